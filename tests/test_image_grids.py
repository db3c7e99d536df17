"""The run's image grids are torchvision's, pixel for pixel, written without importing it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from pyro_vae.plots import _make_grid, _save_image, image_grid


@pytest.mark.parametrize("count,channels,height,width,nrow", [
    (1, 1, 8, 8, 8), (5, 1, 8, 8, 8), (64, 1, 28, 28, 8), (9, 3, 4, 6, 4), (2, 1, 1, 10, 8),
    (17, 3, 5, 5, 3),
])
def test_the_grid_is_torchvisions(count, channels, height, width, nrow):
    images = torch.rand(count, channels, height, width, generator=torch.Generator().manual_seed(0))
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    assert torch.equal(_make_grid(images, nrow=nrow, padding=2, pad_value=1.0), expected)


@pytest.mark.parametrize("count", [1, 7, 32])
def test_the_png_is_torchvisions(tmp_path, count):
    images = torch.rand(count, 64, generator=torch.Generator().manual_seed(1))
    grid = image_grid(images, (1, 8, 8), nrow=8)
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    _save_image(grid, ours)
    save_image(grid, theirs)
    a, b = np.asarray(Image.open(ours)), np.asarray(Image.open(theirs))
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.array_equal(a, b)


def test_writing_a_grid_does_not_import_torchvision(tmp_path):
    script = ("import sys, torch\n"
              "from pyro_vae.plots import save_grid\n"
              f"save_grid(torch.rand(16, 64), (1, 8, 8), {str(tmp_path / 'g.png')!r})\n"
              "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
    assert (tmp_path / "g.png").stat().st_size > 0
