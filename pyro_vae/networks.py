r"""Networks shared by encoders (``pyro_vae.guides``) and decoders (``pyro_vae.models``).

A network maps a flat input ``[..., in_features]`` to a flat output ``[..., out_features]`` and
accepts any number of leading batch dimensions (particles, data), so the same decoder serves one
sample of :math:`z` or K vectorized particles. An optional ``context`` ``[..., context_features]``
(a one-hot label for conditional VAEs) is broadcast against the input's leading dimensions and
joins the input.

Decoder outputs are laid out as :math:`k` blocks of ``data_dim`` numbers (block-major), one block
per parameter of the likelihood; the ``conv`` decoder emits its :math:`k \cdot C` channels in that
order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError

#: The network kinds (``encoder=`` / ``decoder=`` of :class:`pyro_vae.VAE`).
NETWORKS = ("mlp", "linear", "conv")
#: The activations of the hidden layers of ``mlp`` networks (``activation=`` of
#: :class:`pyro_vae.VAE`); ``tanh`` is the architecture of Burda et al. (2016).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU,
    "silu": nn.SiLU, "leaky-relu": nn.LeakyReLU,
}


def activation_class(name: str) -> type[nn.Module]:
    """The module class of the activation ``name`` (:data:`ACTIVATIONS`), or one line."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown activation {name!r}; choose one of: "
                          f"{', '.join(ACTIVATIONS)}") from None


def _join(inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    if context is None:
        return inputs
    context = context.expand(*inputs.shape[:-1], context.shape[-1])
    return torch.cat([inputs, context], dim=-1)


class MLP(nn.Module):
    """Fully connected network: Linear → activation → … → Linear (no output activation)."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.ReLU, context_features: int = 0):
        super().__init__()
        sizes = [in_features + context_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(_join(inputs, context))


class LinearNet(nn.Module):
    """A single affine map; with a Normal likelihood this makes the model probabilistic PCA."""

    def __init__(self, in_features: int, out_features: int, context_features: int = 0):
        super().__init__()
        self.linear = nn.Linear(in_features + context_features, out_features)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(_join(inputs, context))


def _check_image(image_shape: Sequence[int] | None, role: str) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"a conv {role} needs image data of shape C×H×W (such as digits or "
                          f"MNIST), not data of shape {tuple(image_shape or ())}; use mlp")
    channels, height, width = (int(s) for s in image_shape)
    if height < 4 or width < 4:
        raise ConfigError(f"a conv {role} needs images of at least 4×4, not {height}×{width}")
    return channels, height, width


class ConvEncoder(nn.Module):
    r"""Two stride-2 convolutions (32, 64 channels) then an MLP head on the flattened features.

    Input ``[..., C*H*W]`` (flattened images); 8×8 digits give :math:`2 \times 2 \times 64`
    features, 28×28 MNIST :math:`7 \times 7 \times 64`.
    """

    def __init__(self, image_shape: Sequence[int], out_features: int,
                 hidden: Sequence[int] = (256,), context_features: int = 0):
        super().__init__()
        self.image_shape = _check_image(image_shape, "encoder")
        channels = self.image_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            features = self.conv(torch.zeros(1, *self.image_shape)).numel()
        self.head = MLP(features, out_features, hidden[:1] or (256,),
                        context_features=context_features)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        lead = inputs.shape[:-1]
        features = self.conv(inputs.reshape(-1, *self.image_shape)).flatten(1)
        return self.head(features.reshape(*lead, -1), context)


class ConvDecoder(nn.Module):
    r"""An MLP to a :math:`64 \times \lceil H/4 \rceil \times \lceil W/4 \rceil` feature map, then
    two stride-2 transposed convolutions to :math:`k \cdot C` channels at :math:`H \times W`
    (cropped where :math:`H` or :math:`W` is not a multiple of 4)."""

    def __init__(self, in_features: int, image_shape: Sequence[int], out_features: int,
                 hidden: Sequence[int] = (256,), context_features: int = 0):
        super().__init__()
        self.image_shape = _check_image(image_shape, "decoder")
        channels, height, width = self.image_shape
        data_dim = channels * height * width
        if out_features % data_dim:
            raise ConfigError(f"a conv decoder emits whole blocks of {data_dim}, "
                              f"not {out_features} numbers")
        self.blocks = out_features // data_dim
        self.grid = (math.ceil(height / 4), math.ceil(width / 4))
        self.head = MLP(in_features, 64 * self.grid[0] * self.grid[1], hidden[:1] or (256,),
                        context_features=context_features)
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, self.blocks * channels, 4, stride=2, padding=1),
        )

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        lead = inputs.shape[:-1]
        _, height, width = self.image_shape
        features = self.head(inputs, context).reshape(-1, 64, *self.grid)
        images = self.deconv(features)[..., :height, :width]
        return images.reshape(*lead, -1)


def make_network(kind: str, in_features: int, out_features: int,
                 hidden: Sequence[int] = (256, 256), *, role: str = "encoder",
                 image_shape: Sequence[int] | None = None, context_features: int = 0,
                 activation: str = "relu") -> nn.Module:
    """Build the ``role`` (``encoder`` or ``decoder``) network named ``kind`` (:data:`NETWORKS`).

    ``image_shape`` is the data's C×H×W shape, needed by ``conv``; ``activation`` (a name of
    :data:`ACTIVATIONS`) is that of the hidden layers of ``mlp``.
    """
    if kind == "mlp":
        return MLP(in_features, out_features, hidden, activation=activation_class(activation),
                   context_features=context_features)
    if kind == "linear":
        return LinearNet(in_features, out_features, context_features=context_features)
    if kind == "conv":
        if role == "encoder":
            return ConvEncoder(image_shape, out_features, hidden, context_features)
        return ConvDecoder(in_features, image_shape, out_features, hidden, context_features)
    raise ConfigError(f"unknown network {kind!r}; choose one of: {', '.join(NETWORKS)}")
