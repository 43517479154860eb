"""Sampling speed of the score estimators at Lorenz-96 K=40 with their default steps (untrained weights: the cost
of sampling does not depend on them): 1000 samples for one window, and 100 samples for each of 100 windows (10
with ``--quick``), each the faster of two runs. Wall time and the process's CPU time are printed: on a shared machine
the CPU time (divided by the threads) is the steadier figure.

One network evaluation per predictor or corrector step (``steps * (1 + corrections) - corrections`` in all); the
composed mode evaluates the network on ``T + 1`` rows per sample (each observation time and the prior), so it costs
about ``T + 1`` times the posterior score's. Timings on a shared machine are noisy: use ``--threads 1`` there."""

from __future__ import annotations

import argparse
import json
import time

import torch

import sbida
from sbida.estimators import ComposedScore, PosteriorScore


def timed(make_post, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``make_post().sample(n)``, the faster of two runs: the first one also pays one-time
    costs (thread pools, the convolutions' kernels for these shapes) that later calls do not."""
    best = (float("inf"), float("inf"))
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        make_post().sample(n, generator=torch.Generator().manual_seed(0))
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--K", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="PosteriorScore and composed mode only, 100 windows x 10")
    p.add_argument("--only", default=None, help="comma-separated subset of score, composed, guided")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    task = sbida.tasks.get("lorenz96", K=a.K, n_trajectories=4, n_states=40)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.arange(len(data))[:100])
    kinds = {"score": lambda: PosteriorScore(task), "composed": lambda: ComposedScore(task),
             "guided": lambda: ComposedScore(task, mode="guided")}
    if a.quick:
        kinds.pop("guided")
    if a.only:
        kinds = {k: kinds[k] for k in a.only.split(",")}
    per = 10 if a.quick else 100
    rows = {}
    for name, make in kinds.items():
        est = make()
        est.fit_standardization(data)
        est.eval()
        one = timed(lambda e=est: e.posterior(y[:1], m[:1], t[:1]), 1000)
        many = timed(lambda e=est: e.posterior(y, m, t), per)
        rows[name] = {"1000 samples, 1 window (s)": one[0], "1000 samples, 1 window (cpu s)": one[1],
                      f"{per} samples x 100 windows (s)": many[0], f"{per} samples x 100 windows (cpu s)": many[1],
                      "threads": a.threads, "steps": est.hparams["steps"], "corrections": est.hparams["corrections"]}
        print(f"{name:9s} K={a.K}: 1000 samples of one window {one[0]:6.2f} s (cpu {one[1]:6.2f} s); {per} samples x "
              f"100 windows {many[0]:6.2f} s (cpu {many[1]:6.2f} s) (steps {est.hparams['steps']}, corrections "
              f"{est.hparams['corrections']}, {a.threads} threads)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
