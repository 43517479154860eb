"""Cost of ``sbida.diagnostics.evaluate`` once samples exist, next to sbi's SBC and TARP loops on the same samples.

Set-up: ``N`` windows (default 1000) of a K=40 state, ``n`` = 1000 precomputed samples per window from Gaussian
posteriors with random means and marginal standard deviations, the truths drawn from them. The estimator hands out
its slice of the samples as an ``EnsemblePosterior`` (the window index is written in the observations), so
``evaluate``'s "metrics" time is the cost of the diagnostics alone: RMSE, CRPS (fair), energy score, spread/skill,
SBC ranks and KS tests, coverage (distance statistic and per-variable central intervals), TARP. The ratio column
compares sbi 0.27's ``_run_sbc`` (per-window Python loop, marginal ranks) and ``_run_tarp`` on the same samples.
Times are wall-clock seconds, best of ``--repeats``, on a possibly shared machine.

    python benchmarks/diagnostics.py [--quick] [--windows N] [--samples n] [--K 40] [--threads T] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sbida.data import WindowDataset
from sbida.diagnostics import evaluate, tarp_references
from sbida.posterior import EnsemblePosterior


def make_case(N: int, n: int, K: int, seed: int = 0):
    """Samples ``(n, N, K)``, truths ``(N, K)`` and a one-window-per-trajectory dataset holding the truths."""
    g = torch.Generator().manual_seed(seed)
    mu, sigma = torch.randn(N, K, generator=g), 0.3 + torch.rand(N, K, generator=g)
    truth = mu + sigma * torch.randn(N, K, generator=g)
    samples = mu + sigma * torch.randn(n, N, K, generator=g)
    y = torch.arange(N, dtype=torch.float32).view(N, 1, 1).expand(N, 1, K).clone()  # the window index
    data = WindowDataset(truth.unsqueeze(1), y, torch.ones(N, 1, K, dtype=torch.bool), torch.zeros(1), window=1)
    return samples, truth, data


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 windows, one repeat")
    p.add_argument("--windows", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--K", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=str, default=None)
    a = p.parse_args()
    if a.quick:
        a.windows, a.repeats = 200, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    samples, truth, data = make_case(a.windows, a.samples, a.K)
    posterior_fn = lambda y, m, t: EnsemblePosterior(samples[:, y[:, 0, 0].long()])  # noqa: E731
    evaluate(posterior_fn, data, n_samples=a.samples, batch_size=a.batch_size, progress=False)  # warm-up (imports)
    t_eval, res = best(lambda: evaluate(posterior_fn, data, n_samples=a.samples, batch_size=a.batch_size,
                                        progress=False), a.repeats)
    metrics = res.timings["metrics"]

    from sbi.diagnostics.sbc import _run_sbc
    from sbi.diagnostics.tarp import _run_tarp

    t_sbc, _ = best(lambda: _run_sbc(truth, torch.zeros(a.windows, 1), samples, "marginals", False), 1)
    refs = tarp_references(truth)
    t_tarp, _ = best(lambda: _run_tarp(samples, truth, refs, z_score_theta=True), a.repeats)
    rows = [
        ("evaluate, total (incl. handing out samples)", t_eval, None),
        ("evaluate, metrics only", metrics, None),
        ("sbi _run_sbc (marginal ranks only)", t_sbc, t_sbc / metrics),
        ("sbi _run_tarp (TARP only)", t_tarp, t_tarp / metrics),
    ]
    print(f"# diagnostics: {a.windows} windows x {a.samples} samples, K={a.K}, torch threads "
          f"{torch.get_num_threads()}, best of {a.repeats}")
    print(f"{'what':48s} {'seconds':>9s} {'x metrics':>10s}")
    for name, sec, ratio in rows:
        print(f"{name:48s} {sec:9.2f} {'' if ratio is None else f'{ratio:10.1f}'}")
    print(f"per window: metrics {1e3 * metrics / a.windows:.2f} ms; coverage ECE {res.coverage.ece:.3f}, "
          f"SBC p {res.sbc.p_value:.2f}, spread/skill {res.spread_skill:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"windows": a.windows, "samples": a.samples, "K": a.K, "threads": torch.get_num_threads(),
                       "rows": [{"what": n, "seconds": s} for n, s, _ in rows], "timings": res.timings}, f, indent=1)


if __name__ == "__main__":
    main()
