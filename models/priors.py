r"""Priors :math:`p(z)`.

Protocol: a prior is an ``nn.Module`` with

- ``setup(latent_dim)``: called once by the VAE before use (create parameters here);
- ``distribution()``: a Pyro distribution over :math:`z` with ``event_shape == (latent_dim,)`` and
  empty batch shape (the VAE broadcasts it over the data plate and particles);
- optionally ``bind(vae)``: called once the VAE's networks exist, for priors built from them
  (a VampPrior encodes pseudo-inputs); keep a bound method or a weak reference, never the VAE
  itself as an attribute (it would become a submodule of itself);
- optionally ``name`` (the registry name) and ``options()`` (keyword arguments that rebuild it),
  so a run that uses it can be saved and restored.

The catalogue (``PRIORS``):

.. list-table::
   :header-rows: 1

   * - name
     - :math:`p(z)`
     - ``meanfield``
   * - ``normal``
     - :math:`\mathcal{N}(0, I)`
     - yes
   * - ``learned-normal``
     - :math:`\mathcal{N}(\mu, \operatorname{diag} \sigma^2)`, :math:`\mu` and :math:`\sigma`
       trained
     - yes
   * - ``laplace``
     - :math:`\prod_d \mathrm{Laplace}(0, b)`, :math:`b` = ``scale``
     - ``normal`` guide
   * - ``studentt``
     - :math:`\prod_d \mathrm{StudentT}(\nu, 0, 1)`, :math:`\nu` = ``df``
     - no
   * - ``mog``
     - mixture of ``components`` trained diagonal Gaussians
     - no
   * - ``vamp``
     - VampPrior: :math:`\frac{1}{K} \sum_k q(z \mid u_k)`, K = ``components``
     - no
   * - ``flow``
     - :math:`\mathcal{N}(0, I)` pushed through ``layers`` trained coupling layers
     - no
   * - ``categorical``
     - one-hot :math:`z` over ``latent_dim`` categories; uniform or ``learn``
     - ``categorical``
   * - ``relaxed-categorical``
     - Concrete / Gumbel-softmax at ``temperature``, uniform
     - no

The ``meanfield`` column says with which guides a closed-form :math:`\mathrm{KL}(q \,\|\, p)`
exists: "yes" means the
``normal`` and ``full-rank`` guides (not ``flow``); the ``categorical`` pair has torch's
registered KL between two one-hot categoricals. Elsewhere ``meanfield`` refuses; ``elbo``,
``iwae``, ``renyi``, ``dreg`` and ``stl`` need only :math:`\log p(z)` and work with every
continuous prior.

The two discrete priors pair with the guides of the same name (:math:`z` must lie in the prior's
support: one-hot vectors, or the open simplex): ``categorical`` prior, ``categorical`` guide and
a ``linear`` decoder with a Normal likelihood make a Gaussian mixture with ``latent_dim``
clusters, the decoder mapping each one-hot :math:`z` to its cluster mean.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

#: Smallest standard deviation a trained scale can reach (keeps :math:`\log p(z)` finite).
MIN_SCALE = 1e-4
#: Factor on the initial output weights of a flow prior's coupling networks (near-identity start).
INITIAL_OUTPUT_SCALE = 0.01


def _inverse_softplus(y: float) -> float:
    """ρ with softplus(ρ) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, not {value!r}")
    return int(value)


def _boolean(what: str, value) -> bool:
    if not isinstance(value, bool):  # a real bool: "false" or 0 would pass ``bool(value)``
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    return value


def _positive_float(what: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a positive number, not {value!r}") from None
    if isinstance(value, bool) or not (number > 0 and math.isfinite(number)):
        raise ConfigError(f"{what} must be a positive finite number, not {value!r}")
    return number


class OneHotCategorical(dist.OneHotCategorical):
    """Pyro's one-hot categorical, drawing its one-hot vectors by comparison with the category
    indices: torch's ``one_hot`` reads the largest index back to the host (a synchronisation
    per step on a GPU). Values and log-densities are the same."""

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance or self._get_checked_instance(OneHotCategorical, _instance))

    def sample(self, sample_shape=torch.Size()):
        indices = self._categorical.sample(torch.Size(sample_shape))
        probs = self._categorical.probs
        categories = torch.arange(self._categorical._num_events, device=indices.device)
        return (indices.unsqueeze(-1) == categories).to(probs)


class RelaxedOneHotCategorical(dist.RelaxedOneHotCategorical):
    r"""Pyro's Concrete / Gumbel-softmax distribution, its draws kept off the simplex's faces:
    a coordinate below the smallest normal float is raised to it. In float32 a coordinate
    underflows to exactly 0 once its log-space value falls below about −87 (frequent at small
    temperatures), where the density, :math:`\log z` and every gradient through them are
    :math:`-\infty` or NaN."""

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RelaxedOneHotCategorical, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size()):
        z = super().rsample(sample_shape)
        return z.clamp(min=torch.finfo(z.dtype).tiny)

    def log_prob(self, value):
        return super().log_prob(value.clamp(min=torch.finfo(value.dtype).tiny))


class StandardNormal(nn.Module):
    r""":math:`p(z) = \mathcal{N}(0, I)`, the prior of Kingma & Welling (2014)."""

    name = "normal"

    def setup(self, latent_dim: int) -> None:
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def distribution(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def options(self) -> dict:
        return {}


class LearnedNormal(nn.Module):
    r""":math:`p(z) = \mathcal{N}(\mu, \operatorname{diag} \sigma^2)` with trainable :math:`\mu`
    (initially 0) and :math:`\sigma = \operatorname{softplus}(\rho) + 10^{-4}` (initially 1):
    :math:`\mathcal{N}(0, I)` at initialisation, with a closed-form KL from a Gaussian guide."""

    name = "learned-normal"

    def setup(self, latent_dim: int) -> None:
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.full((latent_dim,), _inverse_softplus(1.0 - MIN_SCALE)))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + MIN_SCALE

    def distribution(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def options(self) -> dict:
        return {}


class LaplacePrior(nn.Module):
    r""":math:`p(z) = \prod_d \mathrm{Laplace}(z_d; 0, b)`, :math:`b` = ``scale``. The default
    :math:`b = 1/\sqrt 2` gives each dimension variance :math:`2b^2 = 1`, as under
    :math:`\mathcal{N}(0, I)`, with heavier (exponential) tails and a cusp at 0."""

    name = "laplace"

    def __init__(self, scale: float = 1 / math.sqrt(2)):
        super().__init__()
        self.scale_value = _positive_float("laplace prior scale", scale)

    def setup(self, latent_dim: int) -> None:
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.full((latent_dim,), self.scale_value))

    def distribution(self) -> dist.Distribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)

    def options(self) -> dict:
        return {"scale": self.scale_value}


class _StudentT(dist.StudentT):
    """Pyro's ``StudentT`` built without a host upload: torch's constructor makes its χ²
    (used for sampling) as ``Chi2(df)`` = ``Gamma(df / 2, 0.5)``, turning the Python 0.5 into a
    new device tensor, a synchronous copy on a GPU at every step. Here the rate is filled on the
    device. Same distribution, same values."""

    def __init__(self, df: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 validate_args=None):
        self.df, self.loc, self.scale = torch.broadcast_tensors(df, loc, scale)
        self._chi2 = dist.Gamma(0.5 * self.df, torch.full_like(self.df, 0.5))
        torch.distributions.Distribution.__init__(self, self.df.size(),
                                                  validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> "_StudentT":
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(_StudentT, _instance)
        new.df, new.loc, new.scale = (t.expand(batch_shape) for t in (self.df, self.loc, self.scale))
        new._chi2 = self._chi2.expand(batch_shape)
        torch.distributions.Distribution.__init__(new, batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


class StudentTPrior(nn.Module):
    r""":math:`p(z) = \prod_d \mathrm{StudentT}(z_d; \nu, 0, 1)`, :math:`\nu` = ``df`` > 0
    (default 5): polynomial tails; the variance :math:`\nu/(\nu - 2)` exists for :math:`\nu > 2`
    only."""

    name = "studentt"

    def __init__(self, df: float = 5.0):
        super().__init__()
        self.df = _positive_float("studentt prior df", df)

    def setup(self, latent_dim: int) -> None:
        self.register_buffer("df_vector", torch.full((latent_dim,), self.df))
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def distribution(self) -> dist.Distribution:
        return _StudentT(self.df_vector, self.loc, self.scale).to_event(1)

    def options(self) -> dict:
        return {"df": self.df}


class MixtureOfGaussians(nn.Module):
    r""":math:`p(z) = \sum_c \pi_c\, \mathcal{N}(z; \mu_c, \operatorname{diag} \sigma_c^2)`, all
    trained: :math:`\pi = \operatorname{softmax}(\text{logits})`,
    :math:`\sigma_c = \operatorname{softplus}(\rho_c) + 10^{-4}`.

    Initialisation (from the global torch RNG, so seed before building the VAE): equal weights,
    means :math:`\mu_c \sim \mathcal{N}(0, \frac14 I)`, scales :math:`\sigma = \sqrt{3/4}`. Each
    dimension then has variance :math:`\frac14 + \frac34 = 1` in expectation over the draw of the
    means: close to :math:`\mathcal{N}(0, I)`, but with distinct components that training can pull
    apart.
    """

    name = "mog"

    def __init__(self, components: int = 10):
        super().__init__()
        self.components = _positive_int("mog prior components", components)

    def setup(self, latent_dim: int) -> None:
        c = self.components
        self.logits = nn.Parameter(torch.zeros(c))
        self.locs = nn.Parameter(0.5 * torch.randn(c, latent_dim))
        self.raw_scales = nn.Parameter(
            torch.full((c, latent_dim), _inverse_softplus(math.sqrt(0.75) - MIN_SCALE)))

    @property
    def scales(self) -> torch.Tensor:
        return F.softplus(self.raw_scales) + MIN_SCALE

    def distribution(self) -> dist.Distribution:
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      dist.Normal(self.locs, self.scales).to_event(1))

    def options(self) -> dict:
        return {"components": self.components}


class _BroadcastingMixture(dist.MixtureSameFamily):
    """MixtureSameFamily whose log_prob hands its components z already expanded along the
    component dimension (``[..., K, latent_dim]``) instead of a size-1 dimension there.

    The densities are the same; the difference matters for components that cannot broadcast a
    size-1 dimension against their K, such as a flow guide's transforms conditioned on a
    ``[K, context]`` tensor (their autoregressive inverse works on the input's shape)."""

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1 - self._event_ndims)
        cut = x.dim() - self._event_ndims - 1
        return x.expand(x.shape[:cut] + (self._num_component,) + x.shape[cut + 1:])


class VampPrior(nn.Module):
    r"""The VampPrior of Tomczak & Welling (2018):
    :math:`p(z) = \frac{1}{K} \sum_k q_\phi(z \mid u_k)`, the guide's own posterior at
    K = ``components`` trained pseudo-inputs :math:`u_k \in \mathbb{R}^{D}` (:math:`D` =
    ``data_dim``).

    The pseudo-inputs are created in ``bind(vae)``, once the VAE (its encoder and data size)
    exists, initialised uniformly in [0.25, 0.75] (the middle of the [0, 1] range of image
    data; from the global torch RNG). Gradients of :math:`\log p(z)` reach both the pseudo-inputs
    and the encoder (the prior shares :math:`\phi` with the guide). The guide family's distribution
    at a batch of K inputs must have batch shape ``[K]`` and event shape ``(latent_dim,)``; every
    guide in
    ``POSTERIORS`` qualifies.
    """

    name = "vamp"

    def __init__(self, components: int = 50):
        super().__init__()
        self.components = _positive_int("vamp prior components", components)
        self.latent_dim: int | None = None

    def setup(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim

    def bind(self, vae) -> None:
        # A bound method, not the VAE: storing the VAE as an attribute would make it a
        # submodule of its own prior. object.__setattr__ keeps nn.Module from inspecting it.
        object.__setattr__(self, "_encode", vae.encode)
        guide_name = getattr(vae.guide_family, "name", type(vae.guide_family).__name__)
        object.__setattr__(self, "_guide_name", guide_name)
        self.pseudo_inputs = nn.Parameter(0.25 + 0.5 * torch.rand(self.components, vae.data_dim))
        # Dry run: the guide's distribution must serve as the mixture's components.
        try:
            with torch.no_grad():
                mixture = self.distribution()
                probe = mixture.log_prob(torch.zeros(2, 3, self.latent_dim))
            ok = (mixture.batch_shape == () and mixture.event_shape == (self.latent_dim,)
                  and probe.shape == (2, 3))
        except ConfigError:
            raise
        except Exception:  # any failure of the guide's distribution as a component
            ok = False
        if not ok:
            raise ConfigError(f"the vamp prior cannot use guide {guide_name!r}: its distribution "
                              "at K pseudo-inputs must have batch shape [K] and event shape "
                              f"({self.latent_dim},) and score z of shape [..., K, "
                              f"{self.latent_dim}]")

    def distribution(self) -> dist.Distribution:
        encode = self.__dict__.get("_encode")
        if encode is None:
            raise ConfigError("the vamp prior must be bound to a VAE (VAE(..., prior='vamp') "
                              "does this) before use")
        q = encode(self.pseudo_inputs)
        if q.batch_shape != (self.components,) or q.event_shape != (self.latent_dim,):
            raise ConfigError(f"the vamp prior cannot use guide {self._guide_name!r}: at "
                              f"{self.components} pseudo-inputs its distribution has batch shape "
                              f"{list(q.batch_shape)} and event shape {list(q.event_shape)}, "
                              f"not [{self.components}] and [{self.latent_dim}]")
        logits = self.pseudo_inputs.new_zeros(self.components)
        return _BroadcastingMixture(dist.Categorical(logits=logits), q)

    def options(self) -> dict:
        return {"components": self.components}


class FlowPrior(nn.Module):
    r""":math:`p(z)`: :math:`\mathcal{N}(0, I)` pushed through ``layers`` trained invertible
    transforms (a RealNVP-style flow; Dinh et al. 2017).

    For ``latent_dim`` ≥ 2 each layer is an affine coupling transform (Pyro's
    ``affine_coupling``, a ``hidden``-``hidden`` ReLU network computing shift and log-scale of the
    second half of :math:`z` from the first half), with the dimensions reversed between layers so
    that every dimension is transformed. Both sampling and :math:`\log p(z)` are single parallel
    passes.

    For ``latent_dim`` = 1 coupling is impossible (there is no "other half" to condition on);
    each layer is then an elementwise monotone rational-quadratic spline (Pyro's ``Spline``, 8
    bins on :math:`[-3, 3]`, identity outside; Durkan et al. 2019), and ``hidden`` is unused.

    Initialisation: every layer starts at (coupling: close to) the identity map, so the prior starts
    as (nearly) :math:`\mathcal{N}(0, I)`: the coupling networks' output weights are scaled by
    ``INITIAL_OUTPUT_SCALE`` and their output biases zeroed; splines start with equal bins and unit
    slopes. Their other weights use Pyro's (global-RNG) initialisation.
    """

    name = "flow"

    def __init__(self, layers: int = 4, hidden: int = 64):
        super().__init__()
        self.layers = _positive_int("flow prior layers", layers)
        self.hidden = _positive_int("flow prior hidden", hidden)

    def setup(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)
        make = self._spline if latent_dim == 1 else self._coupling
        self.transforms = nn.ModuleList(make(latent_dim) for _ in range(self.layers))

    def _coupling(self, latent_dim: int) -> T.AffineCoupling:
        transform = T.affine_coupling(latent_dim, hidden_dims=[self.hidden, self.hidden])
        output = transform.nn.layers[-1]
        with torch.no_grad():  # near the identity: shift ≈ 0, log-scale ≈ 0
            output.weight.mul_(INITIAL_OUTPUT_SCALE)
            output.bias.zero_()
        return transform

    @staticmethod
    def _spline(latent_dim: int) -> T.Spline:
        transform = T.Spline(latent_dim, count_bins=8, bound=3.0, order="quadratic")
        with torch.no_grad():  # the identity: equal bins, unit slopes at the knots
            transform.unnormalized_widths.zero_()
            transform.unnormalized_heights.zero_()
            transform.unnormalized_derivatives.fill_(_inverse_softplus(1.0 - 1e-3))
        return transform

    def distribution(self) -> dist.Distribution:
        chain: list = []
        for i, transform in enumerate(self.transforms):
            if i and self.latent_dim > 1:
                chain.append(T.Permute(self.reverse))
            chain.append(transform)
        base = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, chain)

    def options(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden}


class CategoricalPrior(nn.Module):
    r""":math:`p(z) = \mathrm{OneHotCategorical}(\pi)` over the :math:`C` = ``latent_dim`` one-hot
    vectors, :math:`\pi = \operatorname{softmax}(\text{logits})`: uniform (:math:`\pi_c = 1/C`)
    unless ``learn`` is true, when the logits are trained (from 0).

    :math:`z` is discrete: pair it with the ``categorical`` guide (sampled, score-function
    gradients; or enumerated exactly). With a ``linear`` decoder and a Normal likelihood the VAE is
    a Gaussian mixture: :math:`p(x) = \sum_c \pi_c\, \mathcal{N}(x; W e_c + b, \sigma^2 I)`.
    """

    name = "categorical"

    def __init__(self, learn: bool = False):
        super().__init__()
        self.learn = _boolean("categorical prior learn", learn)

    def setup(self, latent_dim: int) -> None:
        logits = torch.zeros(latent_dim)
        if self.learn:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def distribution(self) -> dist.Distribution:
        return OneHotCategorical(logits=self.logits)

    def options(self) -> dict:
        return {"learn": self.learn}


class RelaxedCategoricalPrior(nn.Module):
    r""":math:`p(z) = \mathrm{RelaxedOneHotCategorical}(\tau, \text{uniform logits})`, the
    Concrete / Gumbel-softmax distribution on the open simplex of ``latent_dim`` categories
    (Maddison et al. 2017; Jang et al. 2017), :math:`\tau` = ``temperature`` > 0 (default 0.5). As
    :math:`\tau \to 0` its samples approach the one-hot vectors of the uniform ``categorical``
    prior.

    .. warning:: the density is over the simplex, so it pairs with the ``relaxed-categorical``
       guide only, and at small :math:`\tau` a coordinate of :math:`z` can underflow to 0 in
       float32, where :math:`\log p(z)` is :math:`-\infty`.
    """

    name = "relaxed-categorical"

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = _positive_float("relaxed-categorical prior temperature", temperature)

    def setup(self, latent_dim: int) -> None:
        self.register_buffer("logits", torch.zeros(latent_dim))
        # a tensor on the module's device: torch's log_prob needs τ as a tensor
        self.register_buffer("temperature_tensor", torch.tensor(self.temperature))

    def distribution(self) -> dist.Distribution:
        return RelaxedOneHotCategorical(self.temperature_tensor, logits=self.logits)

    def options(self) -> dict:
        return {"temperature": self.temperature}


#: The built-in priors by name (the ``prior=`` names of :class:`pyro_vae.VAE`).
PRIORS: dict[str, type[nn.Module]] = {
    "normal": StandardNormal,
    "learned-normal": LearnedNormal,
    "laplace": LaplacePrior,
    "studentt": StudentTPrior,
    "mog": MixtureOfGaussians,
    "vamp": VampPrior,
    "flow": FlowPrior,
    "categorical": CategoricalPrior,
    "relaxed-categorical": RelaxedCategoricalPrior,
}
#: The methods every prior must have.
PROTOCOL = ("setup", "distribution")
