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

Particles are processed in chunks, so K = 5000 on a whole test split runs in bounded memory.
All bounds are in nats per datapoint; higher is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import torch
from tqdm.auto import tqdm

from .data import Dataset
from .errors import ConfigError
from .log_weights import log_weights

#: A latent unit is active when the variance over :math:`x` of :math:`\mathbb{E}_q[z_u \mid x]`
#: exceeds this (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01
#: Floats one particle chunk may hold per activation tensor (bounds evaluation memory, ~256 MB).
_CHUNK_FLOATS = 2**26


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


def scored_batches(vae, x_all, labels, particles: int, batch_size: int, seed: int):
    """Score ``x_all`` batch by batch with K = ``particles`` guide particles per datapoint.

    Yields ``(start, x, y, chunks)`` per batch, where ``chunks`` yields the batch's
    :class:`~pyro_vae.log_weights.LogWeights` in particle chunks of bounded memory. Runs in
    eval mode with Pyro's validation off, under a forked random-number state seeded with
    ``seed``: the same seed gives the same particles to every consumer (``evaluate``,
    the diagnostics) and leaves the caller's random state untouched.
    """
    device = vae.device
    was_training = vae.training
    vae.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                pyro.validation_enabled(False):
            torch.manual_seed(seed)
            for start in range(0, x_all.shape[0], batch_size):
                x = x_all[start:start + batch_size]
                y = None if labels is None else labels[start:start + batch_size]
                yield start, x, y, _particle_chunks(vae, x, y, particles)
    finally:
        vae.train(was_training)


def _particle_chunks(vae, x: torch.Tensor, y, particles: int):
    chunk, done = particle_chunk(vae, x.shape[0], particles), 0
    while done < particles:
        k = min(chunk, particles - done)
        yield log_weights(vae.model, vae.guide, x, y, particles=k).per_datapoint_only(
            "evaluation")
        done += k


def particle_chunk(vae, batch: int, particles: int) -> int:
    """Particles per pass so that one activation tensor stays under ``_CHUNK_FLOATS`` floats.

    The widest activation per particle and datapoint is the decoder output (a categorical
    likelihood emits levels × data_dim logits), a hidden layer, or z.
    """
    width = max(2 * vae.likelihood.decoder_outputs(vae.data_dim), *(vae.hidden or (0,)),
                vae.latent_dim)
    return max(1, min(particles, _CHUNK_FLOATS // (batch * width)))


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
             progress: bool = False) -> Evaluation:
    """Evaluate ``vae`` on ``data`` (a ``[N, D]`` tensor, or a :class:`Dataset` and a ``split``)
    with K = ``particles`` importance samples per datapoint. A conditional VAE takes the split's
    labels, or ``labels`` with a tensor. Seeded: the same seed, model and data give the same
    numbers."""
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
    batches = scored_batches(vae, x_all, labels, particles, batch_size, seed)
    for _, x, y, chunks in tqdm(batches, total=math.ceil(x_all.shape[0] / batch_size),
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
