"""The command line."""

import json
import subprocess
import sys

import pytest

from sbida.cli import main
from sbida.data import WindowDataset


def test_simulate_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "lorenz96", "data.n_trajectories=6", "data.n_states=30", "--out", str(out), "--quiet"])
    assert rc == 0
    data = WindowDataset.load(out / "data.h5")
    assert data.n_trajectories == 6 and data.states.shape[1] == 30
    assert "n_trajectories: 6" in (out / "config.yaml").read_text()
    assert json.loads((out / "data.json").read_text())["windows"] == len(data)
    assert "6 trajectories" in capsys.readouterr().out


def test_bad_key_exits_2_with_the_key(tmp_path, capsys):
    assert main(["simulate", "lorenz96", "simulator.G=1", "--out", str(tmp_path)]) == 2
    assert "simulator.G" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    for cmd in (["--help"], ["simulate", "--help"], ["quickstart", "--help"], ["tasks", "--help"], ["train", "--help"],
                ["evaluate", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "sbida.cli", "tasks"], capture_output=True, text=True)
    assert r.returncode == 0 and "lorenz96" in r.stdout


def test_tasks_lists_the_five_tasks(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("lorenz96 ", "lorenz96-sparse", "lorenz96-two-scale", "kolmogorov", "linear-gaussian"):
        assert name in out


# -- runs: train, evaluate, report ---------------------------------------------------------------------------------
TINY_CODA = "estimators.coda={estimator: {channels: [8, 16], rollout: 2}, fit: {epochs: 1, steps_per_epoch: 3}}"


def _metrics(folder):
    """The evaluation of every method without its timings (which vary from run to run)."""
    d = json.loads((folder / "metrics.json").read_text())
    for m in d["methods"].values():
        m.pop("timings"), m.pop("training_seconds")
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "l96"
    rc = main(["report", "l96-tiny", "--out", str(out), "--quiet", TINY_CODA])
    assert rc == 0
    return out


@pytest.mark.slow
def test_report_runs_every_stage_into_the_run_folder(tiny_run, capsys):
    for name in ("config.yaml", "data.h5", "data.json", "training.json", "metrics.json", "examples.pt", "log.txt",
                 "report.html", "report.json", "checkpoints/npe.pt", "checkpoints/coda.pt"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"npe", "coda", "oi"}
    assert metrics["methods"]["oi"]["type"] == "baseline" and metrics["methods"]["npe"]["type"] == "estimator"
    assert "coda:" in (tiny_run / "config.yaml").read_text()  # the override is in the resolved config
    log = (tiny_run / "log.txt").read_text()
    assert "report written" in log and "npe: Student-t base of" in log  # NPE's tails, fitted after its fit
    assert "npe: scales of the flow's base fitted on" in log  # and its base's scales before them
    training = json.loads((tiny_run / "training.json").read_text())
    assert training["npe"]["calibration"]["tails"]["tails"] >= 3
    assert list(training["npe"]["calibration"]) == ["scale", "tails"]
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        rows, images = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            if tag == "img" and dict(attrs)["src"].startswith("data:image/png;base64,"):
                self.images += 1

        def handle_data(self, data):
            if self.rows and self.lasttag in ("td", "th"):
                self.rows[-1].append(data.strip())

    p = Rows()
    p.feed((tiny_run / "report.html").read_text())
    names = [r[0] for r in p.rows if r]
    assert {"npe", "coda", "oi"} <= set(names)
    assert p.images == 4 + 3  # coverage, SBC, TARP, spread/skill by scale, one example window per method


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_others(tiny_run, tmp_path, capsys):
    assert main(["evaluate", str(tiny_run / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert _metrics(tmp_path / "again") == _metrics(tiny_run)
    out = capsys.readouterr().out.splitlines()  # the headline table, with the ECE that noise alone would give
    at = next(i for i, line in enumerate(out) if line.startswith("method") and "ECE of noise" in line)
    assert {line.split()[0] for line in out[at + 1:at + 4]} == {"npe", "coda", "oi"}
    assert main(["evaluate", "l96-tiny", "seed=1", "--out", str(tmp_path / "other"), "--quiet"]) == 0
    other = _metrics(tmp_path / "other")
    assert other["seed"] == 1
    assert other["methods"]["npe"]["rmse"] != _metrics(tiny_run)["methods"]["npe"]["rmse"]


def test_run_config_errors_name_the_key(tmp_path, capsys):
    for override, key in (("estimators.npe.fit.epoch=1", "estimators.npe.fit.epoch"),
                          ("estimators.npe.estimator.channels=1.5", "estimators.npe.estimator.channels"),
                          ("seed=abc", "seed"), ("evaluation.samples=3", "evaluation.samples"),
                          ("task_overrides.simulator.G=1", "simulator.G"), ("baselines.nope={}", "nope"),
                          ("estimators.nope={}", "nope")):
        assert main(["train", "l96-tiny", override, "--out", str(tmp_path)]) == 2, override
        assert key in capsys.readouterr().err, override
    assert not (tmp_path / "checkpoints").exists()


def test_simulate_a_run_config(tmp_path, capsys):
    args = ["simulate", "l96-tiny", "--out", str(tmp_path), "--quiet", "task_overrides.data.n_trajectories=5"]
    assert main(args) == 0
    data = WindowDataset.load(tmp_path / "data.h5")
    assert data.n_trajectories == 5 and data.state_shape == (8,)
    assert "run folder" in capsys.readouterr().out


def test_quickstart_config_names_the_five_methods():
    from sbida.runs import load_config

    cfg = load_config("quickstart")
    assert cfg.task == "lorenz96" and cfg.task_overrides.get("simulator", {}).get("K", 40) == 40
    assert set(cfg.estimators) == {"npe", "score", "coda"} and set(cfg.baselines) == {"enks", "fourdvar"}
    for spec in cfg.estimators.values():  # fixed budgets: the same seed gives the same metrics
        assert spec.fit.get("epochs") and spec.fit.get("max_time", 0) >= 120


QUICK_TINY = ["task_overrides.simulator.K=8", "task_overrides.data.n_trajectories=12",
              "task_overrides.data.n_states=40", "evaluation.n_samples=32", "evaluation.max_windows=24",
              "evaluation.example_samples=32", "baselines.enks.options.members=10",
              "baselines.fourdvar.options.max_iter=5",
              "estimators.npe={estimator: {channels: 8, depth: 1, features: 16, hidden: [16], transforms: 2}, "
              "fit: {epochs: 1, steps_per_epoch: 3, batch_size: 32}}",
              "estimators.score={kind: posterior_score, estimator: {channels: 8, depth: 1, features: 16, "
              "unet_channels: [8, 16], steps: 4, corrections: 0}, "
              "fit: {epochs: 1, steps_per_epoch: 3, batch_size: 32}}",
              "estimators.coda={estimator: {channels: [8, 16], rollout: 2}, fit: {epochs: 1, steps_per_epoch: 3}}"]


@pytest.mark.slow
def test_quickstart_prints_the_report_and_its_table(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--quiet", *QUICK_TINY]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").is_file()
    table = text[text.index("method"):].splitlines()
    assert [row.split()[0] for row in table[1:6]] == ["npe", "score", "coda", "enks", "fourdvar"]
    assert json.loads((out / "metrics.json").read_text())["task"] == "lorenz96"


def test_an_interrupted_training_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    import functools

    import torch

    from sbida.estimators import NPE
    from sbida.runs import Run

    over = ["estimators.npe.fit.epochs=3", "baselines={}"]
    whole = Run("l96-tiny", over, out=tmp_path / "whole", progress=False, echo=False)
    whole.train()
    fit = NPE.fit

    @functools.wraps(fit)  # the run reads the fit's signature
    def stopped_after_the_first_epoch(self, *args, **kwargs):
        def interrupt(epoch, history):
            raise KeyboardInterrupt

        return fit(self, *args, callback=interrupt, **kwargs)

    part = Run("l96-tiny", over, out=tmp_path / "part", progress=False, echo=False)
    monkeypatch.setattr(NPE, "fit", stopped_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    assert (tmp_path / "part/checkpoints/npe.fit.pt").exists() and not (tmp_path / "part/checkpoints/npe.pt").exists()
    epochs_run = []

    @functools.wraps(fit)
    def counted(self, *args, **kwargs):
        return fit(self, *args, callback=lambda epoch, history: epochs_run.append(epoch), **kwargs)

    monkeypatch.setattr(NPE, "fit", counted)
    record = part.train()
    monkeypatch.undo()
    assert epochs_run == [1, 2]  # only the epochs that were left
    assert "resuming its interrupted training" in (tmp_path / "part/log.txt").read_text()
    assert record["npe"]["history"]["epoch"] == [0, 1, 2]
    a = torch.load(tmp_path / "whole/checkpoints/npe.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "part/checkpoints/npe.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other settings: the stale training state is not resumed
    (tmp_path / "part/checkpoints/npe.pt").unlink()
    other = Run("l96-tiny", ["estimators.npe.fit.epochs=2", "baselines={}"], out=tmp_path / "part", progress=False,
                echo=False)
    assert other.train()["npe"]["history"]["epoch"] == [0, 1]
    assert "settings changed, training from the start" in (tmp_path / "part/log.txt").read_text()


def test_a_change_of_sampler_settings_resumes_the_training_and_a_change_of_network_does_not(tmp_path):
    """The settings recorded beside a training state, compared without the estimator's ``sampler_hparams``."""
    from sbida.runs import EstimatorSpec, Run, _estimator_settings

    run = Run("l96-tiny", ["baselines={}"], out=tmp_path, progress=False, echo=False)
    run.config.estimators = {"nre": EstimatorSpec(kind="nre", estimator={"channels": 8}, fit={"epochs": 1})}
    cls, hp, fit = _estimator_settings(run.config, "nre")
    state = tmp_path / "checkpoints" / "nre.fit.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"")
    state.with_suffix(".json").write_text(json.dumps({"estimator": cls(run.task, **hp).config(), "fit": fit},
                                                     default=str))
    assert "smc_moves" in cls.sampler_hparams and "channels" not in cls.sampler_hparams
    assert run._resumable(state, cls(run.task, **{**hp, "smc_moves": 7, "proposal": "reference"}), fit)
    assert not run._resumable(state, cls(run.task, **{**hp, "channels": 16}), fit)
    assert not run._resumable(state, cls(run.task, **hp), {**fit, "epochs": 2})


def test_a_run_folder_reused_with_other_settings_says_so_and_trains_again(tmp_path):
    """Data simulated for another task configuration are flagged in the log; a trained estimator whose settings have
    changed is trained again, one whose settings are the same is kept."""
    from sbida.runs import Run

    run = Run("l96-tiny", ["baselines={}"], out=tmp_path, progress=False, echo=False)
    first = run.train()
    log = (tmp_path / "log.txt").read_text()
    assert "warning" not in log and first["npe"]["requested"]["fit"]["epochs"] == 1
    same = Run("l96-tiny", ["baselines={}"], out=tmp_path, progress=False, echo=False)
    assert same.train()["npe"]["seconds"] == first["npe"]["seconds"]  # kept, not trained again
    other = Run("l96-tiny", ["baselines={}", "task_overrides.simulator.F=9.0", "estimators.npe.fit.epochs=2"],
                out=tmp_path, progress=False, echo=False)
    again = other.train()
    log = (tmp_path / "log.txt").read_text()
    assert "simulated with another task configuration (simulator.F differ" in log
    assert "settings changed since" in log and again["npe"]["epochs"] == 2


def test_calibration_lines_name_every_kind_of_fit():
    """The run log's line for each calibration fit made at the end of a fit."""
    from sbida.runs import _calibration_lines

    lines = _calibration_lines({
        "gaussian": {"scale": 1.0765, "power": 1.0952, "tails": 43.4, "nll": 72.29, "nll_gaussian": 72.67,
                     "windows": 4096},
        "tails": {"tails": 39.6, "nll": 58.96, "nll_gaussian": 59.21, "windows": 4096},
        "scale": {"scale_min": 1.033, "scale_median": 1.033, "scale_max": 1.712, "own": 10, "nll": 4.773,
                  "nll_before": 5.804, "windows": 4096, "trajectories": 51},
        "temperature": {"temperature": 0.6, "criterion": "coverage", "score": [0.05, 0.02], "score_at_1": 0.1,
                        "windows": 128},
        "spectrum": {"gains": [1.0, 0.93, 1.12], "own": 2, "spread_skill": [1.0, 1.08, 0.9], "nll": 58.1,
                     "nll_before": 58.4, "windows": 1024, "samples": 64, "trajectories": 51},
        "residual_weight": {"weight": 0.0, "criterion": "coverage", "grid": [0.0, 0.5, 1.0],
                            "score": [0.0446, 0.1867, 0.2714], "windows": 64, "samples": 32}})
    assert lines[0] == ("mode 'gaussian' calibrated on 4096 validation windows: spread x1.077, eigenvalues to the "
                        "power 1.095, Student-t of 43.4 degrees of freedom (NLL 72.29 nats per window, uncalibrated "
                        "72.67)")
    assert lines[1].startswith("Student-t base of 39.6 degrees of freedom") and "ratio temperature 0.6" in lines[3]
    assert lines[2] == ("scales of the flow's base fitted on 4096 validation windows of 51 trajectories: 1.03 to "
                        "1.71, median 1.03, 10 dimensions with their own (NLL 4.773 nats per window, before 5.804)")
    assert lines[4] == ("spread per wavenumber fitted on 1024 validation windows of 51 trajectories x 64 draws: 2 of 3 "
                        "wavenumbers with their own factor, factors 0.93 to 1.12 (NLL 58.1 nats per window, before "
                        "58.4)")
    assert lines[5] == ("residual weight 0 fitted on 64 validation windows x 32 draws (coverage by weight: 0: 0.0446, "
                        "0.5: 0.1867, 1: 0.2714)")
