r"""Likelihoods :math:`p_\theta(x \mid z)`: a distribution over one datapoint :math:`x` given the
decoder output at :math:`z`.

Protocol: a likelihood is an ``nn.Module`` with

- ``decoder_outputs(data_dim) -> int``: how many numbers the decoder emits per datapoint;
- ``setup(data_dim)``: called once by the VAE (create learned parameters here);
- ``distribution(decoder_output)``: a Pyro distribution with ``event_shape == (data_dim,)`` and
  the decoder output's leading dimensions as batch shape;
- ``check_support(x)``: raise :class:`pyro_vae.errors.DataError` (one line) when the data lie
  outside the distribution's support;
- optionally ``name`` and ``options()`` as for priors.

A likelihood with :math:`k` parameters per dimension has the decoder emit :math:`k \cdot D`
numbers laid out in blocks (block-major): ``decoder_output[..., j*D:(j+1)*D]`` is parameter block
:math:`j`.

Image grids and reconstructions use ``distribution(...).mean``.

The catalogue (``LIKELIHOODS``):

=========================  ==========  =====================================================
name                       blocks      data
=========================  ==========  =====================================================
``bernoulli``              1           [0, 1] (binary; grey levels by the BCE convention)
``continuous-bernoulli``   1           [0, 1]
``beta``                   2           [0, 1], clamped into :math:`[\epsilon, 1 - \epsilon]`
``categorical``            ``levels``  [0, 1], rounded to ``levels`` evenly spaced levels
``normal``                 1 or 2      real
``laplace``                1 or 2      real
``poisson``                1           non-negative integer counts
``negative-binomial``      2           non-negative integer counts
=========================  ==========  =====================================================
"""

from __future__ import annotations

import math
import numbers

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch import nn

from ..errors import ConfigError, DataError

#: Smallest scale (:math:`\sigma` of a Normal, :math:`b` of a Laplace) a learned scale can reach
#: (keeps densities finite).
MIN_SCALE = 1e-3
#: Smallest concentration (Beta :math:`\alpha` and :math:`\beta`, negative-binomial total count)
#: from the decoder.
MIN_CONCENTRATION = 1e-3
#: Smallest Poisson rate from the decoder (log_prob stays finite for every count).
MIN_RATE = 1e-6


# -- support checks -------------------------------------------------------------------------------
def _refuse_unless(x: torch.Tensor, ok: torch.Tensor, name: str, need: str, hint: str = "") -> None:
    """Raise a one-line DataError naming the first value (and its row) where ``ok`` is False.

    ``ok`` must be False wherever ``x`` is NaN (comparisons with NaN are False, so masks built
    from ``>=``, ``<=`` and ``==`` are)."""
    if bool(ok.all()):
        return
    rows = ok.reshape(ok.shape[0], -1) if ok.dim() > 1 else ok.reshape(1, -1)
    values = x.reshape(rows.shape)
    row = int((~rows).any(dim=1).nonzero()[0])
    column = int((~rows[row]).nonzero()[0])
    value = float(values[row, column])
    raise DataError(f"likelihood {name!r} needs {need}, but the data hold {value:g} "
                    f"(row {row}){hint}")


def _check_unit_interval(x: torch.Tensor, name: str) -> None:
    _refuse_unless(x, (x >= 0.0) & (x <= 1.0), name, "data in [0, 1]",
                   " (use --likelihood normal for real-valued data)")


def _check_counts(x: torch.Tensor, name: str) -> None:
    ok = torch.isfinite(x) & (x >= 0.0) & (x == torch.round(x))
    _refuse_unless(x, ok, name, "non-negative integer counts")


def _blocks(decoder_output: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Split a decoder output of k block-major parameter blocks (each D wide) into k tensors."""
    return decoder_output.chunk(k, dim=-1)


# -- distributions ------------------------------------------------------------------------------
#: Beta data are clamped into ``[BETA_EPSILON, 1 - BETA_EPSILON]`` before scoring (see ``Beta``).
BETA_EPSILON = 1e-3


class ClampedBeta(dist.Beta):
    r"""A Beta distribution whose ``log_prob`` first clamps the value into
    :math:`[\epsilon, 1 - \epsilon]`.

    Sampling, ``mean`` and ``variance`` are those of the plain Beta; only the scoring of data
    at (or within :math:`\epsilon` of) 0 and 1 changes, where a Beta density is 0 or infinite.
    :math:`\epsilon` is the class
    attribute ``EPSILON`` (no custom ``__init__``, so torch's ``expand`` keeps working)."""

    EPSILON = BETA_EPSILON

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)  # the closed [0, 1]: 0 and 1 themselves are valid data
        return super().log_prob(value.clamp(self.EPSILON, 1.0 - self.EPSILON))


class DiscretizedUnitInterval(dist.TorchDistribution):
    r"""A categorical distribution over the :math:`L` evenly spaced levels
    :math:`0, \frac{1}{L-1}, \dots, 1` of :math:`[0, 1]`.

    ``logits[..., l]`` is the (unnormalized) log-probability of level :math:`l`; the batch shape
    is ``logits.shape[:-1]`` and the event shape is ``()`` (use ``.to_event`` for vectors).
    A value :math:`v` is scored at level :math:`\operatorname{round}(v \cdot (L - 1))` (ties to
    even, as ``torch.round``), so any value in :math:`[0, 1]` is accepted and quantized;
    ``sample()`` returns :math:`\text{level} / (L - 1)`.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.unit_interval  # every v in [0, 1] is scored at its nearest level
    has_rsample = False

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        if logits.dim() < 1 or logits.shape[-1] < 2:
            raise ValueError("DiscretizedUnitInterval needs logits of shape [..., levels >= 2]")
        self.logits = logits - logits.logsumexp(dim=-1, keepdim=True)  # normalized
        super().__init__(batch_shape=logits.shape[:-1], event_shape=torch.Size(),
                         validate_args=validate_args)

    @property
    def levels(self) -> int:
        return self.logits.shape[-1]

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    @property
    def grid(self) -> torch.Tensor:
        r"""The :math:`L` level values :math:`l / (L - 1)`."""
        return torch.linspace(0.0, 1.0, self.levels, dtype=self.logits.dtype,
                              device=self.logits.device)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedUnitInterval, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + (self.levels,))
        super(DiscretizedUnitInterval, new).__init__(batch_shape, torch.Size(),
                                                     validate_args=False)
        new._validate_args = self._validate_args
        return new

    def level_of(self, value: torch.Tensor) -> torch.Tensor:
        r"""The level index of each value: :math:`\operatorname{round}(v \cdot (L - 1))`, clamped to
        :math:`[0, L - 1]`."""
        return torch.round(value * (self.levels - 1)).clamp(0, self.levels - 1).long()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        index = self.level_of(value).expand(shape).unsqueeze(-1)
        logits = self.logits.expand(shape + (self.levels,))
        return logits.gather(-1, index).squeeze(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            levels = torch.distributions.Categorical(logits=self.logits).sample(sample_shape)
            return levels.to(self.logits.dtype) / (self.levels - 1)

    @property
    def mean(self) -> torch.Tensor:
        return (self.probs * self.grid).sum(-1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.probs * self.grid**2).sum(-1) - self.mean**2

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.logits).sum(-1)


# -- likelihoods on [0, 1] ----------------------------------------------------------------------
class Bernoulli(nn.Module):
    r""":math:`x_d \sim \mathrm{Bernoulli}(\operatorname{sigmoid}(f_\theta(z)_d))`, independently
    over dimensions.

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
    r""":math:`x_d \sim \mathrm{ContinuousBernoulli}(\lambda_d)` with
    :math:`\lambda_d = \operatorname{sigmoid}(f_\theta(z)_d)`, a normalized density on
    :math:`[0, 1]` (Loaiza-Ganem & Cunningham 2019)."""

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


class Beta(nn.Module):
    r""":math:`x_d \sim \mathrm{Beta}(\alpha_d(z), \beta_d(z))`: the decoder emits 2 blocks
    (:math:`\alpha`'s, then :math:`\beta`'s), each mapped to ``softplus(raw) + MIN_CONCENTRATION``.

    A Beta density at exactly 0 or 1 is 0 or infinite, and data in :math:`[0, 1]` (such as the
    digits' background pixels) sit there, so data are clamped into
    :math:`[\epsilon, 1 - \epsilon]` with ``EPSILON = 1e-3`` before scoring (by
    :class:`ClampedBeta`). Why 1e-3: it is far below half the spacing of 8-bit (1/255) or
    17-level (1/16) grey levels, so no two distinct levels merge and their order is kept;
    :math:`1 - \epsilon` is exact enough in float32; and :math:`\log \epsilon \approx -6.9` keeps
    the gradients at the edges moderate. The scores are those of the slightly moved data: a
    density, not comparable with the probabilities of the discrete likelihoods (``bernoulli``,
    ``categorical``), and it can grow without bound when the decoder concentrates at
    :math:`\epsilon`.
    """

    name = "beta"
    EPSILON = ClampedBeta.EPSILON

    def decoder_outputs(self, data_dim: int) -> int:
        return 2 * data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        raw_alpha, raw_beta = _blocks(decoder_output, 2)
        return ClampedBeta(F.softplus(raw_alpha) + MIN_CONCENTRATION,
                           F.softplus(raw_beta) + MIN_CONCENTRATION).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, self.name)

    def options(self) -> dict:
        return {}


class Categorical(nn.Module):
    r""":math:`x_d` takes one of :math:`L` = ``levels`` evenly spaced values
    :math:`0, \frac{1}{L-1}, \dots, 1`, with probabilities softmax over the decoder's :math:`L`
    logits for dimension :math:`d` (a "256-way softmax" likelihood).

    The decoder emits :math:`L` blocks of :math:`D` logits (block-major: block :math:`l` holds
    the logits of level :math:`l` for every dimension). A value :math:`v` is scored at level
    :math:`\operatorname{round}(v \cdot (L - 1))`; for the digits (values :math:`k/16`)
    ``levels=17`` is exact, the default 256 suits 8-bit images. The log-likelihood is a
    log-probability (:math:`\le 0`), comparable across models of the same ``levels``.
    """

    name = "categorical"

    def __init__(self, levels: int = 256):
        super().__init__()
        if isinstance(levels, str):
            try:
                levels = int(levels)
            except ValueError:
                pass
        if isinstance(levels, numbers.Real) and not isinstance(levels, numbers.Integral) \
                and float(levels).is_integer():
            levels = int(levels)  # 17.0 is 17
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
            raise ConfigError(f"categorical likelihood levels must be an integer >= 2, "
                              f"not {levels!r}")
        levels = int(levels)
        if levels < 2:
            raise ConfigError(f"categorical likelihood levels must be at least 2, not {levels}")
        self.levels = levels

    def decoder_outputs(self, data_dim: int) -> int:
        return self.levels * data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        # [..., L*D] block-major → [..., L, D] → [..., D, L]
        data_dim = decoder_output.shape[-1] // self.levels
        logits = decoder_output.unflatten(-1, (self.levels, data_dim)).transpose(-1, -2)
        return DiscretizedUnitInterval(logits).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval(x, self.name)

    def options(self) -> dict:
        return {"levels": self.levels}


# -- location-scale likelihoods for real data ---------------------------------------------------
class LocationScale(nn.Module):
    r""":math:`x \sim \text{family}(f_\theta(z), \text{scale})`, independently over dimensions;
    subclasses set ``name`` and
    ``family`` (a Pyro location-scale distribution class taking ``(loc, scale)``).

    ``scale`` chooses the scale:

    - ``"shared"`` (default): one learned scale for all dimensions;
    - ``"per-dim"``: one learned scale per dimension;
    - ``"decoder"``: the scale from the decoder (it emits 2 blocks: locations, then raw scales);
    - a positive number: the scale fixed to that value.

    Learned scales are ``softplus(ρ) + MIN_SCALE``, initialised at ``init_scale``.
    """

    name: str
    family: type[dist.Distribution]
    SCALES = ("shared", "per-dim", "decoder")

    def __init__(self, scale: str | float = "shared", init_scale: float = 1.0):
        super().__init__()
        if isinstance(scale, str):
            if scale not in self.SCALES:
                try:
                    scale = float(scale)
                except ValueError:
                    raise ConfigError(f"{self.name} likelihood scale must be one of "
                                      f"{', '.join(self.SCALES)} or a positive number, "
                                      f"not {scale!r}") from None
        if not isinstance(scale, str):
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise ConfigError(f"{self.name} likelihood scale must be one of "
                                  f"{', '.join(self.SCALES)} or a positive number, "
                                  f"not {scale!r}")
            if not (scale > 0 and math.isfinite(scale)):
                raise ConfigError(f"{self.name} likelihood scale must be positive, not {scale!r}")
            scale = float(scale)
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) \
                or not (init_scale > MIN_SCALE and math.isfinite(init_scale)):
            raise ConfigError(f"{self.name} likelihood init_scale must be a finite number "
                              f"above {MIN_SCALE}, not {init_scale!r}")
        self.scale = scale
        self.init_scale = float(init_scale)

    def decoder_outputs(self, data_dim: int) -> int:
        return 2 * data_dim if self.scale == "decoder" else data_dim

    def setup(self, data_dim: int) -> None:
        # ρ with softplus(ρ) + MIN_SCALE = init_scale (inverse softplus, stable for large y)
        y = self.init_scale - MIN_SCALE
        rho = y + math.log(-math.expm1(-y))
        if self.scale == "shared":
            self.raw_scale = nn.Parameter(torch.full((1,), rho))
        elif self.scale == "per-dim":
            self.raw_scale = nn.Parameter(torch.full((data_dim,), rho))
        elif self.scale != "decoder":
            self.register_buffer("fixed_scale", torch.tensor(float(self.scale)))

    def loc_scale(self, decoder_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The location and the scale (expanded to the location's shape)."""
        if self.scale == "decoder":
            loc, raw = _blocks(decoder_output, 2)
            scale = F.softplus(raw) + MIN_SCALE
        elif isinstance(self.scale, str):
            loc = decoder_output
            scale = F.softplus(self.raw_scale) + MIN_SCALE
        else:
            loc = decoder_output
            scale = self.fixed_scale
        return loc, scale.expand_as(loc)

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return self.family(*self.loc_scale(decoder_output)).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        pass  # every finite real vector; non-finite values are refused when the data load

    def options(self) -> dict:
        return {"scale": self.scale, "init_scale": self.init_scale}


class Normal(LocationScale):
    r""":math:`x \sim \mathcal{N}(f_\theta(z), \operatorname{diag}(\sigma^2))`; ``scale`` is
    :math:`\sigma` (see :class:`LocationScale` for the options)."""

    name = "normal"
    family = dist.Normal


class Laplace(LocationScale):
    r""":math:`x_d \sim \mathrm{Laplace}(f_\theta(z)_d, b)`, density
    :math:`\exp(-|x - \mu|/b) / (2b)`: heavier tails than the Normal, an L1 reconstruction error.
    ``scale`` is :math:`b` (standard deviation :math:`\sqrt 2\, b`); the options are those of
    :class:`LocationScale`."""

    name = "laplace"
    family = dist.Laplace


# -- likelihoods for counts ---------------------------------------------------------------------
class Poisson(nn.Module):
    r""":math:`x_d \sim \mathrm{Poisson}(\operatorname{softplus}(f_\theta(z)_d) + c)`,
    :math:`c` = ``MIN_RATE``, for non-negative integer counts (stored as floats: 3.0 is the count
    3)."""

    name = "poisson"

    def decoder_outputs(self, data_dim: int) -> int:
        return data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        return dist.Poisson(F.softplus(decoder_output) + MIN_RATE).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_counts(x, self.name)

    def options(self) -> dict:
        return {}


class NegativeBinomial(nn.Module):
    r""":math:`x_d \sim \mathrm{NegativeBinomial}(r_d(z), \text{logits}_d(z))` for over-dispersed
    counts: the decoder emits 2 blocks, :math:`r = \operatorname{softplus}(\text{block } 0) + c`
    (:math:`c` = ``MIN_CONCENTRATION``) and the logits = block 1.

    torch's parametrization: the number of successes before :math:`r` failures, success
    probability :math:`p = \operatorname{sigmoid}(\text{logits})`; mean
    :math:`r p / (1 - p) = r \exp(\text{logits})`, variance :math:`\text{mean} / (1 - p)`."""

    name = "negative-binomial"

    def decoder_outputs(self, data_dim: int) -> int:
        return 2 * data_dim

    def setup(self, data_dim: int) -> None:
        pass

    def distribution(self, decoder_output: torch.Tensor) -> dist.Distribution:
        raw_total, logits = _blocks(decoder_output, 2)
        return dist.NegativeBinomial(total_count=F.softplus(raw_total) + MIN_CONCENTRATION,
                                     logits=logits).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_counts(x, self.name)

    def options(self) -> dict:
        return {}


#: The built-in likelihoods by name (the ``likelihood=`` names of :class:`pyro_vae.VAE`).
LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": Bernoulli,
    "continuous-bernoulli": ContinuousBernoulli,
    "beta": Beta,
    "categorical": Categorical,
    "normal": Normal,
    "laplace": Laplace,
    "poisson": Poisson,
    "negative-binomial": NegativeBinomial,
}
#: The methods every likelihood must have.
PROTOCOL = ("decoder_outputs", "setup", "distribution", "check_support")
