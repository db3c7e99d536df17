r"""The one core every bound reduces: per-datapoint log importance weights of any Pyro program.

For K particles drawn in one vectorized pass (particle dimension leftmost),

.. math:: \log w_{k,b} = \log p_\theta(x_b \mid z_{k,b}) + \log p(z_{k,b})
          - \log q_\phi(z_{k,b} \mid x_b),\qquad\text{shape } [K, \text{batch}].

**Plates.** The datapoint plate is the plate named ``"data"``. Every site inside it (and inside
plates nested in it) contributes a *local*, per-datapoint term; nested plates are summed within
the datapoint. Every site outside it (a global latent, a ``pyro.factor``, a global observation)
contributes one *global* term per draw. A program with no ``"data"`` plate is one weight for
everything (a batch of one), so ``iwae`` on it is Pyro's ``RenyiELBO(alpha=0)`` (when no plate
encloses every site: ``RenyiELBO`` reduces such a plate element by element, as plate "data").

**The hierarchical bound.** With global latents :math:`g` and local latents :math:`z_b`,

.. math:: \log p(x) \;\ge\; \mathbb{E}_{q(g)}\Big[\log\frac{p(g)}{q(g)}
          + \sum_b \log p(x_b \mid g)\Big]
          \;\ge\; \mathbb{E}_{q(g)}\Big[\log\frac{p(g)}{q(g)}
          + \sum_b \mathbb{E}\,\log\frac1K\sum_k w_{k,b}(g)\Big],

the first step is Jensen over :math:`g` (an ELBO over the globals), the second the IWAE bound of
each datapoint *given the same* :math:`g` (any K-particle bound :math:`\le \log p(x_b \mid g)`
serves). So the K local particles must share one draw of :math:`g`: for the objectives that are
non-linear in the particles (``iwae``, ``renyi``, ``dreg``, ``vimco``, ``miwae``, ``ciwae``,
``piwae``, ``stl`` at K > 1) the particle plate enters only sites inside plate ``"data"`` and the
globals are drawn once per step.
For the linear ones (``elbo``, ``meanfield``) every site gets the particle dimension and the result
equals ``Trace_ELBO`` particle for particle. The minibatch scale :math:`N/B` (``scale``) multiplies
the local terms only, outside every log-mean-exp. Pyro's ``RenyiELBO`` instead draws the globals per
particle and puts every term, scaled, inside one log-sum-exp over the particles: with global latents
and local data its value is not a bound on :math:`\log p(x)` (the datapoints' log-mean-exps mix
particles with different :math:`g`), and under subsampling :math:`N/B` sits inside the log-sum-exp.

**Scales and masks** are Pyro's, per site, as ``Trace_ELBO`` applies them: a site's log-density
is multiplied by its scale (scalar or tensor, from ``poutine.scale`` or a subsampling plate) and
zeroed where masked. For local sites the data plate's :math:`N/B` is divided out and returned as
``scale``; any other scale stays on its site, inside the weight.

**K = 1** runs the program without a particle dimension, as ``Trace_ELBO`` does.

**Discrete latents.** A guide site without ``rsample`` is sampled and its :math:`\log q` kept
apart (``score_local`` / ``score_global``) for the score-function estimator. Sites marked
``infer={"enumerate": "parallel"}`` are enumerated with Pyro's ``poutine.enum``: a model-side
site (absent from the guide) is summed out of each weight, :math:`\log \sum_c p(x, c, z_k)`; a
guide-side site is summed out of each importance weight, :math:`\log \sum_c q(c)\, w_k(c)`, and
averaged over :math:`q(c)` in the ELBO, as ``TraceEnum_ELBO`` does.

Objectives (:mod:`pyro_vae.objectives`), the evaluator and the diagnostics all start here.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_validation_enabled
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match

from .errors import ConfigError, PyroVAEError

DATA_PLATE = "data"
#: the name of the internal particle plate (a user plate named "particles" is left alone)
PARTICLE_PLATE = "_pyro_vae_particles"


@dataclass
class LatentSite:
    """One latent site: its value and the distributions that scored it.

    ``local``: inside plate ``"data"``; ``weigh`` turns an elementwise term of the site (a
    closed-form KL, say) into the site's contribution, ``[particles, batch]`` (local) or
    ``[particles]`` (global), with the site's scale and mask applied as to its log-density.
    """

    value: torch.Tensor
    prior: torch.distributions.Distribution   # the model's distribution at the site
    guide: torch.distributions.Distribution   # the guide's distribution at the site
    local: bool = True
    weigh: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda term: term, repr=False)
    #: places a ``[particles, batch]`` tensor on the value's particle and datapoint dims
    spread: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def per_particle(self, term: torch.Tensor) -> torch.Tensor:
        """``term`` ``[particles, batch]`` shaped to broadcast against ``value``."""
        if self.spread is not None:
            return self.spread(term)
        return term.reshape(term.shape + (1,) * (self.value.dim() - 2))


class EnumeratedComponent:
    r"""Guide sites enumerated together (``infer={"enumerate": "parallel"}``) and every term
    that depends on them, in the enumerated sites' plate context; plates nested further are
    already summed inside. Per element of the context (a datapoint, or a plate element) the
    enumerated values :math:`c` are summed out of the importance weight,

    .. math:: \log \sum_c q(c)\, w(c) = \operatorname{logsumexp}_c
              \big[\log q(c) + L(c) + \beta\,(P(c) - Q(c))\big],

    and averaged in the ELBO, :math:`\sum_c q(c)\,[L(c) + \beta\,(P(c) - Q(c))]`; then the
    context's plates are summed, leaving ``[particles, batch]`` (local) or ``[particles]``
    (global).

    ``likelihood`` :math:`L`, ``prior`` :math:`P`, ``guide`` :math:`Q` (:math:`Q` includes
    :math:`\log q(c)`) and ``log_q`` :math:`= \log q(c)` are raw log-density tensors whose
    enumeration dims are ``dims``; ``fold`` maps a tensor reduced over them to its final shape."""

    def __init__(self, likelihood, prior, guide, log_q, dims, fold):
        self.likelihood, self.prior, self.guide, self.log_q = likelihood, prior, guide, log_q
        self.dims, self.fold = sorted(dims), fold

    def _joint(self, beta: float) -> torch.Tensor:
        latent = self.prior - self.guide
        return self.likelihood + (latent if beta == 1.0 else beta * latent)

    def total(self, beta: float = 1.0) -> torch.Tensor:
        return self.fold(torch.logsumexp(self.log_q + self._joint(beta), self.dims, keepdim=True))

    def expected(self, term: torch.Tensor) -> torch.Tensor:
        term = torch.broadcast_tensors(term, self.log_q)[0]
        return self.fold((self.log_q.exp() * term).sum(self.dims, keepdim=True))

    def expected_total(self, beta: float = 1.0) -> torch.Tensor:
        return self.expected(self._joint(beta))


class LogWeights:
    r"""Per-datapoint log-density terms of K particles, each of shape ``[particles, batch]``.

    ``log_likelihood``: :math:`\log p_\theta(x \mid z)` (observed sites, factors, and model
    sites summed out by enumeration); ``log_prior``: :math:`\log p(z)` (latent sites of the
    model); ``log_guide``: :math:`\log q_\phi(z \mid x)` (sites of the guide; with
    ``stop_guide_gradient`` its parameters are stopped and only the path through :math:`z`
    carries gradient); ``sites``: the latent sites by name; ``scale``: ``num_data / batch``, the
    factor that turns a minibatch sum into a data-set estimate.

    Global terms (sites outside plate ``"data"``) are ``global_terms`` = (likelihood, prior,
    guide), each of shape ``[particles]`` (drawn per particle) or ``[1]`` (drawn once and shared
    by the particles); ``None`` when there are none.
    ``score_local`` ``[particles, batch]`` and ``score_global`` hold :math:`\log q` of the guide
    sites sampled without ``rsample`` (the score-function factors), ``None`` when there are none.

    Enumerated guide sites form :class:`EnumeratedComponent`\ s (``components``, local, and
    ``global_components``): :meth:`total` sums their values out of the importance weight,
    :meth:`expected_total` and the three term properties average over them.

    ``log_prior`` and ``log_guide`` may be given as functions of no arguments: they are then
    computed when first read (an objective with the KL in closed form never reads them).
    """

    def __init__(self, log_likelihood: torch.Tensor,
                 log_prior: torch.Tensor | Callable[[], torch.Tensor],
                 log_guide: torch.Tensor | Callable[[], torch.Tensor], scale: float,
                 sites: dict[str, LatentSite] | None = None, *,
                 global_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 score_local: torch.Tensor | None = None,
                 score_global: torch.Tensor | None = None,
                 components: list[EnumeratedComponent] | None = None,
                 global_components: list[EnumeratedComponent] | None = None,
                 model_only: list[str] | None = None):
        self._log_likelihood = log_likelihood
        self._log_prior, self._log_guide = log_prior, log_guide
        self._grad_enabled = torch.is_grad_enabled()  # a deferred term is computed as if now
        self.scale = scale
        self.sites = {} if sites is None else sites
        self.global_terms = global_terms
        self.score_local = score_local
        self.score_global = score_global
        self.components = components or []
        self.global_components = global_components or []
        #: latent sites of the model that the guide does not sample (drawn from the prior)
        self.model_only = [] if model_only is None else model_only
        #: ``pyro.factor`` terms of the guide (local ``[particles, batch]``, global), or None
        self.guide_factors: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        #: latent model sites whose density depends on a model-side enumerated site
        self.enum_dependent_latents: list[str] = []
        #: the latent sites in the order the model and the guide sample them
        self.site_order: tuple[list[str], list[str]] = ([], [])
        #: with ``stop_guide_gradient``: a function of no arguments giving the direct terms
        #: (see :meth:`direct_log_guide`)
        self.direct_guide: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def per_datapoint_only(self, what: str) -> "LogWeights":
        """These weights, for a tool that reports per-datapoint bounds; refused in one line if
        the program has terms outside plate "data", which no per-datapoint number holds."""
        if self.global_terms is not None or self.global_components:
            raise ConfigError(f"{what} reports per-datapoint bounds, and this program has sites "
                              "outside plate 'data' (global latents or observations)")
        return self

    def direct_log_guide(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        r""":math:`\log q_\phi(z \mid x)` at the latent values held fixed (detached), with the
        guide's parameters live: local ``[particles, batch]`` and global (``[particles]`` or
        ``[1]``; ``None`` without global latents). Its gradient is the direct term
        :math:`\partial_\phi \log q_\phi(z \mid x)|_z` that weights scored with
        ``stop_guide_gradient`` drop (only there is it available; computed when first read). A
        local site is scored given live global values: its dependence on them is direct too."""
        if self.direct_guide is None:
            raise ConfigError("the direct log q terms are computed for weights scored with "
                              "stop_guide_gradient only")
        if callable(self.direct_guide):
            with torch.set_grad_enabled(self._grad_enabled):
                self.direct_guide = self.direct_guide()
        return self.direct_guide

    @property
    def has_guide_enumeration(self) -> bool:
        return bool(self.components or self.global_components)

    def _resolved(self, term):
        if not callable(term):
            return term
        with torch.set_grad_enabled(self._grad_enabled):
            return term()

    def _with_components(self, base: torch.Tensor, part: str) -> torch.Tensor:
        for component in self.components:
            base = base + component.expected(getattr(component, part))
        return base

    @property
    def log_likelihood(self) -> torch.Tensor:
        return self._with_components(self._log_likelihood, "likelihood")

    @property
    def log_prior(self) -> torch.Tensor:
        self._log_prior = self._resolved(self._log_prior)
        return self._with_components(self._log_prior, "prior")

    @property
    def log_guide(self) -> torch.Tensor:
        self._log_guide = self._resolved(self._log_guide)
        return self._with_components(self._log_guide, "guide")

    def __repr__(self) -> str:
        return (f"LogWeights(particles={self.particles}, batch={self.batch}, "
                f"scale={self.scale}, sites={list(self.sites)})")

    @property
    def particles(self) -> int:
        return self._log_likelihood.shape[-2]

    @property
    def batch(self) -> int:
        return self._log_likelihood.shape[-1]

    @property
    def latents(self) -> torch.Tensor | None:
        """The values of the latent site ``"z"``, ``[particles, batch, latent_dim]``."""
        site = self.sites.get("z")
        return None if site is None else site.value

    def _base(self, beta: float) -> torch.Tensor:
        self._log_prior = self._resolved(self._log_prior)
        self._log_guide = self._resolved(self._log_guide)
        latent = self._log_prior - self._log_guide
        return self._log_likelihood + (latent if beta == 1.0 else beta * latent)

    def total(self, beta: float = 1.0) -> torch.Tensor:
        r"""The log-weights, ``[particles, batch]``,
        :math:`\log w = \log p(x \mid z) + \beta\,(\log p(z) - \log q(z \mid x))`;
        :math:`\beta = 1` is the usual importance weight. Enumerated guide values are summed out:
        :math:`\log \sum_c q(c)\, w(c)`."""
        total = self._base(beta)
        for component in self.components:
            total = total + component.total(beta)
        return total

    def expected_total(self, beta: float = 1.0) -> torch.Tensor:
        r"""The ELBO's integrand per particle, ``[particles, batch]``: :meth:`total` without
        enumeration, :math:`\mathbb{E}_{q(c)}[\log w(c)]` with it."""
        total = self._base(beta)
        for component in self.components:
            total = total + component.expected_total(beta)
        return total

    def log_mean_weight(self, beta: float = 1.0) -> torch.Tensor:
        r"""The per-datapoint IWAE bound :math:`\log \frac{1}{K}\sum_k w_k`, ``[batch]``."""
        return torch.logsumexp(self.total(beta), dim=0) - math.log(self.particles)

    def global_total(self, beta: float = 1.0) -> torch.Tensor | None:
        r"""The global terms per draw,
        :math:`\log p(x_g \mid g) + \beta\,(\log p(g) - \log q(g))`, averaged over enumerated
        global guide values; ``None`` if there are none."""
        if self.global_terms is None and not self.global_components:
            return None
        total = 0.0
        if self.global_terms is not None:
            likelihood, prior, guide = self.global_terms
            latent = prior - guide
            total = likelihood + (latent if beta == 1.0 else beta * latent)
        for component in self.global_components:
            total = total + component.expected_total(beta)
        return total


# -- the program's structure -------------------------------------------------------------------
class ProgramStructure(NamedTuple):
    """What one undisturbed run of a model/guide pair shows: the deepest plate nesting and
    whether there is a datapoint plate ``"data"`` (vectorized)."""

    max_plate_nesting: int
    has_data_plate: bool


def program_structure(model: Callable, guide: Callable, *args, **kwargs) -> ProgramStructure:
    """Run the pair once, outside any handler's view, as Pyro's ELBOs guess ``max_plate_nesting``."""
    devices = ([torch.cuda.current_device()]
               if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    # the random draws of this look are not the caller's: the next run draws as if it had not been
    with poutine.block(), warnings.catch_warnings(), torch.random.fork_rng(devices):
        warnings.simplefilter("ignore")
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    nesting, has_data = 0, False
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.name == PARTICLE_PLATE:
                    continue
                if frame.name == DATA_PLATE and frame.dim is not None:
                    # a sequential (for-loop) plate "data" gives no datapoint dimension: the
                    # program is then one weight for everything
                    has_data = True
                if frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
    return ProgramStructure(nesting, has_data)


class _LocalParticlePlate(PlateMessenger):
    """The particle plate for the sites inside plate ``"data"`` only: the globals are drawn
    once and shared by the K local particles (the hierarchical bound above)."""

    def _process_message(self, msg) -> None:
        if any(frame.name == DATA_PLATE for frame in msg["cond_indep_stack"]):
            super()._process_message(msg)


# -- scoring ------------------------------------------------------------------------------------
def _scale_and_mask(term: torch.Tensor, scale, mask) -> torch.Tensor:
    if mask is False:
        return torch.zeros_like(term)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        term = term * scale
    if mask is not None and mask is not True:
        term = torch.where(mask, term, term.new_zeros(()))
    return term


class _Layout:
    """Where the dimensions of one run's log-densities are, and how to fold them.

    Dims −1 … −M are plates (M = max_plate_nesting); −(M+1) is the particle plate when there is
    one; further left are enumeration dims. A local term folds to ``[*enum, K, batch]`` (plates
    nested in "data" summed), a global one to ``[*enum, K]``.
    """

    def __init__(self, nesting: int, has_particle_dim: bool, has_data_plate: bool,
                 additive: bool = False):
        self.nesting = nesting
        self.additive = additive
        self.has_particle_dim = has_particle_dim
        self.has_data_plate = has_data_plate
        self.right = nesting + (1 if has_particle_dim else 0)  # dims that are not enumeration

    def data_frame(self, site):
        if not self.has_data_plate:
            return None
        for frame in site["cond_indep_stack"]:
            if frame.name == DATA_PLATE and frame.dim is not None:
                return frame
        return None

    def check(self, name: str, site: dict, term: torch.Tensor, enum_dims: set[int],
              shared_globals: bool) -> None:
        """Every dimension of a log-density is declared: a plate, the particles, or an
        enumerated value. Anything else would be summed silently into a wrong number.

        For an objective additive in the log-weights (the ELBO family, or any objective at
        K = 1) Pyro's own rules apply, as ``Trace_ELBO`` sums: a plate other than "data" may
        subsample (its scale stays on the site) and undeclared dims inside the plates are summed.
        """
        declared = {f.dim for f in site["cond_indep_stack"] if f.dim is not None}
        data = self.data_frame(site)
        for frame in site["cond_indep_stack"]:
            if (frame is not data and frame.full_size is not None
                    and frame.full_size != frame.size and not self.additive):
                raise ConfigError(
                    f"site {name!r}: plate {frame.name!r} subsamples ({frame.size} of "
                    f"{frame.full_size}); only the vectorized datapoint plate 'data' may "
                    "subsample under a multi-particle bound (elbo and meanfield allow it)")
        for position in range(1, term.dim() + 1):
            size = term.shape[-position]
            if size == 1:
                continue
            dim = -position
            if position <= self.nesting:
                # Pyro sums a dim that no plate declares; so do additive objectives, and any
                # objective at a site in plate "data" (summed within its datapoint's weight).
                # Elsewhere, under a multi-particle bound, it could be the particle dim moved by
                # a reduction over another dim: refused rather than summed over the particles.
                if dim not in declared and not self.additive and data is None:
                    raise ConfigError(
                        f"site {name!r}: its log-density has a batch dimension of size {size} at "
                        f"dim {dim} that no enclosing plate declares")
            elif self.has_particle_dim and position == self.nesting + 1:
                if shared_globals and self.data_frame(site) is None:
                    raise ConfigError(
                        f"site {name!r} outside plate 'data' depends on the local latents; "
                        "a global site may depend on global latents only")
            elif dim not in enum_dims:
                raise ConfigError(
                    f"site {name!r}: its log-density has {term.dim()} batch dimensions, more "
                    f"than its {len(declared)} plates declare (max_plate_nesting = "
                    f"{self.nesting}); declare every batch dimension with a plate")

    def fold(self, term: torch.Tensor, local: bool, data_dim: int | None) -> torch.Tensor:
        """``[*enum, K, batch]`` (local) or ``[*enum, K]`` (global) from a site's term."""
        need = self.right
        if term.dim() < need:
            term = term.reshape((1,) * (need - term.dim()) + term.shape)
        if self.nesting:
            plate_dims = [d for d in range(-self.nesting, 0) if not (local and d == data_dim)]
            if plate_dims:
                term = term.sum(plate_dims, keepdim=True)
            keep = term.shape[data_dim] if (local and data_dim is not None) else None
            term = term.reshape(term.shape[:-self.nesting] + ((keep,) if keep is not None else ()))
        if local and data_dim is None:  # a program without plate "data": a batch of one
            term = term.unsqueeze(-1)
        if not self.has_particle_dim:
            term = term.unsqueeze(-2 if local else -1)
        # leading dims left by a summed-out enumeration are of size one
        return term.reshape(term.shape[-2:] if local else term.shape[-1:])


class _CheckedEnum(EnumMessenger):
    """Pyro's parallel enumeration, refusing in one line what it cannot honour (rather than
    sampling the site, or failing inside Pyro). In the guide, sequential enumeration is the
    same sum computed in a loop: it is done in parallel."""

    def __init__(self, first_available_dim: int, sequential_as_parallel: bool = False):
        super().__init__(first_available_dim=first_available_dim)
        self.sequential_as_parallel = sequential_as_parallel

    def _pyro_sample(self, msg) -> None:
        how = msg["infer"].get("enumerate")
        if how == "sequential" and self.sequential_as_parallel and not msg["done"]:
            msg["infer"] = dict(msg["infer"], enumerate="parallel")
            how = "parallel"
        if how is not None and not msg["done"] and not msg["is_observed"]:
            if how != "parallel":
                raise ConfigError(f"site {msg['name']!r}: enumerate={how!r} is not supported; "
                                  "use infer={'enumerate': 'parallel'}")
            if not getattr(msg["fn"], "has_enumerate_support", False):
                raise ConfigError(f"site {msg['name']!r} is marked for enumeration, but "
                                  f"{type(msg['fn']).__name__} has no finite support to "
                                  "enumerate")
        super()._pyro_sample(msg)


def _enum_dims_of(trace) -> set[int]:
    return {site["infer"]["_enumerate_dim"] for site in trace.nodes.values()
            if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None}


@contextmanager
def _frozen(parameters: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, the given leaf tensors take part in computations as constants."""
    frozen = [p for p in parameters if p.requires_grad and p.is_leaf]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _guide_parameters(guide: Callable, guide_trace) -> list[torch.Tensor]:
    """Every leaf parameter the guide reads: its module's parameters (when it is a method of an
    ``nn.Module``), and the param store's leaves behind its ``pyro.param``/``pyro.module``/
    ``PyroParam`` sites."""
    found: dict[int, torch.Tensor] = {}
    owner = getattr(guide, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        found.update((id(p), p) for p in owner.parameters())
    store = pyro.get_param_store()
    for name, site in guide_trace.nodes.items():
        if site["type"] != "param":
            continue
        for candidate in (site["value"], store._params.get(name)):
            if torch.is_tensor(candidate) and candidate.is_leaf and candidate.requires_grad:
                found[id(candidate)] = candidate
    return list(found.values())


def _with_values(trace, values: dict[str, torch.Tensor]):
    """A copy of ``trace`` whose sample sites named in ``values`` hold those values."""
    copy = trace.copy()
    for name, value in values.items():
        copy.nodes[name] = {**copy.nodes[name], "value": value}
    return copy


# -- the untraced fast path of an unmodified VAE --------------------------------------------------
@contextmanager
def _parameters_detached(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` reads as a detached tensor."""
    saved = []
    for owner in module.modules():
        for name, parameter in owner._parameters.items():
            if parameter is not None:
                saved.append((owner, name, parameter))
    try:
        for owner, name, parameter in saved:
            owner._parameters[name] = parameter.detach()
        yield
    finally:
        for owner, name, parameter in saved:
            owner._parameters[name] = parameter


def _plain_vae(model: Callable, guide: Callable):
    """The VAE whose unmodified ``model``/``guide`` these are, when nothing else is listening:
    no Pyro handler is active (SVI's parameter capture, a user's ``poutine``), and its guide
    family is reparameterized and not enumerated. Then tracing would add bookkeeping and nothing
    else: the site structure is fixed by construction, and Pyro's validation switch also
    governs torch's argument and support checks, which the distributions run either way."""
    owner = getattr(model, "__self__", None)
    if owner is None or getattr(guide, "__self__", None) is not owner:
        return None
    from .vae import VAE

    if (not isinstance(owner, VAE) or type(owner).model is not VAE.model
            or type(owner).guide is not VAE.guide or _PYRO_STACK
            or not getattr(owner.guide_family, "has_rsample", True)
            or getattr(owner.guide_family, "infer", None)):
        return None
    return owner


def _vae_log_weights(vae, particles: int, stop_guide_gradient: bool, x: torch.Tensor,
                     y: torch.Tensor | None = None, num_data: int | None = None) -> LogWeights:
    """The same quantities as the traced path, computed from the VAE's components directly:
    z ~ q(z|x) with the particle dimension leftmost (the same random draws as Pyro's
    plate-expanded sample), then log p(x|z), log p(z), log q(z|x) per particle and datapoint."""
    batch = x.shape[0]
    if num_data is not None and num_data < batch:
        raise ConfigError(f"num_data ({num_data}) is smaller than the batch ({batch})")
    encoded = vae.encoder_output(x, y)
    guide = vae.guide_family.distribution(encoded)
    z = guide.rsample((particles,))
    prior = vae.prior_distribution(y, batch)
    log_likelihood = vae.decode(z, y).log_prob(x)

    def log_guide() -> torch.Tensor:
        if not stop_guide_gradient:
            return guide.log_prob(z)
        # q scored with φ stopped: the same guide family on the detached encoder output, with
        # the family's own parameters detached; only the path through z carries gradient
        with _parameters_detached(vae.guide_family):
            return vae.guide_family.distribution(encoded.detach()).log_prob(z)

    shape = (particles, batch)
    site = LatentSite(z, prior.expand(shape), guide.expand(shape))
    # log p(z) and log q(z|x) are computed when an objective reads them (meanfield does not)
    weights = LogWeights(log_likelihood, lambda: prior.log_prob(z), log_guide,
                         1.0 if num_data is None else num_data / batch, {"z": site})
    if stop_guide_gradient:
        weights.direct_guide = lambda: (guide.log_prob(z.detach()), None)
    return weights


# -- the general traced path ----------------------------------------------------------------------
def log_weights(model: Callable, guide: Callable, *args, particles: int = 1,
                stop_guide_gradient: bool = False, shared_globals: bool = True,
                additive: bool | None = None,
                structure: ProgramStructure | Callable[[], ProgramStructure] | None = None,
                **kwargs) -> LogWeights:
    r"""Trace ``guide`` and replay ``model`` against it with ``particles`` vectorized particles.

    Any Pyro model/guide pair: plates (the datapoint plate is ``"data"``), scales, masks,
    factors, global and local latents, discrete sites (see the module docstring). The result is
    differentiable with respect to both programs' parameters: pathwise through reparameterized
    samples; sites sampled without ``rsample`` are detached and their log q returned apart
    for a score-function estimator.

    :param shared_globals: draw the global latents once and share them across the K local
        particles (the hierarchical bound; for objectives non-linear in the particles). With
        ``False`` every site gets the particle dimension (``Trace_ELBO``'s vectorized particles).
    :param additive: the weights will be averaged over the particles, not log-mean-exp'ed (the
        ELBO family; any objective at K = 1): Pyro's own rules then hold everywhere (a plate
        other than "data" may subsample, undeclared dims inside the plates are summed). Default:
        ``particles == 1``.
    :param stop_guide_gradient: score the guide a second time at the same values with every
        guide parameter stopped (module parameters, ``pyro.param``, ``PyroParam``), so
        :math:`\log q(z \mid x)` keeps only the path gradient through :math:`z(\phi, \epsilon)`: the
        gradient used by STL, DReG and PIWAE. The latent sites' values in ``sites`` are then
        aliases of the samples through which the path gradient of the weights (and only it)
        flows, and :meth:`LogWeights.direct_log_guide` gives the dropped direct term on demand.
    :param structure: the program's :class:`ProgramStructure` (or a function returning it),
        if known; finding it costs one run of the pair.

    For an unmodified :class:`pyro_vae.VAE` with no Pyro handler active (how
    :func:`pyro_vae.fit` and :func:`pyro_vae.evaluate` run), the same numbers are computed from
    its components without tracing; a test holds the two paths equal.
    """
    if not isinstance(particles, int) or isinstance(particles, bool) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    vae = _plain_vae(model, guide)
    if vae is not None:
        return _vae_log_weights(vae, particles, stop_guide_gradient, *args, **kwargs)
    if structure is None:
        structure = program_structure(model, guide, *args, **kwargs)
    elif callable(structure):
        structure = structure()
    if additive is None:
        additive = particles == 1
    try:
        return _traced_log_weights(model, guide, args, kwargs, particles, stop_guide_gradient,
                                   shared_globals, structure, additive)
    except PyroVAEError as error:
        # raised inside a traced program, Pyro appends its table of trace shapes: one line
        raise type(error)(str(error).splitlines()[0]) from None


def _traced_log_weights(model, guide, args, kwargs, particles: int, stop_guide_gradient: bool,
                        shared_globals: bool, structure: ProgramStructure,
                        additive: bool) -> LogWeights:
    nesting, has_data = structure
    has_particle_dim = particles > 1
    shared = shared_globals and has_data and has_particle_dim
    layout = _Layout(nesting, has_particle_dim, has_data, additive or not has_particle_dim)
    first_enum_dim = -(layout.right + 1)

    if has_particle_dim:
        plate_type = _LocalParticlePlate if shared else PlateMessenger
        # on the data's device, so the plate does not make a tensor to find it (an upload)
        particle_plate = plate_type(name=PARTICLE_PLATE, size=particles, dim=-(nesting + 1),
                                    device=_data_device(args, kwargs))
    else:
        particle_plate = None

    def in_particles(fn):
        # the plate sits inside replay, so replayed sites are broadcast as Pyro's own vectorized
        # particles are, and the model's distributions carry the particle dimension
        if particle_plate is None:
            return fn

        def vectorized(*args, **kwargs):
            with particle_plate:
                return fn(*args, **kwargs)

        return vectorized

    try:
        guide_trace = poutine.trace(_CheckedEnum(first_enum_dim, sequential_as_parallel=True)(
            in_particles(guide))).get_trace(*args, **kwargs)
        guide_enum_dims = _enum_dims_of(guide_trace)
        model_first = first_enum_dim - len(guide_enum_dims)
        values = _path_aliases(guide_trace) if stop_guide_gradient else {}
        replayed = _with_values(guide_trace, values) if values else guide_trace
        model_trace = poutine.trace(_CheckedEnum(model_first)(
            poutine.replay(in_particles(model), trace=replayed))).get_trace(*args, **kwargs)
    except ValueError as error:
        message = str(error).splitlines()[0] if str(error) else ""
        if message.startswith("Shape mismatch inside plate"):
            # Pyro's broadcast found a batch dimension that no plate declares where the
            # particle plate was to go
            raise ConfigError(f"{message.replace(repr(PARTICLE_PLATE), 'of the particles')}: a "
                              "batch dimension that no plate declares; declare every batch "
                              "dimension with a plate") from None
        raise
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, layout.right)
    stopped = {}
    if stop_guide_gradient:
        stopped = _stopped_guide_log_probs(guide, in_particles(guide), guide_trace, values,
                                           layout, args, kwargs, shared)
    model_enum_dims = _enum_dims_of(model_trace) - guide_enum_dims
    enum_dims = guide_enum_dims | model_enum_dims

    def data_dim_of(site):
        frame = layout.data_frame(site)
        return None if frame is None else frame.dim

    def is_local(site):
        return not has_data or layout.data_frame(site) is not None

    data_scale = 1.0
    batch = 1
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            frame = site["type"] == "sample" and layout.data_frame(site)
            if frame:
                batch = frame.size
                data_scale = frame.full_size / frame.size if frame.full_size else 1.0
                break

    def log_prob_of(name, site, which):
        unscaled = stopped.get(name) if which == "guide" else None
        if unscaled is None:
            unscaled = _checked_log_prob(name, site, which)
            layout.check(name, site, unscaled, enum_dims, shared)
        return unscaled

    def scale_of(site):
        scale = site["scale"]
        if is_local(site) and data_scale != 1.0:
            scale = scale / data_scale
        return scale

    # every scored term: (name, site, kind, log-density masked but not scaled, scale)
    records = []
    for which, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if (site["type"] != "sample" or site_is_subsample(site)
                    or site["infer"].get("_deterministic")):
                continue
            if which == "model":
                kind = "likelihood" if site["is_observed"] else "prior"
            else:
                kind = "guide_factor" if site["is_observed"] else "guide"
            term = _scale_and_mask(log_prob_of(name, site, which), 1.0, site["mask"])
            records.append((name, site, kind, term, scale_of(site)))

    local = {"likelihood": [], "prior": [], "guide": [], "score": [], "guide_factor": []}
    glob = {"likelihood": [], "prior": [], "guide": [], "score": [], "guide_factor": []}
    sites: dict[str, LatentSite] = {}
    reference = None

    def add(bucket, site, term):
        nonlocal reference
        folded = layout.fold(term, is_local(site), data_dim_of(site))
        reference = folded if reference is None else reference
        bucket.append(folded)

    # model-side enumeration: each connected group summed out, log Σ_c p(c, …), in its context
    enum_dependent_latents = [name for name, site, kind, term, _ in records
                              if kind == "prior" and _depends_on(term, model_enum_dims)
                              and site["infer"].get("_enumerate_dim") is None]
    grouped = [r for r in records if r[2] in ("likelihood", "prior")
               and _depends_on(r[3], model_enum_dims)]
    records = [r for r in records if not (r[2] in ("likelihood", "prior")
                                          and _depends_on(r[3], model_enum_dims))]
    for group in _components(grouped, model_enum_dims):
        owner, context = _context(group, "model")
        scale = _common_scale(group)
        total = _summed([_inside(term, site, context) for _, site, _, term, _ in group])
        dims = sorted(d for d in _dims_of(total, model_enum_dims))
        marginal = torch.logsumexp(total, dims, keepdim=True)
        if shared and not is_local(owner):
            raise ConfigError(f"model site {owner['name']!r} is enumerated outside plate 'data': "
                              "under a multi-particle bound the local particles would share it "
                              "(use elbo or meanfield, or K = 1)")
        records.append((owner["name"], owner, "likelihood", marginal, scale))

    # guide-side enumeration: each connected group a component, summed out per weight
    grouped = [r for r in records if _depends_on(r[3], guide_enum_dims)]
    records = [r for r in records if not _depends_on(r[3], guide_enum_dims)]
    components, global_components = [], []
    for group in _components(grouped, guide_enum_dims):
        owner, context = _context(group, "guide")
        owner_local = is_local(owner)
        if shared and not owner_local:
            raise ConfigError(f"guide site {owner['name']!r} is enumerated outside plate "
                              "'data': under a multi-particle bound the local particles would "
                              "share it (use elbo or meanfield, or K = 1)")
        scale = _common_scale(group)  # on the terms, not on the enumeration weights q(c)
        parts = {"likelihood": [], "prior": [], "guide": [], "log_q": []}
        for name, site, kind, term, _ in group:
            if kind == "guide" and not site["fn"].has_rsample and \
                    site["infer"].get("_enumerate_dim") is None:
                raise ConfigError(f"guide site {name!r} is sampled without rsample given an "
                                  "enumerated site; enumerate every discrete guide site or none")
            term = _inside(term, site, context)
            parts["guide" if kind in ("guide", "guide_factor") else kind].append(term)
            if kind == "guide" and site["infer"].get("_enumerate_dim") is not None:
                parts["log_q"].append(term)
        zero = parts["log_q"][0].new_zeros(())
        tensors = [_summed(parts[k]) if parts[k] else zero
                   for k in ("likelihood", "prior", "guide", "log_q")]
        if scale != 1.0:
            tensors[:3] = [scale * t for t in tensors[:3]]
        data_dim = data_dim_of(owner)
        component = EnumeratedComponent(
            *tensors, _dims_of(_summed([t for t in tensors if t.dim()]), guide_enum_dims),
            _reducer(layout, owner_local, data_dim, particles, batch))
        (components if owner_local else global_components).append(component)
        if reference is None:
            reference = component.total()

    for name, site, kind, term, scale in records:
        term = _scale_and_mask(term, scale, None)
        bucket = local if is_local(site) else glob
        if kind in ("likelihood", "prior"):
            add(bucket[kind], site, term)
            continue
        add(bucket["guide"], site, term)
        if kind == "guide_factor":
            add(bucket["guide_factor"], site, term)
            if site["fn"].__dict__.get("has_rsample", True) is False:
                # a factor standing for a non-reparameterized draw: its score-function factor
                if stop_guide_gradient:
                    raise ConfigError(f"guide factor {name!r} has has_rsample=False; stl, "
                                      "dreg and piwae need pathwise gradients")
                add(bucket["score"], site, site["fn"].log_prob(site["value"]))
        elif not site["fn"].has_rsample:
            if stop_guide_gradient:
                raise ConfigError(f"guide site {name!r} is not reparameterizable; stl, dreg and "
                                  "piwae need pathwise gradients (use elbo, iwae, renyi or "
                                  "vimco)")
            # the score-function factor: log q, neither scaled nor masked (Pyro's ScoreParts)
            add(bucket["score"], site, site["fn"].log_prob(site["value"]))

    for name, site in guide_trace.nodes.items():
        model_site = model_trace.nodes.get(name)
        if (site["type"] != "sample" or site["is_observed"] or site_is_subsample(site)
                or model_site is None or model_site["type"] != "sample"
                or model_site["is_observed"]):
            continue
        sites[name] = LatentSite(values.get(name, site["value"]), model_site["fn"], site["fn"],
                                 local=is_local(site),
                                 weigh=_weigher(site, layout, is_local(site),
                                                data_dim_of(site), data_scale),
                                 spread=_spreader(site, layout, data_dim_of(site)))
    if reference is None:  # nothing to score: a bound of zero, as Trace_ELBO gives
        reference = torch.zeros((), device=_data_device(args, kwargs))
    if components + global_components and (local["score"] or glob["score"]):
        raise ConfigError("a guide with both enumerated and score-function sites is not "
                          "supported; enumerate every discrete guide site or none")

    local_shape = (particles, batch)
    terms = [(_summed(local[k]) if local[k] else reference.new_zeros(())).expand(local_shape)
             for k in ("likelihood", "prior", "guide")]
    score_local = _summed(local["score"])
    if score_local is not None:
        score_local = score_local.expand(local_shape)

    global_terms = score_global = None
    width = 1 if shared else particles
    if any(glob[k] for k in ("likelihood", "prior", "guide")):
        global_terms = tuple(
            (_summed(glob[k]) if glob[k] else reference.new_zeros((1,))).expand(width)
            for k in ("likelihood", "prior", "guide"))
        if glob["score"]:
            score_global = _summed(glob["score"]).expand(width)
    guide_factors = (_summed(local["guide_factor"]), _summed(glob["guide_factor"]))
    guide_factors = (None if guide_factors[0] is None else guide_factors[0].expand(local_shape),
                     None if guide_factors[1] is None else guide_factors[1].expand(width))
    model_latents = [name for name, site in model_trace.nodes.items()
                     if site["type"] == "sample" and name in guide_trace.nodes]
    guide_latents = [name for name, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and name in model_trace.nodes]
    model_only = [name for name, site in model_trace.nodes.items()
                  if site["type"] == "sample" and not site["is_observed"]
                  and not site_is_subsample(site) and name not in guide_trace.nodes
                  and site["infer"].get("_enumerate_dim") is None]
    weights = LogWeights(*terms, data_scale, sites, global_terms=global_terms,
                         score_local=score_local, score_global=score_global,
                         components=components, global_components=global_components,
                         model_only=model_only)
    weights.guide_factors = guide_factors
    weights.enum_dependent_latents = enum_dependent_latents
    weights.site_order = (model_latents, guide_latents)
    if stop_guide_gradient:
        def direct():
            def weigh(site):
                return _weigher(site, layout, is_local(site), data_dim_of(site), data_scale)
            return _direct_guide_log_probs(in_particles(guide), guide_trace, is_local, weigh,
                                           shared, local_shape, width, args, kwargs)
        weights.direct_guide = direct
    return weights


def _checked_log_prob(name, site, which) -> torch.Tensor:
    try:
        return site["fn"].log_prob(site["value"])
    except ValueError as error:
        if "broadcastable" not in str(error):
            raise
        raise ConfigError(f"{which} site {name!r}: its value does not broadcast with its "
                          "distribution; a batch dimension that no plate declares collides "
                          "with an enumerated or particle dimension") from None


def _frames(site) -> frozenset:
    return frozenset((f.name, f.dim) for f in site["cond_indep_stack"]
                     if f.name != PARTICLE_PLATE and f.dim is not None)


def _dims_of(term: torch.Tensor, dims: set[int]) -> set[int]:
    return {d for d in dims if -d <= term.dim() and term.shape[d] > 1}


def _components(records, dims: set[int]) -> list[list]:
    """Partition terms into groups connected through the enumeration dims they depend on."""
    groups: list[tuple[set[int], list]] = []
    for record in records:
        mine = _dims_of(record[3], dims)
        joined = [g for g in groups if g[0] & mine]
        merged_dims, merged = set(mine), [record]
        for g in joined:
            merged_dims |= g[0]
            merged = g[1] + merged
            groups.remove(g)
        groups.append((merged_dims, merged))
    return [members for _, members in groups]


def _context(group, which: str):
    """The enumerated sites' shared plate context (and one of them); every term of the group
    must lie inside it."""
    kinds = ("guide",) if which == "guide" else ("likelihood", "prior")
    enumerated = list({name: (name, site) for name, site, kind, _, _ in group
                       if kind in kinds and site["infer"].get("_enumerate_dim") is not None
                       and not site["is_observed"]}.values())
    contexts = {_frames(site) for _, site in enumerated}
    if len(contexts) != 1:
        raise ConfigError(f"{which} sites {', '.join(repr(n) for n, _ in enumerated)} are "
                          "enumerated together in different plates; enumeration is supported "
                          "for sites that share one plate context")
    context = contexts.pop()
    for name, site, _, _, _ in group:
        if not context <= _frames(site):
            raise ConfigError(f"site {name!r} depends on an enumerated site but lies outside "
                              f"its plates {sorted(n for n, _ in context)}; not supported")
    return enumerated[0][1], context


def _inside(term: torch.Tensor, site, context: frozenset) -> torch.Tensor:
    """Sum the plates nested below the context: a product inside the mixture."""
    inner = sorted(d for _, d in _frames(site) - context if -d <= term.dim())
    return term.sum(inner, keepdim=True) if inner else term


def _common_scale(group):
    """The one scale of a group summed out together (applied outside the sum over values)."""
    scales = [scale for _, _, _, _, scale in group]
    first = scales[0]
    for scale in scales[1:]:
        same = (scale is first or (not torch.is_tensor(scale) and not torch.is_tensor(first)
                                   and scale == first))
        if not same:
            names = ", ".join(repr(name) for name, _, _, _, _ in group)
            raise ConfigError(f"sites {names} are summed out together but carry different "
                              "scales; give them one scale")
    if torch.is_tensor(first):
        raise ConfigError(f"site {group[0][0]!r}: a tensor scale on a site summed out by "
                          "enumeration is not supported")
    return first


def _reducer(layout: _Layout, local: bool, data_dim, particles: int, batch: int):
    def fold(term: torch.Tensor) -> torch.Tensor:
        folded = layout.fold(term, local, data_dim)
        return folded.expand(particles, batch) if local else folded
    return fold


def _summed(terms: list[torch.Tensor]) -> torch.Tensor | None:
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _depends_on(term: torch.Tensor, dims: set[int]) -> bool:
    return any(-d <= term.dim() and term.shape[d] > 1 for d in dims)


def _data_device(args, kwargs) -> torch.device:
    """The device of the program's first tensor argument (CPU if it has none)."""
    return next((a.device for a in (*args, *kwargs.values()) if torch.is_tensor(a)),
                torch.device("cpu"))


def _weigher(site, layout: _Layout, local: bool, data_dim, data_scale):
    """A function applying the site's scale and mask to an elementwise term and folding it."""
    scale = site["scale"]
    if local and data_scale != 1.0:
        scale = scale / data_scale
    mask = site["mask"]

    def weigh(term: torch.Tensor) -> torch.Tensor:
        return layout.fold(_scale_and_mask(term, scale, mask), local, data_dim)

    return weigh


def _path_aliases(guide_trace) -> dict[str, torch.Tensor]:
    """A distinct autograd node for each reparameterized latent value: the weights are scored
    through it, so a gradient hook on it sees ∂ log w / ∂z as a *density input* only, not the
    guide's own dependence of later sites on it (which DReG must not re-weight)."""
    aliases = {}
    for name, site in guide_trace.nodes.items():
        if (site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                and site["fn"].has_rsample and torch.is_tensor(site["value"])
                and site["value"].requires_grad):
            aliases[name] = site["value"].view_as(site["value"])
    return aliases


def _stopped_guide_log_probs(guide, vectorized_guide, guide_trace, aliases, layout, args, kwargs,
                             shared: bool) -> dict[str, torch.Tensor]:
    """log q of every latent guide site with every guide parameter stopped, scored at the
    aliases (so the path gradient flows). With globals shared by local particles, the local
    sites are scored given *stopped* global values: their dependence on g is part of q's
    parameters, whose score term DReG replaces (Tucker et al. 2019, eq. 5)."""
    parameters = _guide_parameters(guide, guide_trace)

    def rescore(values):
        with _frozen(parameters), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not registered in the param store")
            trace = poutine.trace(poutine.replay(vectorized_guide,
                                                 trace=_with_values(guide_trace, values))
                                  ).get_trace(*args, **kwargs)
            # score while the parameters are frozen: a flow's inverse runs lazily in log_prob
            return {name: _checked_log_prob(name, site, "guide")
                    for name, site in trace.nodes.items()
                    if site["type"] == "sample" and not site["is_observed"]
                    and not site_is_subsample(site)}, trace

    scored, trace = rescore(aliases)
    global_names = [name for name, site in trace.nodes.items()
                    if site["type"] == "sample" and not site["is_observed"]
                    and not site_is_subsample(site) and layout.data_frame(site) is None]
    if shared and global_names:
        detached = dict(aliases)
        detached.update({name: aliases[name].detach() for name in global_names if name in aliases})
        local_scored, _ = rescore(detached)
        scored.update({name: term for name, term in local_scored.items()
                       if name not in global_names})
    return scored


def _direct_guide_log_probs(vectorized_guide, guide_trace, is_local, weigh, shared: bool,
                            local_shape, width: int, args, kwargs):
    """log q of every latent guide site at its value detached, the guide's parameters live,
    summed as the weights sum it: (local ``[particles, batch]``, global ``[width]`` or None).
    With globals shared by local particles the stopped weights score the local sites given
    stopped globals, so here the local sites are scored given the live globals (their direct
    dependence on g); the global sites at their own detached values."""
    latent = {name: site for name, site in guide_trace.nodes.items()
              if site["type"] == "sample" and not site["is_observed"]
              and not site_is_subsample(site) and not site["infer"].get("_deterministic")}

    def rescore(names):
        values = {name: latent[name]["value"].detach() for name in names}
        trace = poutine.trace(poutine.replay(vectorized_guide,
                                             trace=_with_values(guide_trace, values))
                              ).get_trace(*args, **kwargs)
        return {name: _checked_log_prob(name, trace.nodes[name], "guide") for name in names}

    local_names = [name for name, site in latent.items() if is_local(site)]
    global_names = [name for name in latent if name not in local_names]
    if not latent:
        scored = {}
    elif shared and global_names:
        scored = rescore(local_names) if local_names else {}
        scored.update(rescore(global_names))
    else:
        scored = rescore(list(latent))
    local, glob = [], []
    for name, term in scored.items():
        site = latent[name]
        (local if is_local(site) else glob).append(weigh(site)(term))
    local_total = _summed(local)
    if local_total is None:
        local_total = torch.zeros((), device=_data_device(args, kwargs))
    local_total = local_total.expand(local_shape)
    glob_total = _summed(glob)
    return local_total, None if glob_total is None else glob_total.expand(width)


def _spreader(site, layout: _Layout, data_dim):
    """Place ``[particles, batch]`` on the particle and datapoint dims of the site's value."""
    event_dim = site["fn"].event_dim
    batch_dims = site["value"].dim() - event_dim

    def spread(term: torch.Tensor) -> torch.Tensor:
        shape = [1] * batch_dims  # the value's own batch dims: a hook must keep its shape
        if layout.has_particle_dim and layout.nesting + 1 <= batch_dims:
            shape[-(layout.nesting + 1)] = term.shape[0]
        if data_dim is not None and -data_dim <= batch_dims:
            shape[data_dim] = term.shape[1]
        return term.reshape(shape + [1] * event_dim)

    return spread
