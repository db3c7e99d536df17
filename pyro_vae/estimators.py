r"""Side-by-side comparison of ELBO estimators on one model state.

For each objective × K, on a fixed minibatch of data:

- ``bound`` ± ``bound_se``: the objective's per-datapoint bound (nats per datapoint), mean and
  standard error over datapoints;
- per parameter group (``encoder``: the guide's parameters; ``decoder``: the model's), over
  :math:`R` independent gradient draws :math:`g_1, \dots, g_R` of the loss (per datapoint):
  ``grad_var`` = mean over parameter elements of :math:`\operatorname{Var}_r(g_r)`, and
  ``snr`` = mean over elements of
  :math:`|\operatorname{mean}_r(g_r)| / \operatorname{std}_r(g_r)` (Rainforth et al. 2018);
- ``ms_per_step``: median wall-clock time of one loss + backward pass.

Rainforth et al. (2018) predict, for ``iwae``, an encoder SNR falling like :math:`1/\sqrt K` and a
decoder SNR rising like :math:`\sqrt K`; ``dreg`` (Tucker et al. 2019) keeps the encoder SNR from
falling, and so, by the paper's own remedies, do ``miwae`` (M groups of K: encoder SNR
:math:`O(\sqrt{M/K})`), ``piwae`` (IWAE_MK's decoder gradient, MIWAE(M, K)'s encoder gradient) and
``ciwae`` (the ELBO's share).

An estimator is an objective name with an optional gradient, ``objective[:gradient]``, applied to
the same model/guide pair by a handler (:func:`with_gradient`):

- ``pathwise`` (the default): reparameterized sites by their path, discrete sites by the score
  function;
- ``score``: every guide site by the score function (REINFORCE), even where ``rsample`` exists
  — beside the pathwise row it shows what the reparameterization trick buys;
- ``enum``: every discrete guide site summed out exactly (``config_enumerate``);
- ``relaxed``: every one-hot categorical site, in the model and the guide, replaced by its
  Concrete / Gumbel-softmax relaxation at ``temperature`` (Maddison et al. 2017; Jang et al.
  2017) — a pathwise gradient of a *different*, relaxed model.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Iterable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.poutine.messenger import Messenger

from . import lvm
from .lvm import device_of
from .errors import ConfigError
from .models.priors import RelaxedOneHotCategorical
from .objectives import GROUPED, OBJECTIVES, make_objective

#: The gradient estimators an ``objective[:gradient]`` name can ask for (see the module docstring).
GRADIENTS = ("pathwise", "score", "enum", "relaxed")


class ScoreFunctionOnly(dist.TorchDistribution):
    """``base`` without its reparameterized sampler: objectives then use the score function."""

    has_rsample = False
    arg_constraints: dict = {}

    def __init__(self, base: dist.TorchDistribution):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return ScoreFunctionOnly(self.base.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value)


class _ScoreFunction(Messenger):
    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and getattr(msg["fn"], "has_rsample", False):
            msg["fn"] = ScoreFunctionOnly(msg["fn"])


class _Relaxed(Messenger):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if not msg["is_observed"] and isinstance(fn, dist.OneHotCategorical):
            temperature = torch.full((), self.temperature, dtype=fn.logits.dtype,
                                     device=fn.logits.device)
            msg["fn"] = RelaxedOneHotCategorical(temperature, logits=fn.logits)


def parse_estimator(spec: str) -> tuple[str, str]:
    """``"elbo:enum"`` → ``("elbo", "enum")``; a bare name uses the ``pathwise`` gradient."""
    name, _, gradient = spec.partition(":")
    gradient = gradient or "pathwise"
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(OBJECTIVES)}")
    if gradient not in GRADIENTS:
        raise ConfigError(f"unknown gradient {gradient!r} in {spec!r}; choose from: "
                          f"{', '.join(GRADIENTS)}")
    return name, gradient


def with_gradient(model, guide, gradient: str, temperature: float = 0.5):
    """The model/guide pair as the ``gradient`` estimator sees it (see the module docstring)."""
    if gradient == "pathwise":
        return model, guide
    if gradient == "score":
        return model, _ScoreFunction()(guide)
    if gradient == "enum":
        return model, config_enumerate(guide, default="parallel")
    if gradient == "relaxed":
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"the relaxation temperature must be positive, not {temperature!r}")
        return _Relaxed(temperature)(model), _Relaxed(temperature)(guide)
    raise ConfigError(f"unknown gradient {gradient!r}; choose from: {', '.join(GRADIENTS)}")

#: The keys of each row :func:`compare_estimators` returns.
ROW_KEYS = ("objective", "particles", "bound", "bound_se", "encoder_snr", "decoder_snr",
            "encoder_grad_var", "decoder_grad_var", "ms_per_step")


def parameter_groups(vae, x: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> dict[str, list[torch.nn.Parameter]]:
    r"""``encoder``: :math:`q_\phi`'s parameters (encoder network, guide family); ``decoder``:
    :math:`p_\theta`'s. For a model other than :class:`pyro_vae.VAE` they are found by tracing
    the two programs on ``x`` (:func:`pyro_vae.lvm.parameter_roles`): the guide's parameters
    (with any it shares with the model) are ``encoder``, the rest ``decoder``."""
    if not (hasattr(vae, "encoder") and hasattr(vae, "guide_family")):
        if x is None:
            raise ConfigError("parameter_groups of a model other than a VAE needs a batch x")
        guide, model_only, _ = lvm.parameter_roles(vae, x, labels)
        return {"encoder": guide, "decoder": model_only}
    encoder = [*vae.encoder.parameters(), *vae.guide_family.parameters()]
    encoder_ids = {id(p) for p in encoder}
    decoder = [p for p in vae.parameters() if id(p) not in encoder_ids]
    return {"encoder": encoder, "decoder": decoder}


def _snr_and_variance(draws: torch.Tensor) -> tuple[float, float]:
    """``draws``: [R, P] gradient draws; mean per-element SNR and variance."""
    mean = draws.mean(0)
    std = draws.std(0, unbiased=True)
    varying = std > 0
    if not bool(varying.any()):
        return float("nan"), 0.0
    snr = (mean[varying].abs() / std[varying]).mean()
    return float(snr), float(std.pow(2).mean())


def gradient_draws(vae, objective, x: torch.Tensor, repeats: int,
                   labels: torch.Tensor | None = None,
                   gradient: str = "pathwise") -> dict[str, torch.Tensor]:
    """R = ``repeats`` gradients of the per-datapoint loss on ``x``: ``{group: [R, P_group]}``."""
    groups = parameter_groups(vae, x, labels)
    draws = {name: [] for name in groups}
    loss_module = objective(*with_gradient(*lvm.programs(vae), gradient))
    for _ in range(repeats):
        vae.zero_grad(set_to_none=True)
        (loss_module(x, labels) / x.shape[0]).backward()
        for name, params in groups.items():
            draws[name].append(torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in params]) if params else torch.zeros(0))
    vae.zero_grad(set_to_none=True)
    return {name: torch.stack(rows) for name, rows in draws.items()}


def compare_estimators(vae, x: torch.Tensor, objectives: Sequence[str] = ("elbo", "iwae", "dreg"),
                       particles: Sequence[int] = (1, 5, 50), repeats: int = 100,
                       timing_repeats: int = 20, alpha: float | None = None, seed: int = 0,
                       labels: torch.Tensor | None = None, progress: bool = False,
                       temperature: float = 0.5, groups: int | None = None,
                       elbo_weight: float | None = None) -> list[dict]:
    """Compare estimators (``objective[:gradient]``, see the module docstring) × ``particles``
    on the minibatch ``x`` (``[batch, data_dim]``; a conditional VAE also takes the batch's
    ``labels``). ``alpha``, ``groups`` and ``elbo_weight`` go to the objectives they apply to
    (``renyi``; ``miwae`` and ``piwae``, whose ``particles`` are per group; ``ciwae``).

    Returns one row per pair with the keys of :data:`ROW_KEYS`. The model is not changed.
    """
    estimators = [parse_estimator(spec) for spec in objectives]
    for k in particles:
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"particles must be positive integers, not {k!r}")
    if repeats < 2:
        raise ConfigError(f"repeats must be at least 2 to estimate a variance, not {repeats}")
    lvm.check_protocol(vae, "compare_estimators")
    data_dim = getattr(vae, "data_dim", None)
    if x.ndim != 2 or x.shape[0] < 2 or (data_dim is not None and x.shape[1] != data_dim):
        raise ConfigError("need a batch of at least 2 datapoints"
                          + (f" of dimension {data_dim}" if data_dim is not None else ", [N, D]"))
    x = x.to(device_of(vae))
    labels = None if labels is None else labels.to(device_of(vae))
    pairs = [(spec, estimator, k) for spec, estimator in zip(objectives, estimators)
             for k in particles]
    rows = []
    from tqdm.auto import tqdm

    with pyro.validation_enabled(False):
        for spec, (name, gradient), k in tqdm(pairs, desc="compare estimators",
                                             disable=not progress):
            objective = make_objective(name, k, alpha=alpha if name == "renyi" else None,
                                       groups=groups if name in GROUPED else None,
                                       elbo_weight=elbo_weight if name == "ciwae" else None)
            model, guide = with_gradient(*lvm.programs(vae), gradient, temperature)
            pyro.set_rng_seed(seed)
            with torch.no_grad():
                bound, _ = objective.per_datapoint_bound(model, guide, x, labels)
            draws = gradient_draws(vae, objective, x, repeats, labels, gradient)
            encoder_snr, encoder_var = _snr_and_variance(draws["encoder"])
            decoder_snr, decoder_var = _snr_and_variance(draws["decoder"])
            rows.append({
                "objective": spec, "particles": k,
                "bound": float(bound.mean()),
                "bound_se": float(bound.std(unbiased=True) / math.sqrt(bound.shape[0])),
                "encoder_snr": encoder_snr, "decoder_snr": decoder_snr,
                "encoder_grad_var": encoder_var, "decoder_grad_var": decoder_var,
                "ms_per_step": _ms_per_step(vae, objective, x, labels, timing_repeats,
                                            gradient),
            })
    return rows


def _ms_per_step(vae, objective, x: torch.Tensor, labels, repeats: int,
                 gradient: str = "pathwise") -> float:
    loss_module = objective(*with_gradient(*lvm.programs(vae), gradient))
    times = []
    for i in range(repeats + 2):
        if device_of(vae).type == "cuda":
            torch.cuda.synchronize(device_of(vae))
        start = time.perf_counter()
        loss_module(x, labels).backward()
        if device_of(vae).type == "cuda":
            torch.cuda.synchronize(device_of(vae))
        if i >= 2:  # the first passes warm caches up
            times.append(time.perf_counter() - start)
    vae.zero_grad(set_to_none=True)
    return 1000 * statistics.median(times)


def format_table(rows: Iterable[dict]) -> str:
    """A fixed-width table of comparison rows."""
    header = (f"{'estimator':<14} {'K':>5} {'bound':>10} {'± se':>7} {'enc SNR':>9} "
              f"{'dec SNR':>9} {'enc var':>10} {'dec var':>10} {'ms/step':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['objective']:<14} {r['particles']:>5} {r['bound']:>10.3f} "
                     f"{r['bound_se']:>7.3f} {r['encoder_snr']:>9.4f} {r['decoder_snr']:>9.4f} "
                     f"{r['encoder_grad_var']:>10.3e} {r['decoder_grad_var']:>10.3e} "
                     f"{r['ms_per_step']:>8.2f}")
    ratios = variance_ratios(rows)
    if ratios:
        lines.append("")
        lines.append("encoder gradient variance, score function / reparameterized:")
        lines.extend(f"  {name} K={k}: {ratio:.3g}×" for (name, k), ratio in ratios.items())
    return "\n".join(lines)


def variance_ratios(rows: Iterable[dict]) -> dict[tuple[str, int], float]:
    """For each objective and K with both a ``name:score`` and a pathwise ``name`` row: the
    encoder gradient variance of the score-function estimator over the reparameterized one."""
    rows = list(rows)
    pathwise = {(r["objective"], r["particles"]): r["encoder_grad_var"] for r in rows
                if ":" not in r["objective"] or r["objective"].endswith(":pathwise")}
    pathwise = {(name.split(":")[0], k): v for (name, k), v in pathwise.items()}
    ratios = {}
    for r in rows:
        name, _, gradient = r["objective"].partition(":")
        reference = pathwise.get((name, r["particles"]))
        if gradient == "score" and reference:
            ratios[(name, r["particles"])] = r["encoder_grad_var"] / reference
    return ratios


def comparison_figure(rows: Sequence[dict]):
    """Bound, encoder SNR and decoder SNR against K, one line per objective."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for name in dict.fromkeys(r["objective"] for r in rows):
        mine = sorted((r for r in rows if r["objective"] == name), key=lambda r: r["particles"])
        ks = [r["particles"] for r in mine]
        axes[0].errorbar(ks, [r["bound"] for r in mine], yerr=[r["bound_se"] for r in mine],
                         marker="o", capsize=3, label=name)
        axes[1].plot(ks, [r["encoder_snr"] for r in mine], marker="o", label=name)
        axes[2].plot(ks, [r["decoder_snr"] for r in mine], marker="o", label=name)
    titles = ("bound (nats per datapoint)", "encoder gradient SNR", "decoder gradient SNR")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("particles K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    return fig
