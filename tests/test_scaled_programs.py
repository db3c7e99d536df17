"""A VAE whose model is rescaled by a user's ``poutine.scale``: every tool reports the scaled
program, as ``Trace_ELBO`` scores it."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, evaluate, log_weights
from pyro_vae.errors import ConfigError
from pyro_vae.objectives import make_objective


class TemperedVAE(VAE):
    """The model's log-density halved (a tempered likelihood and prior, as in KL annealing)."""

    def model(self, x, y=None, num_data=None):
        with poutine.scale(scale=0.5):
            return super().model(x, y, num_data)


def test_evaluate_reports_the_scaled_program(digits):
    pyro.set_rng_seed(0)
    base = VAE(digits.data_shape, 3, hidden=(16,))
    tempered = TemperedVAE(digits.data_shape, 3, hidden=(16,))
    tempered.load_state_dict(base.state_dict())
    x = digits.val[:40]
    plain, scaled = evaluate(base, x, particles=1), evaluate(tempered, x, particles=1)
    # the same draws (same seed and parameters): the model's terms halve, the guide's stay
    assert torch.allclose(scaled.reconstruction, 0.5 * plain.reconstruction, rtol=1e-5)
    pyro.set_rng_seed(2)
    plain_weights = log_weights(base.model, base.guide, x, particles=3)
    pyro.set_rng_seed(2)
    scaled_weights = log_weights(tempered.model, tempered.guide, x, particles=3)
    assert torch.allclose(scaled_weights.log_likelihood, 0.5 * plain_weights.log_likelihood)
    assert torch.allclose(scaled_weights.log_prior, 0.5 * plain_weights.log_prior)
    assert torch.allclose(scaled_weights.log_guide, plain_weights.log_guide)


@pytest.mark.parametrize("particles", [1, 3])
def test_the_elbo_of_the_scaled_program_equals_pyros(digits, particles):
    pyro.set_rng_seed(0)
    vae = TemperedVAE(digits.data_shape, 3, hidden=(16,))
    x = digits.val[:16]
    pyro.set_rng_seed(4)
    ours = make_objective("elbo", particles).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    theirs = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                        max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert ours == pytest.approx(theirs, rel=1e-6)


class GlobalShiftVAE(VAE):
    """A VAE with a global latent shift outside plate "data" (and its guide)."""

    def model(self, x, y=None, num_data=None):
        pyro.sample("shift", pyro.distributions.Normal(0.0, 1.0))
        return super().model(x, y, num_data)

    def guide(self, x, y=None, num_data=None):
        pyro.sample("shift", pyro.distributions.Normal(0.0, 0.5))
        return super().guide(x, y, num_data)


def test_per_datapoint_tools_refuse_a_program_with_global_terms(digits):
    vae = GlobalShiftVAE(digits.data_shape, 2, hidden=(8,))
    x = digits.val[:8]
    with pytest.raises(ConfigError, match="^evaluation reports per-datapoint bounds.*outside "
                                          "plate 'data'"):
        evaluate(vae, x, particles=2)
    with pytest.raises(ConfigError, match="per-datapoint bounds"):
        make_objective("iwae", 3).per_datapoint_bound(vae.model, vae.guide, x)
    # the training objective itself handles the global term
    assert torch.isfinite(make_objective("iwae", 3).differentiable_loss(vae.model, vae.guide, x))


def test_fit_refuses_a_program_with_global_terms_before_training_or_writing(digits, tmp_path):
    from pyro_vae import fit

    vae = GlobalShiftVAE(digits.data_shape, 2, hidden=(8,))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(ConfigError, match="^fit scores a validation ELBO per datapoint after "
                                          "every epoch, and GlobalShiftVAE has sites outside "
                                          "plate \"data\"") as info:
        fit(vae, digits, epochs=1, out=tmp_path / "run", progress=False, device="cpu")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # no step taken
