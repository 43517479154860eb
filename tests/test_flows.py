"""Grid coupling flows: exact inverse and log-determinant, locality, translation equivariance, 1-D and 2-D grids."""

import pytest
import torch

from sbida.nn import GridFlow, IsotropicStudentT
from sbida.nn.flows import couplings_per_level, lattice, levels_of


def _flow(shape, context, transforms=3, hidden=(8, 8), kernel=5, levels=None):
    torch.manual_seed(0)
    f = GridFlow(shape, context, transforms, list(hidden), kernel, levels).double()
    for c in f.couplings:  # away from the identity it starts at
        torch.nn.init.normal_(c.out.weight, std=0.3)
        torch.nn.init.normal_(c.out.bias, std=0.3)
    return f


@pytest.mark.parametrize("shape", [(12,), (2, 4, 6)])
def test_inverse_and_log_determinant_are_exact(shape):
    grid = shape[-1:] if len(shape) == 1 else shape[1:]
    f = _flow(shape, 3)
    h = torch.randn(2, 3, *grid, dtype=torch.float64)
    d = f(h)
    x = d.sample((5,))
    D = torch.tensor(shape).prod().item()
    assert x.shape == (5, 2, D)
    assert torch.allclose(d.transform.inv(d.transform(x)), x, atol=1e-12)
    x0 = torch.randn(2, D, dtype=torch.float64)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v, b=b: d.transform(v.expand(2, D))[b], x0[b])
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(d.transform(x0)[b]).sum() + torch.linalg.slogdet(J)[1]
        assert torch.allclose(d.log_prob(x0)[b], ref, atol=1e-10)


def test_couplings_are_local_and_alternate():
    """A coupling moves only one checkerboard, and a cell's update depends on its neighbourhood only."""
    K = 16
    f = _flow((K,), 2, transforms=2, hidden=(8,), kernel=5)
    h = torch.randn(1, 2, K, dtype=torch.float64)
    t0, t1 = (c(h) for c in f.couplings[:2])
    x = torch.randn(1, K, dtype=torch.float64)
    even = ~lattice((K,), 0)[1]
    assert torch.equal(t0(x)[:, even], x[:, even]) and not torch.allclose(t0(x)[:, ~even], x[:, ~even])
    assert torch.equal(t1(x)[:, ~even], x[:, ~even])
    x2 = x.clone()
    x2[0, 0] += 1.0  # an even cell: within kernel 5 it reaches the odd cells 15 and 1 only (periodic)
    changed = (t0(x2) - t0(x)).abs()[0] > 0
    assert changed.nonzero().squeeze(-1).tolist() == [0, 1, 15]


def test_multiscale_levels():
    assert levels_of((16,)) == 4 and levels_of((40,)) == 6 and levels_of((8, 8)) == 6
    active, moving = lattice((16,), 2)
    assert active.nonzero().squeeze(-1).tolist() == [0, 4, 8, 12] and moving.nonzero().squeeze(-1).tolist() == [4, 12]
    active, moving = lattice((4, 4), 1)  # the quincunx lattice of the even checkerboard; rows 1, 3 move
    assert int(active.sum()) == 8 and int(moving.sum()) == 4 and bool(moving[1, 1]) and not moving[0, 0]
    f = GridFlow((16,), 2, transforms=2)
    moved = [int((~c.mask).sum()) for c in f.couplings]
    assert moved == [8, 8, 4, 4, 2, 2, 1, 1]


def test_couplings_per_level():
    """A list gives the couplings of each level from the finest, its last number repeated; the flow stays exact."""
    f = GridFlow((16,), 2, transforms=[3, 2])
    moved = [int((~c.mask).sum()) for c in f.couplings]
    assert moved == [8, 8, 8, 4, 4, 2, 2, 1, 1]
    assert couplings_per_level([4, 1, 3], 5) == [4, 1, 3, 3, 3] and couplings_per_level(2, 3) == [2, 2, 2]
    f = _flow((12,), 3, transforms=[3, 1])
    h = torch.randn(2, 3, 12, dtype=torch.float64)
    d = f(h)
    x = torch.randn(4, 2, 12, dtype=torch.float64)
    assert torch.allclose(d.transform.inv(d.transform(x)), x, atol=1e-12)
    J = torch.autograd.functional.jacobian(lambda v: d.transform(v.expand(2, 12))[0], x[0, 0])
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(d.transform(x[0, 0].expand(2, 12))[0]).sum()
    assert torch.allclose(d.log_prob(x[0, 0].expand(2, 12))[0], ref + torch.linalg.slogdet(J)[1], atol=1e-10)
    for bad in (0, [], [2, 0], [2.5], True):
        with pytest.raises(ValueError, match="transforms"):
            GridFlow((8,), 2, transforms=bad)


def test_translation_equivariance():
    """Shifting the state and the context map by the coarsest lattice step leaves densities unchanged."""
    K = 16
    f = _flow((K,), 3, transforms=2, levels=2)
    h = torch.randn(3, 3, K, dtype=torch.float64)
    x = torch.randn(3, K, dtype=torch.float64)
    lp = f(h).log_prob(x)
    lp_shift = f(h.roll(4, -1)).log_prob(x.roll(4, -1))
    assert torch.allclose(lp, lp_shift, atol=1e-10)
    assert not torch.allclose(lp, f(h.roll(1, -1)).log_prob(x.roll(1, -1)), atol=1e-3)  # not for any shift


def test_fits_a_correlated_gaussian():
    """Trained by maximum likelihood on a stationary AR(1)-correlated field, the flow reaches its entropy."""
    K, rho = 16, 0.8
    i = torch.arange(K)
    dist = (i[:, None] - i[None]).abs()
    cov = rho ** torch.minimum(dist, K - dist).double()
    target = torch.distributions.MultivariateNormal(torch.zeros(K, dtype=torch.float64), cov)
    torch.manual_seed(1)
    f = GridFlow((K,), 1, transforms=2, hidden=[16], kernel_size=5).double()
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    h = torch.zeros(256, 1, K, dtype=torch.float64)
    for _ in range(400):
        loss = -f(h).log_prob(target.sample((256,))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x = target.sample((4096,))
    with torch.no_grad():
        gap = float((target.log_prob(x) - f(torch.zeros(4096, 1, K, dtype=torch.float64)).log_prob(x)).mean())
    # KL(target || flow) in nats: the identity is at 4.2 nats, a single-scale checkerboard flow stalled at 1.3
    assert -0.02 < gap < 0.15, gap


def test_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        GridFlow((8,), 2, kernel_size=4)
    with pytest.raises(ValueError, match="state_shape"):
        GridFlow((2, 8), 2)
    with pytest.raises(ValueError, match="neighbour"):
        GridFlow((8,), 2, kernel_size=1)
    with pytest.raises(ValueError, match="levels"):
        GridFlow((8,), 2, levels=4)


def test_student_t_base_density_and_draws():
    """The isotropic multivariate t: its density is scipy's, its draws' radii follow ``|z|^2 / (D c^2) ~ F(D, nu)``
    (one scale per draw, shared by the components), and nu -> infinity gives N(0, c^2 I)."""
    from scipy.stats import f as f_dist
    from scipy.stats import kstest, multivariate_t

    D, nu, c = 6, 3.5, 1.7
    loc = torch.randn(4, D, dtype=torch.float64)
    d = IsotropicStudentT(loc, nu, c)
    assert d.batch_shape == (4,) and d.event_shape == (D,) and torch.equal(d.mean, loc)
    x = loc + 3 * torch.randn(5, 4, D, dtype=torch.float64)
    for b in range(4):
        ref = multivariate_t(loc=loc[b].numpy(), shape=c**2 * torch.eye(D).numpy(), df=nu).logpdf(x[:, b].numpy())
        assert torch.allclose(d.log_prob(x)[:, b], torch.as_tensor(ref), atol=1e-10)
    torch.manual_seed(0)
    z = d.sample((20000,))
    assert z.shape == (20000, 4, D)
    r = ((z - loc).square().sum(-1) / (D * c**2)).flatten().numpy()
    assert kstest(r, f_dist(D, nu).cdf).pvalue > 0.01
    r_gauss = ((z - loc).square().sum(-1) / c**2).flatten().numpy()
    from scipy.stats import chi2
    assert kstest(r_gauss, chi2(D).cdf).pvalue < 1e-6  # and not the Gaussian's chi^2_D
    assert torch.allclose(d.variance, torch.full((4, D), c**2 * nu / (nu - 2), dtype=torch.float64))
    far = IsotropicStudentT(loc, 1e9, c)
    gauss = torch.distributions.Independent(torch.distributions.Normal(loc, c), 1)
    assert torch.allclose(far.log_prob(x), gauss.log_prob(x), atol=1e-5)
    assert d.expand((3, 4)).sample((2,)).shape == (2, 3, 4, D)
    for bad in ({"df": 0.0}, {"df": -1.0}, {"scale": 0.0}):
        with pytest.raises(ValueError, match="df and scale"):
            IsotropicStudentT(loc, **{"df": nu, "scale": c, **bad})
