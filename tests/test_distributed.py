"""Data-parallel training (2 CPU processes, gloo) against one process with the same global batch."""

import math
import os

import pytest
import torch
from torch import nn

from sbida import distributed
from sbida.data import Window, WindowDataset, simulate_windows
from sbida.estimators import NPE
from sbida.estimators.base import Estimator
from sbida.observations import RandomMask
from sbida.simulators import Lorenz96

NPE_HP = {"channels": 8, "depth": 1, "features": 16, "emb_features": 8, "transforms": 2, "hidden": [32]}
FIT = {"epochs": 2, "batch_size": 33, "steps_per_epoch": 4, "progress": False, "seed": 3}  # 33: unequal shards


class TinyGaussian(Estimator):
    """``x ~ N(A y + b, diag(exp(2 s)))``: a loss whose gradients are all far from zero."""

    defaults = {}

    def build(self) -> None:
        self.net = nn.Linear(self.T * math.prod(self.obs_shape) + 1, 2 * self.event_size)

    def loss(self, batch):
        h = torch.cat([batch.y.flatten(1), batch.mask.flatten(1).float().mean(1, keepdim=True) * batch.t[:, None]], 1)
        mu, log_s = self.net(h).chunk(2, -1)
        return ((batch.x.flatten(1) - mu) ** 2 / (2 * torch.exp(2 * log_s)) + log_s).sum(-1).mean()


def make_data(path=None):
    sim = Lorenz96(K=8, dt=0.05)
    data = simulate_windows(sim, RandomMask(p_missing=0.5, sigma=0.5), Window(3), n_trajectories=16, states=30,
                            seed=0, progress=False)
    if path is not None:
        data.save(path)
    return data


def train(rank, data, checkpoint=None):
    train_set, val_set = data.split(0.75, 0.25)
    out = {}
    for name, est in (("tiny", TinyGaussian(None, state_shape=(8,), obs_shape=(8,), window=3)),
                      ("npe", NPE(None, state_shape=(8,), obs_shape=(8,), window=3, **NPE_HP))):
        history = est.fit(train_set, val_set, checkpoint=checkpoint if name == "npe" else None, **FIT)
        out[name] = ({k: v.clone() for k, v in est.state_dict().items()}, history)
    return out


def _worker(rank, directory):
    data = WindowDataset.open(os.path.join(directory, "data.h5"))  # every rank streams the same file
    saved = torch.save
    if rank != 0:  # only rank 0 may write checkpoints
        def forbidden(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                raise AssertionError(f"rank {rank} wrote {f}")
            return saved(obj, f, *args, **kwargs)  # collectives pickle objects to buffers
        torch.save = forbidden
    try:
        out = train(rank, data, checkpoint=os.path.join(directory, "ck.pt"))
    finally:
        torch.save = saved
    torch.save(out, os.path.join(directory, f"rank{rank}.pt"))


def _relative(a, b):
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point())
    den = sum(float(a[k].double().square().sum()) for k in a if a[k].is_floating_point())
    return math.sqrt(num / den)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    single = train(0, make_data(tmp_path / "data.h5"))
    distributed.spawn(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert (tmp_path / "ck.pt").exists()
    for name in ("tiny", "npe"):
        (w0, h0), (w1, h1), (w, h) = ranks[0][name], ranks[1][name], single[name]
        assert all(torch.equal(w0[k], w1[k]) for k in w)  # every rank ends with the very same weights
        assert all(h0[k] == h1[k] for k in ("epoch", "train_loss", "val_loss", "lr"))  # not "time"
        for key in ("train_loss", "val_loss"):  # the losses of the global batches, up to float32 sums
            assert torch.allclose(torch.tensor(h0[key]), torch.tensor(h[key]), rtol=1e-5, atol=0)
        assert h0["lr"] == h["lr"] and h0["epoch"] == h["epoch"]
        if name == "tiny":  # every gradient is far from 0: the weights agree element by element
            for k in w:
                torch.testing.assert_close(w0[k], w[k], rtol=1e-5, atol=1e-6)
        else:
            # Adam divides by sqrt(v): an element whose gradient is ~0 (zero-initialized FiLM and head layers) may
            # step by ~lr either way from round-off. The weights agree as a whole, and no element by more than that.
            assert _relative(w, w0) < 1e-5
            lr_steps = 1e-3 * FIT["epochs"] * FIT["steps_per_epoch"]
            assert max(float((w[k] - w0[k]).abs().max()) for k in w if w[k].is_floating_point()) < 2 * lr_steps
    assert not torch.allclose(ranks[0]["npe"][0]["flow.couplings.0.inp.weight"],
                              NPE(None, state_shape=(8,), obs_shape=(8,), window=3, **NPE_HP).state_dict()[
                                  "flow.couplings.0.inp.weight"])  # it trained


def _timed_worker(rank, directory):
    data = WindowDataset.open(os.path.join(directory, "data.h5"))
    est = TinyGaussian(None, state_shape=(8,), obs_shape=(8,), window=3)
    history = est.fit(data, None, epochs=10**4, batch_size=33, steps_per_epoch=5, max_time=1.5, progress=False,
                      seed=3)
    torch.save(history, os.path.join(directory, f"timed{rank}.pt"))


def test_a_time_budget_gives_every_rank_the_same_learning_rate(tmp_path):
    """With ``max_time`` the cosine schedule follows the elapsed time; the ranks agree on it (the slowest's), so their
    learning rates, hence their steps, are the same."""
    torch.set_num_threads(1)
    make_data(tmp_path / "data.h5")
    distributed.spawn(_timed_worker, 2, str(tmp_path))
    h0, h1 = (torch.load(tmp_path / f"timed{r}.pt", weights_only=False) for r in (0, 1))
    assert len(h0["lr"]) >= 3 and h0["lr"] == h1["lr"]  # epochs of 5 steps, ended by the time budget
    assert h0["lr"][0] > h0["lr"][-2] > h0["lr"][-1]  # the schedule decayed with the elapsed time


def test_shard_splits_a_global_batch():
    idx = torch.arange(33)
    parts = [distributed.shard(idx, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [17, 16] and torch.equal(torch.cat(parts), idx)
    parts = [distributed.shard(idx, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), idx) and max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="B >= 4"):
        distributed.shard(torch.arange(3), 0, 4)


def test_single_process_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.init() and not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.device() == torch.device("cpu")
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(x) is x and torch.equal(x, torch.tensor([1.0, 2.0]))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    data = make_data()
    est = TinyGaussian(None, state_shape=(8,), obs_shape=(8,), window=3)
    with pytest.raises(ValueError, match="torchrun"):
        est.fit(data, epochs=1, progress=False, distributed=True)
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        distributed.all_reduce(x, "mean")
