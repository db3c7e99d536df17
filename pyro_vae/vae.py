r"""The VAE: a prior, a likelihood with its decoder, and a guide family with its encoder,
composed into one Pyro model/guide pair.

The generative story, as :meth:`VAE.model` tells it::

    for each datapoint n (plate "data"):
        z_n ~ p(z)                       # the prior (p(z | y_n) with a conditional prior)
        x_n ~ p_θ(x | z_n)               # the likelihood at the decoder output f_θ(z_n)

and the amortized guide :meth:`VAE.guide`::

    for each datapoint n (plate "data"):
        z_n ~ q_φ(z | x_n)               # the guide family at the encoder output g_φ(x_n)

Both are ordinary Pyro programs, so ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``Predictive`` and
poutine handlers work on them unchanged.

A conditional VAE (labels :math:`y` fed to both networks) may also have a conditional prior,
:math:`p(z \mid y) = \mathcal{N}(\mu_0 + \mu_y, \operatorname{diag}(\sigma_0 \sigma_y)^2)`:
the label-free prior's :math:`\mathcal{N}(\mu_0, \operatorname{diag} \sigma_0^2)`
(``normal``: :math:`\mu_0 = 0, \sigma_0 = 1`; ``learned-normal``: trained) moved by a trained
mean :math:`\mu_y` and scaled by a trained :math:`\sigma_y = \exp(\log \sigma_y)` per class,
both ``[num_classes, latent_dim]`` and initially 0 and 1, so it starts as the label-free prior.
In :meth:`VAE.model` it is then one distribution per datapoint (batch shape ``[batch]`` inside
the data plate); :meth:`VAE.prior_distribution` gives :math:`p(z)` or :math:`p(z \mid y)`.

The encoder and decoder are built-in networks by name or any ``nn.Module`` following the
contract of :mod:`pyro_vae.networks`: ``encoder(x, context)`` returns
``[batch, guide.encoder_outputs(latent_dim)]`` and ``decoder(z, context)`` returns
``[..., likelihood.decoder_outputs(data_dim)]`` for ``z`` ``[..., latent_dim]``.
"""

from __future__ import annotations

import itertools
import math
from contextvars import ContextVar
from typing import Any, Sequence

import pyro
import torch
from pyro.distributions.util import is_validation_enabled
from torch import nn

from .errors import ConfigError
from .models import likelihoods as likelihood_catalogue
from .models import priors as prior_catalogue
from .guides import posteriors as posterior_catalogue
from .networks import (NETWORKS, activation_class, as_network, make_network, network_entry, probe,
                       rebuild_network)
from .registry import describe, resolve
from .resources import check_model_size

_instance_ids = itertools.count()
#: True while :mod:`pyro_vae.resources` builds a VAE on the meta device to count its parameters
_SIZING: ContextVar[bool] = ContextVar("pyro_vae_sizing", default=False)


def _latent_space(distribution) -> str:
    support = distribution.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return {"_OneHot": "one-hot vectors", "_Simplex": "the simplex"}.get(
        type(support).__name__, "real vectors")


def _network_label(net: Any) -> str:
    return repr(net) if isinstance(net, str) else f"a {type(net).__name__} module"


def _check_network(net: Any, role: str) -> None:
    if isinstance(net, nn.Module):
        return
    if not isinstance(net, str):
        raise ConfigError(f"the {role} must be a network name ({', '.join(NETWORKS)}) or an "
                          f"nn.Module, not {type(net).__name__}")
    if net not in NETWORKS:
        raise ConfigError(f"unknown network {net!r}; choose one of: {', '.join(NETWORKS)}")


class ClassPrior(nn.Module):
    r"""The per-class part of a conditional prior: a mean :math:`\mu_y` and a log-scale
    :math:`\log \sigma_y` for each class, ``[num_classes, latent_dim]`` each, initially 0."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_classes, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(num_classes, latent_dim))

    def forward(self, one_hot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\mu_y` and :math:`\sigma_y` of the one-hot labels ``[batch, num_classes]``
        (a product with the one-hot rows: exact, and no index read back from a GPU)."""
        return one_hot @ self.loc, (one_hot @ self.log_scale).exp()


class VAE(nn.Module):
    r"""A variational autoencoder as a Pyro model/guide pair.

    :param data_shape: shape of one datapoint, e.g. ``64`` or ``(1, 8, 8)``; data are passed to
        :meth:`model` / :meth:`guide` flattened, as ``[batch, prod(data_shape)]``.
    :param latent_dim: dimension of :math:`z`.
    :param prior: a name from ``pyro_vae.models.priors.PRIORS`` or a prior object.
    :param likelihood: a name from ``pyro_vae.models.likelihoods.LIKELIHOODS`` or an object.
    :param guide: a name from ``pyro_vae.guides.posteriors.POSTERIORS`` or an object.
    :param encoder: the encoder network: a kind (``"mlp"``, ``"linear"`` or ``"conv"`` for C×H×W
        image data), or any ``nn.Module`` called as ``encoder(x, context)`` with ``x``
        ``[batch, data_dim]`` that returns ``[batch, guide.encoder_outputs(latent_dim)]``
        (``context``: ``None``, or the one-hot labels ``[batch, num_classes]`` of a conditional
        VAE; a module whose ``forward`` takes one argument is called as ``encoder(x)``, in an
        unconditional VAE only).
    :param decoder: the decoder network: a kind, as for ``encoder``, or any ``nn.Module`` called
        as ``decoder(z, context)`` with ``z`` ``[..., latent_dim]`` (any leading dimensions:
        particles, data) that returns ``[..., likelihood.decoder_outputs(data_dim)]``, the
        likelihood's parameter blocks one after another (block-major). The contract of both is
        that of :mod:`pyro_vae.networks`; a user's network is probed once, here, and one that
        breaks it is refused in one line. :attr:`config` records it by class and ``config``
        options (see :func:`pyro_vae.networks.network_entry`).
    :param hidden: hidden layer widths of ``mlp`` networks (``conv`` uses the first for its head).
    :param activation: the activation of the hidden layers of ``mlp`` networks (a name of
        :data:`pyro_vae.networks.ACTIVATIONS`: ``relu``, ``tanh``, ``softplus``, …).
    :param prior_options: keyword arguments for a prior given by name, e.g. ``{"components": 3}``.
    :param likelihood_options: keyword arguments for a likelihood given by name, e.g.
        ``likelihood_options={"scale": 0.1}``.
    :param guide_options: keyword arguments for a guide given by name.
    :param conditional: a conditional VAE, :math:`p_\theta(x \mid z, y)` and
        :math:`q_\phi(z \mid x, y)`, for integer labels :math:`y` in ``range(num_classes)``, fed
        to both networks as one-hot vectors.
    :param num_classes: the number of classes (at least 2) of a conditional VAE.
    :param conditional_prior: with ``conditional``, the prior :math:`p(z \mid y)`: the
        ``normal`` or ``learned-normal`` prior moved and scaled by a trained mean and log-scale
        per class (see the module docstring), in place of the label-free :math:`p(z)`.

    Before anything is allocated, the VAE the arguments describe is built on the meta device to
    count its parameters exactly; one too large to train here (its parameters five times over:
    gradients, Adam's two moments, a checkpoint) is refused in one line
    (:func:`pyro_vae.resources.check_model_size`).
    """

    def __init__(self, data_shape: int | Sequence[int], latent_dim: int = 8, *,
                 prior: Any = "normal", likelihood: Any = "bernoulli", guide: Any = "normal",
                 encoder: str | nn.Module = "mlp", decoder: str | nn.Module = "mlp",
                 hidden: Sequence[int] = (256, 256), prior_options: dict | None = None,
                 likelihood_options: dict | None = None, guide_options: dict | None = None,
                 conditional: bool = False, num_classes: int | None = None,
                 activation: str = "relu", conditional_prior: bool = False):
        super().__init__()
        data_shape = (int(data_shape),) if isinstance(data_shape, int) else tuple(map(int, data_shape))
        if not data_shape or any(size <= 0 for size in data_shape):
            raise ConfigError(f"data_shape must be positive sizes, not {data_shape}")
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise ConfigError(f"latent_dim must be a positive integer, not {latent_dim!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h <= 0 for h in hidden):
            raise ConfigError(f"hidden sizes must be positive, not {hidden}")
        self.data_shape = data_shape
        self.data_dim = math.prod(data_shape)
        self.latent_dim = latent_dim
        self.hidden = hidden
        _check_network(encoder, "encoder")
        _check_network(decoder, "decoder")
        # a kind by name; None for a user's module (recorded from the module itself)
        self.encoder_kind = encoder if isinstance(encoder, str) else None
        self.decoder_kind = decoder if isinstance(decoder, str) else None
        activation_class(activation)  # a known name, or one line
        if activation != "relu" and "mlp" not in (self.encoder_kind, self.decoder_kind):
            raise ConfigError(f"activation {activation!r} applies to mlp networks; the encoder "
                              f"is {_network_label(encoder)} and the decoder "
                              f"{_network_label(decoder)}")
        self.activation = activation
        self.conditional = bool(conditional)
        if self.conditional:
            if not isinstance(num_classes, int) or num_classes < 2:
                raise ConfigError(f"a conditional VAE needs num_classes ≥ 2, not {num_classes!r}")
            self.num_classes = num_classes
        elif num_classes is not None:
            raise ConfigError("num_classes applies to a conditional VAE (conditional=True) only")
        else:
            self.num_classes = None
        if not isinstance(conditional_prior, bool):
            raise ConfigError(f"conditional_prior must be true or false, not {conditional_prior!r}")
        if conditional_prior and not self.conditional:
            raise ConfigError("conditional_prior needs a conditional VAE (conditional=True with "
                              "num_classes)")
        self.conditional_prior = conditional_prior
        if not _SIZING.get():
            # the parameter count from a build on the meta device, refused in one line if
            # training it could not fit in memory: before anything below allocates
            check_model_size(data_shape, latent_dim, prior=prior, likelihood=likelihood,
                             guide=guide, encoder=encoder, decoder=decoder, hidden=hidden,
                             prior_options=prior_options, likelihood_options=likelihood_options,
                             guide_options=guide_options, conditional=self.conditional,
                             num_classes=self.num_classes, conditional_prior=conditional_prior)
        context = self.num_classes or 0
        image_shape = data_shape if len(data_shape) == 3 else None

        self.prior = resolve("prior", prior_catalogue.PRIORS, prior, prior_options,
                             prior_catalogue.PROTOCOL)
        self.likelihood = resolve("likelihood", likelihood_catalogue.LIKELIHOODS, likelihood,
                                  likelihood_options, likelihood_catalogue.PROTOCOL)
        self.guide_family = resolve("guide", posterior_catalogue.POSTERIORS, guide, guide_options,
                                    posterior_catalogue.PROTOCOL)
        if conditional_prior and not isinstance(self.prior, (prior_catalogue.StandardNormal,
                                                             prior_catalogue.LearnedNormal)):
            raise ConfigError("conditional_prior applies to the 'normal' and 'learned-normal' "
                              f"priors, not {describe(self.prior)['name']!r}")
        self.prior.setup(latent_dim)
        self.likelihood.setup(self.data_dim)
        self.guide_family.setup(latent_dim)
        decoder_outputs = self.likelihood.decoder_outputs(self.data_dim)
        encoder_outputs = self.guide_family.encoder_outputs(latent_dim)
        if isinstance(decoder, nn.Module):
            self.decoder = as_network(decoder, "decoder", self.conditional)
        else:
            self.decoder = make_network(decoder, latent_dim, decoder_outputs, hidden,
                                        role="decoder", image_shape=image_shape,
                                        context_features=context, activation=activation)
        if isinstance(encoder, nn.Module):
            self.encoder = as_network(encoder, "encoder", self.conditional)
        else:
            self.encoder = make_network(encoder, self.data_dim, encoder_outputs, hidden,
                                        role="encoder", image_shape=image_shape,
                                        context_features=context, activation=activation)
        if not _SIZING.get():  # a user's network against the contract, on a probe of zeros
            if self.encoder_kind is None:
                probe(self.encoder, "encoder", (2, self.data_dim), (2, encoder_outputs), context,
                      inputs_name="x", need=f" (the guide's encoder_outputs({latent_dim}))")
            if self.decoder_kind is None:
                for lead in ((2,), (3, 2)):
                    probe(self.decoder, "decoder", (*lead, latent_dim), (*lead, decoder_outputs),
                          context, inputs_name="z",
                          need=f" (the likelihood's decoder_outputs({self.data_dim}), after the "
                               "leading dimensions of z)")
        self.class_prior = ClassPrior(self.num_classes, latent_dim) if conditional_prior else None
        # Components that need the assembled VAE (a VampPrior's pseudo-inputs go through the
        # encoder) receive it here; they must not store it as a submodule.
        for component in (self.prior, self.likelihood, self.guide_family):
            if hasattr(component, "bind"):
                if self.conditional:
                    raise ConfigError(f"{describe(component)['name']!r} is built from the "
                                      "encoder and cannot be combined with a conditional VAE")
                component.bind(self)
        if not _SIZING.get():  # a probe of the distributions, not part of the model's size
            self._check_latent_spaces()
        # Names under which model/guide register with Pyro's param store; unique per instance
        # so two VAEs never share (or silently swap) parameters through the global store.
        self._pyro_name = "vae-meta" if _SIZING.get() else f"vae{next(_instance_ids)}"

    def _check_latent_spaces(self) -> None:
        """The prior and the guide family must put z in the same space (a one-hot categorical
        prior with a Gaussian guide cannot be scored); refused here, in one line, rather than
        at the first step with an error that seems to blame the data."""
        try:
            with torch.no_grad():
                prior = self.prior_distribution(0, 1) if self.conditional_prior \
                    else self.prior_distribution()
                outputs = self.guide_family.encoder_outputs(self.latent_dim)
                guide = self.guide_family.distribution(torch.zeros(1, outputs))
        except Exception:  # a component that cannot be probed this way is checked at scoring
            return
        spaces = (_latent_space(prior), _latent_space(guide))
        if spaces[0] != spaces[1]:
            prior_name, guide_name = (describe(c)["name"] for c in (self.prior, self.guide_family))
            raise ConfigError(f"prior {prior_name!r} puts z in {spaces[0]} and guide "
                              f"{guide_name!r} in {spaces[1]}; choose a matching pair")

    # -- configuration -----------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Everything :meth:`from_config` needs to rebuild this VAE (JSON-serializable).

        ``encoder`` and ``decoder`` are a network's name, or for a user's module its
        :func:`pyro_vae.networks.network_entry`; ``conditional_prior`` is present (true) only
        for a conditional prior, so a config without it is a label-free prior's."""
        prior, likelihood, guide = (describe(c) for c in
                                    (self.prior, self.likelihood, self.guide_family))
        config = {
            "data_shape": list(self.data_shape), "latent_dim": self.latent_dim,
            "prior": prior["name"], "prior_options": prior["options"],
            "likelihood": likelihood["name"], "likelihood_options": likelihood["options"],
            "guide": guide["name"], "guide_options": guide["options"],
            "encoder": self.encoder_kind or network_entry(self.encoder),
            "decoder": self.decoder_kind or network_entry(self.decoder),
            "hidden": list(self.hidden), "activation": self.activation,
            "conditional": self.conditional, "num_classes": self.num_classes,
        }
        if self.conditional_prior:
            config["conditional_prior"] = True
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VAE":
        """The VAE that a :attr:`config` dict describes (fresh, untrained parameters).

        A user's network recorded with its class and options is rebuilt as
        ``cls(**options)``; one recorded as not rebuildable is refused in one line (restore such
        a run with ``load_run(run_dir, model=...)``)."""
        config = dict(config)
        for role in ("encoder", "decoder"):
            if isinstance(config.get(role), dict):
                config[role] = rebuild_network(config[role], role)
        return cls(**config)

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    # -- the two halves as distributions -------------------------------------------------------
    def prior_distribution(self, y: torch.Tensor | int | None = None,
                           batch: int | None = None) -> pyro.distributions.Distribution:
        r""":math:`p(z)`, or with a conditional prior :math:`p(z \mid y)` for the labels ``y``
        (one per datapoint, or an int broadcast to ``batch``): a distribution with event shape
        ``[latent_dim]`` and batch shape ``[batch]``. ``y`` and ``batch`` are not used by a
        label-free prior, whose batch shape is empty (it broadcasts)."""
        if not self.conditional_prior:
            return self.prior.distribution()
        if y is None:
            raise ConfigError("the conditional prior p(z | y) needs labels y")
        base = self.prior.distribution().base_dist
        loc, scale = self.class_prior(self.one_hot(y, batch))
        return pyro.distributions.Normal(base.loc + loc, base.scale * scale).to_event(1)

    def labels(self, y, batch: int | None = None) -> torch.Tensor | None:
        """Checked integer labels of a conditional VAE on its device (a scalar is broadcast to
        ``batch`` when given); ``None`` for an unconditional VAE, which refuses labels.

        The range ``0 .. num_classes - 1`` is checked while Pyro's validation is on (the default),
        as Pyro checks a distribution's support: reading the check's result is a host
        synchronisation on a GPU, so training checks every split's labels once, up front, and its
        steps run with validation off."""
        if not self.conditional:
            if y is not None:
                raise ConfigError("labels y were given to a VAE that is not conditional")
            return None
        if y is None:
            raise ConfigError("a conditional VAE needs labels y")
        message = f"labels must be integers in 0..{self.num_classes - 1}"
        try:
            y = torch.as_tensor(y, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(message) from None
        if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool or y.ndim > 1:
            raise ConfigError(message)
        if is_validation_enabled() and bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ConfigError(message)
        y = y.long()
        return y.expand(batch) if y.ndim == 0 and batch is not None else y

    def one_hot(self, y: torch.Tensor | int | None, batch: int | None = None) -> torch.Tensor | None:
        """The label context of a conditional VAE (``None`` for an unconditional one)."""
        y = self.labels(y, batch or 1)
        if y is None:
            return None
        # a comparison, not F.one_hot: that reads the labels' min and max back on a CPU
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.unsqueeze(-1) == classes).to(torch.get_default_dtype())

    def encoder_output(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""The encoder network's output :math:`g_\phi(x)` (:math:`g_\phi(x, y)` for a
        conditional VAE), which parameterizes the guide family."""
        return self.encoder(x, self.one_hot(y, x.shape[0]))

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> pyro.distributions.Distribution:
        r""":math:`q_\phi(z \mid x)` (:math:`q_\phi(z \mid x, y)` for a conditional VAE) for a
        batch ``x`` of shape ``[batch, data_dim]``."""
        return self.guide_family.distribution(self.encoder_output(x, y))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> pyro.distributions.Distribution:
        r""":math:`p_\theta(x \mid z)` (:math:`p_\theta(x \mid z, y)` for a conditional VAE) for
        latents ``z`` of shape ``[..., latent_dim]``."""
        return self.likelihood.distribution(self.decoder(z, self.one_hot(y, z.shape[-2] if z.ndim > 1 else 1)))

    # -- the Pyro programs ---------------------------------------------------------------------
    def _data_plate(self, x: torch.Tensor, num_data: int | None) -> pyro.plate:
        batch = x.shape[0]
        # the device given, so the plate does not make a tensor to find it (an upload per step)
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch, dim=-1, device=x.device)
        if num_data < batch:
            raise ConfigError(f"num_data ({num_data}) is smaller than the batch ({batch})")
        # A minibatch of `batch` from `num_data`: Pyro scales every site in the plate by
        # num_data / batch, so the loss estimates the whole data set's.
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device), dim=-1,
                          device=x.device)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None,
              num_data: int | None = None) -> torch.Tensor:
        r"""The model :math:`p(z)\, p_\theta(x \mid z)`: latent site ``"z"``, observed site ``"x"``,
        plate ``"data"``."""
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        pyro.module(f"{self._pyro_name}.prior", self.prior)
        pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        if self.class_prior is not None:
            pyro.module(f"{self._pyro_name}.class_prior", self.class_prior)
        with self._data_plate(x, num_data):
            z = pyro.sample("z", self.prior_distribution(y, x.shape[0]))
            return pyro.sample("x", self.decode(z, y), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None,
              num_data: int | None = None) -> torch.Tensor:
        r"""The guide :math:`q_\phi(z \mid x)`: latent site ``"z"`` in plate ``"data"``."""
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        pyro.module(f"{self._pyro_name}.guide_family", self.guide_family)
        # The family's infer dict, e.g. enumeration of a discrete z (pyro.sample copies it; an
        # empty one leaves the site as it was without one).
        infer = dict(getattr(self.guide_family, "infer", {}))
        with self._data_plate(x, num_data):
            return pyro.sample("z", self.encode(x, y), infer=infer)

    # -- conveniences --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | int | None = None) -> torch.Tensor:
        r"""Decoder means :math:`\mathbb{E}[x \mid z]` (:math:`\mathbb{E}[x \mid z, y]`) for ``n``
        draws :math:`z \sim p(z)` (:math:`z \sim p(z \mid y)` with a conditional prior):
        ``[n, data_dim]``. For a conditional VAE ``y`` fixes the label (an int, or one per
        sample); by default the labels cycle through the classes."""
        if self.conditional:
            if y is None:
                y = torch.arange(n, device=self.device) % self.num_classes
            y = self.labels(y, n)
            if y.shape != (n,):
                raise ConfigError(f"sample({n}) takes one label or {n} labels, not {y.shape[0]}")
        prior = self.prior_distribution(y, n)
        z = prior.sample() if self.conditional_prior else prior.sample((n,))
        return self.decode(z, y).mean

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, y: torch.Tensor | None = None,
                       samples: int = 256) -> torch.Tensor:
        r""":math:`\mathbb{E}_q[z \mid x]`, in closed form where the guide family has one, else from
        samples."""
        q = self.encode(x, y)
        try:
            return q.mean
        except NotImplementedError:
            return q.sample((samples,)).mean(0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""Decoder means :math:`\mathbb{E}[x \mid z = \mathbb{E}_q[z \mid x]]`:
        ``[batch, data_dim]``."""
        return self.decode(self.posterior_mean(x, y), y).mean
