r"""Diagnostics of a trained VAE: PSIS :math:`\hat k` of the importance weights, KL per latent
dimension, posterior collapse, and an ArviZ ``InferenceData`` of the guide's samples.

For each datapoint :math:`x`, K particles :math:`z_k \sim q_\phi(z \mid x)` and their log-weights
:math:`\log w_k = \log p_\theta(x \mid z_k) + \log p(z_k) - \log q_\phi(z_k \mid x)` come from
:func:`pyro_vae.log_weights.log_weights`, drawn exactly as :func:`pyro_vae.evaluate` draws them
(same seed, same batches, same particle chunks), so the diagnostics describe the very weights
behind the reported log-likelihood.

**Pareto** :math:`\hat k` (Vehtari et al. 2024, "Pareto smoothed importance sampling", JMLR
25(72); Yao et al. 2018, "Yes, but did it work?") is the estimated shape of a generalized Pareto
distribution fitted to the largest weights of each datapoint: the weights have finite variance
only for :math:`k < 1/2`, and for :math:`\hat k > 0.7` the importance-sampled :math:`\log p(x)`
of that datapoint is unreliable at any practical K — the guide's tails are too light for the
posterior. A guide wider than the posterior gives bounded weights (:math:`k < 0`).

**KL per latent dimension**: for a guide and a prior that both factorize over :math:`z`
(``Independent(·, 1)``),
:math:`\mathrm{KL}(q(z \mid x) \,\|\, p(z)) = \sum_d \mathrm{KL}(q_d \,\|\, p_d)`; each term,
averaged over the datapoints, is the information dimension :math:`d` carries. Dimensions below
:data:`COLLAPSE_THRESHOLD` nats have collapsed to the prior (posterior collapse).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch

from .lvm import device_of
from . import lvm
from .data import Dataset
from .errors import ConfigError, PyroVAEError
from .evaluation import (_CHUNK_FLOATS, ACTIVE_UNIT_THRESHOLD, active_units, evaluate,
                         point_sites, scored_batches, unmasked)
from .training import check_compatible, labels_for

#: A latent dimension whose :math:`\mathrm{KL}(q \,\|\, p)`, averaged over datapoints, is below this
#: (nats) has collapsed to the prior.
COLLAPSE_THRESHOLD = 0.01
#: :math:`\hat k` above this: the weights have infinite variance (the estimate converges slowly).
PARETO_K_GOOD = 0.5
#: :math:`\hat k` above this: importance sampling of that datapoint is unreliable (Vehtari et al.
#: 2024).
PARETO_K_BAD = 0.7
#: Fewest draws per datapoint from which :math:`\hat k` is estimated (a tail of at least 5 draws).
PARETO_MIN_DRAWS = 25
#: :math:`\hat k` reported for weights whose largest values are all tied (every weight equal, as
#: under the exact posterior, or the top of the distribution flat): such weights are bounded, which
#: is the :math:`k < 0` side of the generalized Pareto family (a point mass is the limit
#: :math:`k \to -\infty`); −1, the
#: shape of a uniform (flat, bounded) tail, stands in as a finite value below every threshold.
BOUNDED_PARETO_K = -1.0
#: Log-weights count as tied when they lie within
#: :math:`\max(\mathrm{ATOL}, \mathrm{RTOL} \cdot |\log w_{\max}|)` nats: weights within a factor
#: :math:`e^{0.001}` of each other (ESS > 0.999999·K), with room for float32 round-off
#: in log-densities of large magnitude.
TIE_ATOL = 1e-3
#: The relative tolerance of the tie test (see :data:`TIE_ATOL`).
TIE_RTOL = 1e-5
#: File that :func:`diagnose` writes into a run directory.
DIAGNOSTICS_FILE = "diagnostics.nc"


# -- PSIS k̂ ---------------------------------------------------------------------------------

def _arviz_major() -> int:
    import arviz

    try:
        return int(str(arviz.__version__).split(".")[0])
    except ValueError:
        return 0


def psis_backend() -> str:
    """The PSIS implementation :func:`pareto_k` uses: ``"arviz"`` (ArviZ 0.x, ``arviz.psislw``)
    or ``"arviz_stats"`` (ArviZ 1.x, ``arviz_stats.base.array_stats.psislw``)."""
    import arviz

    if _arviz_major() < 1 and hasattr(arviz, "psislw"):
        return "arviz"
    return "arviz_stats"


def _psis_k(log_weights: np.ndarray, backend: str) -> np.ndarray:
    """k̂ of ``log_weights`` [n, draws] (draws last) with ArviZ; may raise ``ValueError``."""
    if backend == "arviz":
        import arviz

        # ArviZ 0.x: psislw(log_weights, reff) smooths log importance weights as given.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            _, khat = arviz.psislw(log_weights, 1.0)
        return np.asarray(khat, dtype=float)
    if backend == "arviz_stats":
        try:
            from arviz_stats.base import array_stats
        except ImportError:
            raise PyroVAEError("PSIS k̂ needs ArviZ < 1 (arviz.psislw) or the arviz-stats "
                               "package (ArviZ 1.x); neither is installed") from None
        # arviz-stats' psislw takes the pointwise log-likelihood of PSIS-LOO and smooths the
        # weights 1/p, i.e. it negates its input (`_ps_tail(-ary, ...)`): give it −log w.
        r_eff = _arviz_stats_r_eff(log_weights.shape[-1])
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            _, khat = array_stats.psislw(-log_weights, r_eff=r_eff, axis=-1)
        return np.asarray(khat, dtype=float)
    raise ConfigError(f"unknown PSIS backend {backend!r}; choose one of: arviz, arviz_stats")


def _tail_length(draws: int) -> int:
    """Draws in the fitted tail: ⌈min(S/5, 3√S)⌉ for independent draws, as in ArviZ 0.x and
    R's loo (Vehtari et al. 2024)."""
    return int(math.ceil(min(draws / 5.0, 3.0 * math.sqrt(draws))))


def _arviz_stats_r_eff(draws: int) -> float:
    """The relative efficiency that makes arviz-stats fit :func:`_tail_length` draws.

    arviz-stats rounds the tail length down, ⌊3√(S/r_eff)⌋ for S·r_eff > 225 (else ⌊S/5⌋),
    where ArviZ 0.x and loo round up; for independent draws (r_eff = 1) it would fit one draw
    fewer and give a slightly different k̂. An r_eff within 1 % of 1 restores the same tail,
    hence the same k̂, where its formula allows (for S ≤ 225 not a multiple of 5 it does not:
    there the tails differ by one draw)."""
    tail = _tail_length(draws)
    r_eff = 9.0 * draws / (tail + 0.5) ** 2
    if draws * r_eff > 225 and math.floor(3.0 * math.sqrt(draws / r_eff)) == tail:
        return r_eff
    return 1.0


def pareto_k(log_weights: np.ndarray, backend: str = "auto") -> np.ndarray:
    r"""PSIS :math:`\hat k` per datapoint for log importance weights of shape ``[draws, n]`` (a
    ``[draws]`` vector gives a 0-d array). Draws are independent (relative efficiency 1).

    Uses ArviZ: ``arviz.psislw`` under ArviZ 0.x, ``arviz_stats.base.array_stats.psislw``
    (which negates its input) under ArviZ 1.x; ``backend`` forces one. Both fit the same
    :math:`\lceil \min(S/5,\, 3\sqrt S) \rceil` largest of the :math:`S` weights and give the
    same :math:`\hat k` (see ``_arviz_stats_r_eff``).

    Defined beyond ArviZ: a datapoint whose largest weights are tied (within
    :data:`TIE_ATOL`/:data:`TIE_RTOL`; all weights equal, as under the exact posterior) gets
    :data:`BOUNDED_PARETO_K`, where ArviZ returns inf or refuses; one whose weights are all
    zero (:math:`\log w = -\infty`) or any +inf gets inf; any NaN gives NaN.
    """
    array = np.asarray(log_weights, dtype=float)
    if array.ndim not in (1, 2):
        raise ConfigError(f"log weights must be [draws] or [draws, n], not shape {list(array.shape)}")
    vector = array.ndim == 1
    array = array.reshape(array.shape[0], -1).T          # [n, draws]: ArviZ wants draws last
    n, draws = array.shape
    if draws < PARETO_MIN_DRAWS:
        raise ConfigError(f"PSIS k̂ needs at least {PARETO_MIN_DRAWS} draws per datapoint, "
                          f"not {draws}")
    backend = psis_backend() if backend == "auto" else backend
    if backend not in ("arviz", "arviz_stats"):
        raise ConfigError(f"unknown PSIS backend {backend!r}; choose one of: auto, arviz, "
                          "arviz_stats")
    khat = np.full(n, np.nan)
    has_nan = np.isnan(array).any(axis=1)
    with np.errstate(invalid="ignore"):
        infinite = ~has_nan & (np.isposinf(array).any(axis=1) | np.isneginf(array).all(axis=1))
    khat[infinite] = np.inf
    todo = ~has_nan & ~infinite
    if todo.any():
        ordered = -np.sort(-array[todo], axis=1)           # descending
        top, cutoff = ordered[:, 0], ordered[:, min(_tail_length(draws), draws - 1)]
        tol = np.maximum(TIE_ATOL, TIE_RTOL * np.abs(top))
        with np.errstate(invalid="ignore"):
            tied = (top - cutoff) <= tol
        rows = np.flatnonzero(todo)
        khat[rows[tied]] = BOUNDED_PARETO_K
        fit = rows[~tied]
        if fit.size:
            try:
                khat[fit] = _psis_k(array[fit], backend)
            except ValueError:
                # ArviZ 1.x refuses a tail of equal values; find the datapoint(s) one by one.
                for row in fit:
                    try:
                        khat[row] = _psis_k(array[row:row + 1], backend)[0]
                    except ValueError:
                        khat[row] = BOUNDED_PARETO_K
    return khat.reshape(()) if vector else khat


def pareto_k_threshold(draws: int) -> float:
    r"""The sample-size-dependent :math:`\hat k` threshold :math:`\min(1 - 1/\log_{10} S,\ 0.7)`
    of Vehtari et al. (2024), above which :math:`S` draws cannot give a reliable estimate."""
    return min(1.0 - 1.0 / math.log10(draws), PARETO_K_BAD) if draws > 10 else -math.inf


# -- the draws ---------------------------------------------------------------------------------

def _split_data(vae, data, split: str, labels, max_datapoints):
    """(x, y) of ``split`` (or of a tensor), checked against the VAE, cut to max_datapoints."""
    if isinstance(data, Dataset):
        check_compatible(vae, data)
        x = data.split(split)
        y = labels_for(vae, data, split)
    elif torch.is_tensor(data):
        x, y = data, labels
        data_dim = getattr(vae, "data_dim", None)
        if x.ndim != 2 or (data_dim is not None and x.shape[1] != data_dim):
            raise ConfigError(f"data of shape {list(x.shape)} do not fit a model of "
                              f"data_dim {data_dim}")
    else:
        raise ConfigError(f"data must be a Dataset or a [N, D] tensor, not {type(data).__name__}")
    conditional = lvm.is_conditional(vae)
    if conditional and y is None:
        raise ConfigError("a conditional model needs labels")
    if not conditional:
        y = None
    if max_datapoints is not None:
        if isinstance(max_datapoints, bool) or not isinstance(max_datapoints, int) \
                or max_datapoints < 1:
            raise ConfigError(f"max_datapoints must be a positive integer, not {max_datapoints!r}")
        x = x[:max_datapoints]
        y = None if y is None else y[:max_datapoints]
    if x.shape[0] == 0:
        raise ConfigError("no datapoints to diagnose")
    return x.to(device_of(vae)), (None if y is None else y.to(device_of(vae)))


def _check_positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, not {value!r}")


@torch.no_grad()
def _draw(vae, x, y, particles: int, seed: int, batch_size: int, latents: bool) -> dict:
    """Log-density terms [K, N] (and the values [K, N, units] of every continuous latent site
    in plate "data", under ``"sites"``) of K guide particles per datapoint."""
    n = x.shape[0]
    out = {name: np.empty((particles, n), dtype=np.float32)
           for name in ("log_weight", "log_likelihood", "log_prior", "log_guide")}
    out["sites"] = {}
    for start, xb, _, chunks in scored_batches(vae, x, y, particles, batch_size, seed):
        stop, done = start + xb.shape[0], 0
        for weights in chunks:
            k = weights.particles
            rows = slice(done, done + k)
            out["log_weight"][rows, start:stop] = weights.total().cpu().numpy()
            out["log_likelihood"][rows, start:stop] = weights.log_likelihood.cpu().numpy()
            out["log_prior"][rows, start:stop] = weights.log_prior.cpu().numpy()
            out["log_guide"][rows, start:stop] = weights.log_guide.cpu().numpy()
            if latents:
                for name, value in _site_values(weights, xb.shape[0]).items():
                    if name not in out["sites"]:
                        if start or done:  # a site that appears after the first batch
                            continue
                        out["sites"][name] = np.empty((particles, n, value.shape[-1]),
                                                      dtype=np.float32)
                    if out["sites"][name].shape[-1] == value.shape[-1]:
                        out["sites"][name][rows, start:stop] = value.cpu().numpy()
            done += k
    return out  # no site to record (each drawn per enumerated value, or masked): no posterior


def _site_values(weights, batch: int) -> dict[str, torch.Tensor]:
    """``[K, batch, units]`` values of the sites :func:`~pyro_vae.evaluation.point_sites`
    keeps."""
    return {name: value.detach().reshape(value.shape[0], batch, -1)
            for name, _, value in point_sites(weights, batch)}


def inference_data(vae, data: Dataset | torch.Tensor, split: str = "test", particles: int = 1000,
                   max_datapoints: int | None = None, seed: int = 0, *,
                   labels: torch.Tensor | None = None, latents: bool = True,
                   batch_size: int = 256):
    r"""The guide's K = ``particles`` draws per datapoint of ``split`` as ArviZ ``InferenceData``.

    Groups (one chain; draws are the particles):

    - ``posterior``: ``z`` (chain, draw, datapoint, latent), :math:`z_k \sim q(z \mid x)` —
      omitted with ``latents=False`` (it is K·N·latent_dim floats);
    - ``log_likelihood``: ``x`` (chain, draw, datapoint) :math:`= \log p_\theta(x \mid z_k)`;
    - ``sample_stats``: ``log_weight``
      :math:`= \log w_k = \log p(x \mid z_k) + \log p(z_k) - \log q(z_k \mid x)`, and its
      terms ``log_prior`` and ``log_guide`` (chain, draw, datapoint);
    - ``observed_data``: ``x`` (datapoint, feature); ``constant_data``: ``y`` (datapoint) for a
      conditional VAE.

    ``data`` is a :class:`Dataset` (its ``split``, and its labels for a conditional VAE) or a
    ``[N, D]`` tensor (with ``labels``); ``max_datapoints`` keeps the first ones. Seeded, and
    drawn as :func:`pyro_vae.evaluate` draws with the same seed and ``batch_size``.
    """
    _check_positive_int("particles", particles)
    _check_positive_int("batch_size", batch_size)
    x, y = _split_data(vae, data, split, labels, max_datapoints)
    split_name = split if isinstance(data, Dataset) else "given"
    return _inference_data(vae, x, y, split_name, particles, seed, latents, batch_size)


def _inference_data(vae, x, y, split_name: str, particles: int, seed: int, latents: bool,
                    batch_size: int):
    import arviz
    import xarray as xr

    draws = _draw(vae, x, y, particles, seed, batch_size, latents)
    n = x.shape[0]
    coords = {"chain": [0], "draw": np.arange(particles), "datapoint": np.arange(n)}
    sample_dims = ("chain", "draw", "datapoint")

    def group(variables: dict[str, Any], extra_coords: dict | None = None) -> xr.Dataset:
        return xr.Dataset({name: (dims, value) for name, (dims, value) in variables.items()},
                          coords={**coords, **(extra_coords or {})})

    attrs = {"inference_library": "pyro-vae", "split": split_name,
             "particles": particles, "seed": seed, "num_datapoints": n}
    groups = {
        "log_likelihood": group({"x": (sample_dims, draws["log_likelihood"][None])}),
        "sample_stats": group({name: (sample_dims, draws[name][None])
                               for name in ("log_weight", "log_prior", "log_guide")}),
        "observed_data": xr.Dataset(
            {"x": (("datapoint", "feature"), x.cpu().numpy())},
            coords={"datapoint": np.arange(n), "feature": np.arange(x.shape[1])}),
    }
    if latents and draws["sites"]:
        sites = draws["sites"]
        variables, extra = {}, {}
        for name, values in sites.items():
            # the VAE's one site keeps its dimension name "latent"; several sites get their own
            dim = "latent" if name == "z" else f"{name}_dim"
            variables[name] = (sample_dims + (dim,), values[None])
            extra[dim] = np.arange(values.shape[-1])
        groups["posterior"] = group(variables, extra)
    if y is not None:
        groups["constant_data"] = xr.Dataset({"y": (("datapoint",), y.cpu().numpy())},
                                             coords={"datapoint": np.arange(n)})
    for dataset in groups.values():
        dataset.attrs.update(attrs)
    order = ("posterior", "log_likelihood", "sample_stats", "observed_data", "constant_data")
    return _arviz_object({name: groups[name] for name in order if name in groups})


def arviz_groups(idata) -> set[str]:
    """The group names of an ArviZ object, ``InferenceData`` (ArviZ 0.x) or ``DataTree``
    (ArviZ 1.x)."""
    groups = idata.groups() if callable(idata.groups) else idata.groups
    return {name.strip("/") for name in groups if name.strip("/")}


def _arviz_object(groups: dict):
    """The groups as ArviZ's container: ``InferenceData`` under ArviZ 0.x, xarray's
    ``DataTree`` (what ``arviz_base`` reads and writes) under ArviZ 1.x."""
    import arviz

    if _arviz_major() < 1:
        return arviz.InferenceData(**groups)
    import xarray as xr

    return xr.DataTree.from_dict(groups)


def write_netcdf(idata, path: str | Path) -> Path:
    """Write ``idata`` to ``path`` with ``arviz.to_netcdf``, atomically (a temporary file in the
    same directory, then a rename): a crash never leaves a torn file."""
    import arviz

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise PyroVAEError(f"cannot write {path}: {path.parent} is not a directory")
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PyroVAEError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    os.close(handle)
    try:
        if _arviz_major() < 1:
            arviz.to_netcdf(idata, tmp)
        else:  # a DataTree writes itself, one netCDF group per ArviZ group
            idata.to_netcdf(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# -- KL per latent dimension -------------------------------------------------------------------

class KLPerDimension(NamedTuple):
    r""":math:`\mathrm{KL}(q(z_d \mid x) \,\|\, p(z_d))` per latent dimension :math:`d`, mean over
    datapoints (nats), or ``None``
    with a ``note`` where guide or prior does not factorize; ``method`` is ``"closed form"``
    or ``"monte carlo"``."""

    values: np.ndarray | None
    method: str | None
    note: str | None


def _factorized(distribution, latent_dim: int):
    """The per-dimension base of ``Independent(base, 1)`` over z, else ``None``."""
    if (isinstance(distribution, torch.distributions.Independent)
            and distribution.reinterpreted_batch_ndims == 1
            and distribution.event_shape == (latent_dim,)
            and distribution.base_dist.event_shape == ()):
        return distribution.base_dist
    return None


def _component_name(vae, kind: str) -> str:
    return str(vae.config[kind])


@torch.no_grad()
def kl_per_dimension(vae, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1000,
                     seed: int = 0, batch_size: int = 256) -> KLPerDimension:
    r"""Mean over the datapoints ``x`` of :math:`\mathrm{KL}(q(z_d \mid x) \,\|\, p(z_d))` for each
    latent dimension :math:`d`.

    Needs :math:`q(z \mid x)` and :math:`p(z)` both of the form ``Independent(base, 1)`` (the
    ``normal`` guide with the ``normal``, ``learned-normal``, ``laplace`` or ``studentt`` prior):
    then the total KL is the sum of the per-dimension terms. They are in closed form where
    ``torch.distributions.kl_divergence`` knows the pair of bases, else Monte Carlo estimates with
    ``samples`` draws per datapoint (seeded). Otherwise ``values`` is ``None``."""
    _check_positive_int("samples", samples)
    d = vae.latent_dim
    prior = _factorized(vae.prior.distribution(), d)
    if prior is None:
        return KLPerDimension(None, None, f"the {_component_name(vae, 'prior')!r} prior does not "
                              "factorize over latent dimensions; no KL per dimension")
    was_training = vae.training
    vae.eval()
    totals = torch.zeros(d, dtype=torch.float64, device=device_of(vae))
    method = "closed form"
    devices = [device_of(vae)] if device_of(vae).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                yb = None if y is None else y[start:start + batch_size]
                guide = _factorized(vae.encode(xb, yb), d)
                if guide is None:
                    return KLPerDimension(None, None, f"the {_component_name(vae, 'guide')!r} "
                                          "guide does not factorize over latent dimensions; no "
                                          "KL per dimension")
                try:
                    kl = torch.distributions.kl_divergence(guide, prior)
                except NotImplementedError:
                    method = "monte carlo"
                    kl = torch.zeros(xb.shape[0], d, device=device_of(vae))
                    chunk = max(1, min(samples, _CHUNK_FLOATS // max(1, xb.shape[0] * d)))
                    done = 0
                    while done < samples:
                        k = min(chunk, samples - done)
                        z = guide.sample((k,))
                        kl += (guide.log_prob(z) - prior.log_prob(z)).sum(0)
                        done += k
                    kl /= samples
                totals += kl.expand(xb.shape[0], d).double().sum(0)
    finally:
        vae.train(was_training)
    note = None if method == "closed form" else \
        f"Monte Carlo estimate ({samples} draws per datapoint): no closed-form KL for this pair"
    return KLPerDimension((totals / x.shape[0]).cpu().numpy(), method, note)


def _is_plain_vae(vae) -> bool:
    from .vae import VAE

    return isinstance(vae, VAE) and not getattr(vae, "conditional_prior", False)


@torch.no_grad()
def site_kl_per_dimension(model, x: torch.Tensor, y: torch.Tensor | None = None, *,
                          particles: int = 100, seed: int = 0,
                          batch_size: int = 256) -> dict[str, KLPerDimension]:
    r"""Per continuous latent site :math:`s` in plate "data" of any latent-variable model
    (:mod:`pyro_vae.lvm`), the mean over the datapoints ``x`` of
    :math:`\mathbb{E}_q\big[\mathrm{KL}(q(z_{s,d} \mid \cdot) \,\|\, p(z_{s,d} \mid
    \cdot))\big]` for each of its dimensions :math:`d`, where both conditionals are the ones the
    guide and the model's trace hold at the site (so for a hierarchy z₂ → z₁ → x the prior of
    :math:`z_1` is :math:`p(z_1 \mid z_2)` at the guide's draw of :math:`z_2`), averaged over
    K = ``particles`` draws of the site's parents: the site's term of the ELBO's KL, split by
    dimension. Closed form per draw where ``torch.distributions.kl_divergence`` knows the
    pair of per-dimension bases, else the Monte Carlo estimate
    :math:`\log q(z_{s,d}) - \log p(z_{s,d})` at the draws, which is also used where the guide
    draws a site before latents its prior depends on (:func:`_parents_drawn_first`); a site
    whose guide or prior does not factorize over its dimensions gets ``values=None`` and a
    note. The sites' totals add up to the ELBO's KL term."""
    _check_positive_int("particles", particles)
    totals: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    notes: dict[str, str] = {}
    for _, xb, _, chunks in scored_batches(model, x, y, particles, batch_size, seed):
        for weights in chunks:
            for name, site in weights.sites.items():
                value = site.value
                if (not site.local or not torch.is_tensor(value)
                        or not value.dtype.is_floating_point or name in notes):
                    continue
                guide, mask = unmasked(site.guide)
                if mask is not None and not bool(torch.as_tensor(mask).any()):
                    continue  # masked off for every datapoint here: no term of these data
                event = len(guide.event_shape)
                if value.dim() - event > 2 or (value.dim() - event == 2
                                               and value.shape[1] != xb.shape[0]):
                    notes[name] = (f"site {name!r} is drawn for every value of an enumerated "
                                   "site; no KL per dimension")
                    continue
                units = guide.event_shape.numel() if guide.event_shape else 1
                q = _factorized(guide, units)
                p = _factorized(unmasked(site.prior)[0], units)
                if q is None or p is None:
                    which = "guide" if q is None else "prior"
                    notes[name] = (f"the {which} of site {name!r} does not factorize over its "
                                   "dimensions; no KL per dimension")
                    continue
                try:
                    if not _parents_drawn_first(weights, name):
                        raise NotImplementedError
                    kl = torch.distributions.kl_divergence(q, p)
                    methods.setdefault(name, "closed form")
                except NotImplementedError:
                    kl = q.log_prob(value) - p.log_prob(value)
                    methods[name] = "monte carlo"
                if mask is not None:
                    kl = kl * torch.as_tensor(mask, dtype=kl.dtype).unsqueeze(-1)
                kl = kl.reshape(-1, xb.shape[0], units) if kl.dim() >= 2 else kl
                total = kl.double().sum(0)  # over particles: [batch, units]
                total = total.expand(xb.shape[0], units).sum(0)
                totals[name] = totals.get(name, 0) + total
    out = {}
    for name in list(totals) + [n for n in notes if n not in totals]:
        if name in notes:
            out[name] = KLPerDimension(None, None, notes[name])
        else:
            values = (totals[name] / (particles * x.shape[0])).cpu().numpy()
            note = None if methods[name] == "closed form" else \
                f"Monte Carlo estimate at the {particles} draws per datapoint"
            out[name] = KLPerDimension(values, methods[name], note)
    return out


def _parents_drawn_first(weights, name: str) -> bool:
    """Whether every latent the model draws before site ``name`` (its possible parents) is
    drawn before it by the guide too: then, given the draws before it, the site is distributed
    as its guide says, and the closed-form KL over the site, averaged over those draws, is the
    site's term of the ELBO. Otherwise (a hierarchy whose guide runs bottom-up, x → z₁ → z₂,
    while the model runs z₂ → z₁) the guide draws the site's prior's parents *from* the site,
    and only the Monte Carlo term at the joint draws is right."""
    model_order, guide_order = weights.site_order
    if name not in model_order or name not in guide_order:
        return not model_order  # the untraced VAE path: one site, no order recorded
    before_in_guide = set(guide_order[:guide_order.index(name)])
    return set(model_order[:model_order.index(name)]) <= before_in_guide


@dataclass
class SiteDiagnosis:
    """The diagnostics of one latent site: its dimensions (``units``), KL per dimension
    (``None`` where unknown), the collapsed dimensions and the active units."""

    units: int
    kl_per_dim: np.ndarray | None
    kl_method: str | None
    kl_note: str | None
    collapsed: list[int] | None
    active_units: int

    def summary(self) -> dict:
        kl = None if self.kl_per_dim is None else [float(v) for v in self.kl_per_dim]
        return {"units": self.units, "kl_per_dim": kl,
                "kl_total": None if kl is None else float(sum(kl)),
                "kl_method": self.kl_method, "kl_note": self.kl_note,
                "collapsed_dims": self.collapsed, "active_units": self.active_units}


# -- the diagnosis -----------------------------------------------------------------------------

def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Diagnosis:
    r"""What :func:`diagnose` found. ``pareto_k``: :math:`\hat k` per datapoint ``[n]``;
    ``kl_per_dim``: mean KL per latent dimension ``[latent_dim]`` in nats (``None`` where guide or
    prior does not factorize); ``collapsed``: the dimensions with KL < :data:`COLLAPSE_THRESHOLD`
    (``None`` when unknown); ``evaluation``: :func:`pyro_vae.evaluate`'s summary (active units,
    log-likelihood, …) for the same draws."""

    split: str
    particles: int
    seed: int
    latent_dim: int
    pareto_k: np.ndarray
    evaluation: dict
    kl_per_dim: np.ndarray | None
    kl_method: str | None
    kl_note: str | None
    collapsed: list[int] | None
    inference_data: Any = field(repr=False)
    netcdf_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    #: per latent site (``"z"`` for a VAE; ``"z1"``, ``"z2"`` for a hierarchy, …)
    sites: dict[str, SiteDiagnosis] = field(default_factory=dict)

    @property
    def num_datapoints(self) -> int:
        return int(self.pareto_k.shape[0])

    def _k_stats(self) -> dict:
        k = np.where(np.isnan(self.pareto_k), np.inf, self.pareto_k)   # NaN: unreliable
        return {"max": float(k.max()), "median": float(np.median(k)),
                "above_good": float(np.mean(k > PARETO_K_GOOD)),
                "above_bad": float(np.mean(k > PARETO_K_BAD))}

    def summary(self) -> dict:
        """A JSON-able dict (non-finite numbers as ``None``)."""
        k = self._k_stats()
        kl = None if self.kl_per_dim is None else [float(v) for v in self.kl_per_dim]
        return {
            "split": self.split, "particles": self.particles, "seed": self.seed,
            "num_datapoints": self.num_datapoints, "latent_dim": self.latent_dim,
            "pareto_k_max": _finite_or_none(k["max"]),
            "pareto_k_median": _finite_or_none(k["median"]),
            f"pareto_k_share_above_{PARETO_K_GOOD}": k["above_good"],
            f"pareto_k_share_above_{PARETO_K_BAD}": k["above_bad"],
            "pareto_k_threshold": pareto_k_threshold(self.particles),
            "log_likelihood": self.evaluation["log_likelihood"],
            "log_likelihood_se": _finite_or_none(self.evaluation["log_likelihood_se"]),
            "log_likelihood_mc_se": self.evaluation["log_likelihood_mc_se"],
            "elbo": self.evaluation["elbo"], "kl": self.evaluation["kl"],
            "mean_ess": self.evaluation["mean_ess"],
            "active_units": self.evaluation["active_units"],
            "kl_per_dim": kl, "kl_total": None if kl is None else float(sum(kl)),
            "kl_method": self.kl_method, "kl_note": self.kl_note,
            "collapse_threshold": COLLAPSE_THRESHOLD, "collapsed_dims": self.collapsed,
            "diagnostics_file": None if self.netcdf_path is None else str(self.netcdf_path),
            "warnings": list(self.warnings),
            "sites": {name: site.summary() for name, site in self.sites.items()},
        }

    def format(self) -> str:
        """Human-readable multi-line text."""
        k = self._k_stats()
        ev = self.evaluation
        lines = [
            f"diagnostics: {self.split} split, {self.num_datapoints} datapoints, "
            f"K = {self.particles} particles (seed {self.seed})",
            f"log-likelihood {ev['log_likelihood']:.3f} ± {ev['log_likelihood_se']:.3f}, "
            f"ELBO {ev['elbo']:.3f}"
            + (f", KL {ev['kl']:.3f}" if ev.get("kl") is not None else "")
            + " nats per datapoint; "
            f"mean ESS {ev['mean_ess']:.1f}/{self.particles}",
            f"PSIS k̂ per datapoint: max {k['max']:.2f}, median {k['median']:.2f}; "
            f"{100 * k['above_good']:.1f} % > {PARETO_K_GOOD}, "
            f"{100 * k['above_bad']:.1f} % > {PARETO_K_BAD} (reliable below "
            f"{pareto_k_threshold(self.particles):.2f} at this K)",
        ]
        if len(self.sites) > 1:
            for name, site in self.sites.items():
                lines.append(f"site {name}: active units {site.active_units}/{site.units}")
                if site.kl_per_dim is None:
                    lines.append(f"  KL per dimension: unavailable ({site.kl_note})")
                    continue
                lines.append(f"  KL per dimension (nats, {site.kl_method}; total "
                             f"{float(site.kl_per_dim.sum()):.3f}):")
                lines += _cells(site.kl_per_dim, lambda d, n=name: f"{n}[{d}]", "    ")
        else:
            lines.append(f"active units {ev['active_units']}/{self.latent_dim}")
            if self.kl_per_dim is None:
                lines.append(f"KL per latent dimension: unavailable ({self.kl_note})")
            else:
                lines.append(f"KL per latent dimension (nats, mean over datapoints, "
                             f"{self.kl_method}; total {float(self.kl_per_dim.sum()):.3f}):")
                lines += _cells(self.kl_per_dim, lambda d: f"z{d}", "  ")
        lines += [f"warning: {text}" for text in self.warnings]
        if self.netcdf_path is not None:
            lines.append(f"InferenceData written to {self.netcdf_path}")
        return "\n".join(lines)


def _cells(values, label, indent: str) -> list[str]:
    """``label(d)=value`` cells, eight to a line."""
    cells = [f"{label(d)}={v:.3f}" for d, v in enumerate(values)]
    return [indent + "  ".join(cells[i:i + 8]) for i in range(0, len(cells), 8)]


def diagnose(vae, data: Dataset | torch.Tensor, split: str = "test", particles: int = 1000,
             seed: int = 0, run_dir: str | Path | None = None, *,
             labels: torch.Tensor | None = None, latents: bool = True,
             batch_size: int = 256) -> Diagnosis:
    r"""Diagnose ``vae`` on ``split`` of ``data`` with K = ``particles`` guide draws per datapoint:
    PSIS :math:`\hat k` per datapoint, active units and the log-likelihood
    (:func:`pyro_vae.evaluate`, same seed: the same draws), KL per latent dimension and posterior
    collapse. With ``run_dir`` the draws are written there as :data:`DIAGNOSTICS_FILE`
    (``arviz.from_netcdf`` reads it)."""
    _check_positive_int("particles", particles)
    if particles < PARETO_MIN_DRAWS:
        raise ConfigError(f"diagnostics need at least {PARETO_MIN_DRAWS} particles for PSIS k̂, "
                          f"not {particles}")
    run_path = None
    if run_dir is not None:
        run_path = Path(run_dir).expanduser()
        if not run_path.is_dir():
            raise PyroVAEError(f"run directory not found: {run_path}")
    x, y = _split_data(vae, data, split, labels, None)
    _check_positive_int("batch_size", batch_size)
    split_name = split if isinstance(data, Dataset) else "given"
    idata = _inference_data(vae, x, y, split_name, particles, seed, latents, batch_size)
    khat = pareto_k(idata.sample_stats["log_weight"].values[0])
    evaluation = evaluate(vae, x, particles, labels=y, batch_size=batch_size, seed=seed)
    if _is_plain_vae(vae):
        kls = {"z": kl_per_dimension(vae, x, y, samples=particles, seed=seed,
                                     batch_size=batch_size)}
    else:
        kls = site_kl_per_dimension(vae, x, y, particles=particles, seed=seed,
                                    batch_size=batch_size)
    means = evaluation.site_posterior_means
    sites = {}
    for name in list(means) + [n for n in kls if n not in means]:
        kl = kls.get(name, KLPerDimension(None, None, f"site {name!r} has no KL per dimension"))
        units = int(means[name].shape[-1]) if name in means else \
            (0 if kl.values is None else len(kl.values))
        collapsed = None if kl.values is None else \
            [int(d) for d in np.flatnonzero(kl.values < COLLAPSE_THRESHOLD)]
        if collapsed and kl.method == "monte carlo" and name in means and len(means[name]) > 1:
            # a Monte Carlo KL against a prior with parents (p(z1 | z2)) can be near zero, even
            # negative, for a unit that carries information: collapsed only if also inactive
            spread = means[name].var(dim=0, unbiased=True)
            collapsed = [d for d in collapsed if float(spread[d]) <= ACTIVE_UNIT_THRESHOLD]
        sites[name] = SiteDiagnosis(units, kl.values, kl.method, kl.note, collapsed,
                                    active_units(means[name]) if name in means else 0)
    primary = "z" if "z" in sites else next(iter(sites), None)
    first = sites.get(primary) if primary is not None else None
    latent_dim = getattr(vae, "latent_dim", None)
    if not isinstance(latent_dim, int):
        latent_dim = sum(site.units for site in sites.values())
    diagnosis = Diagnosis(split=split_name, particles=particles, seed=seed,
                          latent_dim=latent_dim, pareto_k=khat,
                          evaluation=dict(evaluation.summary),
                          kl_per_dim=None if first is None else first.kl_per_dim,
                          kl_method=None if first is None else first.kl_method,
                          kl_note="the model has no continuous latent site" if first is None
                          else first.kl_note,
                          collapsed=None if first is None else first.collapsed,
                          inference_data=idata, sites=sites)
    for name, site in sites.items():
        if site.collapsed:
            label = "latent dimensions" if name == "z" else f"dimensions of site {name}"
            diagnosis.warnings.append(
                f"posterior collapse: {len(site.collapsed)}/{site.units} {label} carry "
                f"KL < {COLLAPSE_THRESHOLD} nats: " + ", ".join(
                    (f"z{d}" if name == "z" else f"{name}[{d}]") for d in site.collapsed))
    above = diagnosis._k_stats()["above_bad"]
    if above > 0:
        diagnosis.warnings.append(
            f"{100 * above:.1f} % of datapoints have k̂ > {PARETO_K_BAD}: their importance-"
            "sampled log p(x) is unreliable (the guide's tails are lighter than the posterior's)")
    if run_path is not None:
        diagnosis.netcdf_path = write_netcdf(idata, run_path / DIAGNOSTICS_FILE)
    return diagnosis
