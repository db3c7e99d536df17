"""Figures written to a run directory: reconstructions, samples, and the loss curves.

Every figure is written atomically (:func:`pyro_vae.runs.atomic_write`): a full disk or a crash
leaves the previous figure, never an empty or torn PNG.

matplotlib is imported when a figure is drawn, not with this module, and image grids are
written with PIL (as torchvision writes them, without its import); the files are drawn without
pyplot (a :class:`matplotlib.figure.Figure` saved through the Agg canvas), so
they can be written from a background thread (:func:`pyro_vae.training.write_figures`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch


def as_images(x: torch.Tensor, data_shape: Sequence[int]) -> torch.Tensor:
    """``[n, D]`` → ``[n, C, H, W]`` for image data; non-image vectors become 1×1×D strips."""
    if len(data_shape) == 3:
        return x.reshape(-1, *data_shape)
    return x.reshape(x.shape[0], 1, 1, -1)


def _image_format(path: Path) -> str:
    """The image format that the name of ``path`` asks for (PNG without a known suffix)."""
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix) or "png"


def _make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """``torchvision.utils.make_grid`` (unnormalized), pixel for pixel, without importing
    torchvision (about half a second): ``[n, C, H, W]`` → ``[3, H', W']`` (one channel is
    repeated into three), ``nrow`` images per row, ``padding`` pixels of ``pad_value`` around and
    between them; a single image is returned unpadded."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.shape[1] == 1:
        images = torch.cat((images, images, images), 1)
    if images.shape[0] == 1:
        return images.squeeze(0)
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, cell_h * rows + padding, cell_w * columns + padding),
                           pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        grid[:, y * cell_h + padding:(y + 1) * cell_h,
             x * cell_w + padding:(x + 1) * cell_w] = images[k]
    return grid


def _save_image(grid: torch.Tensor, path: str | Path) -> Path:
    """A ``[3, H, W]`` grid in [0, 1] written as ``torchvision.utils.save_image`` writes it
    (pixels ``⌊255·v + 0.5⌋`` clamped to 0…255, through PIL), into a temporary file renamed over
    ``path``."""
    from PIL import Image

    from .runs import atomic_write

    path = Path(path)
    pixels = (_make_grid(grid).mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0)
              .to("cpu", torch.uint8).numpy())
    image = Image.fromarray(pixels)
    atomic_write(path, lambda stream: image.save(stream, format=_image_format(path)))
    return path


def save_grid(x: torch.Tensor, data_shape: Sequence[int], path: str | Path, nrow: int = 8) -> Path:
    """Save datapoints as an image grid (values clamped to [0, 1], upscaled for small images)."""
    return _save_image(image_grid(x, data_shape, nrow), path)


def save_reconstructions(vae, x: torch.Tensor, path: str | Path, n: int = 32,
                         labels: torch.Tensor | None = None) -> Path:
    """Originals (odd rows) above their reconstructions (even rows)."""
    return _save_image(reconstruction_grid(vae, x, n, labels), path)


def save_samples(vae, path: str | Path, n: int = 64) -> Path:
    """Decoder means of ``n`` draws from the prior."""
    return _save_image(sample_grid(vae, n), path)


def loss_figure(history: list[dict]) -> "Figure":
    """Training loss and validation ELBO (nats per datapoint) against the epoch (a pyplot
    figure: shown by a notebook; :func:`save_loss` draws the same without pyplot)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    _draw_loss(fig, ax, history)
    return fig


def _draw_loss(fig, ax, history: list[dict]) -> None:
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [-row["train_loss"] for row in history], label="train bound (−loss)")
    ax.plot(epochs, [row["val_elbo"] for row in history], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()


def save_loss(history: list[dict], path: str | Path) -> Path:
    """:func:`loss_figure` saved (atomically) to ``path``; drawn on a figure of its own, not
    through pyplot (no global figure state: safe in any thread, and nothing to close)."""
    from matplotlib.figure import Figure

    from .runs import atomic_write

    path = Path(path)
    fig = Figure(figsize=(6, 3.5))
    _draw_loss(fig, fig.add_subplot(), history)
    suffix = path.suffix.lower().lstrip(".")
    fmt = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
    atomic_write(path, lambda stream: fig.savefig(stream, format=fmt, dpi=100))
    return path


# -- the same figures as image tensors (for experiment trackers: TensorBoard, MLflow) ----------

def image_grid(x: torch.Tensor, data_shape: Sequence[int], nrow: int = 8) -> torch.Tensor:
    """Datapoints as an image grid (values clamped to [0, 1], upscaled for small images): a
    ``[3, H, W]`` float tensor in [0, 1] on the CPU."""
    images = as_images(x.detach().float().cpu(), data_shape).clamp(0, 1)
    if images.shape[-1] < 32 and images.shape[-2] > 1:
        factor = max(1, 32 // images.shape[-1])
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    return _make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def reconstruction_grid(vae, x: torch.Tensor, n: int = 32,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """The image of :func:`save_reconstructions` (originals above their reconstructions) as a
    ``[3, H, W]`` tensor in [0, 1]."""
    return image_grid(reconstruction_rows(vae, x, n, labels), _data_shape(vae), nrow=8)


def reconstruction_rows(vae, x: torch.Tensor, n: int = 32,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's part of :func:`reconstruction_grid`: the first ``n`` datapoints and their
    reconstructions, in alternating rows of 8 (``[2n, D]``)."""
    x = x[:n]
    recon = vae.reconstruct(x) if labels is None else vae.reconstruct(x, labels[:n])
    rows = []
    for start in range(0, x.shape[0], 8):
        rows.extend([x[start:start + 8], recon[start:start + 8]])
    return torch.cat(rows)


def sample_grid(vae, n: int = 64) -> torch.Tensor:
    """The image of :func:`save_samples` (decoder means of ``n`` prior draws) as a
    ``[3, H, W]`` tensor in [0, 1]."""
    return image_grid(vae.sample(n), _data_shape(vae), nrow=max(1, int(n ** 0.5)))


def _data_shape(vae) -> tuple[int, ...]:
    shape = getattr(vae, "data_shape", None)
    return tuple(shape) if shape is not None else (int(vae.data_dim),)
