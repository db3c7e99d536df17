"""The VAE: a prior, a likelihood with its decoder, and a guide family with its encoder,
composed into one Pyro model/guide pair.

The generative story, as :meth:`VAE.model` tells it::

    for each datapoint n (plate "data"):
        z_n ~ p(z)                       # the prior
        x_n ~ p_θ(x | z_n)               # the likelihood at the decoder output f_θ(z_n)

and the amortized guide :meth:`VAE.guide`::

    for each datapoint n (plate "data"):
        z_n ~ q_φ(z | x_n)               # the guide family at the encoder output g_φ(x_n)

Both are ordinary Pyro programs, so ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``Predictive`` and
poutine handlers work on them unchanged.
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
from .networks import activation_class, make_network
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


class VAE(nn.Module):
    r"""A variational autoencoder as a Pyro model/guide pair.

    :param data_shape: shape of one datapoint, e.g. ``64`` or ``(1, 8, 8)``; data are passed to
        :meth:`model` / :meth:`guide` flattened, as ``[batch, prod(data_shape)]``.
    :param latent_dim: dimension of :math:`z`.
    :param prior: a name from ``pyro_vae.models.priors.PRIORS`` or a prior object.
    :param likelihood: a name from ``pyro_vae.models.likelihoods.LIKELIHOODS`` or an object.
    :param guide: a name from ``pyro_vae.guides.posteriors.POSTERIORS`` or an object.
    :param encoder: the encoder network's kind (``"mlp"``, ``"linear"`` or ``"conv"`` for C×H×W
        image data).
    :param decoder: the decoder network's kind, as for ``encoder``.
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

    Before anything is allocated, the VAE the arguments describe is built on the meta device to
    count its parameters exactly; one too large to train here (its parameters five times over:
    gradients, Adam's two moments, a checkpoint) is refused in one line
    (:func:`pyro_vae.resources.check_model_size`).
    """

    def __init__(self, data_shape: int | Sequence[int], latent_dim: int = 8, *,
                 prior: Any = "normal", likelihood: Any = "bernoulli", guide: Any = "normal",
                 encoder: str = "mlp", decoder: str = "mlp", hidden: Sequence[int] = (256, 256),
                 prior_options: dict | None = None, likelihood_options: dict | None = None,
                 guide_options: dict | None = None, conditional: bool = False,
                 num_classes: int | None = None, activation: str = "relu"):
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
        self.encoder_kind, self.decoder_kind = encoder, decoder
        activation_class(activation)  # a known name, or one line
        if activation != "relu" and "mlp" not in (encoder, decoder):
            raise ConfigError(f"activation {activation!r} applies to mlp networks; the encoder "
                              f"is {encoder!r} and the decoder {decoder!r}")
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
        if not _SIZING.get():
            # the parameter count from a build on the meta device, refused in one line if
            # training it could not fit in memory: before anything below allocates
            check_model_size(data_shape, latent_dim, prior=prior, likelihood=likelihood,
                             guide=guide, encoder=encoder, decoder=decoder, hidden=hidden,
                             prior_options=prior_options, likelihood_options=likelihood_options,
                             guide_options=guide_options, conditional=self.conditional,
                             num_classes=self.num_classes)
        context = self.num_classes or 0
        image_shape = data_shape if len(data_shape) == 3 else None

        self.prior = resolve("prior", prior_catalogue.PRIORS, prior, prior_options,
                             prior_catalogue.PROTOCOL)
        self.likelihood = resolve("likelihood", likelihood_catalogue.LIKELIHOODS, likelihood,
                                  likelihood_options, likelihood_catalogue.PROTOCOL)
        self.guide_family = resolve("guide", posterior_catalogue.POSTERIORS, guide, guide_options,
                                    posterior_catalogue.PROTOCOL)
        self.prior.setup(latent_dim)
        self.likelihood.setup(self.data_dim)
        self.guide_family.setup(latent_dim)
        self.decoder = make_network(decoder, latent_dim,
                                    self.likelihood.decoder_outputs(self.data_dim), hidden,
                                    role="decoder", image_shape=image_shape,
                                    context_features=context, activation=activation)
        self.encoder = make_network(encoder, self.data_dim,
                                    self.guide_family.encoder_outputs(latent_dim), hidden,
                                    role="encoder", image_shape=image_shape,
                                    context_features=context, activation=activation)
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
                prior = self.prior.distribution()
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
        """Everything :meth:`from_config` needs to rebuild this VAE (JSON-serializable)."""
        prior, likelihood, guide = (describe(c) for c in
                                    (self.prior, self.likelihood, self.guide_family))
        return {
            "data_shape": list(self.data_shape), "latent_dim": self.latent_dim,
            "prior": prior["name"], "prior_options": prior["options"],
            "likelihood": likelihood["name"], "likelihood_options": likelihood["options"],
            "guide": guide["name"], "guide_options": guide["options"],
            "encoder": self.encoder_kind, "decoder": self.decoder_kind,
            "hidden": list(self.hidden), "activation": self.activation,
            "conditional": self.conditional, "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VAE":
        """The VAE that a :attr:`config` dict describes (fresh, untrained parameters)."""
        return cls(**config)

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    # -- the two halves as distributions -------------------------------------------------------
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
        with self._data_plate(x, num_data):
            z = pyro.sample("z", self.prior.distribution())
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
        draws :math:`z \sim p(z)`: ``[n, data_dim]``. For a conditional VAE ``y`` fixes the label
        (an int, or one per sample); by default the labels cycle through the classes."""
        if self.conditional and y is None:
            y = torch.arange(n, device=self.device) % self.num_classes
        return self.decode(self.prior.distribution().sample((n,)), y).mean

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
