"""Pyro's model/guide validation warnings, as Pyro emits them: on a validated step only."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_vae import VAE, fit
from pyro_vae.objectives import make_objective


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        u = pyro.sample("u", dist.Normal(0.0, 1.0))  # the guide forgets it
        pyro.sample("x", dist.Normal(z + u, 1.0), obs=x)


def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x, 1.0))


def _messages(validate: bool, name: str, particles: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(validate):
        warnings.simplefilter("always")
        make_objective(name, particles).loss(model, guide, torch.randn(4))
    return [str(w.message) for w in caught if "guide" in str(w.message)]


def test_a_site_the_guide_lacks_is_warned_about_under_validation_only():
    for name, particles in (("elbo", 1), ("iwae", 3)):
        assert any("Found vars in model but not guide: {'u'}" in m
                   for m in _messages(True, name, particles)), name
        assert not _messages(False, name, particles), name


class ForgetfulVAE(VAE):
    """A VAE whose model has a latent site its guide does not sample."""

    def model(self, x, y=None, num_data=None):
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        with self._data_plate(x, num_data):  # per datapoint, as evaluation needs
            pyro.sample("u", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", self.prior.distribution())
            return pyro.sample("x", self.decode(z, y), obs=x)


def test_fit_warns_once_on_its_validated_first_step(digits):
    pyro.set_rng_seed(0)
    vae = ForgetfulVAE(digits.data_shape, 2, hidden=(8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(vae, digits, "elbo", epochs=2, batch_size=64, progress=False, device="cpu",
            val_particles=1)
    found = [w for w in caught if "Found vars in model but not guide" in str(w.message)]
    assert len(found) == 1
