"""Windows, datasets, HDF5 and splits."""

import hashlib

import pytest
import torch

from sbida.data import Window, WindowDataset, simulate_windows
from sbida.observations import RandomMask, Stations
from sbida.simulators import Lorenz96


def small(seed=0, window=None, **kw):
    sim = Lorenz96(K=16, dt=0.05)
    obs = Stations(every=4, kernel_width=0.8, radius=2, sigma=0.5)
    kw = {"n_trajectories": 12, "states": 40, "seed": seed, "progress": False} | kw
    return simulate_windows(sim, obs, window or Window(5, "end"), config={"name": "small"}, **kw)


def test_window_offsets():
    assert Window(4, "end").offsets() == [-3, -2, -1, 0]
    assert Window(5, "centre").offsets() == [-2, -1, 0, 1, 2]
    assert Window(4, "center").offsets() == [-2, -1, 0, 1]
    with pytest.raises(ValueError):
        Window(0)
    with pytest.raises(ValueError):
        Window(3, "middle")


@pytest.mark.parametrize("window", [Window(5, "end"), Window(5, "centre")])
def test_items_are_the_windows_of_the_trajectories(window):
    data = small(window=window)
    assert len(data) == 12 * (40 - 4) and data.state_shape == (16,) and data.obs_shape == (4,)
    x, y, m, t = data.get(torch.arange(len(data)))
    assert x.shape == (len(data), 16) and y.shape == m.shape == (len(data), 5, 4) and t.shape == (len(data),)
    obs = Stations(every=4, kernel_width=0.8, radius=2, sigma=0.5, state_shape=(16,))
    target = 4 if window.align == "end" else 2  # position of x_t in the window
    r = (y[:, target] - obs.apply(x))[m[:, target]]
    assert abs(r.std().item() - 0.5) < 0.05  # the observation at the target time is of x_t
    # times are consecutive saved states, t the target's time
    n, s = data.locate(torch.arange(len(data)))
    assert torch.allclose(t.double(), data.times[s].to(t.dtype).double())
    assert torch.equal(y[:, 0], data.y[n, s + window.offsets()[0]])
    x0, y0, m0, t0 = data[7]
    assert torch.equal(x0, x[7]) and torch.equal(y0, y[7]) and t0 == t[7]


def test_loader_batches():
    data = small()
    batches = list(data.loader(batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sum(len(b[0]) for b in batches) == len(data)
    assert batches[0][1].shape == (100, 5, 4) and batches[0][2].dtype == torch.bool


def test_split_by_trajectory():
    data = small(n_trajectories=20)
    parts = data.split(0.6, 0.2, 0.2, seed=3)
    ids = [set(p.trajectory_ids.tolist()) for p in parts]
    assert [len(i) for i in ids] == [12, 4, 4]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(range(20))
    a = parts[2].states
    assert torch.equal(a, data.states[sorted(ids[2])])
    with pytest.raises(ValueError, match="sum"):
        data.split(0.8, 0.5)
    with pytest.raises(ValueError, match="empty"):
        small(n_trajectories=3).split(0.9, 0.05, 0.05)


def test_hdf5_round_trip_and_same_bytes(tmp_path):
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    pa, pb, pc = a.save(tmp_path / "a.h5"), b.save(tmp_path / "b.h5"), c.save(tmp_path / "c.h5")

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(pa) == digest(pb) != digest(pc)
    loaded = WindowDataset.load(pa)
    assert loaded.fingerprint() == a.fingerprint() and loaded.window == a.window and loaded.config == a.config
    assert loaded.meta["seed"] == 1 and len(loaded) == len(a)
    for u, v in zip(loaded.get([0, 5, 99]), a.get([0, 5, 99])):
        assert torch.equal(u, v)
    import h5py

    with h5py.File(pa) as f:
        assert f["states"].chunks[0] == 1  # chunked by trajectory


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        small(window=Window(50), states=40)
    with pytest.raises(FileNotFoundError):
        WindowDataset.load(tmp_path / "missing.h5")
    data = small()
    with pytest.raises(IndexError):
        data.get([len(data)])
    with pytest.raises(ValueError, match="shape"):
        simulate_windows(Lorenz96(K=16), RandomMask(0.5, 1.0, state_shape=(12,)), 3, n_trajectories=2, states=8,
                         progress=False)


def test_burn_in_and_every_set_time():
    data = small(burn_in=100, every=2, states=20)
    assert torch.allclose(data.times, torch.arange(20, dtype=torch.float64) * 0.1)
    # after 5 time units of spin-up the states are on the attractor, not at the N(0, 1) start
    assert data.states.std() > 2.0
