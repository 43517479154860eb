"""The allocator settings of ``sbida.runtime``."""

import platform
import subprocess
import sys

import pytest

import sbida
from sbida import runtime

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt thresholds are a glibc feature")


@glibc
def test_import_raises_the_allocator_thresholds():
    assert runtime.tuned() == (runtime.MMAP_THRESHOLD, runtime.TRIM_THRESHOLD)
    assert runtime.tune_malloc()


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert not runtime.tune_malloc()


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="positive"):
        runtime.tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match="below 2"):
        runtime.tune_malloc(trim_threshold=2**32)


TUNED = str((runtime.MMAP_THRESHOLD, runtime.TRIM_THRESHOLD))


@pytest.mark.parametrize("value, expected", [("0", "None"), ("1", TUNED)])
def test_the_environment_variable_turns_the_tuning_off(value, expected):
    if value == "1" and (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", "import sbida; print(sbida.runtime.tuned())"], capture_output=True,
                         text=True, check=True, env={"SBIDA_TUNE_MALLOC": value, "PATH": ""})
    assert out.stdout.strip() == expected
    assert sbida.runtime is runtime
