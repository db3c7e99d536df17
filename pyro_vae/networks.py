"""Networks shared by encoders (``pyro_vae.guides``) and decoders (``pyro_vae.models``).

A network maps a flat input ``[..., in_features]`` to a flat output ``[..., out_features]`` and
accepts any number of leading batch dimensions (particles, data), so the same decoder serves one
sample of z or K vectorized particles.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError

NETWORKS = ("mlp", "linear")


class MLP(nn.Module):
    """Fully connected network: Linear → activation → … → Linear (no output activation)."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


class LinearNet(nn.Module):
    """A single affine map; with a Normal likelihood this makes the model probabilistic PCA."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs)


def make_network(kind: str, in_features: int, out_features: int,
                 hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """Build the network named ``kind`` (one of :data:`NETWORKS`)."""
    if kind == "mlp":
        return MLP(in_features, out_features, hidden)
    if kind == "linear":
        return LinearNet(in_features, out_features)
    raise ConfigError(f"unknown network {kind!r}; choose one of: {', '.join(NETWORKS)}")
