r"""Paired comparison of two VAEs by their held-out log-likelihoods.

Both models are evaluated with :func:`pyro_vae.evaluate` on the same datapoints with the same
seed, giving importance-sampled :math:`\log \hat p_A(x_n)` and :math:`\log \hat p_B(x_n)` per
datapoint. Because the datapoints are shared, the difference is judged pairwise:
:math:`d_n = \log \hat p_A(x_n) - \log \hat p_B(x_n)`, its mean :math:`\bar d` and standard error
:math:`\operatorname{sd}(d)/\sqrt n`, and :math:`z = \bar d / \mathrm{se}`. The table follows
ArviZ's ``compare`` (Vehtari, Gelman & Gabry 2017):
:math:`\mathrm{elpd} = \sum_n \log \hat p(x_n)` with
:math:`\mathrm{se} = \sqrt n \cdot \operatorname{sd}(\log \hat p)`, and the difference to the best
model with :math:`\mathrm{se}_\mathrm{diff} = \sqrt n \cdot \operatorname{sd}(d)` — far smaller
than the two se's combined when the models agree on which datapoints are hard.

The :math:`\log \hat p` are IWAE bounds, biased low by roughly :math:`\operatorname{Var}(w)/(2K)`
(see :mod:`pyro_vae.evaluation`); a model with a poorer guide is penalized by that bias too,
which shrinks with K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import Dataset
from .errors import ConfigError
from . import lvm
from .evaluation import evaluate

#: :math:`|z|` at or above which a difference is reported as significant.
SIGNIFICANCE_Z = 2.0


def _float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Comparison:
    r"""Per-datapoint log-likelihoods of two models on the same datapoints, and their summaries.

    ``log_likelihood_a`` / ``_b``: importance-sampled :math:`\log \hat p(x_n)`, arrays ``[n]``;
    ``evaluation_a`` / ``_b``: :func:`pyro_vae.evaluate`'s summaries."""

    names: tuple[str, str]
    split: str
    particles: int
    seed: int
    log_likelihood_a: np.ndarray
    log_likelihood_b: np.ndarray
    evaluation_a: dict
    evaluation_b: dict

    # -- statistics --------------------------------------------------------------------------
    @property
    def num_datapoints(self) -> int:
        return int(self.log_likelihood_a.shape[0])

    @property
    def difference(self) -> np.ndarray:
        r""":math:`d_n = \log \hat p_A(x_n) - \log \hat p_B(x_n)`, ``[n]``."""
        return self.log_likelihood_a - self.log_likelihood_b

    @property
    def mean_difference(self) -> float:
        return float(self.difference.mean())

    @property
    def se_difference(self) -> float:
        r""":math:`\operatorname{sd}(d) / \sqrt n`, the standard error of the mean paired
        difference."""
        return float(self.difference.std(ddof=1) / math.sqrt(self.num_datapoints))

    @property
    def z(self) -> float:
        """mean difference / its standard error (0 when both are 0, ±inf for a constant shift)."""
        mean, se = self.mean_difference, self.se_difference
        if se > 0:
            return mean / se
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)

    @property
    def significant(self) -> bool:
        return abs(self.z) >= SIGNIFICANCE_Z

    @property
    def better(self) -> str | None:
        """The name of the significantly better model, or ``None``."""
        if not self.significant:
            return None
        return self.names[0] if self.mean_difference > 0 else self.names[1]

    def _elpd(self, values: np.ndarray) -> tuple[float, float]:
        n = self.num_datapoints
        return float(values.sum()), float(math.sqrt(n) * values.std(ddof=1))

    def table(self) -> list[dict]:
        r"""ArviZ-``compare``-style rows, best first: ``rank``, ``name``, ``elpd``
        (:math:`\sum_n \log \hat p(x_n)`), ``se`` (:math:`\sqrt n \cdot \operatorname{sd}`),
        ``elpd_diff`` (elpd of the best minus this one's, :math:`\ge 0`), ``dse``
        (:math:`\sqrt n \cdot \operatorname{sd}(d)`, 0 for the best), ``log_likelihood`` (mean
        per datapoint) and its ``se``."""
        n = self.num_datapoints
        rows = []
        for name, values in zip(self.names, (self.log_likelihood_a, self.log_likelihood_b)):
            elpd, se = self._elpd(values)
            rows.append({"name": name, "elpd": elpd, "se": se,
                         "log_likelihood": float(values.mean()),
                         "log_likelihood_se": se / n})
        rows.sort(key=lambda row: -row["elpd"])
        dse = math.sqrt(n) * float(self.difference.std(ddof=1))
        for rank, row in enumerate(rows):
            row["rank"] = rank
            row["elpd_diff"] = rows[0]["elpd"] - row["elpd"]
            row["dse"] = 0.0 if rank == 0 else dse
        return rows

    def verdict(self) -> str:
        mean, se, z = self.mean_difference, self.se_difference, self.z
        if not self.significant:
            return (f"no significant difference (|z| < {SIGNIFICANCE_Z:g}): "
                    f"{self.names[0]} − {self.names[1]} = {mean:.3f} ± {se:.3f} nats per "
                    f"datapoint (z = {z:.2f})")
        return (f"{self.better} is better by {abs(mean):.3f} ± {se:.3f} nats per datapoint "
                f"(z = {abs(z):.2f})")

    # -- output ------------------------------------------------------------------------------
    def summary(self) -> dict:
        """A JSON-able dict (non-finite numbers as ``None``)."""
        n = self.num_datapoints
        runs = {}
        for name, ev in zip(self.names, (self.evaluation_a, self.evaluation_b)):
            values = self.log_likelihood_a if name == self.names[0] else self.log_likelihood_b
            elpd, se = self._elpd(values)
            runs[name] = {"log_likelihood": ev["log_likelihood"],
                          "log_likelihood_se": ev["log_likelihood_se"],
                          "log_likelihood_mc_se": ev["log_likelihood_mc_se"],
                          "elbo": ev["elbo"], "elpd": elpd, "elpd_se": se}
        return {
            "names": list(self.names), "split": self.split, "particles": self.particles,
            "seed": self.seed, "num_datapoints": n, "runs": runs,
            "difference": self.mean_difference, "difference_se": self.se_difference,
            "z": _float(self.z),
            "elpd_diff": float(self.difference.sum()),
            "elpd_diff_se": math.sqrt(n) * float(self.difference.std(ddof=1)),
            "significant": self.significant, "better": self.better,
            "table": self.table(), "verdict": self.verdict(),
        }

    def format(self) -> str:
        """The table, best first, and a one-line verdict."""
        width = max(4, *(len(name) for name in self.names))
        header = (f"{'rank':>4}  {'run':<{width}}  {'elpd':>11}  {'se':>8}  {'elpd_diff':>9}  "
                  f"{'dse':>8}  {'log p(x)':>9}  {'± se':>6}")
        lines = [f"comparison on the {self.split} split: {self.num_datapoints} datapoints, "
                 f"K = {self.particles} importance samples each (seed {self.seed})",
                 header, "-" * len(header)]
        for row in self.table():
            lines.append(f"{row['rank']:>4}  {row['name']:<{width}}  {row['elpd']:>11.2f}  "
                         f"{row['se']:>8.2f}  {row['elpd_diff']:>9.2f}  {row['dse']:>8.2f}  "
                         f"{row['log_likelihood']:>9.3f}  {row['log_likelihood_se']:>6.3f}")
        lines.append(self.verdict())
        return "\n".join(lines)


def compare_runs(vae_a, vae_b, data: Dataset | torch.Tensor, split: str = "test",
                 particles: int = 1000, seed: int = 0, names: tuple[str, str] = ("A", "B"), *,
                 labels: torch.Tensor | None = None, batch_size: int = 256,
                 progress: bool = False) -> Comparison:
    """Compare two VAEs on the same datapoints (``split`` of a :class:`Dataset`, or a ``[N, D]``
    tensor with ``labels`` for conditional models) by importance-sampled log-likelihoods with K
    = ``particles`` and the same ``seed`` for both (common random numbers: ``compare_runs(v,
    v)`` gives a difference of exactly 0)."""
    if not (isinstance(names, (tuple, list)) and len(names) == 2
            and all(isinstance(name, str) and name for name in names)):
        raise ConfigError(f"names must be two non-empty strings, not {names!r}")
    if names[0] == names[1]:
        raise ConfigError(f"the two runs need different names, not {names[0]!r} twice")
    dims = [getattr(vae, "data_dim", None) for vae in (vae_a, vae_b)]
    if None not in dims and dims[0] != dims[1]:
        raise ConfigError(f"cannot compare {names[0]} (data_dim {dims[0]}) with "
                          f"{names[1]} (data_dim {dims[1]}): they model different data")
    if isinstance(data, Dataset):
        split_name = split
    elif torch.is_tensor(data):
        split_name = "given"
    else:
        raise ConfigError(f"data must be a Dataset or a [N, D] tensor, not {type(data).__name__}")
    evaluations = [evaluate(vae, data, particles, split=split,
                            labels=labels if lvm.is_conditional(vae) else None,
                            batch_size=batch_size, seed=seed, progress=progress)
                   for vae in (vae_a, vae_b)]
    n = evaluations[0].log_likelihood.shape[0]
    if n < 2:
        raise ConfigError(f"a comparison needs at least 2 datapoints, not {n}")
    a, b = (ev.log_likelihood.double().numpy() for ev in evaluations)
    return Comparison(names=(str(names[0]), str(names[1])), split=split_name,
                      particles=particles, seed=seed, log_likelihood_a=a, log_likelihood_b=b,
                      evaluation_a=dict(evaluations[0].summary),
                      evaluation_b=dict(evaluations[1].summary))
