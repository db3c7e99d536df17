"""Likelihoods p_θ(x|z): a distribution over one datapoint x given the decoder output at z.

Protocol: a likelihood is an ``nn.Module`` with

- ``decoder_outputs(data_dim) -> int``: how many numbers the decoder emits per datapoint;
- ``setup(data_dim)``: called once by the VAE (create learned parameters here);
- ``distribution(decoder_output)``: a Pyro distribution with ``event_shape == (data_dim,)`` and
  the decoder output's leading dimensions as batch shape;
- ``check_support(x)``: raise :class:`pyro_vae.errors.DataError` (one line) when the data lie
  outside the distribution's support;
- optionally ``name`` and ``options()`` as for priors.

Image grids and reconstructions use ``distribution(...).mean``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

#: Smallest standard deviation a learned Normal scale can reach (keeps densities finite).
MIN_SCALE = 1e-3


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    low, high = float(x.min()), float(x.max())
    if not (low >= 0.0 and high <= 1.0):  # written so that NaN fails too
        raise DataError(f"likelihood {name!r} needs data in [0, 1], but the data range from "
                        f"{low:g} to {high:g} (use --likelihood normal for real-valued data)")


class Bernoulli(nn.Module):
    """x_d ~ Bernoulli(sigmoid(f_θ(z)_d)), independently over dimensions.

    .. warning:: For data in [0, 1] that are not binary (grey levels) the "log-likelihood" is the
       negative binary cross-entropy, the usual VAE convention, not the log of a normalized
       density. Use ``continuous-bernoulli`` for a proper density on [0, 1], or binarize the data.
    """

    name = "bernoulli"

    def decoder_outputs(self, data_dim: int) -> int:
        return data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        # Grey levels are accepted on purpose (see the warning), so torch's {0,1} check is off;
        # the data are checked once against [0, 1] by ``check_support``.
        return dist.Bernoulli(logits=decoder_output, validate_args=False).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, self.name)

    def options(self) -> dict:
        return {}


class ContinuousBernoulli(nn.Module):
    """x_d ~ ContinuousBernoulli(λ = sigmoid(f_θ(z)_d)), a normalized density on [0, 1]
    (Loaiza-Ganem & Cunningham 2019)."""

    name = "continuous-bernoulli"

    def decoder_outputs(self, data_dim: int) -> int:
        return data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=decoder_output).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, self.name)

    def options(self) -> dict:
        return {}


class Normal(nn.Module):
    """x ~ N(f_θ(z), diag(σ²)).

    ``scale`` chooses σ:

    - ``"shared"`` (default): one learned σ for all dimensions;
    - ``"per-dim"``: one learned σ_d per dimension;
    - ``"decoder"``: σ(z) from the decoder (it emits 2·D numbers);
    - a positive number: σ fixed to that value.

    Learned scales are ``softplus(ρ) + MIN_SCALE``, initialised at ``init_scale``.
    """

    name = "normal"
    SCALES = ("shared", "per-dim", "decoder")

    def __init__(self, scale: str | float = "shared", init_scale: float = 1.0):
        super().__init__()
        if isinstance(scale, str):
            if scale not in self.SCALES:
                try:
                    scale = float(scale)
                except ValueError:
                    raise ConfigError(f"normal likelihood scale must be one of "
                                      f"{', '.join(self.SCALES)} or a positive number, "
                                      f"not {scale!r}") from None
        if not isinstance(scale, str) and not (scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"normal likelihood scale must be positive, not {scale!r}")
        if not init_scale > MIN_SCALE:
            raise ConfigError(f"normal likelihood init_scale must exceed {MIN_SCALE}")
        self.scale = scale
        self.init_scale = float(init_scale)

    def decoder_outputs(self, data_dim: int) -> int:
        return 2 * data_dim if self.scale == "decoder" else data_dim

    def setup(self, data_dim: int) -> None:
        # ρ with softplus(ρ) + MIN_SCALE = init_scale
        rho = math.log(math.expm1(self.init_scale - MIN_SCALE))
        if self.scale == "shared":
            self.raw_scale = nn.Parameter(torch.full((1,), rho))
        elif self.scale == "per-dim":
            self.raw_scale = nn.Parameter(torch.full((data_dim,), rho))
        elif self.scale != "decoder":
            self.register_buffer("fixed_scale", torch.tensor(float(self.scale)))

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        if self.scale == "decoder":
            loc, raw = decoder_output.chunk(2, dim=-1)
            scale = F.softplus(raw) + MIN_SCALE
        elif isinstance(self.scale, str):
            loc = decoder_output
            scale = F.softplus(self.raw_scale) + MIN_SCALE
        else:
            loc = decoder_output
            scale = self.fixed_scale
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        pass  # every finite real vector; non-finite values are refused when the data load

    def options(self) -> dict:
        return {"scale": self.scale, "init_scale": self.init_scale}


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": Bernoulli,
    "continuous-bernoulli": ContinuousBernoulli,
    "normal": Normal,
}
PROTOCOL = ("decoder_outputs", "setup", "distribution", "check_support")
