r"""Two estimators around the ELBO: naive Monte Carlo from the prior, and the amortization gap.

**Naive Monte Carlo.** With the prior as the proposal, :math:`q(z \mid x) = p(z)`, the importance
weight of :func:`pyro_vae.log_weights.log_weights` is the likelihood alone,

.. math:: \log w_k = \log p(x \mid z_k),\qquad z_k \sim p(z),\qquad
          \log \hat p(x) = \log \frac{1}{K}\sum_{k=1}^K p(x \mid z_k),

which :func:`naive_log_likelihood` computes per datapoint (:func:`prior_guide` is that proposal
as a Pyro guide, for any model). It is consistent and biased low by
:math:`\approx \operatorname{Var}(w) / (2K\,\mathbb{E}[w]^2)`; its delta-method standard error is
:math:`\sqrt{(K/\mathrm{ESS} - 1)/K}` with :math:`\mathrm{ESS} = (\sum_k w_k)^2 / \sum_k w_k^2`.
The relative variance of the weights is :math:`\chi^2(p(z \mid x)\,\|\,p(z))`, which grows
exponentially with the latent dimension when every dimension is informed by :math:`x`: the ESS
collapses and the estimate falls far below :math:`\log p(x)` while its reported error stays
small (the sample variance misses the weights that were never drawn).

**The amortization gap** (Cremer, Li & Duvenaud 2018). Let the guide family be
:math:`q_\lambda(z)` with :math:`\lambda = g_\phi(x)` the encoder's output. For
:math:`\lambda^*(x) = \arg\max_\lambda \mathrm{ELBO}(q_\lambda; x)`, the best member of the family
for that datapoint,

.. math:: \underbrace{\log p(x) - \mathrm{ELBO}(q_{g_\phi(x)})}_{\text{inference gap}}
          = \underbrace{\log p(x) - \mathrm{ELBO}(q_{\lambda^*})}_{\text{approximation gap}}
          + \underbrace{\mathrm{ELBO}(q_{\lambda^*}) - \mathrm{ELBO}(q_{g_\phi(x)})}_{
            \text{amortization gap} \;\ge\; 0}.

Each gap is a difference of KL divergences to the posterior,
:math:`\log p(x) - \mathrm{ELBO}(q) = \mathrm{KL}(q \,\|\, p(z \mid x))`. :func:`refine` finds
:math:`\lambda^*` per datapoint by gradient ascent on the ELBO (Adam), starting from
:math:`g_\phi(x)`, with every parameter of the model frozen; :func:`amortization_gaps` adds
:math:`\log p(x)` (exact where it is known in closed form, else the IWAE estimate with the
amortized guide) and returns the decomposition.

Both ELBOs are estimated from the same K draws of the guide's noise (common random numbers:
for a reparameterized guide :math:`z_k = T_\lambda(\epsilon_k)` with the same
:math:`\epsilon_k`), so the amortization gap's standard error is that of the per-particle
differences, :math:`\mathrm{sd}_k(\log w^*_k - \log w_k)/\sqrt{K}`. A difference of two estimates
whose covariance is unknown gets :math:`\mathrm{se}_a + \mathrm{se}_b`, an upper bound on the
standard error of :math:`a - b`.

Everything runs in eval mode with Pyro's validation off, under a forked random-number state
seeded with ``seed`` (the caller's random state is untouched), and in nats per datapoint.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .log_weights import DATA_PLATE, log_weights, program_structure
from .lvm import check_protocol, device_of, has, is_conditional, require
from .objectives import make_objective

__all__ = ["prior_guide", "naive_log_likelihood", "NaiveEstimate", "refine", "Refinement",
           "amortization_gaps", "AmortizationGaps", "REFINE_OBJECTIVES"]

#: Objectives whose gradient is an unbiased estimate of the ELBO's, for :func:`refine`:
#: ``elbo`` (pathwise), ``stl`` (pathwise with the score term removed: zero variance where
#: :math:`q` equals the posterior), ``meanfield`` (closed-form KL).
REFINE_OBJECTIVES = ("elbo", "stl", "meanfield")


# -- the prior as a guide -------------------------------------------------------------------------
def _hidden_from_guide(msg) -> bool:
    """Observed sites (data, factors, deterministic sites) and parameters of the model: the prior
    guide runs the model without them."""
    if msg["type"] == "param":
        return True
    return msg["type"] == "sample" and msg["is_observed"] and not site_is_subsample(msg)


def prior_guide(model: Callable) -> Callable:
    r"""A guide that draws every latent site of ``model`` from the model's own prior.

    The guide runs ``model`` with its observed sites (and ``pyro.factor`` and
    ``pyro.deterministic`` sites) and its ``pyro.param``/``pyro.module`` sites hidden from the
    guide's trace (the parameters are the model's: an optimizer of the guide does not see them),
    so its trace holds exactly the model's latent sites, each with the model's distribution
    given the latents drawn before it: :math:`\log q(z) = \log p(z)` and
    :math:`\log w = \log p(x \mid z)`. A site the model enumerates keeps its ``infer`` dict, so
    the guide enumerates it too and each weight sums it out:
    :math:`\log \sum_c p(c)\, p(x \mid c, z)`.

    ``model`` is a Pyro program ``model(*args, **kwargs)``, or a latent-variable model (an
    ``nn.Module`` with a ``model`` method), whose ``model`` is then used. The guide takes the
    model's arguments.
    """
    if isinstance(model, nn.Module) and callable(getattr(model, "model", None)):
        model = model.model
    if not callable(model):
        raise ConfigError(f"prior_guide takes a Pyro model (a function), not "
                          f"{type(model).__name__}")

    @functools.wraps(model)
    def guide(*args, **kwargs):
        with poutine.block(hide_fn=_hidden_from_guide):
            return model(*args, **kwargs)

    guide.__name__ = guide.__qualname__ = f"prior_guide({getattr(model, '__name__', 'model')})"
    guide.model = model
    return guide


def _memory_plan(model: nn.Module, guide: Callable, x, y, particles: int, batch_size: int,
                 memory_budget: int | None):
    """Datapoints and particles per pass for scoring ``model`` against ``guide``, as
    :func:`pyro_vae.evaluate` sizes them."""
    from .evaluation import memory_plan  # evaluation may call this module: imported when used

    return memory_plan(_Proposal(model, guide), x, y, particles, batch_size, memory_budget)


def _programs(model: nn.Module):
    from .lvm import programs

    return programs(model)


class _Proposal(nn.Module):
    """A latent-variable model's ``model`` with another guide, as one module (for the memory
    plan of :func:`pyro_vae.evaluation.memory_plan`)."""

    def __init__(self, lvm: nn.Module, guide: Callable):
        super().__init__()
        self.lvm = lvm
        self.model = _programs(lvm)[0]
        self.guide = guide
        self.training = lvm.training  # the plan's probes restore this mode to the model

    @property
    def device(self) -> torch.device:
        return device_of(self.lvm)


# -- shared checks ---------------------------------------------------------------------------------
def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"{what} must be {kind}, not {value!r}")
    return value


def _prepared(model: nn.Module, x, y, tool: str):
    """``x`` (and ``y``) checked against the model, on its device."""
    check_protocol(model, tool)
    if not torch.is_tensor(x) or x.ndim < 1:
        raise ConfigError(f"{tool} takes a tensor of datapoints [batch, ...], not "
                          f"{type(x).__name__ if not torch.is_tensor(x) else 'a scalar'}")
    if x.shape[0] == 0:
        raise ConfigError(f"{tool}: no datapoints")
    data_dim = getattr(model, "data_dim", None)
    if isinstance(data_dim, int) and (x.ndim != 2 or x.shape[1] != data_dim):
        raise ConfigError(f"data of shape {list(x.shape)} do not fit a model of data_dim "
                          f"{data_dim}")
    if is_conditional(model) and y is None:
        raise ConfigError(f"{tool}: a conditional model needs labels y")
    if y is not None:
        if not torch.is_tensor(y) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ConfigError(f"{tool}: labels y must be a tensor of {x.shape[0]} labels, one "
                              "per datapoint")
    device = device_of(model)
    return x.to(device), None if y is None else y.to(device)


def _rows(x, y, start: int, size: int):
    return x[start:start + size], None if y is None else y[start:start + size]


def _cuda(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _per_datapoint_latents(model: Callable, guide: Callable, x, y, tool: str) -> None:
    """Refuse, in one line, a program with no latent site or with a latent site outside plate
    "data" (a global latent: no per-datapoint estimate holds it)."""
    with poutine.block(), torch.random.fork_rng(_cuda(x.device)):
        trace = poutine.trace(guide).get_trace(x, y)
    latents = [(name, site) for name, site in trace.nodes.items()
               if site["type"] == "sample" and not site["is_observed"]
               and not site_is_subsample(site)]
    if not latents:
        raise ConfigError(f"{tool}: the model has no latent sites, so nothing to estimate "
                          "(its log p(x) is its own log-density)")
    for name, site in latents:
        if not any(frame.name == DATA_PLATE and frame.dim is not None
                   for frame in site["cond_indep_stack"]):
            raise ConfigError(f"{tool} estimates log p(x) per datapoint, and latent site "
                              f"{name!r} lies outside plate 'data' (a global latent)")


def _se_across(values: torch.Tensor) -> float:
    n = values.shape[0]
    return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def _combined(se: torch.Tensor) -> float:
    """The Monte Carlo standard error of a mean of independent per-datapoint estimates."""
    return float(se.pow(2).sum().sqrt() / se.shape[0])


# -- naive Monte Carlo -----------------------------------------------------------------------------
@dataclass
class NaiveEstimate:
    r"""Per-datapoint naive Monte Carlo estimates, tensors of shape ``[num_datapoints]``:
    ``log_likelihood`` :math:`\log \frac1K \sum_k p(x \mid z_k)`, its delta-method
    ``log_likelihood_mc_se``, the ``ess`` of the weights; and their ``summary``."""

    log_likelihood: torch.Tensor
    log_likelihood_mc_se: torch.Tensor
    ess: torch.Tensor
    particles: int
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        self.summary = {
            "log_likelihood": float(self.log_likelihood.mean()),
            "log_likelihood_se": _se_across(self.log_likelihood),
            "log_likelihood_mc_se": _combined(self.log_likelihood_mc_se),
            "mean_ess": float(self.ess.mean()),
            "ess_fraction": float(self.ess.mean()) / self.particles,
            "particles": self.particles, "num_datapoints": self.log_likelihood.shape[0],
        }


@torch.no_grad()
def naive_log_likelihood(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                         particles: int = 1000, seed: int = 0, batch_size: int = 256,
                         chunk: int | None = None, *, progress: bool = False,
                         memory_budget: int | None = None) -> NaiveEstimate:
    r"""The naive Monte Carlo estimate of :math:`\log p(x)` per datapoint of ``x``, with
    K = ``particles`` draws from the prior (:func:`prior_guide`).

    The particles are scored ``chunk`` at a time, and the chunks' log-sum-exps combined with
    ``logaddexp``, so no more than ``chunk`` particles of a batch are held at once; by default the
    batch and the chunk are sized to ``memory_budget`` bytes as :func:`pyro_vae.evaluate` sizes
    them (:func:`pyro_vae.evaluation.memory_plan`). Seeded: the same seed, model and data give the
    same numbers. A model with no latent site, or with a latent site outside plate ``"data"``, is
    refused in one line.
    """
    particles = _positive_int(particles, "particles")
    batch_size = _positive_int(batch_size, "batch_size")
    if chunk is not None:
        chunk = _positive_int(chunk, "chunk")
    x_all, labels = _prepared(model, x, y, "naive_log_likelihood")
    guide = prior_guide(_programs(model)[0])
    device = x_all.device
    was_training = model.training
    model.eval()
    rows: dict[str, list[torch.Tensor]] = {"ll": [], "ess": [], "se": []}
    try:
        with torch.random.fork_rng(_cuda(device)), pyro.validation_enabled(False):
            x0, y0 = _rows(x_all, labels, 0, batch_size)
            _per_datapoint_latents(_programs(model)[0], guide, x0, y0, "naive_log_likelihood")
            structure = program_structure(_programs(model)[0], guide, x0, y0)
            if chunk is None:
                plan = _memory_plan(model, guide, x_all, labels, particles, batch_size,
                                    memory_budget)
                batch, chunk = plan.batch, plan.chunk
            else:
                batch = batch_size
            torch.manual_seed(seed)
            passes = math.ceil(x_all.shape[0] / batch) * math.ceil(particles / chunk)
            bar = tqdm(total=passes, desc="naive", disable=not progress, leave=False)
            for start in range(0, x_all.shape[0], batch):
                xb, yb = _rows(x_all, labels, start, batch)
                lse_w = torch.full((xb.shape[0],), -math.inf, device=device)
                lse_2w = lse_w.clone()
                for done in range(0, particles, chunk):
                    k = min(chunk, particles - done)
                    log_w = log_weights(_programs(model)[0], guide, xb, yb, particles=k,
                                        structure=structure).per_datapoint_only(
                        "naive_log_likelihood").total()
                    lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
                    lse_2w = torch.logaddexp(lse_2w, torch.logsumexp(2 * log_w, 0))
                    del log_w
                    bar.update()
                ess = torch.exp(2 * lse_w - lse_2w)
                rows["ll"].append(lse_w - math.log(particles))
                rows["ess"].append(ess)
                rows["se"].append(((particles / ess - 1).clamp(min=0) / particles).sqrt())
            bar.close()
    finally:
        model.train(was_training)
    cat = {k: torch.cat(v).cpu() for k, v in rows.items()}
    return NaiveEstimate(log_likelihood=cat["ll"], log_likelihood_mc_se=cat["se"],
                         ess=cat["ess"], particles=particles)


# -- refinement: the amortization gap -------------------------------------------------------------
def _same_inputs(inputs, target: torch.Tensor) -> bool:
    return inputs is target or (torch.is_tensor(inputs) and inputs.shape == target.shape
                                and inputs.dtype == target.dtype
                                and inputs.device == target.device and torch.equal(inputs, target))


class _EncoderLookup:
    """While entered, ``encoder``'s forward answers a call on the current batch ``inputs`` with
    the free tensors ``tables`` (when ``active``), and every other call as before; on the first
    call on the batch with no tables it records the encoder's output as their starting value."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.inputs: torch.Tensor | None = None
        self.tables: list[torch.Tensor] | None = None
        self.structure: type | None = None
        self.active = False

    def batch(self, inputs: torch.Tensor, tables: list[torch.Tensor] | None = None,
              structure: type | None = None) -> None:
        self.inputs, self.tables, self.structure = inputs, tables, structure

    def output(self):
        return self.tables[0] if self.structure is None else self.structure(self.tables)

    def __enter__(self) -> "_EncoderLookup":
        self._own = self.encoder.__dict__.get("forward")
        original = self.encoder.forward

        def forward(inputs, *args, **kwargs):
            if self.inputs is None or not _same_inputs(inputs, self.inputs):
                return original(inputs, *args, **kwargs)
            if self.active and self.tables is not None:
                return self.output()
            out = original(inputs, *args, **kwargs)
            if self.tables is None:
                self._record(out)
            return out

        self.encoder.forward = forward
        return self

    def _record(self, out) -> None:
        if torch.is_tensor(out):
            parts, structure = [out], None
        elif isinstance(out, (tuple, list)) and out and all(torch.is_tensor(t) for t in out):
            parts, structure = list(out), type(out)
        else:
            raise ConfigError(f"refine needs an encoder whose output is a tensor or a tuple of "
                              f"tensors, not {type(out).__name__}")
        self.tables = [nn.Parameter(t.detach().clone(), requires_grad=t.is_floating_point())
                       for t in parts]
        self.structure = structure

    def __exit__(self, *exc) -> None:
        if self._own is None:
            del self.encoder.forward
        else:
            self.encoder.forward = self._own


class _TableGuide(nn.Module):
    r"""The model's guide as the method of a module whose parameters are the free tensors, so
    that an objective that stops the guide's parameters in :math:`\log q` (``stl``) finds
    them."""

    def __init__(self, guide: Callable, tables: list[torch.Tensor]):
        super().__init__()
        self.tables = nn.ParameterList(tables)
        self.inner = guide

    def guide(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class _Frozen:
    """Within the block, the module's parameters do not require gradients (restored after)."""

    def __init__(self, module: nn.Module):
        self.saved = [(p, p.requires_grad) for p in module.parameters()]

    def __enter__(self):
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)


class _Moments:
    """Running sums (float64) of per-particle values, ``[batch]``, for a mean and its SE; taken
    about the first chunk's mean, so a small spread about a large value is not lost."""

    def __init__(self, batch: int, device):
        self.n = 0
        self.shift = None
        self.total = torch.zeros(batch, dtype=torch.float64, device=device)
        self.squares = self.total.clone()

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        if self.shift is None:
            self.shift = values.mean(0)
        values = values - self.shift
        self.n += values.shape[0]
        self.total += values.sum(0)
        self.squares += values.pow(2).sum(0)

    def mean(self) -> torch.Tensor:
        return self.shift + self.total / self.n

    def se(self) -> torch.Tensor:
        if self.n < 2:
            return torch.full_like(self.total, math.nan)
        variance = (self.squares - self.total.pow(2) / self.n).clamp(min=0) / (self.n - 1)
        return (variance / self.n).sqrt()


def _rng_state(device: torch.device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class Refinement:
    r"""Per-datapoint ELBOs (tensors ``[num_datapoints]``) of the amortized guide
    :math:`q_{g_\phi(x)}` (``amortized_elbo``) and of the refined one :math:`q_{\lambda^*}`
    (``elbo``), estimated with K = ``particles`` common draws, with their standard errors;
    ``amortization_gap`` = ``elbo`` − ``amortized_elbo``; ``amortized_log_likelihood``, the IWAE
    estimate :math:`\log \frac1K \sum_k w_k` of the amortized guide from the same draws, with its
    delta-method ``amortized_log_likelihood_mc_se``; and ``encoder_output``, the refined free
    parameters :math:`\lambda^*` (the encoder's output per datapoint: a tensor, or a tuple)."""

    elbo: torch.Tensor
    elbo_se: torch.Tensor
    amortized_elbo: torch.Tensor
    amortized_elbo_se: torch.Tensor
    amortization_gap: torch.Tensor
    amortization_gap_se: torch.Tensor
    amortized_log_likelihood: torch.Tensor
    amortized_log_likelihood_mc_se: torch.Tensor
    encoder_output: torch.Tensor | tuple
    steps: int
    particles: int
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        self.summary = {
            "elbo": float(self.elbo.mean()), "elbo_se": _se_across(self.elbo),
            "amortized_elbo": float(self.amortized_elbo.mean()),
            "amortized_elbo_se": _se_across(self.amortized_elbo),
            "amortization_gap": float(self.amortization_gap.mean()),
            "amortization_gap_se": _se_across(self.amortization_gap),
            "amortization_gap_mc_se": _combined(self.amortization_gap_se),
            "steps": self.steps, "particles": self.particles,
            "num_datapoints": self.elbo.shape[0],
        }


def refine(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, steps: int = 100,
           lr: float = 0.05, particles: int = 1, seed: int = 0, *, eval_particles: int = 1000,
           objective: str = "elbo", batch_size: int = 256, progress: bool = False,
           memory_budget: int | None = None) -> Refinement:
    r"""Refine the amortized guide per datapoint and measure the amortization gap.

    For each datapoint the encoder's output :math:`g_\phi(x)` becomes a free tensor
    :math:`\lambda` (one per datapoint), and ``steps`` Adam steps (learning rate ``lr``, decayed
    linearly to zero over the steps) ascend the ELBO in :math:`\lambda` alone, each from
    ``particles`` draws with the gradient estimator ``objective`` (:data:`REFINE_OBJECTIVES`);
    every parameter of the model stays as it was. The model's ``encoder`` must be an ``nn.Module``
    whose output on the data alone parameterizes the guide (as :class:`pyro_vae.VAE`'s does);
    while refining, its forward answers a call on the batch with :math:`\lambda` (and any other
    call, a VampPrior's pseudo-inputs say, as before), and is restored afterwards, on error too.

    Both guides' ELBOs are then estimated from the same ``eval_particles`` draws (seeded with
    ``seed``; see the module's notes on common random numbers). With ``steps=0`` the two are
    the same numbers and the gap is zero.
    """
    check_protocol(model, "refine")
    encoder = require(model, "encoder", "refine_steps")
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"refine needs the model's encoder to be an nn.Module, not "
                          f"{type(encoder).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"refine steps must be a non-negative integer, not {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the refinement learning rate must be a positive number, not {lr!r}")
    particles = _positive_int(particles, "particles")
    eval_particles = _positive_int(eval_particles, "eval_particles")
    batch_size = _positive_int(batch_size, "batch_size")
    if objective not in REFINE_OBJECTIVES:
        raise ConfigError(f"refine ascends the ELBO; objective {objective!r} is not one of "
                          f"{', '.join(REFINE_OBJECTIVES)}")
    x_all, labels = _prepared(model, x, y, "refine")
    device = x_all.device
    bound = make_objective(objective, particles=particles)
    plan = _memory_plan(model, _programs(model)[1], x_all, labels, eval_particles, batch_size,
                        memory_budget)
    batches = list(range(0, x_all.shape[0], plan.batch))
    was_training = model.training
    model.eval()
    lookup = _EncoderLookup(encoder)
    try:
        with lookup, _Frozen(model), torch.random.fork_rng(_cuda(device)), \
                pyro.validation_enabled(False):
            # the refinement's own stream: scored on the draws it was fitted to, the refined
            # guide's ELBO would be biased high (particle k would reuse step k's noise)
            torch.manual_seed(_refinement_seed(seed))
            with tqdm(total=steps * len(batches), desc="refine", disable=not progress,
                      leave=False) as bar:
                refined = [_refine_batch(model, lookup, bound,
                                         *_rows(x_all, labels, start, plan.batch), steps, lr,
                                         bar)
                           for start in batches]
            torch.manual_seed(seed)
            columns: dict[str, list[torch.Tensor]] = {k: [] for k in (
                "elbo", "elbo_se", "amortized", "amortized_se", "gap", "gap_se", "ll", "ll_se")}
            for start, (tables, structure) in zip(batches, refined):
                xb, yb = _rows(x_all, labels, start, plan.batch)
                lookup.batch(xb, tables, structure)
                for key, value in _compare(model, lookup, xb, yb, eval_particles,
                                           plan.chunk).items():
                    columns[key].append(value)
    finally:
        model.train(was_training)
    out = {k: torch.cat(v).cpu() for k, v in columns.items()}
    parts = [torch.cat([tables[i].detach() for tables, _ in refined]).cpu()
             for i in range(len(refined[0][0]))]
    structure = refined[0][1]
    return Refinement(elbo=out["elbo"], elbo_se=out["elbo_se"],
                      amortized_elbo=out["amortized"], amortized_elbo_se=out["amortized_se"],
                      amortization_gap=out["gap"], amortization_gap_se=out["gap_se"],
                      amortized_log_likelihood=out["ll"],
                      amortized_log_likelihood_mc_se=out["ll_se"],
                      encoder_output=parts[0] if structure is None else structure(parts),
                      steps=steps, particles=eval_particles)


def _refinement_seed(seed: int) -> int:
    """A seed for the refinement's draws, apart from the scoring draws seeded with ``seed``."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


@torch.enable_grad()
def _refine_batch(model, lookup: _EncoderLookup, bound, x, y, steps: int, lr: float, bar):
    """The free tensors of one batch after ``steps`` Adam steps (and the encoder output's type)."""
    lookup.batch(x)
    lookup.active = False
    with torch.no_grad():  # the first call on the batch records the encoder's output
        log_weights(*_programs(model), x, y, particles=1).per_datapoint_only("refine")
    if lookup.tables is None:
        raise ConfigError("refine: the guide never called the model's encoder on the data x, so "
                          "its output cannot be refined per datapoint")
    tables = lookup.tables
    free = [t for t in tables if t.requires_grad]
    guide = _TableGuide(_programs(model)[1], free).guide
    lookup.active = True
    if steps and free:
        optimizer = torch.optim.Adam(free, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
        for _ in range(steps):
            loss = bound.differentiable_loss(_programs(model)[0], guide, x, y)
            grads = torch.autograd.grad(loss, free, allow_unused=True)
            for table, grad in zip(free, grads):
                table.grad = torch.zeros_like(table) if grad is None else grad
            optimizer.step()
            schedule.step()
            bar.update()
        for table in free:
            table.grad = None
    lookup.active = False
    return [t.detach() for t in tables], lookup.structure


@torch.no_grad()
def _compare(model, lookup: _EncoderLookup, x, y, particles: int, chunk: int) -> dict:
    """The amortized and refined guides' ELBOs on one batch from the same draws, chunk by chunk."""
    batch, device = x.shape[0], x.device
    amortized, refined, gap = (_Moments(batch, device) for _ in range(3))
    lse_w = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
    lse_2w = lse_w.clone()
    for done in range(0, particles, chunk):
        k = min(chunk, particles - done)
        state = _rng_state(device)
        lookup.active = False
        weights = log_weights(*_programs(model), x, y, particles=k).per_datapoint_only(
            "refine")
        log_w = weights.total().double()
        lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
        lse_2w = torch.logaddexp(lse_2w, torch.logsumexp(2 * log_w, 0))
        before = weights.expected_total() if weights.has_guide_enumeration else weights.total()
        _set_rng_state(state, device)
        lookup.active = True
        weights = log_weights(*_programs(model), x, y, particles=k)
        after = weights.expected_total() if weights.has_guide_enumeration else weights.total()
        lookup.active = False
        dtype = after.dtype
        amortized.add(before)
        refined.add(after)
        gap.add(after.double() - before.double())
        del weights, before, after, log_w
    ess = torch.exp(2 * lse_w - lse_2w)
    columns = {"elbo": refined.mean(), "elbo_se": refined.se(),
               "amortized": amortized.mean(), "amortized_se": amortized.se(),
               "gap": gap.mean(), "gap_se": gap.se(),
               "ll": lse_w - math.log(particles),
               "ll_se": ((particles / ess - 1).clamp(min=0) / particles).sqrt()}
    return {key: value.to(dtype) for key, value in columns.items()}  # the weights' dtype


# -- the decomposition ----------------------------------------------------------------------------
def _exact_log_likelihood(model, x, y) -> torch.Tensor | None:
    r""":math:`\log p(x)` in closed form where it is known (:func:`pyro_vae.exact.exact_reference`:
    the model's ``exact_log_likelihood``, or a linear-Gaussian VAE's), else ``None``."""
    if importlib.util.find_spec(f"{__package__}.exact") is not None:
        reference = importlib.import_module(f"{__package__}.exact").exact_reference(model)
        if reference is None:
            return None
        compute = reference.log_likelihood
    elif has(model, "exact_log_likelihood"):
        def compute(x, y=None):
            return model.exact_log_likelihood(x) if y is None else \
                model.exact_log_likelihood(x, y)
    else:
        return None
    with torch.no_grad():
        return torch.as_tensor(compute(x, y)).detach().cpu()


@dataclass
class AmortizationGaps:
    r"""The decomposition of the inference gap per datapoint (tensors ``[num_datapoints]``):
    ``log_likelihood`` (exact when ``exact``, else the IWAE estimate of the amortized guide),
    ``elbo`` (amortized), ``refined_elbo``, ``approximation_gap`` = ``log_likelihood`` −
    ``refined_elbo``, ``amortization_gap`` = ``refined_elbo`` − ``elbo``, ``inference_gap`` =
    ``log_likelihood`` − ``elbo`` (their sum), each with its standard error (``*_se``), and the
    :class:`Refinement` they come from."""

    log_likelihood: torch.Tensor
    log_likelihood_se: torch.Tensor
    exact: bool
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    refined_elbo: torch.Tensor
    refined_elbo_se: torch.Tensor
    approximation_gap: torch.Tensor
    approximation_gap_se: torch.Tensor
    amortization_gap: torch.Tensor
    amortization_gap_se: torch.Tensor
    inference_gap: torch.Tensor
    inference_gap_se: torch.Tensor
    refinement: Refinement = field(repr=False)
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        self.summary = {"exact": self.exact, "steps": self.refinement.steps,
                        "particles": self.refinement.particles,
                        "num_datapoints": self.elbo.shape[0]}
        for name in ("log_likelihood", "elbo", "refined_elbo", "approximation_gap",
                     "amortization_gap", "inference_gap"):
            values = getattr(self, name)
            self.summary[name] = float(values.mean())
            self.summary[f"{name}_se"] = _se_across(values)
            self.summary[f"{name}_mc_se"] = _combined(getattr(self, f"{name}_se"))


def amortization_gaps(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                      particles: int = 1000, steps: int = 100, lr: float = 0.05,
                      refine_particles: int = 1, seed: int = 0, *, objective: str = "elbo",
                      batch_size: int = 256, progress: bool = False,
                      memory_budget: int | None = None) -> AmortizationGaps:
    r"""The inference gap of the model's amortized guide on ``x``, split into the approximation
    gap and the amortization gap (see the module's docstring), per datapoint.

    :func:`refine` runs ``steps`` steps (``lr``, ``refine_particles`` per step, ``objective``)
    and estimates both ELBOs with K = ``particles`` common draws. :math:`\log p(x)` is exact
    where it is known in closed form (:func:`pyro_vae.exact.exact_reference`: the model's
    ``exact_log_likelihood``, or a linear-Gaussian VAE's); otherwise it is the IWAE estimate of the amortized guide from the same K draws, biased low by
    :math:`\approx \mathrm{se}^2/2`, which then biases the approximation gap low by as much.
    """
    refinement = refine(model, x, y, steps=steps, lr=lr, particles=refine_particles, seed=seed,
                        eval_particles=particles, objective=objective, batch_size=batch_size,
                        progress=progress, memory_budget=memory_budget)
    device = device_of(model)
    exact = _exact_log_likelihood(model, x.to(device), None if y is None else y.to(device))
    if exact is not None:
        if exact.shape != refinement.elbo.shape:
            raise ConfigError(f"the model's exact log-likelihood has shape {list(exact.shape)}, "
                              f"not one value per datapoint ({refinement.elbo.shape[0]})")
        log_likelihood = exact.to(refinement.elbo.dtype)
        log_likelihood_se = torch.zeros_like(log_likelihood)
    else:
        log_likelihood = refinement.amortized_log_likelihood
        log_likelihood_se = refinement.amortized_log_likelihood_mc_se
    return AmortizationGaps(
        log_likelihood=log_likelihood, log_likelihood_se=log_likelihood_se,
        exact=exact is not None,
        elbo=refinement.amortized_elbo, elbo_se=refinement.amortized_elbo_se,
        refined_elbo=refinement.elbo, refined_elbo_se=refinement.elbo_se,
        approximation_gap=log_likelihood - refinement.elbo,
        approximation_gap_se=log_likelihood_se + refinement.elbo_se,
        amortization_gap=refinement.amortization_gap,
        amortization_gap_se=refinement.amortization_gap_se,
        inference_gap=log_likelihood - refinement.amortized_elbo,
        inference_gap_se=log_likelihood_se + refinement.amortized_elbo_se,
        refinement=refinement)
