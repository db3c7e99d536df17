r"""A catalogue of latent-variable models written as plain Pyro programs: a hierarchical VAE, a
Gaussian-mixture VAE with an explicit cluster latent, and the semi-supervised M2.

Each is an ``nn.Module`` following :mod:`pyro_vae.lvm` (``model(x, y=None, num_data=None)`` and
``guide(...)``, every per-datapoint site in :func:`pyro_vae.lvm.data_plate`), so
:func:`pyro_vae.log_weights.log_weights` and every objective score it, and each offers
``config`` (``type(m)(**m.config)`` rebuilds it), ``data_dim``, ``data_shape``,
``sample(n)``, ``reconstruct(x)``, ``posterior_mean(x)`` and ``check_support(x)``. The programs
are meant to be read and copied: the model and the guide are a few lines each.

Gaussian conditionals are diagonal, :math:`\mathcal{N}(\mu, \operatorname{diag}\sigma^2)` with
:math:`(\mu, \rho)` the output of an MLP and :math:`\sigma = \operatorname{softplus}(\rho) +
10^{-4}` (the ``normal`` guide's parameterization). The likelihood :math:`p(x \mid \cdot)` is
one of :data:`pyro_vae.models.likelihoods.LIKELIHOODS` by name (``bernoulli``: grey levels in
[0, 1] are scored by the binary cross-entropy convention).

**HierarchicalVAE** (Burda et al. 2016, L stochastic layers):

.. math:: p(x, z_{1:L}) = p(z_L) \prod_{l=1}^{L-1} p(z_l \mid z_{l+1})\; p(x \mid z_1),\qquad
          q(z_{1:L} \mid x) = q(z_1 \mid x) \prod_{l=2}^{L} q(z_l \mid z_{l-1}),

:math:`p(z_L) = \mathcal{N}(0, I)`, every other factor Gaussian (or the likelihood) with MLP
parameters. Sites ``"z1"`` … ``"zL"`` and ``"x"``.

**MixtureVAE**: a cluster :math:`c` in the model, summed out exactly by enumeration,

.. math:: c \sim \mathrm{Cat}(\pi),\quad z \mid c \sim \mathcal{N}(\mu_c,
          \operatorname{diag}\sigma_c^2),\quad x \mid z \sim p_\theta(x \mid z),\qquad
          \log w = \log p_\theta(x \mid z) + \log \sum_c \pi_c\,\mathcal{N}(z; \mu_c, \sigma_c^2)
          - \log q_\phi(z \mid x);

the marginal of :math:`z` is the ``mog`` prior of :class:`pyro_vae.VAE` (same parameters, same
weights).

**SemiSupervisedVAE** (M2, Kingma et al. 2014): :math:`p(y) = 1/C`, :math:`p(z) =
\mathcal{N}(0, I)`, :math:`p_\theta(x \mid y, z)`; guide :math:`q_\phi(y \mid x)` (a classifier)
and :math:`q_\phi(z \mid x, y)`. A labelled datapoint's weight is that of
:math:`\log p(x, y)`, an unlabelled one's sums :math:`y` out under :math:`q(y \mid x)`:

.. math:: w_{\text{labelled}} = \frac{p(y)\,p(z)\,p_\theta(x \mid y, z)}{q_\phi(z \mid x, y)},
          \qquad w_{\text{unlabelled}} = \sum_{c=1}^{C} q_\phi(c \mid x)\,
          \frac{p(c)\,p(z_c)\,p_\theta(x \mid c, z_c)}{q_\phi(c \mid x)\, q_\phi(z_c \mid x, c)},
          \quad z_c \sim q_\phi(z \mid x, c),

plus, for labelled rows only, :math:`\alpha \log q_\phi(y \mid x)` (the classification term).
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import is_validation_enabled
from torch import nn

from .errors import ConfigError
from .lvm import LatentVariableModel, data_plate
from .models import likelihoods as likelihood_catalogue
from .networks import MLP, activation_class
from .registry import resolve

__all__ = ["HierarchicalVAE", "MixtureVAE", "SemiSupervisedVAE", "CatalogueModel", "gaussian",
           "MIN_SCALE"]

#: The smallest standard deviation of every Gaussian conditional (keeps log-densities finite).
MIN_SCALE = 1e-4

_instance_ids = itertools.count()


# -- checked arguments ----------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _data_shape(data_shape) -> tuple[int, ...]:
    if _is_int(data_shape):
        data_shape = (data_shape,)
    if isinstance(data_shape, (str, bytes)) or not isinstance(data_shape, Sequence) or \
            not data_shape or not all(_is_int(s) and s > 0 for s in data_shape):
        raise ConfigError(f"data_shape must be a positive size or a sequence of them, not "
                          f"{data_shape!r}")
    return tuple(int(s) for s in data_shape)


def _positive_int(what: str, value, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{what} must be an integer ≥ {minimum}, not {value!r}")
    return int(value)


def _widths(what: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be a sequence of positive integers, not {value!r}")
    return tuple(_positive_int(f"every width of {what}", width) for width in value)


def _likelihood(name) -> nn.Module:
    if not isinstance(name, str):
        raise ConfigError(f"likelihood must be a name of "
                          f"{', '.join(likelihood_catalogue.LIKELIHOODS)}, not {name!r}")
    return resolve("likelihood", likelihood_catalogue.LIKELIHOODS, name, None,
                   likelihood_catalogue.PROTOCOL)


def _activation(name) -> type[nn.Module]:
    if not isinstance(name, str):
        raise ConfigError(f"activation must be a name, not {name!r}")
    return activation_class(name)


def _no_labels(model: nn.Module, y) -> None:
    if y is not None:
        raise ConfigError(f"labels y were given to a {type(model).__name__}, which takes none")


# -- shared pieces --------------------------------------------------------------------------------
def gaussian(output: torch.Tensor) -> dist.Distribution:
    r""":math:`\mathcal{N}(\mu, \operatorname{diag}\sigma^2)` from a network output
    :math:`(\mu, \rho)` (two halves of the last dimension), :math:`\sigma =
    \operatorname{softplus}(\rho) + 10^{-4}`."""
    loc, raw_scale = output.chunk(2, dim=-1)
    return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., m]`` and ``[..., n]`` concatenated to ``[..., m + n]``, leading dims broadcast."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


class CatalogueModel(LatentVariableModel):
    """The base of the catalogue's models: the data's shape, the likelihood by name and its
    support check."""

    def _setup_data(self, data_shape, likelihood) -> None:
        self.data_shape = _data_shape(data_shape)
        self.data_dim = math.prod(self.data_shape)
        self.likelihood_name = likelihood
        self.likelihood = _likelihood(likelihood)
        self.likelihood.setup(self.data_dim)
        self.decoder_outputs = self.likelihood.decoder_outputs(self.data_dim)

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`pyro_vae.errors.DataError` (one line) for data outside the
        likelihood's support."""
        self.likelihood.check_support(x)

    def _register(self, **modules: nn.Module) -> None:
        for name, module in modules.items():
            pyro.module(f"{self._pyro_name}.{name}", module)


# -- the hierarchical VAE -------------------------------------------------------------------------
class HierarchicalVAE(CatalogueModel):
    r"""A VAE with :math:`L` = ``len(latent_dims)`` stochastic layers (Burda et al. 2016).

    Generative, top-down: :math:`z_L \sim \mathcal{N}(0, I)`, :math:`z_l \mid z_{l+1} \sim
    \mathcal{N}(\mu_l(z_{l+1}), \operatorname{diag}\sigma_l^2(z_{l+1}))`, :math:`x \mid z_1 \sim
    p(x \mid f(z_1))`. Guide, bottom-up: :math:`z_1 \sim q(z_1 \mid x)`, :math:`z_l \sim
    q(z_l \mid z_{l-1})`, each Gaussian. With one layer it is the plain VAE of the same kind.

    :param data_shape: the shape of one datapoint (data are passed flat, ``[batch, data_dim]``).
    :param latent_dims: :math:`(d_1, \dots, d_L)`, bottom (next to :math:`x`) to top.
    :param hidden: per layer :math:`l`, the hidden widths of the MLPs between layer
        :math:`l - 1` (:math:`x` for :math:`l = 1`) and layer :math:`l`, in both directions
        (the generative network uses them in reverse); one sequence of widths serves every
        layer. Default: two layers of :math:`2 d_l` units each, which for
        ``latent_dims=(100, 50)`` is the architecture of Burda et al.: 200-200 between
        :math:`x` and :math:`z_1`, 100-100 between :math:`z_1` and :math:`z_2`.
    :param activation: of the hidden layers (:data:`pyro_vae.networks.ACTIVATIONS`); ``tanh``
        as in the paper.
    :param likelihood: a name of :data:`pyro_vae.models.likelihoods.LIKELIHOODS`.

    :meth:`posterior_mean` is the guide's mean of :math:`z_1`, :math:`\mathbb{E}_q[z_1 \mid x]`.
    """

    def __init__(self, data_shape: int | Sequence[int], latent_dims: Sequence[int] = (100, 50),
                 hidden: Sequence[Sequence[int]] | None = None, activation: str = "tanh",
                 likelihood: str = "bernoulli"):
        super().__init__()
        self._setup_data(data_shape, likelihood)
        latent_dims = _widths("latent_dims", latent_dims)
        if not latent_dims:
            raise ConfigError("latent_dims must name at least one stochastic layer")
        if hidden is None:
            hidden = [(2 * d, 2 * d) for d in latent_dims]
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ConfigError(f"hidden must be widths, or one sequence of widths per stochastic "
                              f"layer, not {hidden!r}")
        if hidden and all(_is_int(width) for width in hidden):
            hidden = [hidden] * len(latent_dims)  # the same widths in every layer
        if len(hidden) != len(latent_dims):
            raise ConfigError(f"hidden must give one sequence of widths per stochastic layer "
                              f"({len(latent_dims)}), not {hidden!r}")
        hidden = tuple(_widths(f"hidden[{l}]", widths) for l, widths in enumerate(hidden))
        self.latent_dims, self.hidden, self.activation = latent_dims, hidden, activation
        act = _activation(activation)
        below = (self.data_dim, *latent_dims[:-1])  # the input of each layer's inference network
        # encoders[l]: q(z_{l+1} | the layer below); decoders[0]: p(x | z_1),
        # decoders[l]: p(z_l | z_{l+1})
        self.encoders = nn.ModuleList(
            MLP(below[l], 2 * latent_dims[l], hidden[l], activation=act)
            for l in range(len(latent_dims)))
        self.decoders = nn.ModuleList(
            MLP(latent_dims[l], self.decoder_outputs if l == 0 else 2 * below[l],
                hidden[l][::-1], activation=act)
            for l in range(len(latent_dims)))
        self.register_buffer("top_loc", torch.zeros(latent_dims[-1]))
        self.register_buffer("top_scale", torch.ones(latent_dims[-1]))
        self._pyro_name = f"hierarchical-vae{next(_instance_ids)}"

    @property
    def config(self) -> dict[str, Any]:
        return {"data_shape": list(self.data_shape), "latent_dims": list(self.latent_dims),
                "hidden": [list(widths) for widths in self.hidden],
                "activation": self.activation, "likelihood": self.likelihood_name}

    @property
    def layers(self) -> int:
        return len(self.latent_dims)

    def model(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r""":math:`z_L \sim \mathcal{N}(0, I)`, then :math:`z_{L-1}, \dots, z_1`, then the
        observed ``"x"`` given :math:`z_1`."""
        _no_labels(self, y)
        self._register(decoders=self.decoders, likelihood=self.likelihood)
        top = self.layers
        with data_plate(x, num_data):
            z = pyro.sample(f"z{top}", dist.Normal(self.top_loc, self.top_scale).to_event(1))
            for l in range(top - 1, 0, -1):
                z = pyro.sample(f"z{l}", gaussian(self.decoders[l](z)))
            return pyro.sample("x", self.likelihood.distribution(self.decoders[0](z)), obs=x)

    def guide(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r""":math:`z_1 \sim q(z_1 \mid x)`, then each :math:`z_l \sim q(z_l \mid z_{l-1})`."""
        _no_labels(self, y)
        self._register(encoders=self.encoders)
        h = x
        with data_plate(x, num_data):
            for l in range(1, self.layers + 1):
                h = pyro.sample(f"z{l}", gaussian(self.encoders[l - 1](h)))

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        r"""Decoder means :math:`\mathbb{E}[x \mid z_1]` of ``n`` ancestral draws of
        :math:`z_L, \dots, z_1`: ``[n, data_dim]``."""
        _no_labels(self, y)
        z = dist.Normal(self.top_loc, self.top_scale).to_event(1).sample((n,))
        for l in range(self.layers - 1, 0, -1):
            z = gaussian(self.decoders[l](z)).sample()
        return self.likelihood.distribution(self.decoders[0](z)).mean

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}_q[z_1 \mid x]`: ``[batch, d_1]``."""
        _no_labels(self, y)
        return gaussian(self.encoders[0](x)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}[x \mid z_1 = \mathbb{E}_q[z_1 \mid x]]`: ``[batch, data_dim]``."""
        return self.likelihood.distribution(self.decoders[0](self.posterior_mean(x, y))).mean


# -- the Gaussian-mixture VAE ---------------------------------------------------------------------
def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MixtureVAE(CatalogueModel):
    r"""The Gaussian-mixture VAE: a categorical cluster :math:`c` in the model, enumerated
    (``infer={"enumerate": "parallel"}``), so each weight sums it out exactly; the guide is
    :math:`q_\phi(z \mid x)` alone.

    .. math:: c \sim \mathrm{Cat}(\pi),\quad z \mid c \sim \mathcal{N}(\mu_c,
              \operatorname{diag}\sigma_c^2),\quad x \mid z \sim p_\theta(x \mid f(z)).

    The mixture is parameterized as the ``mog`` prior
    (:class:`~pyro_vae.models.priors.MixtureOfGaussians`): :math:`\pi =
    \operatorname{softmax}(\text{logits})` (learned, or fixed uniform with
    ``learn_weights=False``), :math:`\sigma_c = \operatorname{softplus}(\rho_c) + 10^{-4}`;
    initially equal weights, :math:`\mu_c \sim \mathcal{N}(0, \frac14 I)`,
    :math:`\sigma = \sqrt{3/4}`. Encoder and decoder are MLPs as those of :class:`pyro_vae.VAE`
    with the ``normal`` guide, so ``VAE(data_shape, latent_dim, prior="mog",
    prior_options={"components": clusters}, hidden=hidden, activation=activation)`` holding the
    same parameters has the same log-weights.
    """

    def __init__(self, data_shape: int | Sequence[int], latent_dim: int = 8, clusters: int = 10,
                 hidden: Sequence[int] = (256, 256), likelihood: str = "bernoulli",
                 activation: str = "relu", learn_weights: bool = True):
        super().__init__()
        self._setup_data(data_shape, likelihood)
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.clusters = _positive_int("clusters", clusters)
        self.hidden = _widths("hidden", hidden)
        if not isinstance(learn_weights, bool):
            raise ConfigError(f"learn_weights must be true or false, not {learn_weights!r}")
        self.activation, self.learn_weights = activation, learn_weights
        act = _activation(activation)
        self.encoder = MLP(self.data_dim, 2 * latent_dim, self.hidden, activation=act)
        self.decoder = MLP(latent_dim, self.decoder_outputs, self.hidden, activation=act)
        self.mixture = nn.Module()
        logits = torch.zeros(clusters)
        if learn_weights:
            self.mixture.logits = nn.Parameter(logits)
        else:
            self.mixture.register_buffer("logits", logits)
        self.mixture.locs = nn.Parameter(0.5 * torch.randn(clusters, latent_dim))
        self.mixture.raw_scales = nn.Parameter(
            torch.full((clusters, latent_dim), _inverse_softplus(math.sqrt(0.75) - MIN_SCALE)))
        self._pyro_name = f"mixture-vae{next(_instance_ids)}"

    @property
    def config(self) -> dict[str, Any]:
        return {"data_shape": list(self.data_shape), "latent_dim": self.latent_dim,
                "clusters": self.clusters, "hidden": list(self.hidden),
                "likelihood": self.likelihood_name, "activation": self.activation,
                "learn_weights": self.learn_weights}

    @property
    def weights(self) -> torch.Tensor:
        r"""The cluster probabilities :math:`\pi`, ``[clusters]``."""
        return self.mixture.logits.softmax(-1)

    @property
    def scales(self) -> torch.Tensor:
        r""":math:`\sigma_c`, ``[clusters, latent_dim]``."""
        return F.softplus(self.mixture.raw_scales) + MIN_SCALE

    def model(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r"""``"c"`` (enumerated), ``"z"`` given it, the observed ``"x"`` given :math:`z`."""
        _no_labels(self, y)
        self._register(mixture=self.mixture, decoder=self.decoder, likelihood=self.likelihood)
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Categorical(logits=self.mixture.logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mixture.locs[c], self.scales[c]).to_event(1))
            return pyro.sample("x", self.likelihood.distribution(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r""":math:`z \sim q_\phi(z \mid x)`."""
        _no_labels(self, y)
        self._register(encoder=self.encoder)
        with data_plate(x, num_data):
            pyro.sample("z", gaussian(self.encoder(x)))

    @torch.no_grad()
    def cluster_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`p(c \mid z)` at :math:`z = \mathbb{E}_q[z \mid x]`, ``[batch, clusters]``:
        :math:`\propto \pi_c\, \mathcal{N}(z; \mu_c, \operatorname{diag}\sigma_c^2)`."""
        z = self.posterior_mean(x).unsqueeze(-2)
        log_joint = (self.mixture.logits.log_softmax(-1)
                     + dist.Normal(self.mixture.locs, self.scales).to_event(1).log_prob(z))
        return log_joint.softmax(-1)

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        r"""Decoder means of ``n`` draws :math:`c \sim \pi`, :math:`z \sim p(z \mid c)`."""
        _no_labels(self, y)
        c = dist.Categorical(logits=self.mixture.logits).sample((n,))
        z = dist.Normal(self.mixture.locs[c], self.scales[c]).sample()
        return self.likelihood.distribution(self.decoder(z)).mean

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}_q[z \mid x]`: ``[batch, latent_dim]``."""
        _no_labels(self, y)
        return gaussian(self.encoder(x)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}[x \mid z = \mathbb{E}_q[z \mid x]]`: ``[batch, data_dim]``."""
        return self.likelihood.distribution(self.decoder(self.posterior_mean(x, y))).mean


# -- the semi-supervised VAE (M2) -----------------------------------------------------------------
class SemiSupervisedVAE(CatalogueModel):
    r"""M2 of Kingma et al. (2014): labels where given, latent where not, in one pass.

    .. math:: y \sim \mathrm{Cat}(1/C),\quad z \sim \mathcal{N}(0, I),\quad
              x \mid y, z \sim p_\theta(x \mid f(y, z));\qquad
              q_\phi(y \mid x) = \mathrm{Cat}(\operatorname{softmax} g(x)),\quad
              q_\phi(z \mid x, y)\ \text{Gaussian}.

    Training passes ``y`` as integer labels with ``-1`` where a datapoint is unlabelled;
    evaluation passes ``y=None`` (every label latent: a bound on :math:`\log p(x)`). One program
    serves a mixed batch, with a mask ``m`` (labelled rows) on its sites:

    - a labelled row observes its label at site ``"y_observed"`` and draws ``"z_labelled"``
      from :math:`q(z \mid x, y)`: its weight is that of :math:`\log p(x, y)`, with one draw
      of :math:`z` per particle;
    - an unlabelled row draws ``"z"`` from :math:`q(z \mid x, c)` for every class :math:`c` of
      site ``"y"``, which the guide enumerates (``infer={"enumerate": "parallel"}``) under
      :math:`q(c \mid x)`: its weight is :math:`\sum_c q(c \mid x)\, w(c)`;
    - site ``"y"`` is present in labelled rows too, where nothing depends on it and its guide
      is its prior :math:`p(c) = 1/C`: it contributes :math:`\sum_c p(c)\,\frac{p(c)}{p(c)}
      = 1` to the weight, exactly (no :math:`0 \log 0`, no masked sum over classes);
    - ``"z"`` is masked off in labelled rows and ``"z_labelled"``, ``"y_observed"`` in
      unlabelled ones (their log-densities are zero there).

    Per labelled datapoint the model adds :math:`\alpha \log q_\phi(y \mid x)` as the factor
    ``"classification"``: constant in every latent, so under every objective it adds exactly
    that to the datapoint's bound. Kingma et al. weight the mean of this term over the labelled
    data by :math:`0.1 N`, i.e. each labelled datapoint by :math:`0.1 N / N_\ell` (:math:`N`
    datapoints, :math:`N_\ell` of them labelled); ``alpha`` is this per-datapoint weight, and
    its default 50 is the paper's for MNIST with 100 labels (:math:`N = 50\,000`).

    Under an importance-weighted objective (``iwae``, ``dreg``, …) :math:`q(c \mid x)` cancels
    from an unlabelled weight, :math:`\sum_c q(c \mid x)\, w(c) = \sum_c p(x, c, z_c) /
    q(z_c \mid x, c)`: the classifier then learns from the labelled rows alone. Under ``elbo``
    it also learns from the unlabelled ones, through
    :math:`\mathbb{E}_{q(c \mid x)}[\log w(c)]`.

    :param num_classes: :math:`C` ≥ 2.
    :param latent_dim: the dimension of :math:`z`.
    :param hidden: hidden widths of the encoder's and the decoder's MLPs.
    :param classifier_hidden: hidden widths of the classifier's MLP (default: ``hidden``;
        ``()``: a linear classifier, multinomial logistic regression).
    :param alpha: the weight of :math:`\log q(y \mid x)` per labelled datapoint (≥ 0).
    """

    semi_supervised = True

    def __init__(self, data_shape: int | Sequence[int], num_classes: int = 10,
                 latent_dim: int = 16, hidden: Sequence[int] = (256, 256), alpha: float = 50.0,
                 activation: str = "softplus", likelihood: str = "bernoulli",
                 classifier_hidden: Sequence[int] | None = None):
        super().__init__()
        self._setup_data(data_shape, likelihood)
        self.num_classes = _positive_int("num_classes", num_classes, minimum=2)
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.hidden = _widths("hidden", hidden)
        self.classifier_hidden = (self.hidden if classifier_hidden is None
                                  else _widths("classifier_hidden", classifier_hidden))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
                not (math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"alpha must be a non-negative number, not {alpha!r}")
        self.alpha, self.activation = float(alpha), activation
        act = _activation(activation)
        classes = num_classes
        self.classifier = MLP(self.data_dim, classes, self.classifier_hidden, activation=act)
        self.encoder = MLP(self.data_dim + classes, 2 * latent_dim, self.hidden, activation=act)
        self.decoder = MLP(latent_dim + classes, self.decoder_outputs, self.hidden, activation=act)
        self.register_buffer("class_logits", torch.zeros(classes))
        self.register_buffer("prior_loc", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.ones(latent_dim))
        self._pyro_name = f"semi-supervised-vae{next(_instance_ids)}"

    @property
    def config(self) -> dict[str, Any]:
        return {"data_shape": list(self.data_shape), "num_classes": self.num_classes,
                "latent_dim": self.latent_dim, "hidden": list(self.hidden),
                "alpha": self.alpha, "activation": self.activation,
                "likelihood": self.likelihood_name,
                "classifier_hidden": list(self.classifier_hidden)}

    # -- the pieces, as distributions ----------------------------------------------------------
    def labelled_rows(self, x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labelled, label)``, both ``[batch]``: which rows carry a label, and the label
        (0 where there is none). ``y=None``: no row is labelled. Labels must be integers in
        ``-1 .. num_classes - 1`` (checked while Pyro's validation is on)."""
        batch = x.shape[0]
        if y is None:
            none = torch.zeros(batch, dtype=torch.long, device=x.device)
            return none.bool(), none
        message = (f"labels must be {batch} integers in -1..{self.num_classes - 1} "
                   "(-1: unlabelled)")
        try:
            y = torch.as_tensor(y, device=x.device)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(message) from None
        if (y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool
                or y.shape != (batch,)):
            raise ConfigError(message)
        if is_validation_enabled() and bool(((y < -1) | (y >= self.num_classes)).any()):
            raise ConfigError(message)
        labelled = y >= 0
        return labelled, torch.where(labelled, y, 0).long()

    def one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.unsqueeze(-1) == classes).to(like.dtype)

    def classifier_distribution(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q_\phi(y \mid x)`."""
        return dist.Categorical(logits=self.classifier(x))

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        r""":math:`q_\phi(z \mid x, y)` (``y`` integer labels, broadcast against ``x``)."""
        return gaussian(self.encoder(_joined(x, self.one_hot(y, x))))

    def decode(self, y: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        r""":math:`p_\theta(x \mid y, z)`."""
        return self.likelihood.distribution(self.decoder(_joined(z, self.one_hot(y, z))))

    # -- the programs --------------------------------------------------------------------------
    def model(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r""":math:`p(y)\,p(z)\,p_\theta(x \mid y, z)`, the label observed where given (see the
        class docstring), plus :math:`\alpha \log q_\phi(y \mid x)` for labelled rows."""
        labelled, label = self.labelled_rows(x, y)
        self._register(decoder=self.decoder, classifier=self.classifier,
                       likelihood=self.likelihood)
        p_y = dist.Categorical(logits=self.class_logits)
        p_z = dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
        with data_plate(x, num_data):
            # labelled rows: y observed, z drawn given it
            pyro.sample("y_observed", p_y.mask(labelled), obs=label)
            z_labelled = pyro.sample("z_labelled", p_z.mask(labelled))
            # unlabelled rows: y latent (summed out by the guide), z drawn given it
            y_latent = pyro.sample("y", p_y)
            z_latent = pyro.sample("z", p_z.mask(~labelled))
            y_all = torch.where(labelled, label, y_latent)
            z_all = torch.where(labelled.unsqueeze(-1), z_labelled, z_latent)
            pyro.sample("x", self.decode(y_all, z_all), obs=x)
            log_q_label = self.classifier_distribution(x).log_prob(label)
            pyro.factor("classification", torch.where(labelled, self.alpha * log_q_label, 0.0))

    def guide(self, x: torch.Tensor, y=None, num_data: int | None = None):
        r""":math:`q_\phi(z \mid x, y)` where labelled; :math:`q_\phi(y \mid x)\,
        q_\phi(z \mid x, y)` with :math:`y` enumerated where not."""
        labelled, label = self.labelled_rows(x, y)
        self._register(encoder=self.encoder, classifier=self.classifier)
        with data_plate(x, num_data):
            pyro.sample("z_labelled", self.encode(x, label).mask(labelled))
            # q(y | x) where unlabelled; the prior p(y) where the label is known
            logits = torch.where(labelled.unsqueeze(-1), self.class_logits, self.classifier(x))
            y_latent = pyro.sample("y", dist.Categorical(logits=logits),
                                   infer={"enumerate": "parallel"})
            pyro.sample("z", self.encode(x, y_latent).mask(~labelled))

    # -- conveniences --------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`q_\phi(y \mid x)`: class probabilities ``[batch, num_classes]``."""
        return self.classifier_distribution(x).probs

    def _given_or_predicted(self, x: torch.Tensor, y) -> torch.Tensor:
        labelled, label = self.labelled_rows(x, y)
        return torch.where(labelled, label, self.classify(x).argmax(-1))

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}_q[z \mid x, y]` where the label is given, else
        :math:`\mathbb{E}_q[z \mid x] = \sum_c q(c \mid x)\, \mathbb{E}_q[z \mid x, c]`:
        ``[batch, latent_dim]``."""
        labelled, label = self.labelled_rows(x, y)
        classes = torch.arange(self.num_classes, device=x.device).unsqueeze(-1)  # [C, 1]
        means = self.encode(x, classes).mean                                     # [C, batch, d]
        mixed = torch.einsum("bc,cbd->bd", self.classify(x), means)
        return torch.where(labelled.unsqueeze(-1), self.encode(x, label).mean, mixed)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        r""":math:`\mathbb{E}[x \mid y, z = \mathbb{E}_q[z \mid x, y]]` with the given label,
        or the most probable class of :math:`q(y \mid x)` where there is none."""
        y = self._given_or_predicted(x, y)
        return self.decode(y, self.encode(x, y).mean).mean

    @torch.no_grad()
    def sample(self, n: int, y=None) -> torch.Tensor:
        r"""Decoder means of ``n`` draws :math:`z \sim \mathcal{N}(0, I)` with the labels
        ``y`` (an int, or one per sample; by default cycling through the classes)."""
        device = self.prior_loc.device
        if y is None:
            y = torch.arange(n, device=device) % self.num_classes
        y = torch.as_tensor(y, device=device)
        if (y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim > 1
                or bool(((y < 0) | (y >= self.num_classes)).any())):
            raise ConfigError(f"sample labels must be integers in 0..{self.num_classes - 1}")
        z = dist.Normal(self.prior_loc, self.prior_scale).to_event(1).sample((n,))
        return self.decode(y.long().expand(n), z).mean
