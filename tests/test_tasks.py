"""The named tasks of the benchmark protocol and the configuration loader."""

import pytest
import torch

import sbida
from sbida import tasks

SHAPES = {
    "lorenz96": ((40,), (10,), 10, "end"),
    "lorenz96-sparse": ((40,), (40,), 51, "centre"),
    "lorenz96-two-scale": ((36,), (36,), 25, "centre"),
    "kolmogorov": ((2, 32, 32), (2, 6, 6), 10, "end"),
    "linear-gaussian": ((32,), (32,), 10, "end"),
}


def test_all_tasks_load_with_the_protocol_shapes():
    assert tasks.available() == sorted(SHAPES)
    for name, (state, obs, T, align) in SHAPES.items():
        task = tasks.get(name)
        assert task.state_shape == state and task.obs_shape == obs
        assert task.window.length == T and task.window.align == align


def test_overrides():
    t = tasks.get("lorenz96", K=64)
    assert t.simulator.K == 64 and t.obs_shape == (16,)
    t = tasks.get("lorenz96", "observation.sigma=1.0", **{"data.seed": 3})
    assert t.observation.sigma == 1.0 and t.config.data.seed == 3
    assert isinstance(t.simulator.F, torch.Tensor) and float(t.simulator.F) == 8.0


@pytest.mark.parametrize("args, kw, match", [
    ((), {"foo": 1}, "foo"),
    ((), {"window.lenght": 3}, "lenght"),
    (("simulator.G=3",), {}, "simulator.G"),
    ((), {"K": "abc"}, "simulator.K"),
    ((), {"data.n_trajectories": 2.5}, "data.n_trajectories"),
    (("observation.name=telepathy",), {}, "observation.name"),
    (("window.align=middle",), {}, "align"),
    (("nonsense",), {}, "key=value"),
])
def test_bad_overrides_name_the_key(args, kw, match):
    with pytest.raises(ValueError, match=match):
        tasks.get("lorenz96", *args, **kw)


def test_unknown_task_and_custom_file(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("lorenz69")
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nsimulator: {name: lorenz96, K: 8}\nobservation: {name: random_mask, p_missing: 0.5}\n"
                 "window: {length: 3}\ndata: {n_trajectories: 4, n_states: 16}\n")
    t = tasks.get(p)
    data = t.simulate(progress=False)
    assert data.n_trajectories == 4 and data.config["name"] == "mine" and data.state_shape == (8,)
    p.write_text("name: mine\nsimulator: {name: lorenz96}\nobservation: {name: random_mask}\nextra: 1\n")
    with pytest.raises(ValueError, match="extra"):
        tasks.get(p)


@pytest.mark.parametrize("name", ["lorenz96", "lorenz96-sparse", "lorenz96-two-scale", "linear-gaussian"])
def test_tasks_simulate_small(name):
    data = tasks.get(name).simulate(progress=False, n_trajectories=4, n_states=64)
    assert data.state_shape == SHAPES[name][0] and data.obs_shape == SHAPES[name][1]
    assert torch.isfinite(data.states).all() and len(data) > 0
    observed = data.mask.float().mean().item()
    p_missing = getattr(tasks.get(name).observation, "p_missing", 0.0)
    assert abs(observed - (1 - p_missing)) < 0.05


def test_sparse_task_is_on_the_attractor():
    data = tasks.get("lorenz96-sparse").simulate(progress=False, n_trajectories=16, n_states=200)
    assert abs(data.states.mean().item() - 2.34) < 0.4 and abs(data.states.std().item() - 3.64) < 0.4


def test_top_level_api():
    task = sbida.tasks.get("lorenz96", K=8)
    assert isinstance(task, sbida.Task)
    data = sbida.simulate_windows(task.simulator, task.observation, 3, n_trajectories=2, states=8, progress=False)
    assert isinstance(data, sbida.WindowDataset)


def test_independent_windows_come_from_distinct_trajectories():
    task = sbida.tasks.get("linear-gaussian")
    x, y, m, t = task.independent_windows(6, seed=3)
    assert x.shape == (6, 32) and y.shape == (6, 10, 32) and m.dtype == torch.bool and t.shape == (6,)
    data = task.simulate(progress=False, n_trajectories=6, seed=3)
    per = len(data) // 6
    xs = data.get(torch.arange(len(data)))[0].reshape(6, per, 32)
    # each window's state is one of its own trajectory's states, and no two come from the same trajectory
    hits = [[bool((xs[j] == x[i]).all(-1).any()) for j in range(6)] for i in range(6)]
    assert all(sum(row) == 1 for row in hits) and [row.index(True) for row in hits] == list(range(6))
    again = task.independent_windows(6, seed=3)
    assert torch.equal(again[0], x) and not torch.equal(task.independent_windows(6, seed=4)[0], x)
