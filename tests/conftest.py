"""Shared fixtures: the digits, and a probabilistic-PCA VAE whose marginal and posterior are known
exactly (built by :mod:`helpers`)."""

from __future__ import annotations

import pytest
import torch

from helpers import LinearGaussian, make_linear_gaussian
from pyro_vae import load_data


def pytest_configure(config):
    # The test models are tiny: one thread is faster than two and is not slowed down by
    # other processes competing for the same cores (thread oversubscription).
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    """The bundled digits data set, loaded once per test module."""
    return load_data("digits")


@pytest.fixture
def linear_gaussian() -> LinearGaussian:
    return make_linear_gaussian()
