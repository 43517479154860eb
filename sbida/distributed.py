r"""Data-parallel training over several processes (``torchrun``, PyTorch DistributedDataParallel).

With ``W`` processes (ranks), a global batch of ``B`` windows is cut into ``W`` shards of sizes ``n_r``
(``sum_r n_r = B``). Rank ``r`` computes the mean loss ``L_r`` of its shard, scaled so that the average that
DistributedDataParallel takes over ranks is the loss of the whole batch:

.. math:: \frac{1}{W} \sum_{r} \frac{W n_r}{B} L_r = \frac{1}{B} \sum_{b=1}^{B} \ell_b,

hence the same gradient, the same optimizer step and the same weights as one process with batch ``B`` (up to the
order of floating-point sums). The helpers below start the process group from the environment variables that
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with the ``gloo``
backend on CPU and ``nccl`` on GPU, and let only rank 0 log and write files.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["init", "is_distributed", "rank", "world_size", "local_rank", "is_main", "device", "barrier",
           "all_reduce", "broadcast_module", "broadcast_object", "shard", "print0", "save0", "cleanup", "spawn",
           "free_port"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if all(k in os.environ for k in _ENV) else 1


def init(backend: str | None = None, timeout: float = 1800.0) -> bool:
    """Join the process group described by the ``torchrun`` environment variables (if not joined already).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` where CUDA is available, else ``gloo``.
        timeout: seconds a collective may wait for the other ranks.

    Returns:
        Whether training is distributed (an initialized process group of more than one rank).
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if _env_world() <= 1:
            return False
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank of this process on its machine (``LOCAL_RANK``; 0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process is rank 0 (the one that logs and writes checkpoints)."""
    return rank() == 0


def device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` with the ``nccl`` backend, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (nothing when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """Sum (``"sum"``) or maximum (``"max"``) of ``x`` over ranks, in place; ``x`` itself when not distributed.

    Args:
        x: a tensor of any shape on this rank's device.
        op: ``"sum"`` or ``"max"``.

    Returns:
        ``x``, holding the reduction (the same on every rank).
    """
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` to every rank (nothing when not distributed)."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The picklable ``obj`` of rank ``src``, on every rank (``obj`` when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=device() if dist.get_backend() == "nccl" else None)
    return box[0]


def shard(index: Tensor, rank: int | None = None, world: int | None = None) -> Tensor:
    """This rank's part of a global batch of indices: the ``rank``-th of ``world`` contiguous, near-equal parts.

    Args:
        index: ``(B,)`` indices of the global batch (``B >= world``).
        rank, world: default the process's rank and world size.

    Returns:
        ``(n_r,)`` with ``n_r`` equal to ``B // world`` or one more.
    """
    rank = globals()["rank"]() if rank is None else rank
    world = world_size() if world is None else world
    if index.dim() != 1 or len(index) < world:
        raise ValueError(f"a global batch of shape (B,) with B >= {world} (one window per rank at least) is needed, "
                         f"got shape {tuple(index.shape)}")
    return index.tensor_split(world)[rank]


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def save0(obj: Any, path: str | Path) -> None:
    """``torch.save`` on rank 0 only (the other ranks skip)."""
    if is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on this machine (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        init("gloo")
        fn(r, *args)
    finally:
        cleanup()


def spawn(fn: Callable, nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` new CPU processes joined in a ``gloo`` group (as ``torchrun`` would).

    Args:
        fn: a function importable by name (defined at module level).
        nprocs: number of processes.
        args: further arguments of ``fn`` (picklable).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    torch.multiprocessing.spawn(_worker, args=(fn, nprocs, free_port(), args), nprocs=nprocs, join=True)
