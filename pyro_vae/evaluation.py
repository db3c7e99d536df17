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

from .lvm import device_of
from .data import Dataset
from .errors import ConfigError
from . import lvm
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
    #: :math:`\mathbb{E}_q[z_s \mid x]` ``[N, units]`` of every continuous latent site ``s`` in
    #: plate "data" (``posterior_means`` is the one of ``"z"``, or of the first such site)
    site_posterior_means: dict = field(default_factory=dict)
    #: :math:`\log p(x)` in closed form per datapoint (``None`` where it is not known)
    exact_log_likelihood: torch.Tensor | None = None
    #: the amortization-gap decomposition of ``evaluate(..., refine_steps=S)``
    gaps: object | None = None
    #: ``False`` when a latent site's prior is summed out together with a site the model
    #: enumerates (a mixture's p(z) = Σ_c p(c) p(z | c)): the ELBO and log-likelihood are
    #: exact, but no term is log p(x | z) alone, so ``reconstruction`` and ``kl`` are NaN
    terms_separable: bool = True

    def __post_init__(self):
        n = self.elbo.shape[0]

        def se(values):
            return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

        self.summary = {
            "elbo": float(self.elbo.mean()), "elbo_se": se(self.elbo),
            "log_likelihood": float(self.log_likelihood.mean()),
            "log_likelihood_se": se(self.log_likelihood),
            # Monte Carlo error of the mean log-likelihood (the particles' share of the error)
            "log_likelihood_mc_se": float(self.log_likelihood_mc_se.pow(2).sum().sqrt() / n),
            "reconstruction": float(self.reconstruction.mean()) if self.terms_separable else None,
            "kl": float(self.kl.mean()) if self.terms_separable else None,
            "active_units": active_units(self.posterior_means),
            "mean_ess": float(self.ess.mean()),
            "particles": self.particles, "num_datapoints": n,
        }
        if not self.terms_separable:
            self.summary["terms_note"] = (
                "a latent site's prior is summed out with a site the model enumerates: "
                "reconstruction and KL are not separate terms (the ELBO and log-likelihood are)")
        if len(self.site_posterior_means) > 1:  # a hierarchy: active units of every layer
            self.summary["active_units_by_site"] = {
                name: active_units(means) for name, means in self.site_posterior_means.items()}


def active_units(posterior_means: torch.Tensor) -> int:
    r"""Latent units whose :math:`\operatorname{Var}_x \mathbb{E}_q[z_u \mid x]` exceeds
    :data:`ACTIVE_UNIT_THRESHOLD` (Burda et al. 2016), from ``[N, units]`` posterior means."""
    n = posterior_means.shape[0]
    if n < 2 or posterior_means.ndim != 2 or posterior_means.shape[1] == 0:
        return 0
    return int((posterior_means.var(dim=0, unbiased=True) > ACTIVE_UNIT_THRESHOLD).sum())


def seed_generators(device: torch.device, seed: int) -> None:
    """Seed the generators that draws on ``device`` use, and no other: the CPU's and, on CUDA,
    that device's (what ``torch.manual_seed`` does for them, without reseeding every other
    accelerator, which a forked random state restores only for the devices it names, and
    without the cost of its lazy per-backend calls, paid after every epoch by the validation
    pass)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


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
    device = device_of(vae)
    was_training = vae.training
    vae.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                pyro.validation_enabled(False):
            if plan is None:
                plan = memory_plan(vae, x_all, labels, particles, batch_size, memory_budget)
            seed_generators(device, seed)
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
        yield log_weights(*lvm.programs(vae), x, y, particles=k).per_datapoint_only(
            "evaluation")
        done += k
        if trim and device_of(vae).type == "cpu":  # the last chunk's tensors are freed by now
            release_free_memory()


def _probe(vae, x, y, particles: int) -> int:
    """Peak bytes of the tensors one log-weights pass holds (its result included)."""
    with PeakMemory() as memory:
        weights = log_weights(*lvm.programs(vae), x, y, particles=particles)
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
    key = (single_particle, n, limit, budget, str(device_of(vae)), torch.get_default_dtype(),
           x_all.dtype, tuple(x_all.shape[1:]), labels is None, type(vae),
           tuple((name, tuple(p.shape)) for name, p in vae.named_parameters()))
    try:
        remembered = _MEASURED.setdefault(vae, {})
    except TypeError:  # not weakly referenceable: measure every time
        remembered = {}
    if key in remembered:
        return remembered[key]

    def rows(m):
        x = x_all[:m].to(device_of(vae))
        return x, (None if labels is None else labels[:m].to(device_of(vae)))

    was_training = vae.training
    vae.eval()
    try:
        with torch.random.fork_rng(devices=[device_of(vae)] if device_of(vae).type == "cuda" else []), \
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
    free = available_memory(device_of(vae))
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


def unmasked(distribution):
    """``(distribution, mask)``: a site's distribution without its ``.mask(...)`` wrappers, and
    the mask they applied (``None`` for none)."""
    mask = None
    while isinstance(distribution, pyro.distributions.MaskedDistribution):
        inner = distribution._mask
        mask = inner if mask is None else mask & inner
        distribution = distribution.base_dist
    return distribution, mask


def point_sites(weights, batch: int):
    """The continuous latent sites in plate "data" with one value per particle and datapoint:
    ``(name, guide, value)`` with ``guide`` the site's guide distribution without its masks and
    ``value`` ``[K, batch, *event]``. Left out: global sites, discrete ones, a site masked off
    for every datapoint of the batch, and one with more batch dimensions (in a plate nested in
    "data", or drawn for every value of an enumerated site)."""
    for name, site in weights.sites.items():
        value = site.value
        if not site.local or not torch.is_tensor(value) or not value.dtype.is_floating_point:
            continue
        guide, mask = unmasked(site.guide)
        if mask is not None and not bool(torch.as_tensor(mask).any()):
            continue
        event = len(guide.event_shape)
        if value.dim() - event == 1:  # one particle, drawn without a particle dimension
            value = value.unsqueeze(0)
        if value.dim() - event != 2 or value.shape[1] != batch:
            continue
        yield name, guide, value


def _site_means(weights, batch: int) -> dict[str, torch.Tensor]:
    r"""Per continuous local latent site (:func:`point_sites`), the sum over this chunk's
    particles of the guide's mean at the site (its value where the mean is unknown),
    ``[batch, units]``: summed over the K particles and divided by K this is
    :math:`\mathbb{E}_q[z_s \mid x]` (for a site whose guide depends on other latents, by the
    tower rule)."""
    out = {}
    for name, guide, value in point_sites(weights, batch):
        try:
            mean = guide.mean
            mean = mean.unsqueeze(0) if mean.dim() == value.dim() - 1 else mean
            mean = mean.expand_as(value)
        except (NotImplementedError, RuntimeError):
            mean = value
        out[name] = mean.detach().reshape(mean.shape[0], batch, -1).sum(0)
    return out


def _posterior_mean(vae, x, y, guide, particle_mean: torch.Tensor) -> torch.Tensor:
    """E_q[z|x] of site ``z``: closed form where the guide family has one (``guide``, the
    distribution the particles were drawn from, batch shape ``[K, batch]``, so the encoder does
    not run again), else the mean over the K particles."""
    if guide is None:
        return particle_mean
    try:
        mean = guide.mean
    except NotImplementedError:
        return particle_mean
    return mean[0] if mean.dim() == 3 else particle_mean


@torch.no_grad()
def evaluate(vae, data: torch.Tensor | Dataset, particles: int = 1000, *, split: str = "test",
             labels: torch.Tensor | None = None, batch_size: int = 256, seed: int = 0,
             progress: bool = False, memory_budget: int | None = None,
             proposal: str = "guide", refine_steps: int = 0,
             refine_lr: float = 0.05) -> Evaluation:
    r"""Evaluate ``vae`` (any latent-variable model, :mod:`pyro_vae.lvm`) on ``data`` (a
    ``[N, D]`` tensor, or a :class:`Dataset` and a ``split``) with K = ``particles`` importance
    samples per datapoint. A conditional model takes the split's labels, or ``labels`` with a
    tensor. Seeded: the same seed, model and data give the same numbers. The particles are
    processed in chunks whose transient memory stays within ``memory_budget`` bytes (default
    :data:`MEMORY_BUDGET`, 256 MiB; see :func:`memory_plan`).

    ``proposal="prior"`` draws the particles from the prior instead of the guide: the naive
    Monte Carlo estimate :math:`\log \frac1K \sum_k p(x \mid z_k)`, :math:`z_k \sim p(z)`
    (:func:`pyro_vae.gaps.naive_log_likelihood`), with its standard error and effective sample
    size, which collapse as the latent dimension grows: why importance sampling with
    :math:`q(z \mid x)` is needed.

    ``refine_steps`` = S > 0 also optimizes a per-datapoint guide from the encoder's output for
    S steps (``refine_lr``) and splits the inference gap into the approximation and the
    amortization gap (Cremer et al. 2018; :func:`pyro_vae.gaps.amortization_gaps`); the summary
    gains ``refined_elbo``, ``approximation_gap``, ``amortization_gap`` and ``inference_gap``.

    When the model's :math:`\log p(x)` is known in closed form (:func:`pyro_vae.exact.
    exact_reference`: a linear-Gaussian VAE, or a model with ``exact_log_likelihood``), the
    summary also reports it (``exact_log_likelihood``), the true gap
    :math:`\log p(x) - \mathrm{ELBO}` (``true_gap``) and, with an exact posterior, checks the
    identity :math:`\log p(x) = \mathrm{ELBO} + \mathrm{KL}(q(z \mid x) \,\|\, p(z \mid x))`
    on the same particles (``kl_to_posterior``, ``identity_residual``, ``identity_holds``)."""
    if not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
    if proposal not in ("guide", "prior"):
        raise ConfigError(f"proposal must be 'guide' or 'prior', not {proposal!r}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ConfigError(f"refine_steps must be a non-negative integer, not {refine_steps!r}")
    if refine_steps and proposal == "prior":
        raise ConfigError("refine_steps refines the guide; it does not apply to proposal='prior'")
    lvm.check_protocol(vae, "evaluate")
    if proposal == "prior":
        evaluation = evaluate(_PriorProposal(vae), data, particles, split=split, labels=labels,
                              batch_size=batch_size, seed=seed, progress=progress,
                              memory_budget=memory_budget)
        for key in ("active_units", "active_units_by_site"):
            evaluation.summary.pop(key, None)
        evaluation.summary["proposal"] = "prior"
        return evaluation
    conditional = lvm.is_conditional(vae)
    if isinstance(data, Dataset):
        x_all = data.rows(split)  # streamed batch by batch for memory-mapped data
        labels = data.split_labels(split) if conditional else None
    else:
        x_all = data
        if labels is not None and not conditional:
            raise ConfigError("labels were given, but the model is not conditional")
    if conditional and labels is None:
        raise ConfigError("a conditional model needs labels to be evaluated")
    data_dim = getattr(vae, "data_dim", None)
    if x_all.ndim != 2 or (data_dim is not None and x_all.shape[1] != data_dim):
        raise ConfigError(f"data of shape {list(x_all.shape)} do not fit a model of "
                          f"data_dim {data_dim}" if data_dim is not None else
                          f"data must be [N, D], not of shape {list(x_all.shape)}")
    if x_all.shape[0] == 0:
        raise ConfigError("no datapoints to evaluate")
    device = device_of(vae)
    x_all = x_all.to(device)
    labels = None if labels is None else labels.to(device)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("elbo", "ll", "rec", "kl", "ess", "mcse")}
    site_means: dict[str, list[torch.Tensor]] = {}
    separable = True
    plan = memory_plan(vae, x_all, labels, particles, batch_size, memory_budget)
    batches = scored_batches(vae, x_all, labels, particles, batch_size, seed, plan=plan)
    for _, x, y, chunks in tqdm(batches, total=math.ceil(x_all.shape[0] / plan.batch),
                                desc="evaluate", disable=not progress, leave=False):
        lse_w = torch.full((x.shape[0],), -math.inf, device=device)
        lse_2w = lse_w.clone()
        sum_w = torch.zeros(x.shape[0], device=device)
        sum_rec = sum_w.clone()
        means: dict[str, torch.Tensor] = {}
        guide = None
        for weights in chunks:
            separable = separable and not weights.enum_dependent_latents
            log_w = weights.total()
            lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
            lse_2w = torch.logaddexp(lse_2w, torch.logsumexp(2 * log_w, 0))
            # the ELBO's integrand: log w itself, or its average over enumerated guide values
            sum_w += (weights.expected_total() if weights.has_guide_enumeration else log_w).sum(0)
            sum_rec += weights.log_likelihood.sum(0)
            for name, value in _site_means(weights, x.shape[0]).items():
                means[name] = means.get(name, 0) + value / particles
            if "z" in weights.sites and weights.latents is not None:
                guide = weights.sites["z"].guide
            del weights, log_w  # not held while the next chunk is computed
        ess = torch.exp(2 * lse_w - lse_2w)
        rows["elbo"].append(sum_w / particles)
        rows["rec"].append(sum_rec / particles)
        rows["kl"].append((sum_rec - sum_w) / particles)
        rows["ll"].append(lse_w - math.log(particles))
        rows["ess"].append(ess)
        rows["mcse"].append(((particles / ess - 1).clamp(min=0) / particles).sqrt())
        if "z" in means:
            means["z"] = _posterior_mean(vae, x, y, guide, means["z"])
        for name, value in means.items():
            site_means.setdefault(name, []).append(value)
    cat = {k: torch.cat(v).cpu() for k, v in rows.items()}
    site_posterior_means = {name: torch.cat(v).cpu() for name, v in site_means.items()
                            if len(v) == len(rows["elbo"])}
    primary = "z" if "z" in site_posterior_means else next(iter(site_posterior_means), None)
    posterior_means = (site_posterior_means[primary] if primary is not None
                       else torch.zeros(cat["elbo"].shape[0], 0))
    if not separable:
        cat["rec"] = torch.full_like(cat["rec"], math.nan)
        cat["kl"] = torch.full_like(cat["kl"], math.nan)
    evaluation = Evaluation(elbo=cat["elbo"], log_likelihood=cat["ll"],
                            reconstruction=cat["rec"], kl=cat["kl"], ess=cat["ess"],
                            log_likelihood_mc_se=cat["mcse"], posterior_means=posterior_means,
                            particles=particles, site_posterior_means=site_posterior_means,
                            terms_separable=separable)
    if isinstance(vae, _PriorProposal):
        return evaluation
    _exact_terms(vae, evaluation, x_all, labels, particles, seed)
    if refine_steps:
        from .gaps import amortization_gaps

        gaps = amortization_gaps(vae, x_all, labels, particles=particles, steps=refine_steps,
                                 lr=refine_lr, seed=seed, batch_size=batch_size,
                                 progress=progress, memory_budget=memory_budget)
        evaluation.gaps = gaps
        for name in ("refined_elbo", "approximation_gap", "amortization_gap", "inference_gap"):
            evaluation.summary[name] = gaps.summary[name]
            evaluation.summary[f"{name}_se"] = gaps.summary[f"{name}_se"]
        evaluation.summary["refine_steps"] = refine_steps
    return evaluation


@torch.no_grad()
def elbo_per_datapoint(vae, x_all, labels: torch.Tensor | None, particles: int = 1, *,
                       batch_size: int = 256, seed: int = 0,
                       memory_budget: int | None = None) -> torch.Tensor:
    """The per-datapoint ELBO of :func:`evaluate` (``evaluate(...).elbo``: the same particles,
    the same numbers) on the CPU, from one pass that computes nothing else (no log-likelihood,
    ESS, reconstruction term or posterior means): the validation ELBO after every epoch of
    training. ``x_all`` is a ``[N, D]`` tensor or memory-mapped rows, already checked against
    the model, with the model's ``labels`` (or ``None``)."""
    device = device_of(vae)
    x_all = x_all.to(device)
    labels = None if labels is None else labels.to(device)
    plan = memory_plan(vae, x_all, labels, particles, batch_size, memory_budget)
    rows = []
    for _, x, _, chunks in scored_batches(vae, x_all, labels, particles, batch_size, seed,
                                          plan=plan):
        sum_w = torch.zeros(x.shape[0], device=device)
        for weights in chunks:
            sum_w += weights.expected_total().sum(0)  # the ELBO's integrand
            del weights
        rows.append(sum_w / particles)
    return torch.cat(rows).cpu()


#: The identity log p(x) = ELBO + KL(q ‖ p(z|x)) holds on the same particles up to float
#: rounding: a residual above this share of the magnitude of log p(x) (plus this much) means a
#: model whose exact posterior or log-density is inconsistent.
IDENTITY_TOLERANCE = 1e-4


def _exact_terms(vae, evaluation: "Evaluation", x, y, particles: int, seed: int) -> None:
    """The closed-form log p(x), the true gap and the ELBO + KL identity, where known."""
    from . import exact

    reference = exact.exact_reference(vae)
    if reference is None:
        return
    with torch.no_grad():
        log_px = reference.log_likelihood(x, y).detach().double().cpu()
    evaluation.exact_log_likelihood = log_px
    gap = log_px - evaluation.elbo.double()
    n = gap.shape[0]
    summary = evaluation.summary
    summary["exact_log_likelihood"] = float(log_px.mean())
    summary["true_gap"] = float(gap.mean())
    summary["true_gap_se"] = float(gap.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    if reference.posterior is None or particles < 2:
        return
    try:
        identity = exact.gap_identity(vae, x, particles=particles, seed=seed, y=y)
    except ConfigError as exc:  # several latent sites, enumeration: no single posterior
        summary["identity_note"] = str(exc)
        return
    scale = float(log_px.abs().max())
    summary["kl_to_posterior"] = float(identity.kl.mean())
    summary["identity_residual"] = float(identity.residual.max())
    summary["identity_holds"] = bool(
        summary["identity_residual"] <= IDENTITY_TOLERANCE * (1.0 + scale))


class _PriorProposal(torch.nn.Module):
    """A model's ``model`` with the prior as the proposal (:func:`pyro_vae.gaps.prior_guide`),
    for ``evaluate(..., proposal="prior")``."""

    def __init__(self, model: torch.nn.Module):
        from .gaps import prior_guide

        super().__init__()
        self.inner = model
        model_fn = lvm.programs(model)[0]
        self.model = model_fn
        self.guide = prior_guide(model_fn)
        for name in ("data_dim", "conditional", "num_classes"):
            if lvm.has(model, name):
                setattr(self, name, getattr(model, name))
