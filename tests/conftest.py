"""Shared fixtures: the digits, and a probabilistic-PCA VAE whose marginal and posterior are known
exactly (built by :mod:`helpers`)."""

from __future__ import annotations

import pyro
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


@pytest.fixture
def float64():
    """float64 by default and an empty Pyro param store, for tests that compare with exact
    answers to float precision (use with ``pytest.mark.usefixtures("float64")``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()
