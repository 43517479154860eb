"""Windows, datasets, HDF5 and splits."""

import hashlib
import os

import pytest
import torch

from sbida.data import IndexPermutation, Window, WindowDataset, simulate_windows
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
    got, every = torch.cat([b[0] for b in batches]).flatten(1), data.get(torch.arange(len(data)))[0].flatten(1)
    w = torch.randn(got.shape[1], dtype=got.dtype)  # each window once, in a shuffled order
    assert got.shape == every.shape and not torch.equal(got, every)
    assert torch.allclose((got @ w).sort().values, (every @ w).sort().values)
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


# -- streaming from disk and shards ----------------------------------------------------------------------------------
def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("window", [Window(5, "end"), Window(4, "centre")])
def test_streamed_dataset_gives_the_same_batches(tmp_path, window):
    from sbida.data import H5Array

    data = small(n_trajectories=10, window=window)
    streamed = WindowDataset.open(data.save(tmp_path / "d.h5"))
    assert streamed.streamed and not data.streamed and len(streamed) == len(data)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # random batches, repeated windows included, in any order
        idx = torch.randint(-len(data), len(data), (64,), generator=g)
        assert _same(streamed.get(idx), data.get(idx))
    assert _same(streamed.tensors(), data.tensors())
    # splits and subsets stay on disk and give the windows of the in-memory ones
    for a, b in zip(streamed.split(0.6, 0.4, seed=2), data.split(0.6, 0.4, seed=2)):
        assert isinstance(a.states, H5Array) and torch.equal(a.trajectory_ids, b.trajectory_ids)
        assert _same(a.tensors(), b.tensors())
    sub = streamed.subset([7, 2, 2])
    assert _same(sub.tensors(), data.subset([7, 2, 2]).tensors())
    # two-dimensional gathers (as CODA's view does), and a DataLoader's pickled copy
    n, w = torch.tensor([[3], [0], [3]]), torch.tensor([[5, 6, 7], [0, 1, 2], [30, 31, 32]])
    assert torch.equal(streamed.y[n, w], data.y[n, w]) and torch.equal(streamed.mask[n, w], data.mask[n, w])
    import pickle

    assert _same(pickle.loads(pickle.dumps(streamed)).get([4, 100]), data.get([4, 100]))
    assert streamed.fingerprint() == data.fingerprint() and streamed.in_memory().fingerprint() == data.fingerprint()
    stats, ref = streamed.stats(), data.stats()
    assert all(abs(stats[k] - ref[k]) < 1e-9 for k in ("state_mean", "state_std"))
    assert abs(stats["observed_fraction"] - ref["observed_fraction"]) < 1e-6
    assert WindowDataset.load(streamed.save(tmp_path / "copy.h5")).fingerprint() == data.fingerprint()


def test_streamed_dataset_holds_no_arrays(tmp_path):
    data = small(n_trajectories=10)
    streamed = WindowDataset.load(data.save(tmp_path / "d.h5"), stream=True)
    N, S = data.states.shape[:2]

    def tensors(obj, seen=()):
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                yield v
            elif hasattr(v, "__dict__") and not isinstance(v, type) and v not in seen:
                yield from tensors(v, (*seen, v))

    held = list(tensors(streamed))
    assert held and max(t.numel() for t in held) <= max(N, S)  # times, ids, targets: O(N + S), no (N, S, ...) array
    streamed.get(torch.arange(50))
    assert max(t.numel() for t in tensors(streamed)) <= max(N, S)  # reading caches nothing


def _read_in_child(data, queue):
    x = data.get(torch.arange(7))[0]
    queue.put((x.tolist(), data.states._pid == os.getpid(), all(f.id.valid for f in data.states._files.values())))


def test_a_forked_process_opens_its_own_files(tmp_path):
    """DataLoader workers forked from a process that has read a streamed dataset open the files again (HDF5 handles
    are not to be shared across a fork)."""
    import multiprocessing as mp

    streamed = WindowDataset.load(small(n_trajectories=4).save(tmp_path / "d.h5"), stream=True)
    expected = streamed.get(torch.arange(7))[0]  # the parent has open handles now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(streamed, queue))
    child.start()
    x, own, valid = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and own and valid and torch.equal(torch.tensor(x, dtype=expected.dtype), expected)
    assert torch.equal(streamed.get(torch.arange(7))[0], expected)  # the parent's handles still work


def test_shards_opened_as_one_are_their_union(tmp_path):
    from sbida.data import shard_seed, simulate_shards

    sim = Lorenz96(K=16, dt=0.05)
    obs = Stations(every=4, kernel_width=0.8, radius=2, sigma=0.5)
    paths = simulate_shards(sim, obs, tmp_path / "shards", shards=3, n_trajectories=8, seed=5, window=Window(5),
                            states=30, progress=False, config={"name": "small"})
    assert [p.name for p in paths] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    parts = [WindowDataset.load(p) for p in paths]
    seeds = [shard_seed(5, k) for k in range(3)]
    assert [p.n_trajectories for p in parts] == [3, 3, 2] and [p.meta["seed"] for p in parts] == seeds
    assert len(set(seeds)) == 3 and min(seeds) > 2**32 and seeds[0] == shard_seed(5, 0) != shard_seed(6, 0)
    one = WindowDataset.open(paths)
    union = WindowDataset.concat(parts)
    assert one.streamed and not union.streamed and one.n_trajectories == 8 and one.meta["seed"] == seeds
    assert torch.equal(one.trajectory_ids, torch.arange(8)) and torch.equal(union.trajectory_ids, torch.arange(8))
    assert _same(one.tensors(), union.tensors()) and one.fingerprint() == union.fingerprint()
    # the union is the trajectories of the parts, in order: window i of part 1 is window (3 * per + i) of the union
    per = parts[0].windows_per_trajectory
    assert _same(one.get(torch.arange(3 * per, 6 * per)), parts[1].tensors())
    # shards that number their trajectories from 0 each are renumbered; distinct numbers are kept
    a, b = small(seed=1, n_trajectories=4), small(seed=2, n_trajectories=3)
    assert torch.equal(WindowDataset.concat([a, b]).trajectory_ids, torch.arange(7))
    c, d = a.subset([0, 2]), a.subset([3, 1])
    assert torch.equal(WindowDataset.concat([c, d]).trajectory_ids, torch.tensor([0, 2, 3, 1]))
    with pytest.raises(ValueError, match="window"):
        WindowDataset.concat([a, small(window=Window(4), n_trajectories=2)])
    with pytest.raises(ValueError, match="streamed"):
        WindowDataset.concat([a, one])
    with pytest.raises(ValueError, match="shards"):
        simulate_shards(sim, obs, tmp_path, shards=0, n_trajectories=4)


def test_index_permutation_is_a_random_bijection_read_by_slices():
    # up to its dense size: torch.randperm's draw itself
    g = torch.Generator().manual_seed(3)
    assert torch.equal(IndexPermutation(1000, torch.Generator().manual_seed(3))[:], torch.randperm(1000, generator=g))
    # above (forced here with dense=0): a keyed Feistel network, a bijection of range(n) for any n
    for n in (1, 2, 3, 4, 5, 17, 1000, 4099):
        perm = IndexPermutation(n, torch.Generator().manual_seed(n), dense=0)
        full = perm[:]
        assert torch.equal(full.sort().values, torch.arange(n)), n
        assert torch.equal(perm[n // 3:n - 1], full[n // 3:n - 1]) and len(perm[n:n + 5]) == 0
    a, b = (IndexPermutation(4099, torch.Generator().manual_seed(s), dense=0)[:] for s in (0, 1))
    assert (a == b).float().mean() < 0.01
    # random: the value at a position is uniform over seeds; neighbours and positions uncorrelated
    first = torch.stack([IndexPermutation(1000, torch.Generator().manual_seed(s), dense=0)[:2] for s in range(600)])
    counts = torch.bincount(first[:, 0] // 100, minlength=10).double()
    assert float(((counts - 60) ** 2 / 60).sum()) < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    big = IndexPermutation(10**6, torch.Generator().manual_seed(0), dense=0)[:].double()
    assert abs(float(torch.corrcoef(torch.stack([big[1:], big[:-1]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([big, torch.arange(10.0**6)]))[0, 1])) < 0.01
    # 10**12 elements (8 TB as a randperm): the first windows of an epoch, distinct, spread over the range
    huge = IndexPermutation(10**12, torch.Generator().manual_seed(0))
    head = huge[:4096]
    assert len(set(head.tolist())) == 4096 and int(head.min()) >= 0 and int(head.max()) < 10**12
    assert abs(float(head.double().mean()) / 10**12 - 0.5) < 0.03
    assert torch.equal(huge[10**11:10**11 + 7], huge[10**11:10**11 + 7])
    with pytest.raises(TypeError, match="slices"):
        huge[5]


def test_training_on_a_large_dataset_visits_every_window_once_per_epoch(monkeypatch):
    """Training reads its epochs through the Feistel permutation above ``DENSE`` windows (forced here)."""
    from sbida.estimators import NPE
    from sbida.tasks import get

    monkeypatch.setattr(IndexPermutation, "DENSE", 0)
    task = get("lorenz96", K=8, n_trajectories=4, n_states=30)
    data = task.simulate(progress=False)
    est = NPE(task, channels=8, depth=1, features=16, emb_features=8, transforms=2, hidden=[16])
    seen = []
    batch = est._batch
    monkeypatch.setattr(est, "_batch", lambda view, idx: seen.append(idx.clone()) or batch(view, idx))
    steps = len(data) // 16
    est.fit(data, epochs=2, batch_size=16, progress=False)
    first, second = torch.cat(seen[:steps]), torch.cat(seen[steps:2 * steps])
    assert len(seen) == 2 * steps and len(first) == steps * 16
    assert len(set(first.tolist())) == len(first) and len(set(second.tolist())) == len(second)
    assert not torch.equal(first, second)  # a new order each epoch
    assert torch.equal(first, IndexPermutation(len(data), torch.Generator().manual_seed(0), dense=0)[:steps * 16])
