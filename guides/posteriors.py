"""Posterior families q_φ(z|x), amortized by an encoder network.

Protocol: a guide family is an ``nn.Module`` with

- ``encoder_outputs(latent_dim) -> int``: how many numbers the encoder emits per datapoint;
- ``setup(latent_dim)``: called once by the VAE (create learned parameters here);
- ``distribution(encoder_output)``: a reparameterizable Pyro distribution over z with
  ``event_shape == (latent_dim,)`` and the encoder output's leading dimensions as batch shape;
- optionally ``name`` and ``options()`` as for priors.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class DiagonalNormal(nn.Module):
    """q(z|x) = N(μ_φ(x), diag(σ_φ(x)²)), with σ = softplus(·) + ``min_scale``.

    The floor keeps log q finite when the encoder drives a scale towards zero.
    """

    name = "normal"

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        if not min_scale >= 0:
            raise ConfigError(f"normal guide min_scale must be non-negative, not {min_scale!r}")
        self.min_scale = float(min_scale)

    def encoder_outputs(self, latent_dim: int) -> int:
        return 2 * latent_dim

    def setup(self, latent_dim: int) -> None:
        pass

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = encoder_output.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)

    def options(self) -> dict:
        return {"min_scale": self.min_scale}


POSTERIORS: dict[str, type[nn.Module]] = {"normal": DiagonalNormal}
PROTOCOL = ("encoder_outputs", "setup", "distribution")
