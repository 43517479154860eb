"""NRE on the linear-Gaussian task against its exact posterior: accuracy, calibration and the ratio's error.

Trains an NRE on ``--trajectories`` simulated trajectories (split 0.9/0.1 for training and validation) and measures
it on ``--windows`` independent test windows (one window of each of as many fresh trajectories, another seed):

- RMSE of the posterior mean over the exact posterior's (1 is the best possible);
- ECE of highest-density regions (ranks of the unnormalized ``log q``) and of per-variable central intervals;
- C2ST ROC-AUC of NRE samples against exact samples on ``--c2st`` windows (0.5 is perfect);
- the ratio's error alone, free of the sampler: the variance over exact posterior samples of
  ``log q(x | y) - log p(x | y)``, which is 0 for a ratio exact up to its constant (nats^2, mean over windows);
- training and sampling wall times (noisy on a shared machine); ``resample_s``: a second draw from the same
  posterior object, which keeps its Laplace fit.

    python benchmarks/nre.py [--quick] [--epochs 20] [--steps 200] [--trajectories 1024] [--windows 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from linear_gaussian import independent_windows
from linear_gaussian import measure as lg_measure

import sbida
from sbida.estimators import NRE


def measure(est: NRE, task, x, y, m, t, mean, cov, n_samples: int = 500, n_c2st: int = 8) -> dict:
    """The figures of ``linear_gaussian.measure``, plus the ratio's error, MALA's acceptance and the time of a second
    draw from the same posterior object (which keeps its Laplace fit)."""
    with torch.no_grad():
        post = est.posterior(y, m, t)
        out = lg_measure(est, x, y, m, t, mean, cov, n_samples=n_samples, n_c2st=n_c2st, post=post)
        t0 = time.perf_counter()
        post.sample(n_samples, generator=torch.Generator().manual_seed(1))
        resample_s = time.perf_counter() - t0
        exact = torch.distributions.MultivariateNormal(mean, cov)
        ref = exact.sample((n_samples,)).float()
        gap = post.log_prob(ref).double() - exact.log_prob(ref.double())  # (n, B)
    return {**out, "ratio_var": float(gap.var(0).mean()), "acceptance": float(post.acceptance.mean()),
            "resample_s": resample_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small budget: 256 trajectories, 4 epochs of 100 steps")
    p.add_argument("--trajectories", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=None, help="default: the configuration file's")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default: one pass)")
    p.add_argument("--windows", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], help="estimator hyperparameters as key=value (YAML values)")
    p.add_argument("--json", type=str, default=None)
    a = p.parse_args()
    if a.quick:
        a.trajectories, a.epochs, a.steps, a.windows = 256, 4, 100, 300
    if a.threads:
        torch.set_num_threads(a.threads)
    import yaml

    task = sbida.tasks.get("linear-gaussian")
    cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "nre.yaml")
    hp = {**cfg["estimator"], **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}}
    fit = dict(cfg["fit"])
    fit.update({k: v for k, v in (("epochs", a.epochs), ("steps_per_epoch", a.steps)) if v is not None})
    train, val = task.simulate(progress=False, n_trajectories=a.trajectories).split(0.9, 0.1)
    est = NRE(task, **hp)
    t0 = time.perf_counter()
    hist = est.fit(train, val, **fit)
    t_train = time.perf_counter() - t0
    out = measure(est, task, *independent_windows(task, a.windows, seed=12345))
    out.update(train_s=t_train, epochs=len(hist["epoch"]), val_loss=hist["val_loss"][-1], hparams=hp, fit=fit)
    print(json.dumps({k: v for k, v in out.items() if k not in ("hparams", "fit")}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
