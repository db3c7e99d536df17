r"""What a trained VAE is for: the applications the VAE literature teaches.

Each function takes a trained :class:`~pyro_vae.VAE` and returns its numbers together with a
matplotlib :class:`~matplotlib.figure.Figure`, in a small dataclass:

=============================  ===========================================================
function                       what it shows
=============================  ===========================================================
:func:`interpolate`            decodes along the segment (or great circle) between the
                               posterior means of two datapoints
:func:`traverse`               decodes as one latent dimension sweeps a range of values,
                               the others held at a base point (Higgins et al. 2017)
:func:`anomaly_scores`         datapoints ranked by :math:`-\log \hat p(x)`, the
                               importance-sampled negative log-likelihood of
                               :func:`pyro_vae.evaluate`
:func:`representation_probe`   a logistic-regression probe of the labels on the encoder
                               means: how much class information :math:`z` carries
:func:`latent_scatter`         the encoder means in 2-D (PCA beyond two dimensions),
                               coloured by label
:func:`reconstructions`        datapoints above their reconstructions
=============================  ===========================================================

Encoder means are ``vae.posterior_mean(x, y)`` (closed form where the guide family has one) and
images are decoder means :math:`\mathbb{E}[x \mid z]`. A conditional VAE takes labels wherever its
encoder or decoder needs them: the split's labels when given a :class:`~pyro_vae.Dataset`, or ``y``
/ ``labels`` with a tensor. Results are CPU tensors; nothing is computed with gradients. Latent and
data dimensions are numbered from 0 (``z0``, ``z1``, … in figures, as in ``dims``).

Figures are created with :class:`matplotlib.figure.Figure` (no pyplot state): save one with
``result.figure.savefig(path)``; there is nothing to close.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from . import lvm
from .lvm import device_of
from .data import Dataset, check_finite
from .errors import ConfigError
from .evaluation import Evaluation, evaluate
from .plots import as_images

__all__ = [
    "Interpolation", "Traversal", "AnomalyScores", "Probe", "LatentScatter", "Reconstructions",
    "interpolate", "traverse", "anomaly_scores", "representation_probe", "latent_scatter",
    "reconstructions", "DEFAULT_TRAVERSAL_VALUES",
]

#: The values a latent dimension sweeps in :func:`traverse` (±3 prior standard deviations).
DEFAULT_TRAVERSAL_VALUES = torch.linspace(-3, 3, 9)
#: Size in inches of one image cell in the image-grid figures.
_CELL = 0.9


# -- results ---------------------------------------------------------------------------------

@dataclass
class Interpolation:
    r""":func:`interpolate`: ``t`` ``[steps]`` runs from 0 (:math:`x_a`) to 1 (:math:`x_b`);
    ``latents`` ``[steps, latent_dim]``; ``images`` ``[steps, data_dim]`` are the decoder means;
    ``labels`` ``[steps]`` are the decoder's labels (conditional VAE) or ``None``."""

    t: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None
    spherical: bool
    figure: Figure


@dataclass
class Traversal:
    """:func:`traverse`: ``latents`` ``[len(dims), len(values), latent_dim]`` and ``images``
    ``[len(dims), len(values), data_dim]`` (decoder means); row i sets latent dimension
    ``dims[i]`` to each of ``values``, the others held at ``base`` ``[latent_dim]``."""

    dims: list[int]
    values: torch.Tensor
    base: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor
    figure: Figure


@dataclass
class AnomalyScores:
    r""":func:`anomaly_scores`: ``nll`` ``[N]`` :math:`= -\log \hat p(x)` in nats (higher = more
    anomalous); ``ranking`` ``[N]`` the indices sorted by decreasing ``nll`` (most anomalous first);
    ``evaluation`` the full :class:`~pyro_vae.Evaluation` the scores come from."""

    nll: torch.Tensor
    ranking: torch.Tensor
    evaluation: Evaluation
    figure: Figure


@dataclass
class Probe:
    """:func:`representation_probe`: test-split ``accuracy`` of the probe, the ``chance`` level
    (frequency of the test split's majority class), ``confusion`` ``[C, C]`` (rows: true class,
    columns: predicted), the fitted scikit-learn ``classifier`` and the split sizes."""

    accuracy: float
    chance: float
    confusion: np.ndarray
    classes: np.ndarray
    classifier: Any
    num_train: int
    num_test: int
    figure: Figure


@dataclass
class LatentScatter:
    r""":func:`latent_scatter`: ``coordinates`` ``[N, 2]`` as plotted; ``method`` is ``"latent"``
    (latent_dim 2: :math:`z` itself), ``"pca"`` (latent_dim > 2; ``explained_variance`` holds the
    two components' variance ratios) or ``"index"`` (latent_dim 1: datapoint index, :math:`z`)."""

    coordinates: torch.Tensor
    labels: torch.Tensor | None
    method: str
    explained_variance: np.ndarray | None
    figure: Figure


@dataclass
class Reconstructions:
    """:func:`reconstructions`: ``originals`` and ``reconstructions`` ``[n, data_dim]``
    (decoder means at the posterior means)."""

    originals: torch.Tensor
    reconstructions: torch.Tensor
    figure: Figure


# -- the applications ------------------------------------------------------------------------

def interpolate(vae, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, y=None,
                spherical: bool = False) -> Interpolation:
    r"""Decode along the path between the posterior means :math:`z_a = \mathbb{E}_q[z \mid x_a]`
    and :math:`z_b = \mathbb{E}_q[z \mid x_b]`.

    :param x_a: one datapoint, of shape ``[data_dim]``, ``[1, data_dim]`` or ``vae.data_shape``.
    :param x_b: the other datapoint, of the same shape.
    :param steps: points on the path, endpoints included (at least 2); step :math:`i` has
        :math:`t = i / (\mathrm{steps} - 1)`.
    :param y: labels of a conditional VAE: one label for both datapoints (also used by the
        decoder throughout), or a pair ``(y_a, y_b)``: :math:`x_a` is encoded with :math:`y_a`
        and :math:`x_b` with :math:`y_b`, and each step is decoded with the label of the nearer
        endpoint (:math:`t \le 1/2`: :math:`y_a`).
    :param spherical: spherical linear interpolation (slerp, White 2016) instead of the
        straight segment :math:`(1 - t)\, z_a + t\, z_b`; it falls back to the segment when
        :math:`z_a` and :math:`z_b` are parallel.

    The first and last latents are exactly :math:`z_a` and :math:`z_b`. The figure is a row of
    images for image data, and the decoded value of each data dimension against :math:`t`
    otherwise.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"steps must be an integer ≥ 2, not {steps!r}")
    _needs(vae, "interpolate", "posterior_mean", "decode")
    x = torch.cat([_single(vae, x_a, "x_a"), _single(vae, x_b, "x_b")])
    y_ab = _endpoint_labels(vae, y)
    with _inference(vae):
        ends = vae.posterior_mean(x.to(device_of(vae)), _on(vae, y_ab)).cpu()
        z_a, z_b = ends[0], ends[1]
        t = torch.linspace(0, 1, steps)
        latents = _slerp(z_a, z_b, t) if spherical else \
            (1 - t)[:, None] * z_a + t[:, None] * z_b
        latents[0], latents[-1] = z_a, z_b
        labels = None if y_ab is None else torch.where(t <= 0.5, y_ab[0], y_ab[1])
        images = _decode_mean(vae, latents, labels)
    kind = "spherical" if spherical else "linear"
    if _is_image(vae):
        figure = _image_grid(vae, images, ncols=steps,
                             titles=[f"t={v:.2f}" for v in t.tolist()],
                             suptitle=f"{kind} interpolation between posterior means")
    else:
        figure = Figure(figsize=(6, 3.5), layout="constrained")
        ax = figure.subplots()
        for d in range(images.shape[1]):
            ax.plot(t.numpy(), images[:, d].numpy(), marker=".",
                    label=f"x{d}" if images.shape[1] <= 10 else None)
        ax.set_xlabel("t (0: x_a, 1: x_b)")
        ax.set_ylabel("decoder mean")
        ax.set_title(f"{kind} interpolation, one line per data dimension")
        if images.shape[1] <= 10:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return Interpolation(t=t, latents=latents, images=images, labels=labels,
                         spherical=spherical, figure=figure)


def traverse(vae, x: torch.Tensor | None = None, dims: Sequence[int] | None = None,
             values: torch.Tensor | Sequence[float] = DEFAULT_TRAVERSAL_VALUES,
             y=None) -> Traversal:
    r"""Latent traversals: for each dimension :math:`d` in ``dims``, set :math:`z_d` to each of
    ``values`` while the other dimensions stay at a base point, and decode.

    :param x: one datapoint whose posterior mean is the base point; without it the base is
        :math:`z = 0` (the prior mean of the ``normal`` prior; for other priors pass a datapoint).
    :param dims: latent dimensions to traverse (default: all of them, in order).
    :param values: the values :math:`z_d` takes (absolute values, not offsets from the base).
    :param y: the label of a conditional VAE (one int: it encodes ``x`` and decodes every cell).

    The figure is a grid, one row per dimension and one column per value, for image data, and
    one heat map per dimension (values × data dimensions) otherwise.
    """
    _needs(vae, "traverse", "posterior_mean", "decode")
    dims = list(range(_latent_dim(vae))) if dims is None else _dims(vae, dims)
    values = torch.as_tensor(values, dtype=torch.get_default_dtype()).detach().cpu().clone()
    if values.ndim != 1 or values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ConfigError("values must be a non-empty 1-D sequence of finite numbers")
    label = _one_label(vae, y)
    with _inference(vae):
        if x is None:
            base = torch.zeros(_latent_dim(vae))
        else:
            base = vae.posterior_mean(_single(vae, x, "x").to(device_of(vae)), _on(vae, label)).cpu()[0]
        latents = base.repeat(len(dims), len(values), 1)
        for row, d in enumerate(dims):
            latents[row, :, d] = values
        flat = latents.reshape(-1, _latent_dim(vae))
        labels = None if label is None else label.expand(flat.shape[0])
        images = _decode_mean(vae, flat, labels).reshape(len(dims), len(values), -1)
    where = "the posterior mean of x" if x is not None else "z = 0"
    if _is_image(vae):
        figure = _image_grid(vae, images.reshape(-1, images.shape[-1]), ncols=len(values),
                             col_labels=[f"{v:.3g}" for v in values.tolist()],
                             row_labels=[f"z{d}" for d in dims],
                             suptitle=f"latent traversals around {where}")
    else:
        figure = Figure(figsize=(6, 1.2 + 1.1 * len(dims)), layout="constrained")
        axes = np.atleast_1d(figure.subplots(len(dims), 1, squeeze=False)[:, 0])
        lo, hi = _display_range(images)
        for ax, d, strip in zip(axes, dims, images):
            shown = ax.imshow(strip.numpy(), aspect="auto", vmin=lo, vmax=hi, cmap="viridis",
                              interpolation="nearest")
            ax.set_yticks(range(len(values)), [f"{v:.3g}" for v in values.tolist()],
                          fontsize="x-small")
            ax.set_ylabel(f"z{d}")
        axes[-1].set_xlabel("data dimension")
        figure.colorbar(shown, ax=list(axes), label="decoder mean")
        figure.suptitle(f"latent traversals around {where}")
    return Traversal(dims=dims, values=values, base=base, latents=latents, images=images,
                     figure=figure)


def anomaly_scores(vae, data: Dataset | torch.Tensor, split: str = "test", particles: int = 1000,
                   top: int = 32, *, labels: torch.Tensor | None = None, seed: int = 0,
                   batch_size: int = 256) -> AnomalyScores:
    r"""Score datapoints by their negative log-likelihood :math:`\mathrm{nll} = -\log \hat p(x)`
    under the VAE, the importance-sampled estimate of :func:`pyro_vae.evaluate` with
    K = ``particles``.

    :param data: a :class:`~pyro_vae.Dataset` (scored on ``split``) or a ``[N, data_dim]``
        tensor (with ``labels`` for a conditional VAE).
    :param top: how many of the most anomalous datapoints the figure shows.

    The figure shows the ``top`` highest-nll datapoints as an image grid annotated with their
    nll (and index) for image data, and a histogram of nll with the ``top`` ones marked
    otherwise. Note that nll is in nats per datapoint of the model's likelihood: under the
    ``bernoulli`` likelihood on grey levels it is a cross-entropy, not a normalized density.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"top must be a non-negative integer, not {top!r}")
    x, _, y = _data(vae, data, split, labels)
    evaluation = evaluate(vae, x, particles, labels=y, seed=seed, batch_size=batch_size)
    nll = -evaluation.log_likelihood
    ranking = torch.argsort(nll, descending=True, stable=True)
    worst = ranking[:top]
    if _is_image(vae) and len(worst):
        titles = [f"#{i}: {nll[i]:.1f}" for i in worst.tolist()]
        figure = _image_grid(vae, x[worst], ncols=min(8, len(worst)), titles=titles,
                             suptitle=f"the {len(worst)} most anomalous of {len(x)} "
                                      "(index: −log p̂(x) in nats)")
    else:
        figure = Figure(figsize=(6, 3.5), layout="constrained")
        ax = figure.subplots()
        ax.hist(nll.numpy(), bins=min(50, max(10, len(nll) // 5)), color="0.6")
        for i in worst.tolist():
            ax.axvline(float(nll[i]), color="tab:red", alpha=0.5, linewidth=0.8)
        ax.set_xlabel("−log p̂(x) (nats)")
        ax.set_ylabel("datapoints")
        ax.set_title(f"anomaly scores of {len(x)} datapoints (red: the top {len(worst)})")
    return AnomalyScores(nll=nll, ranking=ranking, evaluation=evaluation, figure=figure)


def representation_probe(vae, dataset: Dataset, max_iter: int = 2000) -> Probe:
    """Linear probe of the representation: a logistic regression (scikit-learn, on
    standardized features) trained on the encoder means of the train split and scored on the
    test split.

    ``chance`` is the frequency of the test split's most common class, the accuracy of always
    guessing it. For a conditional VAE the encoder is given the labels, so the probe measures
    how much label information leaks into :math:`z` beyond what :math:`y` already supplies.
    The figure is the test-split confusion matrix.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _needs(vae, "representation_probe", "posterior_mean")
    if not isinstance(dataset, Dataset):
        raise ConfigError("representation_probe needs a labelled Dataset (train and test splits)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, not {max_iter!r}")
    features, targets = {}, {}
    for split in ("train", "test"):
        x, label, y = _data(vae, dataset, split, None)
        if label is None:
            raise ConfigError(f"representation_probe needs labelled data; {dataset.name!r} "
                              f"has no labels for its {split} split")
        features[split] = _posterior_means(vae, x, y).numpy()
        targets[split] = label.numpy()
    if len(np.unique(targets["train"])) < 2:
        raise ConfigError("representation_probe needs at least two classes in the train split")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    classifier.fit(features["train"], targets["train"])
    predicted = classifier.predict(features["test"])
    classes = np.union1d(targets["train"], targets["test"])
    accuracy = float(np.mean(predicted == targets["test"]))
    chance = float(np.bincount(targets["test"]).max() / len(targets["test"]))
    confusion = confusion_matrix(targets["test"], predicted, labels=classes)
    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = figure.subplots()
    ConfusionMatrixDisplay(confusion, display_labels=classes).plot(ax=ax, colorbar=True,
                                                                   cmap="Blues")
    ax.set_title(f"linear probe on E_q[z|x]: test accuracy {accuracy:.3f} "
                 f"(chance {chance:.3f})", fontsize="medium")
    return Probe(accuracy=accuracy, chance=chance, confusion=confusion, classes=classes,
                 classifier=classifier, num_train=len(targets["train"]),
                 num_test=len(targets["test"]), figure=figure)


def latent_scatter(vae, dataset: Dataset | torch.Tensor, split: str = "test", *,
                   labels: torch.Tensor | None = None) -> LatentScatter:
    r"""Scatter the encoder means :math:`\mathbb{E}_q[z \mid x]` of ``split`` in two dimensions,
    coloured by label.

    latent_dim 2: :math:`z` itself; latent_dim > 2: the first two principal components (scikit-learn
    PCA fitted on these means; the axis labels say so and give the variance each explains);
    latent_dim 1: :math:`z` against the datapoint's index. ``dataset`` may also be a
    ``[N, data_dim]`` tensor, with ``labels`` to colour by (and to feed a conditional VAE).
    """
    _needs(vae, "latent_scatter", "posterior_mean")
    x, shown_labels, y = _data(vae, dataset, split, labels)
    means = _posterior_means(vae, x, y)
    latent_dim = means.shape[1]
    explained = None
    if latent_dim == 1:
        method = "index"
        coordinates = torch.stack([torch.arange(len(means), dtype=means.dtype), means[:, 0]], 1)
        axis_labels = ("datapoint index", "z0 (posterior mean)")
    elif latent_dim == 2:
        method = "latent"
        coordinates = means
        axis_labels = ("z0 (posterior mean)", "z1 (posterior mean)")
    else:
        from sklearn.decomposition import PCA

        if len(means) < 2:
            raise ConfigError("latent_scatter needs at least 2 datapoints to project with PCA")
        method = "pca"
        pca = PCA(n_components=2).fit(means.numpy())
        explained = pca.explained_variance_ratio_
        coordinates = torch.as_tensor(pca.transform(means.numpy()), dtype=means.dtype)
        axis_labels = tuple(f"PC {i + 1} of E_q[z|x] ({100 * r:.0f}% of variance)"
                            for i, r in enumerate(explained))
    figure = Figure(figsize=(6, 5), layout="constrained")
    ax = figure.subplots()
    points = coordinates.numpy()
    if shown_labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=12, alpha=0.8)
    else:
        classes = torch.unique(shown_labels).tolist()
        for colour, c in zip(_class_colours(len(classes)), classes):
            mask = (shown_labels == c).numpy()
            ax.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.8, color=colour,
                       label=str(c))
        ax.legend(title="label", fontsize="small", markerscale=1.5,
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    projection = {"pca": f"PCA of the {latent_dim}-d", "latent": "the",
                  "index": "the 1-d"}[method]
    ax.set_title(f"{projection} encoder means, {len(points)} datapoints", fontsize="medium")
    ax.grid(alpha=0.3)
    return LatentScatter(coordinates=coordinates, labels=shown_labels, method=method,
                         explained_variance=explained, figure=figure)


def reconstructions(vae, x: torch.Tensor, y: torch.Tensor | None = None,
                    n: int = 16) -> Reconstructions:
    """The first ``n`` datapoints of ``x`` (``[N, data_dim]``) and their reconstructions,
    decoder means at the posterior means (``vae.reconstruct``); ``y`` labels a conditional VAE.

    The figure shows originals above reconstructions: pairs of rows of up to 16 images for
    image data, two heat maps (datapoints × data dimensions) otherwise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, not {n!r}")
    _needs(vae, "reconstructions", "reconstruct")
    x = _batch(vae, x, "x")
    y = _labels(vae, y, len(x))  # one label is used for every datapoint
    if y is not None and len(y) != len(x):
        raise ConfigError(f"y holds {len(y)} labels for {len(x)} datapoints")
    x, y = x[:n], None if y is None else y[:n]
    with _inference(vae):
        x_on = x.to(device_of(vae))
        recon = (vae.reconstruct(x_on) if y is None else vae.reconstruct(x_on, _on(vae, y))).cpu()
    if _is_image(vae):
        ncols = min(16, len(x))
        rows = []
        for start in range(0, len(x), ncols):
            chunk = slice(start, start + ncols)
            for part in (x[chunk], recon[chunk]):
                rows.append(torch.cat([part, part.new_full((ncols - len(part), part.shape[1]),
                                                           math.nan)]))
        grid = torch.cat(rows)
        figure = _image_grid(vae, grid, ncols=ncols,
                             row_labels=["original", "reconstruction"] * (len(rows) // 2),
                             suptitle="originals above their reconstructions")
    else:
        figure = Figure(figsize=(6, 4.5), layout="constrained")
        axes = figure.subplots(2, 1, sharex=True)
        lo, hi = _display_range(torch.cat([x, recon]))
        for ax, part, name in zip(axes, (x, recon), ("original", "reconstruction")):
            shown = ax.imshow(part.numpy(), aspect="auto", vmin=lo, vmax=hi, cmap="viridis",
                              interpolation="nearest")
            ax.set_ylabel(f"{name}\n(datapoint)")
        axes[-1].set_xlabel("data dimension")
        figure.colorbar(shown, ax=list(axes))
        figure.suptitle("originals above their reconstructions")
    return Reconstructions(originals=x, reconstructions=recon, figure=figure)


# -- inputs ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _inference(vae):
    """No gradients, networks in eval mode (restored afterwards)."""
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        vae.train(was_training)


def _shape(vae, x: torch.Tensor | None = None) -> tuple[int, ...]:
    """The model's datapoint shape: ``data_shape``, else ``(data_dim,)``, else (a model that
    declares neither, :mod:`pyro_vae.lvm`) the width of the data given."""
    shape = getattr(vae, "data_shape", None)
    if shape is not None:
        return tuple(shape)
    dim = getattr(vae, "data_dim", None)
    if dim is not None:
        return (int(dim),)
    if x is not None and x.ndim >= 1:
        return (int(math.prod(x.shape[1:])) if x.ndim > 1 else int(x.shape[0]),)
    raise ConfigError(f"{type(vae).__name__} declares neither data_shape nor data_dim")


def _dim(vae, x: torch.Tensor | None = None) -> int:
    return int(math.prod(_shape(vae, x)))


def _is_image(vae) -> bool:
    return len(_shape(vae, torch.zeros(1, 1))) == 3


def _shape_error(vae, x: torch.Tensor, name: str, what: str) -> ConfigError:
    shape = _shape(vae, x)
    return ConfigError(f"{name} of shape {list(x.shape)} is not {what} of a model with "
                       f"data_shape {list(shape)} ({math.prod(shape)} values per datapoint)")


def _tensor(x, name: str) -> torch.Tensor:
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{name} must be a tensor or an array of numbers") from None
    if x.is_complex():
        raise ConfigError(f"{name} must hold real numbers, not {x.dtype}")
    return x.detach().to("cpu", torch.get_default_dtype())


def _single(vae, x, name: str) -> torch.Tensor:
    """One datapoint (``[D]``, ``[1, D]`` or ``data_shape``) as ``[1, D]``."""
    x = _tensor(x, name)
    shape = _shape(vae, x.reshape(1, -1))
    dim = math.prod(shape)
    if tuple(x.shape) not in {(dim,), (1, dim), shape, (1, *shape)}:
        raise _shape_error(vae, x, name, "one datapoint")
    x = x.reshape(1, dim)
    check_finite(x, name)
    return x


def _batch(vae, x, name: str) -> torch.Tensor:
    """Datapoints (``[N, D]`` or ``[N, *data_shape]``) as ``[N, D]``."""
    x = _tensor(x, name)
    shape = _shape(vae, x if x.ndim >= 2 else None)
    dim = math.prod(shape)
    if not (x.ndim >= 1 and x.shape[0] >= 1 and (tuple(x.shape[1:]) == shape
                                                 or tuple(x.shape[1:]) == (dim,))):
        raise _shape_error(vae, x, name, "a batch of datapoints")
    x = x.reshape(x.shape[0], dim)
    check_finite(x, name)
    return x


def _labels(vae, y, n: int | None) -> torch.Tensor | None:
    """The VAE's checked labels (:meth:`~pyro_vae.VAE.labels`), on the CPU; another
    conditional model's as integers, an unconditional model's ``None``."""
    if callable(getattr(vae, "labels", None)):
        y = vae.labels(y, n)
    elif not lvm.is_conditional(vae):
        if y is not None:
            raise ConfigError("labels were given to a model that is not conditional")
        return None
    elif y is not None:
        y = torch.as_tensor(y).long()
        y = y.expand(n) if y.ndim == 0 and n is not None else y
    return None if y is None else y.detach().cpu()


def _one_label(vae, y) -> torch.Tensor | None:
    """One label for a conditional VAE, as a ``[1]`` tensor."""
    y = _labels(vae, y, 1)
    if y is not None and y.numel() != 1:
        raise ConfigError(f"expected one label, got {y.numel()}")
    return None if y is None else y.reshape(1)


def _endpoint_labels(vae, y) -> torch.Tensor | None:
    """The labels of x_a and x_b (``[2]``): one label for both, or a pair."""
    y = _labels(vae, y, 2)
    if y is not None and y.shape != (2,):
        raise ConfigError(f"y must be one label or a pair (y_a, y_b), got {y.numel()} labels")
    return y


def _on(vae, y: torch.Tensor | None) -> torch.Tensor | None:
    return None if y is None else y.to(device_of(vae))


def _data(vae, data, split: str, labels) -> tuple[torch.Tensor, torch.Tensor | None,
                                                     torch.Tensor | None]:
    """(x ``[N, D]``, the labels to show or None, the labels the VAE needs or None)."""
    if isinstance(data, Dataset):
        if labels is not None:
            raise ConfigError("labels come with the Dataset; pass labels only with a tensor")
        x = _batch(vae, data.split(split), f"split {split!r} of {data.name!r}")
        shown = data.split_labels(split)
        shown = None if shown is None else shown.detach().cpu().long()
    else:
        x = _batch(vae, data, "data")
        shown = None if labels is None else _tensor(labels, "labels")
        if shown is not None:
            if shown.ndim != 1 or len(shown) != len(x) or \
                    not bool((shown == shown.round()).all()) or bool((shown < 0).any()):
                raise ConfigError(f"labels must be {len(x)} non-negative integers, one per "
                                  "datapoint")
            shown = shown.long()
    if lvm.is_conditional(vae) and shown is None:
        raise ConfigError("a conditional VAE needs labels: use a labelled Dataset, or pass "
                          "labels with a tensor")
    return x, shown, _labels(vae, shown, None) if lvm.is_conditional(vae) else None


def _dims(vae, dims) -> list[int]:
    try:
        dims = [int(d) for d in dims]
    except (TypeError, ValueError):
        raise ConfigError("dims must be a sequence of integers") from None
    latent_dim = _latent_dim(vae)
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if not dims or bad:
        raise ConfigError(f"dims must be latent dimensions in 0..{latent_dim - 1}"
                          + (f", not {bad}" if bad else " (none given)"))
    return dims


# -- the model -------------------------------------------------------------------------------

def _latent_dim(vae) -> int:
    dim = getattr(vae, "latent_dim", None)
    if isinstance(dim, int):
        return dim
    raise ConfigError(f"latent traversals need a single latent_dim; {type(vae).__name__} has "
                      "no integer 'latent_dim'")


def _needs(vae, tool: str, *capabilities: str) -> None:
    for capability in capabilities:
        lvm.require(vae, capability, tool)

def _posterior_means(vae, x: torch.Tensor, y: torch.Tensor | None,
                     batch_size: int = 1024) -> torch.Tensor:
    """E_q[z|x] for a whole split, in batches, on the CPU."""
    with _inference(vae):
        parts = []
        for start in range(0, len(x), batch_size):
            chunk = slice(start, start + batch_size)
            xb = x[chunk].to(device_of(vae))
            parts.append((vae.posterior_mean(xb) if y is None else
                          vae.posterior_mean(xb, _on(vae, y[chunk]))).cpu())
    return torch.cat(parts)


def _decode_mean(vae, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Decoder means E[x | z(, y)] on the CPU (call under :func:`_inference`)."""
    return vae.decode(z.to(device_of(vae)), _on(vae, y)).mean.cpu()


def _slerp(z_a: torch.Tensor, z_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation, ``[len(t), latent_dim]``; linear when z_a ∥ z_b."""
    norms = z_a.norm() * z_b.norm()
    if float(norms) == 0.0:
        return (1 - t)[:, None] * z_a + t[:, None] * z_b
    omega = torch.arccos((z_a @ z_b / norms).clamp(-1, 1))
    if float(torch.sin(omega)) < 1e-6:
        return (1 - t)[:, None] * z_a + t[:, None] * z_b
    weight_a = torch.sin((1 - t) * omega) / torch.sin(omega)
    weight_b = torch.sin(t * omega) / torch.sin(omega)
    return weight_a[:, None] * z_a + weight_b[:, None] * z_b


# -- figures ---------------------------------------------------------------------------------

def _display_range(x: torch.Tensor) -> tuple[float, float]:
    """[0, 1] for data inside it (grey levels, probabilities), else the finite data range."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _image_grid(vae, x: torch.Tensor, ncols: int, titles: Sequence[str] | None = None,
                row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                suptitle: str | None = None) -> Figure:
    """Datapoints ``[n, D]`` as a grid of images, ``ncols`` per row, one axes each, on one
    shared grey scale (RGB for 3 channels; channels side by side otherwise). Rows of NaN are
    left blank."""
    images = as_images(x.detach().float().cpu(), _shape(vae, x))  # [n, C, H, W]
    lo, hi = _display_range(images)
    nrows = math.ceil(len(images) / ncols)
    figure = Figure(figsize=(_CELL * ncols + (0.8 if row_labels else 0.2),
                             _CELL * nrows + (0.5 if suptitle else 0.1) + (0.2 if titles else 0)),
                    layout="constrained")
    axes = np.asarray(figure.subplots(nrows, ncols, squeeze=False))
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < len(images) and bool(torch.isfinite(images[i]).all()):
            image = images[i]
            if image.shape[0] == 3:
                ax.imshow(((image - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy(),
                          interpolation="nearest")
            else:
                ax.imshow(torch.cat(list(image), dim=-1).numpy(), cmap="gray", vmin=lo,
                          vmax=hi, interpolation="nearest")
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize="x-small")
    for row, label in enumerate(row_labels or ()):
        axes[row, 0].set_ylabel(label, fontsize="small")
    for col, label in enumerate(col_labels or ()):
        axes[-1, col].set_xlabel(label, fontsize="small")
    if suptitle:
        figure.suptitle(suptitle, fontsize="medium")
    return figure


def _class_colours(n: int) -> list:
    """``n`` distinct colours: tab10, tab20, then evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]
