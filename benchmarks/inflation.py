"""NPE's spread inflation, tails, base scales and spread per wavenumber on Lorenz-96: test calibration at inflation 1,
at the factors fitted on validation windows, with the fitted Student-t base and with the fitted scales.

Trains the default NPE on the ``lorenz96`` task (or ``--task``, e.g. ``lorenz96-sparse``; K=40 unless ``--K``) for
``--minutes`` minutes of wall clock (or loads ``--checkpoint``), fits the inflation on validation windows with both
criteria of :meth:`NPE.fit_inflation` (``coverage``: the joint highest-density ECE; ``nll``: the likelihood of the true
states) and the degrees of freedom of a Student-t base (:meth:`NPE.fit_tails`) and the per-dimension scales of the base
(:meth:`NPE.fit_scale`, then the tails again) and after them the spread per wavenumber (:meth:`NPE.fit_spectrum`, then
the tails again: what ``fit`` does with ``spectrum_fit: true``), then evaluates the test windows (``--windows`` x
``--samples``) with the Gaussian base at factor 1, at each fitted factor and at the ``--factors`` given, with the fitted
tails at factor 1 and at the factor fitted by ``nll`` with them, with the fitted scales (Gaussian base, and with their
tails) and with the scales and the spread per wavenumber (Gaussian base, and with their tails). Each row prints RMSE,
nRMSE, CRPS, spread/skill, the joint ECE (highest density) and its largest gap, the marginal ECE, the joint ECE by the
distance statistic (ECE-d) and the joint coverage at the levels 0.05, 0.25, 0.45, 0.65, 0.85 and 0.95: a curve flatter
than the diagonal (over at low levels, under at high ones) is a spread that is wrong in different directions in
different windows, which no single factor corrects. Last, the spread/skill ratio per wavenumber of the state at factor 1
(:func:`sbida.diagnostics.spread_skill_spectrum`) shows at which scales the spread is wrong.

    python benchmarks/inflation.py [--task lorenz96] [--minutes 10] [--data runs/l96.h5] [--checkpoint PATH]
                                   [--save PATH]
                                   [--windows 1000] [--samples 500] [--factors 1.05 1.1] [--quick] [--json PATH]
                                   [--set npe.KEY=VALUE npe.fit.KEY=VALUE ...]

``--data``: the task's simulated windows are read from that HDF5 file when it exists and written there otherwise (the
split is by trajectory, seed 0, 80/10/10 %, as in ``ablations.py``). ``--quick``: 16 trajectories, 1 minute of
training, 200 test windows x 100 samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import sbida
from sbida.data import WindowDataset
from sbida.diagnostics import evaluate, spread_skill_spectrum
from sbida.estimators import NPE, load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import parse_settings  # noqa: E402

LEVELS = (0, 4, 8, 12, 16, 18)  # indices of 0.05, 0.25, 0.45, 0.65, 0.85, 0.95 among the default levels


def dataset(task, path: str | None, trajectories: int | None) -> WindowDataset:
    """The task's windows, from ``path`` when it exists (else simulated and saved there)."""
    if path is not None and Path(path).exists():
        return WindowDataset.load(path)
    kw = {} if trajectories is None else {"n_trajectories": trajectories}
    data = task.simulate(progress=True, **kw)
    if path is not None:
        data.save(path)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lorenz96", help="a Lorenz-96 task (lorenz96, lorenz96-sparse)")
    p.add_argument("--K", type=int, default=40)
    p.add_argument("--minutes", type=float, default=10.0, help="training time (wall clock)")
    p.add_argument("--data", type=str, default=None, help="HDF5 cache of the simulated windows")
    p.add_argument("--trajectories", type=int, default=None, help="simulated trajectories (default: the task's)")
    p.add_argument("--checkpoint", type=str, default=None, help="a trained NPE to evaluate instead of training one")
    p.add_argument("--save", type=str, default=None, help="save the trained NPE there")
    p.add_argument("--windows", type=int, default=1000, help="test windows")
    p.add_argument("--samples", type=int, default=500, help="posterior samples per test window")
    p.add_argument("--fit-windows", type=int, default=1024, help="validation windows of the fits")
    p.add_argument("--factors", type=float, nargs="*", default=[], help="more factors to evaluate")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--set", nargs="+", default=[], metavar="npe.KEY=VALUE", dest="settings",
                   help="NPE hyperparameters or fit arguments instead of the configuration file's")
    a = p.parse_args()
    settings = parse_settings(a.settings)
    if set(settings) - {"npe"}:
        p.error(f"--set takes npe.KEY=VALUE or npe.fit.KEY=VALUE, got {sorted(settings)}")
    settings = settings.get("npe", {})
    if a.quick:
        a.trajectories, a.minutes, a.windows, a.samples, a.fit_windows = 16, 1.0, 200, 100, 256
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    task = sbida.tasks.get(a.task, K=a.K, seed=0)
    train, val, test = dataset(task, a.data, a.trajectories).split(0.8, 0.1, 0.1, seed=0)
    print(f"{a.task} K={a.K}: {len(train)} training, {len(val)} validation, {len(test)} test windows", flush=True)
    if a.checkpoint:
        est = load(a.checkpoint)
        train_s = float("nan")
    else:
        est = NPE(task, **settings.get("estimator", {}))
        fit = sbida.config.load_yaml(sbida.tasks.CONFIG_DIR / "estimators" / "npe.yaml")["fit"]
        unknown = set(settings.get("fit", {})) - set(fit)
        if unknown:
            p.error(f"unknown fit arguments {sorted(unknown)}; known: {sorted(fit)}")
        fit.update(settings.get("fit", {}))
        fit.update(max_time=60 * a.minutes, seed=0)
        t0 = time.perf_counter()
        est.fit(train, val, **fit, progress=True)
        train_s = time.perf_counter() - t0
        if a.save:
            est.save(a.save)
    est.hparams["tails"] = None  # the Gaussian, unscaled base (fit() fits the scales, spectrum and tails by default)
    est.base_scale.fill_(1.0)
    est.spectrum_scale.fill_(1.0)
    fits = {}
    for criterion in ("coverage", "nll"):
        t0 = time.perf_counter()
        r = est.fit_inflation(val, windows=a.fit_windows, criterion=criterion, seed=0)
        fits[criterion] = r
        print(f"fit by {criterion}: inflation {r['inflation']:.4f}, validation score {min(r['score']):.4g} "
              f"(at 1: {r['score_at_1']:.4g}), {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    est.hparams["inflation"] = 1.0  # the tails of the flow itself (fit_inflation set the last fitted factor)
    tails = est.fit_tails(val, windows=4 * a.fit_windows, seed=0)
    print(f"fit of the tails: nu {tails['tails']:.2f}, validation NLL {tails['nll']:.3f} nats per window (Gaussian "
          f"base {tails['nll_gaussian']:.3f}), {time.perf_counter() - t0:.1f} s", flush=True)
    est.hparams["inflation"] = 1.0
    tails_nll = est.fit_inflation(val, windows=a.fit_windows, criterion="nll", seed=0)["inflation"]
    nu = tails["tails"]
    est.hparams.update(inflation=1.0, tails=None)
    t0 = time.perf_counter()
    scales = est.fit_scale(val, windows=4 * a.fit_windows, seed=0)
    scaled_tails = est.fit_tails(val, windows=4 * a.fit_windows, seed=0)
    fitted_scale = est.base_scale.clone()
    print(f"fit of the base's scales: {scales['scale_min']:.3f} to {scales['scale_max']:.3f} (median "
          f"{scales['scale_median']:.3f}), validation NLL {scales['nll']:.3f} nats per window (unscaled "
          f"{scales['nll_before']:.3f}); with them nu {scaled_tails['tails']:.2f}, NLL {scaled_tails['nll']:.3f}; "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    nu_s = scaled_tails["tails"]
    est.hparams["tails"] = None
    t0 = time.perf_counter()
    spectrum = est.fit_spectrum(val, windows=a.fit_windows, seed=0)
    spectral_tails = est.fit_tails(val, windows=4 * a.fit_windows, seed=0)
    fitted_spectrum = est.spectrum_scale.clone()
    print(f"fit of the spread per wavenumber (after the scales): {spectrum['own']} bins of their own, factors "
          + " ".join(f"{g:.3f}" for g in spectrum["gains"]) + f"; validation NLL {spectrum['nll']:.3f} nats per "
          f"window (before {spectrum['nll_before']:.3f}); with them nu {spectral_tails['tails']:.2f}, NLL "
          f"{spectral_tails['nll']:.3f}; {time.perf_counter() - t0:.1f} s", flush=True)
    nu_w = spectral_tails["tails"]
    # name, inflation, tails, base scales, spectral scales
    rows = [("1", 1.0, None, False, False), ("coverage fit", fits["coverage"]["inflation"], None, False, False),
            ("nll fit", fits["nll"]["inflation"], None, False, False)]
    rows += [("given", float(f), None, False, False) for f in a.factors]
    rows += [(f"tails nu={nu:.1f}", 1.0, nu, False, False), ("tails + nll fit", tails_nll, nu, False, False),
             ("scales", 1.0, None, True, False), (f"scales + nu={nu_s:.1f}", 1.0, nu_s, True, False),
             ("scales + spectrum", 1.0, None, True, True), (f"sc + spec + nu={nu_w:.1f}", 1.0, nu_w, True, True)]
    # a random set of test windows (the first ones would come from a couple of trajectories), as ablations.py
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:a.windows].sort().values
    levels = " ".join(f"{0.05 + 0.05 * i:.2f}" for i in LEVELS)
    print(f"\ntest: {len(idx)} windows x {a.samples} samples; train {train_s:.0f} s")
    print(f"{'inflation':<22}{'RMSE':>7}{'nRMSE':>8}{'CRPS':>7}{'spr/skl':>9}{'ECE':>7}{'maxgap':>8}{'marg':>7}"
          f"{'ECE-d':>7}   joint coverage at {levels}")
    out = []
    for name, s, nu_row, scaled, spectral in rows:
        est.hparams["inflation"], est.hparams["tails"] = s, nu_row
        est.base_scale.copy_(fitted_scale if scaled else torch.ones_like(fitted_scale))
        est.spectrum_scale.copy_(fitted_spectrum if spectral else torch.ones_like(fitted_spectrum))
        res = evaluate(est, test, n_samples=a.samples, indices=idx, progress=False, seed=0)
        cov = res.coverage
        curve = [float(cov.coverage[i]) for i in LEVELS]
        print(f"{name + f' {s:.4f}':<22}{res.rmse:>7.3f}{res.nrmse:>8.4f}{res.crps:>7.3f}{res.spread_skill:>9.3f}"
              f"{cov.ece:>7.4f}{cov.max_gap:>8.3f}{cov.marginal_ece:>7.4f}{cov.distance_ece:>7.4f}   "
              + " ".join(f"{c:.2f}" for c in curve), flush=True)
        out.append({"row": name, "inflation": s, "tails": nu_row, "scaled": scaled, "spectral": spectral,
                    "rmse": res.rmse,
                    "nrmse": res.nrmse, "crps": res.crps, "spread_skill": res.spread_skill, "ece": cov.ece,
                    "max_gap": cov.max_gap, "marginal_ece": cov.marginal_ece, "distance_ece": cov.distance_ece,
                    "coverage": cov.coverage.tolist()})
    est.hparams["inflation"], est.hparams["tails"] = 1.0, None
    est.base_scale.fill_(1.0)
    est.spectrum_scale.fill_(1.0)
    x, y, m, t = test.get(idx)
    with torch.no_grad():
        draws = est.posterior(y, m, t).sample(a.samples, generator=torch.Generator().manual_seed(0))
    k, ratio = spread_skill_spectrum(draws, x)
    print("\nspread/skill per wavenumber at inflation 1: "
          + " ".join(f"{int(w)}:{r:.2f}" for w, r in zip(k.tolist(), ratio.tolist())))
    if a.json:
        Path(a.json).write_text(json.dumps({"K": a.K, "train_seconds": train_s, "windows": len(idx),
                                            "samples": a.samples, "fits": fits, "tails": tails, "scales": scales,
                                            "scaled_tails": scaled_tails, "spectral_fit": spectrum,
                                            "spectral_tails": spectral_tails, "rows": out,
                                            "spectrum": ratio.tolist()}, indent=1))


if __name__ == "__main__":
    main()
