"""The benchmark suite: a tiny run of benchmarks/run.py, the MCMC reference against an exact posterior, the
exponent fit of the scaling study, the ablation transforms and a tiny run of benchmarks/inflation.py."""

import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import sbida

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablations  # noqa: E402
import inflation  # noqa: E402
import linear_gaussian  # noqa: E402
import reference  # noqa: E402
import run as bench  # noqa: E402
import scaling  # noqa: E402


# -- run.py ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_on_linear_gaussian(tmp_path):
    rec = bench.run_benchmark("linear-gaussian", tmp_path, "smoke", estimators=["npe"], baselines=["oi", "fourdvar"],
                              task_overrides={"simulator": {"K": 8}}, progress=False, echo=False)
    rows = {r["method"]: r for r in rec["rows"]}
    assert set(rows) == {"npe", "npe-power", "oi", "fourdvar"}  # NPE with its power fitted: a row of its own
    assert rec["reference"].startswith("exact")
    for r in rows.values():
        assert math.isfinite(r["rmse"]) and r["rmse"] > 0 and math.isfinite(r["nrmse"]) and r["nrmse"] > 0
        assert 0 <= r["coverage_ece"] <= r["coverage_max_gap"] <= 1 and 0 <= r["distance_ece"] <= 1
        assert r["c2st_auc"] is not None and 0 <= r["c2st_auc"] <= 1  # against the exact posterior
        assert r["seconds_1000_samples_1_window"] > 0 and r["seconds_per_window"] > 0
        assert r["seconds_1000_windows"] == pytest.approx(1000 * r["seconds_per_window"])
        assert r["speedup_vs_4dvar"] == pytest.approx(rows["fourdvar"]["seconds_per_window"] / r["seconds_per_window"])
        assert r["rmse_ratio_vs_4dvar"] == pytest.approx(r["rmse"] / rows["fourdvar"]["rmse"])
    assert rows["npe"]["training_seconds"] > 0 and rows["npe"]["type"] == "estimator"
    assert rows["fourdvar"]["speedup_vs_4dvar"] == pytest.approx(1.0)
    # the same figures as metrics.json (the shared evaluation), the report and the JSON record written
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["methods"]["oi"]["rmse"] == rows["oi"]["rmse"]
    assert (tmp_path / "report.html").stat().st_size > 0
    assert json.loads((tmp_path / "benchmark.json").read_text())["rows"] == rec["rows"]
    table = bench.format_table(rec["rows"])
    assert rows["npe-power"]["training_seconds"] > rows["npe"]["training_seconds"]  # the power's fit added
    assert len(table.splitlines()) == 5 and all(h in table for h in ("noise", "C2ST", "x4DVar", "ECE-d"))
    # the point-estimate table: NPE's flow centre and 4D-Var's analysis alone, the mean of its Gaussian posterior (the
    # main table's RMSE is that of the mean of 32 samples of it: within a few per cent)
    points = {r["method"]: r for r in rec["point_rows"]}
    assert set(points) == {"npe", "fourdvar"}
    assert math.isfinite(points["npe"]["rmse"]) and points["npe"]["rmse"] > 0
    assert points["npe"]["rmse_ratio_vs_4dvar"] == pytest.approx(points["npe"]["rmse"] / points["fourdvar"]["rmse"])
    point = points["fourdvar"]
    assert point["method"] == "fourdvar" and point["rmse"] == pytest.approx(rows["fourdvar"]["rmse"], rel=0.05)
    assert point["speedup_vs_4dvar_analysis"] == pytest.approx(1.0) and point["rmse_ratio_vs_4dvar"] == 1.0
    assert point["speedup_vs_4dvar"] == pytest.approx(rows["fourdvar"]["seconds_per_window"]
                                                      / point["seconds_per_window"])
    assert "x4DVar-an" in bench.format_point_table(rec["point_rows"])


def test_point_estimates_score_the_estimate_of_the_point_mode():
    """A method whose point estimate is 0: its RMSE is the root mean square of the true states; a method without a
    point mode is left out."""
    task = sbida.tasks.get("lorenz96", K=8)
    data = task.simulate(progress=False, n_trajectories=2, n_states=20)

    class Zero:
        def posterior(self, y, mask, t, uncertainty="laplace"):
            assert uncertainty == "none"
            return sbida.posterior.PointPosterior(torch.zeros(len(y), 8))

    idx = torch.arange(0, len(data), 3)
    out = bench.point_estimates({"zero": Zero(), "oi": sbida.baselines.OI.from_task(task)}, data, idx, batch_size=4)
    assert list(out) == ["zero"] and out["zero"]["seconds_per_window"] > 0
    assert out["zero"]["rmse"] == pytest.approx(float(data.get(idx)[0].double().pow(2).mean().sqrt()))


def test_point_mode_is_found_on_the_methods_that_have_one():
    task = sbida.tasks.get("lorenz96", K=8)
    est = sbida.estimators
    assert bench.has_point_mode(est.CODA(task)) and bench.has_point_mode(sbida.baselines.FourDVar.from_task(task))
    assert bench.has_point_mode(est.NPE(task))  # the flow's centre
    assert not bench.has_point_mode(est.NRE(task)) and not bench.has_point_mode(sbida.baselines.OI.from_task(task))


def test_inapplicable_methods_are_skipped_with_the_class_reason():
    cfg, skipped = bench.benchmark_config("kolmogorov", "smoke", estimators=["npe", "coda"],
                                          baselines=["oi", "enks"])
    assert list(cfg.estimators) == ["npe"] and list(cfg.baselines) == ["oi"]  # OI never runs the dynamics
    assert set(skipped) == {"coda", "enks"} and "state" in skipped["enks"]
    with pytest.raises(ValueError, match="mode"):
        bench.benchmark_config("lorenz96", "fast")


def test_budgets_come_from_the_estimator_configs():
    from sbida.runs import _estimator_settings

    full, _ = bench.benchmark_config("lorenz96", "full", estimators=["npe"], baselines=[])
    quick, _ = bench.benchmark_config("lorenz96", "quick", estimators=["npe"], baselines=[])
    cfg_file = sbida.config.load_yaml(sbida.runs.CONFIG_DIR / "estimators" / "npe.yaml")
    _, hp, fit = _estimator_settings(full, "npe")
    assert fit["epochs"] == cfg_file["fit"]["epochs"] and hp["transforms"] == cfg_file["estimator"]["transforms"]
    _, hp_q, fit_q = _estimator_settings(quick, "npe")
    assert hp_q == hp and fit_q["epochs"] == bench.FIT_QUICK["epochs"] and fit_q["lr"] == cfg_file["fit"]["lr"]
    # --quick leaves ComposedScore out unless it is named, and says why
    default_quick, skipped = bench.benchmark_config("lorenz96", "quick", baselines=[])
    assert "composed" not in default_quick.estimators and "composed" in skipped and "npe" in default_quick.estimators
    named, skipped = bench.benchmark_config("lorenz96", "quick", estimators=["composed"], baselines=[])
    assert "composed" in named.estimators and "composed" not in skipped


# -- reference.py ------------------------------------------------------------------------------------------------------
def test_mala_samples_a_correlated_gaussian():
    torch.manual_seed(0)
    C = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64) * torch.tensor([[4.0], [0.25]]).sqrt() \
        * torch.tensor([[4.0, 0.25]]).sqrt()
    P = torch.linalg.inv(C)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def log_prob(v):
        d = v - mu
        return -0.5 * torch.einsum("cbi,ij,cbj->cb", d, P, d)

    v0 = 3 * torch.randn(8, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws, acc = reference.mala(log_prob, v0, steps=1500, warmup=400, generator=torch.Generator().manual_seed(2))
    s = draws.reshape(-1, 2, 2)
    assert ((acc > 0.35) & (acc < 0.85)).all()
    for b in range(2):
        emp = torch.cov(s[:, b].T)
        assert torch.allclose(s[:, b].mean(0), mu, atol=0.15)
        assert torch.allclose(emp, C, rtol=0.15, atol=0.03)
    conv = reference.convergence(draws)
    assert conv["rhat"] < 1.05 and conv["ess"] > 300


def test_convergence_flags_chains_that_disagree():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(200, 4, 1, 3, generator=g, dtype=torch.float64)
    draws[:, :2] += 5.0  # two chains in another mode
    assert reference.convergence(draws)["rhat"] > 1.5


@pytest.mark.slow
def test_mcmc_reference_matches_the_exact_linear_gaussian_posterior(tmp_path):
    task = sbida.tasks.get("linear-gaussian", K=8, n_trajectories=6, n_states=16)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.tensor([0, 4, 13]))
    ref = reference.MCMCReference.for_task(task, chains=8, steps=800, warmup=300, thin=2, cache=tmp_path)
    assert ref.prior is not None  # the exact Gaussian prior of the linear task
    post = ref.posterior(y, m, t)
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, data.window.offsets(), data.meta["every"])
    s = post.members.double()
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    n_eff = min(d["ess"] for d in ref.diagnostics)
    assert all(d["rhat"] < 1.05 for d in ref.diagnostics)
    assert ((s.mean(0) - mean).abs() / sd).max() < 5 / math.sqrt(n_eff) + 0.02
    assert ((s.std(0) / sd) - 1).abs().max() < 0.12
    # a different posterior (the prior alone) would be far: the test can fail
    assert ((mean - 0).abs() / sd).max() > 1
    # cached: a second call reads the same samples from disk without sampling
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 3
    again = reference.MCMCReference.for_task(task, chains=8, steps=800, warmup=300, thin=2, cache=tmp_path)
    again.sample_windows = None  # would fail if called
    assert torch.equal(again.posterior(y, m, t).members, post.members.float())
    again.posterior(y[:1], m[:1], t[:1])
    assert [d["rhat"] for d in again.diagnostics] == [d["rhat"] for d in ref.diagnostics]  # one entry per window


def test_reference_rejects_bad_windows():
    task = sbida.tasks.get("linear-gaussian", K=8)
    ref = reference.MCMCReference.for_task(task, chains=2, steps=4, warmup=10, thin=1)
    y = torch.zeros(2, 10, 8)
    with pytest.raises(ValueError, match="empty mask"):
        ref.posterior(y, torch.zeros_like(y, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="y must be"):
        ref.posterior(y[:, :3], torch.ones(2, 3, 8, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="chains"):
        reference.MCMCReference.for_task(task, chains=1)


# -- scaling.py --------------------------------------------------------------------------------------------------------
def test_fit_exponent_recovers_a_power_law():
    D = torch.tensor([8, 16, 32, 64, 128, 256.0])
    noise = torch.exp(0.05 * torch.randn(6, generator=torch.Generator().manual_seed(0)))
    a, c = scaling.fit_exponent(D, 3e-4 * D**1.5 * noise)
    assert a == pytest.approx(1.5, abs=0.06) and c == pytest.approx(3e-4, rel=0.3)
    assert scaling.fit_exponent([10, 100], [2.0, 2.0])[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_exponent([8, 16], [1.0, float("nan")])
    with pytest.raises(ValueError, match="distinct"):
        scaling.fit_exponent([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many"):
        scaling.fit_exponent([8, 16, 32], [1.0, 2.0])


def test_summary_reports_where_an_estimator_stopped():
    rows = [{"task": "lorenz96", "size": k, "D": k, "estimator": "npe", "step_seconds": 0.01 * k, "sample_seconds": 1,
             "peak_mb": 100 + k, "extra_mb": k, "nrmse": 0.5, "ece": 0.1} for k in (8, 16, 32)]
    rows.append({"task": "lorenz96", "size": 64, "estimator": "npe", "error": "timeout after 10 s"})
    text, exps = scaling.summarize(rows)
    assert exps["npe"]["step_seconds"] == pytest.approx(1.0) and exps["npe"]["extra_mb"] == pytest.approx(1.0)
    assert "stopped at lorenz96 size 64 (timeout" in text



def test_scaling_plots_a_kolmogorov_only_study_and_refuses_an_empty_one(tmp_path, capsys):
    rows = [{"task": "kolmogorov", "size": 32, "D": 2048, "estimator": "score", "step_seconds": 2.0,
             "sample_seconds": 30.0, "peak_mb": 900, "extra_mb": 600, "nrmse": 1.0, "ece": 0.1}]
    assert scaling.plot(rows, tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        scaling.main(["--smoke", "--no-lorenz96", "--out", str(tmp_path)])
    assert "leave nothing to run" in capsys.readouterr().err  # that refusal, not another argparse error

# -- ablations.py ------------------------------------------------------------------------------------------------------
def test_ablation_transforms_remove_time_and_mask():
    task = sbida.tasks.get("lorenz96-sparse", K=8, n_trajectories=2, n_states=64)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.arange(5))
    x0, y0, m0, t0 = ablations.without_time(data).get(torch.arange(5))
    assert torch.equal(x0, x) and torch.equal(y0, y) and torch.equal(m0, m) and (t0 == 0).all() and (t > 0).all()
    x1, y1, m1, t1 = ablations.without_mask(data).get(torch.arange(5))
    assert m1.all() and (~m).any() and torch.equal(t1, t)
    assert torch.equal(y1[m], y[m]) and (y1[~m] == 0).all()
    early = ablations.transient_windows(data, 1.0, 50)
    t_all = data.get(torch.arange(len(data)))[3]
    assert len(early) == min(50, int((t_all <= 1.0).sum())) and (t_all[early] <= 1.0).all()
    assert torch.equal(early, early.unique())  # sorted, no repeats
    with pytest.raises(ValueError, match="no window"):
        ablations.transient_windows(data, -1.0, 5)


def test_ablations_run_scores_every_estimator_on_the_requested_test_windows(capsys):
    out = ablations.run("smoke", ["npe"], ["budget"], K=8, windows=3, samples=8)
    rows = out["budget"]
    assert [r["setting"] for r in rows] == [f"{b:g} windows" for b in ablations.BUDGETS["smoke"]["budgets"]]
    assert all(r["estimator"] == "npe" and r["test_windows"] == 3 for r in rows)
    assert all(math.isfinite(r["nrmse"]) and 0 <= r["ece"] <= 0.5 and 0 <= r["ece_d"] <= 0.5 for r in rows)
    assert rows[0]["train_windows"] < rows[1]["train_windows"]
    printed = capsys.readouterr().out
    assert "simulation budget (lorenz96)" in printed and "ECE-d" in printed
    # rows saved before ECE-d existed print "-" there
    old = {k: v for k, v in rows[0].items() if k != "ece_d"}
    assert ablations._table("t", [old]).splitlines()[-1].split()[-2] == "-"
    with pytest.raises(ValueError, match="samples must be a positive"):
        ablations.run("smoke", ["npe"], ["budget"], K=8, samples=0)


def test_coda_mask_ablation_keeps_the_data_mask_and_hides_it_from_the_network(monkeypatch):
    """CODA's loss reads the mask: its "mask of ones" row trains on the real mask with ``mask_input=False``; the
    other estimators get the data with a mask of ones."""
    seen = []

    def fake(task, est, train, val, test, fit, **kw):
        seen.append((est, bool(train.mask.all()), kw["hparams"].get(est, {}).get("mask_input", True)))
        return {"rmse": 1.0, "nrmse": 1.0, "crps": 1.0, "spread_skill": 1.0, "ece": 0.1, "ece_d": 0.1,
                "train_windows": len(train), "test_windows": 3, "seconds": 1.0}

    monkeypatch.setattr(ablations, "train_and_score", fake)
    ablations.run("smoke", ["npe", "coda"], ["mask"], K=8, windows=3, samples=8)
    # (estimator, training mask all ones, mask_input) of the rows with and without the mask
    assert seen == [("npe", False, True), ("npe", True, True), ("coda", False, True), ("coda", False, False)], seen


def test_ablations_subsets_of_lengths_and_budgets_score_the_same_rows(capsys):
    """A subset of the budgets (one process's share of a long run) trains on the same windows and scores on the same
    test windows as the whole run: its row is the whole run's row, to the last digit."""
    whole = ablations.run("smoke", ["npe"], ["budget"], K=8, windows=3, samples=8)["budget"]
    part = ablations.run("smoke", ["npe"], ["window", "budget"], K=8, windows=3, samples=8, lengths=[3],
                         budgets=[ablations.BUDGETS["smoke"]["budgets"][0]])
    assert [r["setting"] for r in part["window"]] == ["window 3"]
    assert len(part["budget"]) == 1
    assert {k: v for k, v in part["budget"][0].items() if k != "seconds"} == \
        {k: v for k, v in whole[0].items() if k != "seconds"}
    for bad in ({"lengths": []}, {"budgets": [0]}):
        with pytest.raises(ValueError, match="must be positive"):
            ablations.run("smoke", ["npe"], ["window"], K=8, **bad)
    assert [r["setting"] for r in ablations.run("smoke", ["npe"], ["time"], K=8, windows=3, samples=8,
                                                  variants=("without",))["time"]] == ["t set to 0"]
    with pytest.raises(ValueError, match="variants"):
        ablations.run("smoke", ["npe"], ["time"], K=8, variants=("off",))


def test_ablations_resume_from_their_folder(tmp_path, monkeypatch):
    """With a folder, finished rows are not trained again, datasets are cached, a fit's training state is resumed
    (here a finished one: the same weights, so the same scores), and a folder of other settings is refused."""
    first = ablations.run("smoke", ["npe"], ["window"], K=8, windows=3, samples=8, out_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"lorenz96-length{n}.h5" for n in (1, 10, 25, 5)]
    assert not list((tmp_path / "checkpoints").iterdir())  # deleted once their rows are recorded
    models = sorted(p.name for p in (tmp_path / "models").iterdir())  # the trained estimators are kept
    assert len(models) == 4 and all(m.endswith("-npe.pt") for m in models)
    assert sbida.estimators.load(tmp_path / "models" / models[0]).fitted
    calls = []
    monkeypatch.setattr(ablations, "train_and_score", lambda *a, **k: calls.append(1))
    again = ablations.run("smoke", ["npe"], ["window"], K=8, windows=3, samples=8, out_dir=tmp_path)
    assert again == first and not calls
    with pytest.raises(ValueError, match="use another folder"):
        ablations.run("smoke", ["npe"], ["window"], K=8, windows=4, samples=8, out_dir=tmp_path)
    monkeypatch.undo()
    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=12, n_states=48)
    tr, va, te = sbida.data.WindowDataset.load(tmp_path / "data" / "lorenz96-length10.h5").split(0.8, 0.1, 0.1)
    fit = {**ablations.BUDGETS["smoke"]["fit"], "epochs": 2, "patience": 1000}
    ck = tmp_path / "state.fit.pt"
    a = ablations.train_and_score(task, "npe", tr, va, te, fit, 3, 8, checkpoint=ck)
    resumed = []
    real_fit = sbida.estimators.Estimator.fit

    @functools.wraps(real_fit)
    def spy(self, *args, **kwargs):
        resumed.append(kwargs["resume"])
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(sbida.estimators.Estimator, "fit", spy)
    b = ablations.train_and_score(task, "npe", tr, va, te, fit, 3, 8, checkpoint=ck)  # resumed after its 2 epochs
    assert resumed == [True] and {k: a[k] for k in a if k != "seconds"} == {k: b[k] for k in b if k != "seconds"}
    c = ablations.train_and_score(task, "npe", tr, va, te, {**fit, "lr": 1e-2}, 3, 8, checkpoint=ck)
    assert resumed == [True, False] and c["nrmse"] != a["nrmse"]  # other settings: trained from the start


def test_run_py_takes_task_overrides_before_or_after_the_options():
    for argv in (["lorenz96", "simulator.K=8", "--quick"], ["lorenz96", "--quick", "simulator.K=8", "--threads", "1"]):
        a = bench.parser().parse_intermixed_args(argv)
        assert (a.task, a.overrides, a.quick) == ("lorenz96", ["simulator.K=8"], True)


def test_run_py_sets_estimator_settings_and_rejects_bad_ones():
    a = bench.parser().parse_intermixed_args(["lorenz96", "simulator.K=8", "--set", "nre.loss=bnre", "nre.fit.lr=1e-3",
                                              "nre.ratio_depth=2"])
    settings = bench.parse_settings(a.settings)
    assert a.overrides == ["simulator.K=8"]
    assert settings == {"nre": {"estimator": {"loss": "bnre", "ratio_depth": 2}, "fit": {"lr": 1e-3}}}
    cfg, _ = bench.benchmark_config("lorenz96", "quick", estimators=["nre"], baselines=[], settings=settings)
    _, hp, fit = sbida.runs._estimator_settings(cfg, "nre")
    assert (hp["loss"], hp["ratio_depth"], fit["lr"], fit["epochs"]) == ("bnre", 2, 1e-3, bench.FIT_QUICK["epochs"])
    for bad in (["nre.loss"], ["nre.fit.x.y=1"], ["nre=1"], ["nre.est.lr=1"]):
        with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
            bench.parse_settings(bad)
    with pytest.raises(ValueError, match="does not train"):
        bench.benchmark_config("lorenz96", "quick", estimators=["npe"], baselines=[], settings=settings)
    with pytest.raises(ValueError, match="unknown key 'estimators.nre.estimator.lossy'"):
        bench.benchmark_config("lorenz96", "quick", estimators=["nre"], baselines=[],
                               settings={"nre": {"estimator": {"lossy": 1}}})


class _Gaussian:
    """A stand-in estimator whose posterior is a given Gaussian (float32) for every window."""

    def __init__(self, mean, cov):
        self.mean, self.cov = mean.float(), cov.float()

    def posterior(self, y, m, t):
        dist = torch.distributions.MultivariateNormal(self.mean, self.cov)
        return sbida.posterior.DistributionPosterior(dist, (self.mean.shape[-1],))


def test_linear_gaussian_measure_passes_the_exact_posterior_and_fails_a_shifted_one():
    """The accuracy figures of benchmarks/linear_gaussian.py: the exact posterior meets every target (RMSE ratio near
    1, ECE and AUC small); the same posterior shifted by one standard deviation of each variable fails them."""
    task = sbida.tasks.get("linear-gaussian")
    x, y, m, t, mean, cov = linear_gaussian.independent_windows(task, 200, seed=3)
    exact = linear_gaussian.measure(_Gaussian(mean, cov), x, y, m, t, mean, cov, n_samples=300, n_c2st=4)
    assert abs(exact["rmse_ratio"] - 1) < 0.03 and exact["ece"] < 0.05 and exact["auc"] < 0.6, exact
    assert abs(exact["variance_ratio"] - 1) < 0.05, exact
    sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    shifted = linear_gaussian.measure(_Gaussian(mean + sd, cov), x, y, m, t, mean, cov, n_samples=300, n_c2st=4)
    assert shifted["rmse_ratio"] > 1.15 and shifted["ece"] > 0.05 and shifted["auc"] > 0.65, shifted
    # the exact posterior's ECE on the windows (the noise floor) depends on the windows, not on the estimator
    assert exact["ece_exact"] < 0.05 and shifted["ece_exact"] == exact["ece_exact"], (exact, shifted)


# -- inflation.py ------------------------------------------------------------------------------------------------------
def test_inflation_script_scores_every_row(tmp_path, monkeypatch, capsys):
    """A tiny run (K=8, seconds of training): every row is scored on the same test windows, the Gaussian rows with
    the Gaussian base, the next two with the fitted tails, the next two with the fitted scales of the base (and their
    own tails), the last two with the scales and the spread per wavenumber (and their own tails); the JSON holds the
    fits."""
    out = tmp_path / "infl.json"
    monkeypatch.setattr(sys, "argv", ["inflation.py", "--K", "8", "--trajectories", "20", "--minutes", "0.02",
                                      "--windows", "16", "--samples", "8", "--fit-windows", "16", "--factors", "1.1",
                                      "--data", str(tmp_path / "l96.h5"), "--json", str(out)])
    inflation.main()
    d = json.loads(out.read_text())
    rows = [r["row"] for r in d["rows"]]
    assert rows[:4] == ["1", "coverage fit", "nll fit", "given"] and rows[4].startswith("tails nu=")
    assert [r["tails"] for r in d["rows"]] == [None] * 4 + [d["tails"]["tails"]] * 2 + [
        None, d["scaled_tails"]["tails"], None, d["spectral_tails"]["tails"]] and d["tails"]["tails"] >= 3
    assert [r["scaled"] for r in d["rows"]] == [False] * 6 + [True] * 4 and rows[6] == "scales"
    assert [r["spectral"] for r in d["rows"]] == [False] * 8 + [True] * 2 and rows[8] == "scales + spectrum"
    assert len(d["spectral_fit"]["gains"]) == 5 and d["spectral_fit"]["windows"] == 16
    assert d["scales"]["scale_min"] <= d["scales"]["scale_median"] <= d["scales"]["scale_max"]
    assert d["rows"][3]["inflation"] == 1.1 and d["rows"][1]["inflation"] == d["fits"]["coverage"]["inflation"]
    assert all(len(r["coverage"]) == 19 for r in d["rows"]) and d["windows"] == 16 and len(d["spectrum"]) == 5
    assert "spread/skill per wavenumber" in capsys.readouterr().out


@pytest.mark.slow
def test_composed_score_has_a_row_of_its_closed_form(tmp_path):
    """A ComposedScore trained in composed mode gives two rows from one training: its diffusion sampler and its
    calibrated Gaussian heads composed in closed form (with a log-density: highest-density coverage)."""
    rec = bench.run_benchmark("linear-gaussian", tmp_path, "smoke", estimators=["composed"], baselines=["oi"],
                              task_overrides={"simulator": {"K": 8}}, progress=False, echo=False)
    rows = {r["method"]: r for r in rec["rows"]}
    assert set(rows) == {"composed", "composed-gaussian", "oi"}
    assert rows["composed-gaussian"]["type"] == "estimator"
    assert rows["composed-gaussian"]["training_seconds"] == rows["composed"]["training_seconds"] > 0
    assert math.isfinite(rows["composed-gaussian"]["rmse"]) and rows["composed-gaussian"]["c2st_auc"] is not None
    training = json.loads((tmp_path / "training.json").read_text())
    assert training["composed"]["calibration"]["gaussian"]["scale"] > 0
    # the sampler is the closed form itself where the residual weight is fitted to 0, else a diffusion (no density)
    weight = training["composed"]["calibration"]["residual_weight"]["weight"]
    assert rows["composed-gaussian"]["coverage_method"] == "hpd"
    assert rows["composed"]["coverage_method"] == ("hpd" if weight == 0 else "distance"), weight
    if weight == 0:
        assert rows["composed"]["rmse"] == rows["composed-gaussian"]["rmse"]
    assert "composed-gaussian" in (tmp_path / "report.html").read_text()
