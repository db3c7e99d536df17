"""Figures written to a run directory: reconstructions, samples, and the loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import torch


def as_images(x: torch.Tensor, data_shape: Sequence[int]) -> torch.Tensor:
    """``[n, D]`` → ``[n, C, H, W]`` for image data; non-image vectors become 1×1×D strips."""
    if len(data_shape) == 3:
        return x.reshape(-1, *data_shape)
    return x.reshape(x.shape[0], 1, 1, -1)


def save_grid(x: torch.Tensor, data_shape: Sequence[int], path: str | Path, nrow: int = 8) -> Path:
    """Save datapoints as an image grid (values clamped to [0, 1], upscaled for small images)."""
    from torchvision.utils import make_grid, save_image  # torchvision is slow to import

    images = as_images(x.detach().float().cpu(), data_shape).clamp(0, 1)
    if images.shape[-1] < 32 and images.shape[-2] > 1:
        factor = max(1, 32 // images.shape[-1])
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    save_image(grid, str(path))
    return Path(path)


def save_reconstructions(vae, x: torch.Tensor, path: str | Path, n: int = 32,
                         labels: torch.Tensor | None = None) -> Path:
    """Originals (odd rows) above their reconstructions (even rows)."""
    x = x[:n]
    recon = vae.reconstruct(x, None if labels is None else labels[:n])
    rows = []
    for start in range(0, x.shape[0], 8):
        rows.extend([x[start:start + 8], recon[start:start + 8]])
    return save_grid(torch.cat(rows), vae.data_shape, path, nrow=8)


def save_samples(vae, path: str | Path, n: int = 64) -> Path:
    """Decoder means of ``n`` draws from the prior."""
    return save_grid(vae.sample(n), vae.data_shape, path, nrow=max(1, int(n ** 0.5)))


def loss_figure(history: list[dict]) -> plt.Figure:
    """Training loss and validation ELBO (nats per datapoint) against the epoch."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [-row["train_loss"] for row in history], label="train bound (−loss)")
    ax.plot(epochs, [row["val_elbo"] for row in history], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_loss(history: list[dict], path: str | Path) -> Path:
    fig = loss_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
