"""Process settings that make torch on a CPU faster: glibc's allocator thresholds.

PyTorch on a CPU allocates every activation with ``malloc`` and frees it when the tensor dies. glibc serves blocks
above its *mmap threshold* (128 KiB at start, raised as large blocks are freed) by fresh ``mmap`` calls, and returns
free memory at the top of its heap to the system beyond its *trim threshold*; every block handed back must be faulted
in again, page by page, on its next use. A sampler or training loop that allocates and frees the same megabyte-sized
activations thousands of times a second then spends much of its time in page faults. Measured at Lorenz-96 K=40
(``benchmarks/RESULTS.md``): ComposedScore's 1000 samples of one window took 14.8 s on 2 threads with glibc's
defaults and 5.4 s with the thresholds of :func:`tune_malloc`; raising only the mmap threshold did not help (16 s), and
raising only the trim threshold made it worse (35 s: fixing either threshold also stops glibc's dynamic raise of the
other). Training steps gain 0-15 %.

:func:`tune_malloc` raises both thresholds with ``mallopt``. ``import sbida`` calls it once, on Linux with glibc,
unless the environment variable ``SBIDA_TUNE_MALLOC`` is ``0``. The cost: up to ``trim_threshold`` bytes of freed
memory stay with the process for reuse instead of going back to the system, and blocks below ``mmap_threshold`` come
from the heap. The same effect, for any program: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
in the environment, or a different allocator (jemalloc, tcmalloc) by ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_malloc", "tuned", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 * 2**20  # blocks below it come from the heap (a 64 or 128 MiB threshold measured the same)
TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>

_tuned: tuple[int, int] | None = None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module).

    Args:
        mmap_threshold: bytes; blocks at least this large get their own ``mmap``.
        trim_threshold: bytes of free memory at the top of the heap kept before returning it to the system.

    Returns:
        Whether both were set: ``False`` where the C library is not glibc (macOS, Windows, musl) or rejects a value.
    """
    global _tuned
    if not (0 < mmap_threshold < 2**31 and 0 < trim_threshold < 2**31):  # mallopt takes a C int
        raise ValueError(f"thresholds must be positive byte counts below 2**31, got {mmap_threshold} and "
                         f"{trim_threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    _tuned = (int(mmap_threshold), int(trim_threshold)) if ok else None
    return ok


def tuned() -> tuple[int, int] | None:
    """The ``(mmap_threshold, trim_threshold)`` set by the last successful :func:`tune_malloc`, else ``None``."""
    return _tuned


def _tune_on_import() -> None:
    if os.environ.get("SBIDA_TUNE_MALLOC", "1").strip().lower() not in ("0", "false", "no", "off"):
        tune_malloc()
