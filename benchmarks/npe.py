"""NPE on Lorenz-96: posterior samples per second (batched over windows) and training time on a budget.

Sampling: ``B`` windows (default 100) of the ``lorenz96`` task at K=40, ``n`` = 1000 samples each, drawn in one
``posterior(y, mask, t).sample(n)`` call with the default NPE (multiscale grid coupling flow); the rate is ``n * B``
over the best wall time of ``--repeats`` draws (the encoder pass is included). The weights do not change the cost, so
the sampling figure is taken on an untrained model unless ``--epochs`` > 0. Training: ``--epochs`` epochs of
``--steps`` steps of 256 windows with the default architecture, wall time per epoch. Times are wall-clock seconds
on a possibly shared machine: noisy.

    python benchmarks/npe.py [--quick] [--K 40] [--windows 100] [--samples 1000] [--epochs 2] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sbida
from sbida.estimators import NPE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer trajectories, one training epoch of 20 steps")
    p.add_argument("--K", type=int, default=40)
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default: one pass)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=str, default=None)
    a = p.parse_args()
    if a.quick:
        a.trajectories, a.epochs, a.steps, a.repeats = 16, 1, 20, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    task = sbida.tasks.get("lorenz96", K=a.K)
    t0 = time.perf_counter()
    data = task.simulate(progress=False, n_trajectories=a.trajectories)
    t_sim = time.perf_counter() - t0
    train, val = data.split(0.9, 0.1)
    est = NPE(task)
    fit_cfg = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "npe.yaml")["fit"]
    fit_cfg.update(epochs=a.epochs, steps_per_epoch=a.steps, patience=None, progress=True)
    t0 = time.perf_counter()
    hist = est.fit(train, val, **fit_cfg) if a.epochs > 0 else None
    t_train = time.perf_counter() - t0
    if hist is None:
        est.fit_standardization(train)
    _, y, m, t = val.get(torch.arange(min(a.windows, len(val))))
    B = len(y)
    times, cpu = [], []
    with torch.no_grad():
        for r in range(a.repeats):
            g = torch.Generator().manual_seed(r)
            t1, c1 = time.perf_counter(), time.process_time()
            s = est.posterior(y, m, t).sample(a.samples, generator=g)
            times.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)
    rate = a.samples * B / min(times)
    steps = a.steps or max(1, len(train) // fit_cfg["batch_size"])
    res = {"K": a.K, "windows": B, "samples": a.samples, "threads": torch.get_num_threads(),
           "sample_seconds": min(times), "samples_per_second": rate,
           "sample_cpu_seconds": min(cpu), "samples_per_cpu_second": a.samples * B / min(cpu), "shape": list(s.shape),
           "train_windows": len(train), "epochs": a.epochs, "steps_per_epoch": steps, "train_seconds": t_train,
           "seconds_per_epoch": t_train / max(a.epochs, 1), "seconds_per_step": t_train / max(a.epochs * steps, 1),
           "simulate_seconds": t_sim}
    print(f"NPE K={a.K}: {a.samples} samples x {B} windows in {min(times):.3f} s = {rate:.3g} samples/s "
          f"({res['threads']} threads; {res['samples_per_cpu_second']:.3g} samples per CPU-second, the figure that a "
          f"shared machine distorts least)")
    if a.epochs > 0:
        print(f"training: {len(train)} windows, {a.epochs} epochs x {steps} steps of {fit_cfg['batch_size']}: "
              f"{t_train:.1f} s ({res['seconds_per_step']:.3f} s/step, {res['seconds_per_epoch']:.1f} s/epoch)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
