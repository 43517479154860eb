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


def _rejects_bad_windows(untrained, est, y, m, t, fixed_window: bool = True) -> None:
    """The checks every estimator's ``posterior`` makes at its boundary, with the errors they must give."""
    with pytest.raises(RuntimeError, match="not trained"):
        untrained.posterior(y, m, t)
    if fixed_window:
        with pytest.raises(ValueError, match=f"window of {y.shape[1]}"):
            est.posterior(y[:, :5], m[:, :5], t)
    with pytest.raises(ValueError, match="NaN"):
        est.posterior(torch.where(m, torch.nan, y), m, t)
    with pytest.raises(ValueError, match="empty mask"):
        est.posterior(y, torch.zeros_like(m), t)


@pytest.fixture
def rejects_bad_windows():
    """``check(untrained, trained, y, mask, t, fixed_window=True)``: the shared bad-input checks of estimators."""
    return _rejects_bad_windows
