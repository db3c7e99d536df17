"""Priors p(z).

Protocol: a prior is an ``nn.Module`` with

- ``setup(latent_dim)``: called once by the VAE before use (create parameters here);
- ``distribution()``: a Pyro distribution over z with ``event_shape == (latent_dim,)`` and
  empty batch shape (the VAE broadcasts it over the data plate and particles);
- optionally ``bind(vae)``: called once the VAE's networks exist, for priors built from them
  (a VampPrior encodes pseudo-inputs); keep a bound method or a weak reference, never the VAE
  itself as an attribute (it would become a submodule of itself);
- optionally ``name`` (the registry name) and ``options()`` (keyword arguments that rebuild it),
  so a run that uses it can be saved and restored.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormal(nn.Module):
    """p(z) = N(0, I), the prior of Kingma & Welling (2014)."""

    name = "normal"

    def setup(self, latent_dim: int) -> None:
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def distribution(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def options(self) -> dict:
        return {}


PRIORS: dict[str, type[nn.Module]] = {"normal": StandardNormal}
PROTOCOL = ("setup", "distribution")
