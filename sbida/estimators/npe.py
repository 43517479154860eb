r"""Neural posterior estimation (NPE): a normalizing flow over the state conditioned on the encoded window.

With the window encoded into a context map ``h`` on the state grid and a vector ``c``, the standardized state
``x~ = (x - mu_x) / sigma_x`` is modelled as

.. math:: \tilde x = m(h) + s(h) \odot f_c^{-1}(z), \qquad z \sim \mathcal{N}(0, I),

where ``m, s`` are a periodic convolution of the context map (a per-cell location and scale, which scales to large
grids) and ``f`` a normalizing flow for the correlations between cells. The default flow, ``"grid"``
(:class:`sbida.nn.GridFlow`), is a multiscale stack of affine couplings on the grid whose conditioners are local
networks of the state's neighbours and of the context map ``h`` (the window's share computed once per window): it sees
the mask-dependent local structure of the posterior directly, its coarse levels carry the long-range correlations, and
one sampling pass costs a few small matrix products. The others are zuko
flows conditioned on the vector ``c``. The density is exact:

.. math:: \log q(x \mid y, t) = \log p_{f_c}\big((\tilde x - m) / s\big) - \textstyle\sum_i \log s_i
          - \sum_i \log \sigma_{x,i},

and training minimises ``-E[log q(x | y, t)]`` over simulated windows (Papamakarios & Murray, 2016; Greenberg et
al., 2019). Flows: ``"realnvp"`` (affine coupling, one network pass each way: the default, fastest to sample),
``"maf"`` (affine autoregressive with ``passes`` passes), ``"nsf"`` (spline, ``passes`` passes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import zuko
from torch import Tensor
from torch.distributions import AffineTransform, Distribution, TransformedDistribution

from ..nn import GridFlow, WindowEncoder, periodic_conv
from ..posterior import DistributionPosterior
from .base import Batch, Estimator

__all__ = ["NPE"]

_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) == 1


class NPE(Estimator):
    """Neural posterior estimation with a window encoder and a conditional zuko flow.

    Hyperparameters (``NPE.defaults``): encoder ``channels``, ``depth``, ``kernel_size``, ``features`` (context
    vector; unused by the ``"grid"`` flow), ``emb_features``, ``aggregate``; flow ``flow`` (``"grid"``,
    ``"realnvp"``, ``"maf"``, ``"nsf"``), ``transforms`` (per level for ``"grid"``), ``levels`` (multiscale levels of
    the grid flow, ``None``: all), ``hidden`` (channels of the grid conditioners, or widths of
    the MLPs), ``flow_kernel`` (kernel of the grid conditioners), ``passes`` (for ``maf``/``nsf``); ``local`` (the
    convolutional location-scale head); ``sample_rows`` (rows of one sampling pass, bounds memory; the grid flow
    also keeps one activation of its conditioners under 2^22 values, which measured fastest).
    """

    defaults: dict[str, Any] = {
        "channels": 32, "depth": 3, "kernel_size": 5, "features": 128, "emb_features": 32, "aggregate": "concat",
        "flow": "grid", "transforms": 2, "levels": None, "hidden": [32], "flow_kernel": 5, "passes": 2, "local": True,
        "sample_rows": 262144,
    }

    def build(self) -> None:
        h = self.hparams
        if h["flow"] not in ("grid", "realnvp", "maf", "nsf"):
            raise ValueError(f"flow must be 'grid', 'realnvp', 'maf' or 'nsf', got {h['flow']!r}")
        D = self.event_size
        grid = h["flow"] == "grid"
        self.encoder = WindowEncoder(self.state_shape, self.obs_shape, self.lags, self.lift, channels=h["channels"],
                                     depth=h["depth"], kernel_size=h["kernel_size"],
                                     features=0 if grid else h["features"],
                                     emb_features=h["emb_features"], aggregate=h["aggregate"])
        sc = self.encoder.state_channels
        self.local_head = periodic_conv(self.encoder.dim, h["channels"], 2 * sc, 3) if h["local"] else None
        if self.local_head is not None:
            torch.nn.init.zeros_(self.local_head.weight)
            torch.nn.init.zeros_(self.local_head.bias)
        kw = {"features": D, "context": h["features"], "transforms": h["transforms"],
              "hidden_features": list(h["hidden"])}
        if grid:
            self.flow = GridFlow(self.state_shape, h["channels"], h["transforms"], list(h["hidden"]), h["flow_kernel"],
                                 h["levels"])
        elif h["flow"] == "realnvp":
            self.flow = zuko.flows.RealNVP(**kw)
        elif h["flow"] == "maf":
            self.flow = zuko.flows.MAF(**kw, passes=h["passes"])
        else:
            self.flow = zuko.flows.NSF(**kw, passes=h["passes"])

    def distribution(self, batch: Batch, unstandardize: bool = False) -> Distribution:
        """Conditional distribution of flat states (standardized, or original if ``unstandardize``), batch ``(B,)``."""
        hmap, c = self.encoder(batch.y, batch.mask, batch.t)
        transforms = []
        if self.local_head is not None:
            B = hmap.shape[0]
            loc, raw = self.local_head(hmap).chunk(2, dim=1)
            scale = F.softplus(raw + _SOFTPLUS_ONE) + 1e-3
            transforms.append(AffineTransform(loc.reshape(B, -1), scale.reshape(B, -1), event_dim=1))
        if unstandardize:
            transforms.append(AffineTransform(self.x_mean.reshape(-1), self.x_std.reshape(-1), event_dim=1))
        dist = self.flow(hmap if self.hparams["flow"] == "grid" else c)
        return TransformedDistribution(dist, transforms) if transforms else dist

    def loss(self, batch: Batch) -> Tensor:
        """Negative log-likelihood of the standardized states, averaged over the batch."""
        return -self.distribution(batch).log_prob(batch.x.flatten(1)).mean()

    def make_posterior(self, batch: Batch, **kwargs: Any) -> DistributionPosterior:
        dist = self.distribution(batch, unstandardize=True)
        rows = int(self.hparams["sample_rows"])
        if self.hparams["flow"] == "grid":  # a conditioner's activation, rows x width x D / 2 values, kept near the
            rows = min(rows, max(1, 2**23 // (max(self.hparams["hidden"]) * self.event_size)))  # cache: 16 MB
        return DistributionPosterior(dist, self.state_shape, sample_batch=max(1, rows // len(batch.y)))
