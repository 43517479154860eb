import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tests run small batches: one thread is faster and steadier than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
