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
    for cmd in (["--help"], ["simulate", "--help"], ["quickstart", "--help"], ["tasks", "--help"]):
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
