r"""Evaluation: per-datapoint bounds and an importance-sampled log-likelihood.

For each datapoint :math:`x` and K particles :math:`z_k \sim q(z \mid x)`, with :math:`\log w_k`
from :func:`pyro_vae.log_weights.log_weights`:

- ``elbo`` :math:`= \frac{1}{K}\sum_k \log w_k`, an unbiased estimate of the ELBO;
- ``reconstruction`` :math:`= \frac{1}{K}\sum_k \log p(x \mid z_k)`;
- ``kl`` :math:`= \frac{1}{K}\sum_k [\log q(z_k \mid x) - \log p(z_k)]` (Monte Carlo KL), so that
  ``elbo`` = ``reconstruction`` − ``kl``;
- ``log_likelihood`` :math:`= \log \frac{1}{K}\sum_k w_k`, the IWAE bound: a consistent estimate
  of :math:`\log p(x)` that is biased low by
  :math:`\approx \operatorname{Var}(w) / (2K\, \mathbb{E}[w]^2)` (Burda et al. 2016);
- ``ess`` :math:`= (\sum_k w_k)^2 / \sum_k w_k^2`, the effective sample size of the weights;
- ``log_likelihood_mc_se`` :math:`= \sqrt{(K/\mathrm{ess} - 1)/K}`, the delta-method Monte Carlo
  standard error of ``log_likelihood`` (zero when every weight is equal, i.e. :math:`q` is the
  exact posterior).

**Memory.** Particles are processed in chunks sized to a memory budget (:data:`MEMORY_BUDGET`,
256 MiB by default; ``evaluate(..., memory_budget=...)``), so K = 5000 on a whole test split runs
in bounded memory. :func:`memory_plan` measures what one particle of one datapoint costs through
the whole log-weights computation (every tensor the decoder, the likelihood, the guide and the
prior hold at the peak, with :class:`pyro_vae.resources.PeakMemory`, on probes of 1 to 64
particles of 4 datapoints, outside the evaluation's random stream) and chooses the particles
per pass (and, when one particle of a whole batch would not fit, fewer datapoints per pass) so
that the measured tensors fill at most 45 % of the budget; the rest is headroom for what the
measurement cannot see (:data:`_TENSOR_SHARE`). Measured on digits with 1–2 CPU threads, K =
2000, the default budget: the process's resident memory grew 113–231 MiB for the built-in
priors, likelihoods, guides and networks, 116 MiB for the default VAE (also at K = 5000, where
chunks of 1456 particles had grown it by about 600 MiB).

The chunking does not change the estimator, only how the K particles are grouped: each is drawn
independently from q either way. On a CPU the chunks are also whole blocks of 16 variates where
they can be (see :func:`_aligned`), so a Gaussian guide draws what one pass over all K particles
would, and the numbers are those of one pass up to float32 summation order.

All bounds are in nats per datapoint; higher is better.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import pyro
import torch
from tqdm.auto import tqdm

from .data import Dataset
from .errors import ConfigError
from .log_weights import log_weights
from .resources import PeakMemory, available_memory, format_bytes, release_free_memory

#: A latent unit is active when the variance over :math:`x` of :math:`\mathbb{E}_q[z_u \mid x]`
#: exceeds this (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01
#: Bytes of transient memory one evaluation may use (256 MiB): its growth over the memory in use
#: before it, as the system counts it (resident memory on a CPU), kept there by the particle
#: chunks of :func:`memory_plan`. Lowered to half the memory free on the device when that is
#: less.
MEMORY_BUDGET = 256 * 2**20
#: The share of the budget that the tensors :func:`memory_plan` measures may fill. The rest is
#: for what the measurement cannot see: operators' internal scratch (a transposed
#: convolution's columns) and the C allocator's heaps (glibc serves blocks under 32 MiB from
#: heaps that fragment). Measured on digits, 1–2 CPU threads, for the built-in priors,
#: likelihoods, guides and networks: resident growth 0.98–2.12 × the measured tensors.
_TENSOR_SHARE = 0.45
#: Floats of one ``[samples, batch, latent_dim]`` tensor in the diagnostics' Monte Carlo KL,
#: which holds about four of them at once: a quarter of :data:`MEMORY_BUDGET` in float32.
_CHUNK_FLOATS = MEMORY_BUDGET // 16
#: Passes whose tensors are estimated at this many bytes or more hand the freed memory back to
#: the system after each chunk (:func:`pyro_vae.resources.release_free_memory`)
_TRIM_ABOVE = 16 * 2**20
#: Datapoints of the probes that :func:`memory_plan` measures, and the rows (particles ×
#: datapoints) of the largest
_PROBE_DATAPOINTS, _PROBE_ROWS = 4, 256


@dataclass(frozen=True)
class MemoryPlan:
    """How an evaluation is cut into passes: ``batch`` datapoints × ``chunk`` particles each.

    ``per_row``: the measured bytes (an upper bound) that one particle of one datapoint costs
    through the log-weights computation, the encoder's share included (NaN when the pass is no
    larger than a probe and was not measured); :attr:`peak`, the estimated peak of one pass's
    tensors, is at most :data:`_TENSOR_SHARE` of ``budget`` unless a single particle of a
    single datapoint exceeds it."""

    batch: int
    chunk: int
    per_row: float
    budget: int

    @property
    def peak(self) -> float:
        return self.batch * self.chunk * self.per_row


@dataclass
class Evaluation:
    """Per-datapoint estimates (tensors of shape ``[num_datapoints]``) and their summary."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    ess: torch.Tensor
    log_likelihood_mc_se: torch.Tensor
    posterior_means: torch.Tensor
    particles: int
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.elbo.shape[0]

        def se(values):
            return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

        variances = self.posterior_means.var(dim=0, unbiased=True) if n > 1 else \
            torch.zeros(self.posterior_means.shape[-1])
        self.summary = {
            "elbo": float(self.elbo.mean()), "elbo_se": se(self.elbo),
            "log_likelihood": float(self.log_likelihood.mean()),
            "log_likelihood_se": se(self.log_likelihood),
            # Monte Carlo error of the mean log-likelihood (the particles' share of the error)
            "log_likelihood_mc_se": float(self.log_likelihood_mc_se.pow(2).sum().sqrt() / n),
            "reconstruction": float(self.reconstruction.mean()),
            "kl": float(self.kl.mean()),
            "active_units": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
            "mean_ess": float(self.ess.mean()),
            "particles": self.particles, "num_datapoints": n,
        }


def scored_batches(vae, x_all, labels, particles: int, batch_size: int, seed: int,
                   memory_budget: int | None = None, *, plan: MemoryPlan | None = None):
    """Score ``x_all`` batch by batch with K = ``particles`` guide particles per datapoint.

    Yields ``(start, x, y, chunks)`` per batch, where ``chunks`` yields the batch's
    :class:`~pyro_vae.log_weights.LogWeights` in particle chunks whose memory stays within
    ``memory_budget`` bytes (default :data:`MEMORY_BUDGET`; see :func:`memory_plan`, which may
    also make the batches smaller than ``batch_size``), or as ``plan`` says. Runs in eval mode
    with Pyro's validation off, under a forked random-number state seeded with ``seed``: the same
    seed gives the same particles to every consumer (``evaluate``, the diagnostics) and leaves
    the caller's random state untouched.
    """
    device = vae.device
    was_training = vae.training
    vae.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                pyro.validation_enabled(False):
            if plan is None:
                plan = memory_plan(vae, x_all, labels, particles, batch_size, memory_budget)
            torch.manual_seed(seed)
            for start in range(0, x_all.shape[0], plan.batch):
                x = x_all[start:start + plan.batch]
                y = None if labels is None else labels[start:start + plan.batch]
                yield start, x, y, _particle_chunks(vae, x, y, particles, plan.chunk,
                                                    plan.peak >= _TRIM_ABOVE)
    finally:
        vae.train(was_training)


def _aligned(chunk: int, particles: int, batch: int, latent_dim: int) -> int:
    """``chunk`` rounded down to a multiple of the particles that make ``[chunk, batch,
    latent_dim]`` a multiple of 16 numbers: on the CPU, torch draws normal variates in blocks of
    16, so chunks of such sizes draw exactly the variates one pass over all the particles
    would (the chunk size then does not change the numbers)."""
    step = 16 // math.gcd(16, batch * latent_dim)
    return chunk if chunk >= particles or chunk < step else chunk - chunk % step


def _particle_chunks(vae, x: torch.Tensor, y, particles: int, chunk: int, trim: bool):
    chunk = _aligned(chunk, particles, x.shape[0], int(getattr(vae, "latent_dim", 1) or 1))
    done = 0
    while done < particles:
        k = min(chunk, particles - done)
        yield log_weights(vae.model, vae.guide, x, y, particles=k).per_datapoint_only(
            "evaluation")
        done += k
        if trim and vae.device.type == "cpu":  # the last chunk's tensors are freed by now
            release_free_memory()


def _probe(vae, x, y, particles: int) -> int:
    """Peak bytes of the tensors one log-weights pass holds (its result included)."""
    with PeakMemory() as memory:
        weights = log_weights(vae.model, vae.guide, x, y, particles=particles)
        weights.total(), weights.log_likelihood  # the terms evaluate reads
        del weights
    return memory.peak


def _ratios(measure, limit: int, cap: float) -> tuple[tuple[int, float], ...]:
    """``(m, measure(m) / m)`` for ``m`` = 1, 2, 4, … up to ``limit``, as long as the next probe
    stays under ``cap`` bytes: the peak bytes per row (a particle of a datapoint) of a pass over
    ``m`` rows.

    A pass's peak is the largest of the peaks of its phases, each some bytes that do not grow
    with the rows plus some that do: a maximum of affine functions with non-negative
    intercepts, whose ratio ``measure(m) / m`` can only fall as ``m`` grows. So the ratio at a
    probed size bounds every larger pass (:func:`_largest`); the larger the probe, the less the
    bytes that do not grow (a VampPrior's pseudo-inputs through the encoder, the encoder's
    activations) add to the bound."""
    size, peak = 1, measure(1)
    ratios = [(size, max(peak, 1) / size)]
    while 2 * size <= limit and 2 * peak <= cap:
        size *= 2
        peak = measure(size)
        ratios.append((size, max(peak, 1) / size))
    return tuple(ratios)


def _largest(ratios, room: float, limit: int) -> tuple[int, float]:
    """The most rows ``m`` ≤ ``limit`` whose bound ``m × ratio`` (the ratio of the largest probe
    of at most ``m`` rows) fits in ``room`` bytes, at least 1; and that ratio."""
    best, per_row = 1, ratios[0][1]
    for size, ratio in ratios:
        rows = min(limit, int(room // ratio))
        if rows >= size and rows >= best:
            best, per_row = rows, ratio
    return best, per_row


#: Measured costs per VAE (the architecture decides them, not the weights), so that an
#: evaluation every epoch measures once: {vae: {key: ratios}}
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cost(vae, x_all, labels, single_particle: bool, budget: int) -> tuple:
    """:func:`_ratios` of the log-weights computation, over particles of the first datapoints
    (bytes per particle and datapoint) or, with one particle, over datapoints; measured (see
    :func:`memory_plan`) or remembered for this VAE's architecture."""
    n = 1 if single_particle else min(_PROBE_DATAPOINTS, x_all.shape[0])
    limit = min(_PROBE_ROWS, x_all.shape[0]) if single_particle else _PROBE_ROWS // n
    key = (single_particle, n, limit, budget, str(vae.device), torch.get_default_dtype(),
           x_all.dtype, tuple(x_all.shape[1:]), labels is None, type(vae),
           tuple((name, tuple(p.shape)) for name, p in vae.named_parameters()))
    try:
        remembered = _MEASURED.setdefault(vae, {})
    except TypeError:  # not weakly referenceable: measure every time
        remembered = {}
    if key in remembered:
        return remembered[key]

    def rows(m):
        x = x_all[:m].to(vae.device)
        return x, (None if labels is None else labels[:m].to(vae.device))

    was_training = vae.training
    vae.eval()
    try:
        with torch.random.fork_rng(devices=[vae.device] if vae.device.type == "cuda" else []), \
                pyro.validation_enabled(False):
            cap = budget * _TENSOR_SHARE / 4
            if single_particle:  # no particle dimension: rows are datapoints
                ratios = _ratios(lambda m: _probe(vae, *rows(m), 1), limit, cap)
            else:  # rows are particles of n datapoints
                x, y = rows(n)
                ratios = tuple((k, ratio / n) for k, ratio in
                               _ratios(lambda k: _probe(vae, x, y, k), limit, cap))
    finally:
        vae.train(was_training)
    remembered[key] = ratios
    return ratios


@torch.no_grad()
def memory_plan(vae, x_all: torch.Tensor, labels: torch.Tensor | None, particles: int,
                batch_size: int = 256, memory_budget: int | None = None) -> MemoryPlan:
    """Datapoints and particles per pass so that an evaluation's transient memory stays within
    ``memory_budget`` bytes (default :data:`MEMORY_BUDGET`, at most half the memory free on the
    VAE's device).

    The cost is measured, not guessed: the log weights of the first 4 datapoints are computed
    under :class:`~pyro_vae.resources.PeakMemory` with 1, 2, 4, … 64 particles (with one
    particle: on 1, 2, 4, … 256 datapoints); the peak bytes per particle and datapoint of a
    probe bound those of every larger pass (see :func:`_ratios`): every activation of the
    decoder and the likelihood, z, the guide and prior terms, the encoder's share. The probes
    run in eval mode with validation off, on a forked random state (the evaluation's own draws
    are untouched), and are remembered for the VAE's architecture. The passes are then sized so
    that the measured tensors fill at most :data:`_TENSOR_SHARE` of the budget; if even one
    particle of one datapoint cannot fit in the memory free on the device, the evaluation is
    refused in one line. An evaluation whose whole batch fits in one pass of at most
    :data:`_PROBE_ROWS` rows (particles × datapoints) runs in that pass, unmeasured.
    """
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"memory_budget must be a positive number of bytes, not {budget!r}")
    most = min(batch_size, x_all.shape[0])
    if particles * most <= _PROBE_ROWS:  # no larger than the largest probe: nothing to learn
        return MemoryPlan(batch=most, chunk=particles, per_row=math.nan, budget=budget)
    free = available_memory(vae.device)
    if free is not None:
        budget = min(budget, max(1, free // 2))
    ratios = _cost(vae, x_all, labels, particles == 1, budget)
    if free is not None and ratios[0][1] > free:
        raise ConfigError(f"one particle of one datapoint needs about "
                          f"{format_bytes(ratios[0][1])} to score; the device has "
                          f"{format_bytes(free)} free")
    room = budget * _TENSOR_SHARE
    if particles == 1:
        (batch, per_row), chunk = _largest(ratios, room, most), 1
    else:
        batch = max(1, min(most, int(room // ratios[0][1])))
        chunk, per_row = _largest(ratios, room / batch, particles)
    return MemoryPlan(batch=batch, chunk=chunk, per_row=per_row, budget=budget)


def _posterior_mean(vae, x, y, guide, particle_mean: torch.Tensor) -> torch.Tensor:
    """E_q[z|x]: closed form where the guide family has one, else the mean of the K particles.
    ``guide`` is the distribution the particles were drawn from (batch shape ``[K, batch]``),
    so the encoder does not run again; without it (a model with no site ``z``) q is rebuilt."""
    try:
        return vae.encode(x, y).mean if guide is None else guide.mean[0]
    except NotImplementedError:
        return particle_mean


@torch.no_grad()
def evaluate(vae, data: torch.Tensor | Dataset, particles: int = 1000, *, split: str = "test",
             labels: torch.Tensor | None = None, batch_size: int = 256, seed: int = 0,
             progress: bool = False, memory_budget: int | None = None) -> Evaluation:
    """Evaluate ``vae`` on ``data`` (a ``[N, D]`` tensor, or a :class:`Dataset` and a ``split``)
    with K = ``particles`` importance samples per datapoint. A conditional VAE takes the split's
    labels, or ``labels`` with a tensor. Seeded: the same seed, model and data give the same
    numbers. The particles are processed in chunks whose transient memory stays within
    ``memory_budget`` bytes (default :data:`MEMORY_BUDGET`, 256 MiB; see :func:`memory_plan`)."""
    if not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(data, Dataset):
        x_all = data.rows(split)  # streamed batch by batch for memory-mapped data
        labels = data.split_labels(split) if vae.conditional else None
    else:
        x_all = data
    if vae.conditional and labels is None:
        raise ConfigError("a conditional VAE needs labels to be evaluated")
    if x_all.ndim != 2 or x_all.shape[1] != vae.data_dim:
        raise ConfigError(f"data of shape {list(x_all.shape)} do not fit a VAE of "
                          f"data_dim {vae.data_dim}")
    if x_all.shape[0] == 0:
        raise ConfigError("no datapoints to evaluate")
    device = vae.device
    x_all = x_all.to(device)
    labels = None if labels is None else labels.to(device)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("elbo", "ll", "rec", "kl", "ess", "mcse", "mean")}
    plan = memory_plan(vae, x_all, labels, particles, batch_size, memory_budget)
    batches = scored_batches(vae, x_all, labels, particles, batch_size, seed, plan=plan)
    for _, x, y, chunks in tqdm(batches, total=math.ceil(x_all.shape[0] / plan.batch),
                                desc="evaluate", disable=not progress, leave=False):
        lse_w = torch.full((x.shape[0],), -math.inf, device=device)
        lse_2w = lse_w.clone()
        sum_w = torch.zeros(x.shape[0], device=device)
        sum_rec = sum_w.clone()
        mean_latents = sum_w.new_zeros(x.shape[0], vae.latent_dim)
        guide = None
        for weights in chunks:
            log_w = weights.total()
            lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
            lse_2w = torch.logaddexp(lse_2w, torch.logsumexp(2 * log_w, 0))
            # the ELBO's integrand: log w itself, or its average over enumerated guide values
            sum_w += (weights.expected_total() if weights.has_guide_enumeration else log_w).sum(0)
            sum_rec += weights.log_likelihood.sum(0)
            if weights.latents is not None:
                mean_latents += weights.latents.sum(0) / particles
                guide = weights.sites["z"].guide
            del weights, log_w  # not held while the next chunk is computed
        ess = torch.exp(2 * lse_w - lse_2w)
        rows["elbo"].append(sum_w / particles)
        rows["rec"].append(sum_rec / particles)
        rows["kl"].append((sum_rec - sum_w) / particles)
        rows["ll"].append(lse_w - math.log(particles))
        rows["ess"].append(ess)
        rows["mcse"].append(((particles / ess - 1).clamp(min=0) / particles).sqrt())
        rows["mean"].append(_posterior_mean(vae, x, y, guide, mean_latents))
    cat = {k: torch.cat(v).cpu() for k, v in rows.items()}
    return Evaluation(elbo=cat["elbo"], log_likelihood=cat["ll"], reconstruction=cat["rec"],
                      kl=cat["kl"], ess=cat["ess"], log_likelihood_mc_se=cat["mcse"],
                      posterior_means=cat["mean"], particles=particles)
