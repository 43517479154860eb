"""Building blocks on periodic grids: convolutions, embeddings, FiLM, window encoders, U-Nets."""

import pytest
import torch

import sbida
from sbida.nn import FiLM, FourierEmbedding, ResBlock, SinusoidalEmbedding, UNet1d, UNet2d, WindowEncoder, periodic_conv


def test_periodic_conv_matches_circular_conv1d_and_is_shift_equivariant():
    torch.manual_seed(0)
    conv = periodic_conv(1, 3, 4, 5)
    ref = torch.nn.Conv1d(3, 4, 5, padding=2, padding_mode="circular")
    with torch.no_grad():
        ref.weight.copy_(conv.weight[:, :, 0])
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 12)
    assert torch.allclose(conv(x), ref(x), atol=1e-6)
    assert torch.allclose(conv(torch.roll(x, 5, -1)), torch.roll(conv(x), 5, -1), atol=1e-5)
    conv2 = periodic_conv(2, 2, 3, 3)
    x2 = torch.randn(2, 2, 8, 8)
    assert torch.allclose(conv2(torch.roll(x2, (3, -2), (-2, -1))), torch.roll(conv2(x2), (3, -2), (-2, -1)),
                          atol=1e-5)
    # the wrap-around is real: a value at the last cell reaches the first
    x = torch.zeros(1, 3, 12)
    x[..., -1] = 1.0
    assert (conv(x) - conv(torch.zeros_like(x)))[..., 0].abs().sum() > 0
    with pytest.raises(ValueError, match="odd"):
        periodic_conv(1, 1, 1, 4)
    with pytest.raises(ValueError, match="1-D and 2-D"):
        periodic_conv(3, 1, 1, 3)


def test_embeddings():
    e = SinusoidalEmbedding(16, min_period=0.1, max_period=10.0)
    s = torch.linspace(-3, 3, 7)
    out = e(s)
    assert out.shape == (7, 16)
    assert torch.allclose(out[:, :8] ** 2 + out[:, 8:] ** 2, torch.ones(7, 8), atol=1e-6)
    # distinct inputs give distinct embeddings; the longest period is resolved (first frequency 2 pi / 10)
    assert torch.cdist(out, out).fill_diagonal_(1).min() > 0.1
    assert torch.allclose(e.freqs[0], torch.tensor(2 * torch.pi / 10.0))
    f = FourierEmbedding(8, scale=4.0, seed=1)
    assert torch.equal(f.freqs, FourierEmbedding(8, scale=4.0, seed=1).freqs)
    assert f(torch.rand(5)).shape == (5, 8)
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)


def test_film_starts_as_identity_and_modulates():
    film = FiLM(4, 3)
    h, emb = torch.randn(2, 3, 10), torch.randn(2, 4)
    assert torch.equal(film(h, emb), h)
    torch.nn.init.normal_(film.proj.weight)
    out = film(h, emb)
    assert not torch.allclose(out, h)
    # per sample and channel, an affine map of h
    gamma, beta = film.proj(emb).chunk(2, -1)
    assert torch.allclose(out, h * (1 + gamma[..., None]) + beta[..., None], atol=1e-6)


def test_resblock_shapes_and_needs_embedding():
    block = ResBlock(2, 4, 8, emb_features=6)
    assert block(torch.randn(3, 4, 8, 8), torch.randn(3, 6)).shape == (3, 8, 8, 8)
    with pytest.raises(ValueError, match="embedding"):
        block(torch.randn(3, 4, 8, 8))


@pytest.mark.parametrize("dim,grid", [(1, (40,)), (1, (12,)), (2, (32, 32)), (2, (12, 20))])
def test_unet_shapes_and_periodic_equivariance(dim, grid):
    torch.manual_seed(0)
    cls = UNet1d if dim == 1 else UNet2d
    net = cls(2, 3, channels=(8, 16, 16), blocks=1, emb_features=8, context_channels=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, c, emb = torch.randn(2, 2, *grid), torch.randn(2, 1, *grid), torch.randn(2, 8)
    out = net(x, emb, c)
    assert out.shape == (2, 3, *grid)
    if all(g % 4 == 0 for g in grid):  # shifts by a multiple of 2^(levels-1) commute with the network
        dims = tuple(range(-dim, 0))
        shift = (4,) * dim
        assert torch.allclose(net(torch.roll(x, shift, dims), emb, torch.roll(c, shift, dims)),
                              torch.roll(out, shift, dims), atol=1e-4)
    # the embedding modulates the output
    for m in net.modules():
        if isinstance(m, FiLM):
            torch.nn.init.normal_(m.proj.weight, std=0.5)
    assert not torch.allclose(net(x, emb, c), net(x, torch.randn(2, 8), c))
    with pytest.raises(ValueError, match="context"):
        net(x, emb)


def test_unet_fresh_output_is_zero():
    net = UNet1d(1, 1, channels=(8, 8))
    assert torch.equal(net(torch.randn(2, 1, 16), torch.randn(2, 64)), torch.zeros(2, 1, 16))


def test_encoder_lifts_stations_onto_the_grid():
    task = sbida.tasks.get("lorenz96", K=16)
    H = task.observation.matrix()
    enc = WindowEncoder(task.state_shape, task.obs_shape, range(-2, 1), H, channels=8, depth=1, features=16)
    y = torch.randn(2, 3, *task.obs_shape)
    mask = torch.rand(2, 3, *task.obs_shape) > 0.3
    lifted = enc.lift_window(y, mask)
    assert lifted.shape == (2, 3, 3, 16)
    assert torch.allclose(lifted[:, :, 0], (y * mask) @ H, atol=1e-6)  # H^T (m y)
    assert torch.allclose(lifted[:, :, 1], mask.float() @ H, atol=1e-6)  # H^T m
    stations = task.observation.positions(16)
    assert torch.equal(lifted[0, 0, 2].topk(len(stations)).indices.sort().values, stations)  # where stations sit
    # unobserved values have no influence; observed ones do
    y2 = torch.where(mask, y, torch.randn_like(y))
    h, v = enc(y, mask, torch.zeros(2))
    h2, v2 = enc(y2, mask, torch.zeros(2))
    assert torch.allclose(v, v2) and torch.allclose(h, h2)
    h3, v3 = enc(torch.where(mask, y + 1, y), mask, torch.zeros(2))
    assert (h3 - h).abs().max() > 0.05 and (v3 - v).abs().max() > 0.01
    assert h.shape == (2, 8, 16) and v.shape == (2, 16)


def test_encoder_2d_and_variable_window():
    enc = WindowEncoder((2, 16, 16), (2, 16, 16), range(-3, 1), None, channels=8, depth=1, features=12,
                        aggregate="mean")
    y = torch.randn(3, 4, 2, 16, 16)
    m = torch.rand(3, 4, 2, 16, 16) > 0.5
    h, v = enc(y, m, torch.zeros(3))
    assert h.shape == (3, 8, 16, 16) and v.shape == (3, 12)
    h, v = enc(y[:, :2], m[:, :2], torch.zeros(3), lags=torch.tensor([-5.0, 0.0]))
    assert v.shape == (3, 12)
    with pytest.raises(ValueError, match="lags"):
        enc(y[:, :2], m[:, :2], torch.zeros(3))
    with pytest.raises(ValueError, match="lift"):
        WindowEncoder((16,), (4,), [0])


@pytest.mark.parametrize("shape", [(3, 4, 10, 40), (3, 4, 5, 20), (3, 4, 1, 8), (2, 3, 7, 8, 16), (2, 3, 1, 4, 4)])
def test_coda_pooling_equals_max_pool_with_ceil_mode_values_and_gradients(shape):
    from sbida.nn.coda_unet import _pool

    spatial = len(shape) - 3
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    h = x.relu()  # as in the network: ties at 0, where the ReLU passes no gradient
    kernel = (2 if shape[2] > 1 else 1,) + (2,) * spatial
    ref = (torch.nn.functional.max_pool2d if spatial == 1 else torch.nn.functional.max_pool3d)(h, kernel,
                                                                                            ceil_mode=True)
    out = _pool(h, spatial)
    assert torch.equal(out, ref)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.autograd.grad((out * w).sum(), x, retain_graph=True)[0],
                       torch.autograd.grad((ref * w).sum(), x)[0])


@pytest.mark.parametrize("spatial, shape", [(1, (3, 2, 5, 16)), (2, (2, 4, 3, 8, 8))])
def test_coda_inference_folds_batch_norm_into_the_convolutions_with_the_same_output(spatial, shape, monkeypatch):
    """In eval mode the blocks fold batch norm (running statistics, affine) into their convolutions: same output and
    input gradient as convolution, batch norm and ReLU applied one after the other."""
    import torch.nn.functional as F

    from sbida.nn import coda_unet

    torch.manual_seed(0)
    net = coda_unet.CODAUNet(shape[1], 1, spatial, (4, 8)).eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.2, 3.0)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    x = torch.randn(shape, requires_grad=True)
    out = net(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)

    def plain(block, h):
        for conv, norm in block.layers:
            h = F.relu(norm(conv(coda_unet._circular_space(h, block.spatial, block.pad))))
        return h

    monkeypatch.setattr(coda_unet._Block, "forward", plain)
    ref = net(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert ref.abs().max() > 0.1
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5) and torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5)
