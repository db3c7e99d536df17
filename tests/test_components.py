"""Networks, the conditional VAE, user-written components, and combinations that cannot work."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae import VAE, evaluate, fit, load_run
from pyro_vae.errors import ConfigError, PyroVAEError
from pyro_vae.models.priors import PRIORS
from pyro_vae.registry import unregister


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28), (3, 10, 6)])
def test_conv_networks_map_images_to_blocks_for_any_leading_dims(image_shape):
    data_dim = math.prod(image_shape)
    vae = VAE(image_shape, 3, encoder="conv", decoder="conv", likelihood="normal",
              likelihood_options={"scale": "decoder"}, hidden=(32,))
    x = torch.rand(5, data_dim)
    q = vae.encode(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    z = q.rsample((4,))                                    # [particles, batch, latent]
    out = vae.decoder(z)
    assert out.shape == (4, 5, 2 * data_dim)               # two blocks: loc and scale
    trace = pyro.poutine.trace(vae.model).get_trace(x)
    assert trace.nodes["x"]["fn"].log_prob(x).shape == (5,)


def test_conv_refuses_data_that_are_not_images():
    with pytest.raises(ConfigError, match="C×H×W"):
        VAE(64, 2, encoder="conv")


def test_conv_vae_trains_on_digits(digits):
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 4, encoder="conv", decoder="conv", hidden=(64,))
    history = fit(vae, digits, "elbo", epochs=3, progress=False, device="cpu").history
    se = math.hypot(history[0]["val_elbo_se"], history[-1]["val_elbo_se"])
    assert history[-1]["val_elbo"] - history[0]["val_elbo"] > 3 * se


def test_conditional_vae_generates_the_requested_class(digits):
    from sklearn.linear_model import LogisticRegression

    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 4, hidden=(128,), conditional=True, num_classes=10)
    fit(vae, digits, "elbo", epochs=100, progress=False, device="cpu")
    classifier = LogisticRegression(max_iter=2000).fit(digits.train.numpy(),
                                                        digits.labels["train"].numpy())
    per_class = 50
    torch.manual_seed(1)
    requested = torch.arange(10).repeat_interleave(per_class)
    samples = vae.sample(len(requested), requested)
    accuracy = float((classifier.predict(samples.numpy()) == requested.numpy()).mean())
    # Chance is 1/10; a binomial 3σ band above chance for n samples:
    n, chance = len(requested), 0.1
    assert accuracy > chance + 3 * math.sqrt(chance * (1 - chance) / n)
    assert accuracy > 0.8, accuracy  # and, measured, well above it
    # a conditional run restores and evaluates with the split's labels
    summary = evaluate(vae, digits, particles=10).summary
    assert math.isfinite(summary["log_likelihood"])


def test_conditional_vae_needs_labels(digits):
    vae = VAE(digits.data_shape, 2, hidden=(8,), conditional=True, num_classes=10)
    with pytest.raises(ConfigError, match="labels"):
        vae.encode(digits.train[:3])
    with pytest.raises(ConfigError, match="labels"):
        evaluate(vae, digits.train[:10], particles=2)
    unlabelled = pyro_vae.data.from_array(digits.train.numpy())
    with pytest.raises(ConfigError, match="labelled"):
        fit(vae, unlabelled, epochs=1, progress=False)


def test_labels_out_of_range_are_refused_before_training(digits):
    vae = VAE(digits.data_shape, 2, hidden=(8,), conditional=True, num_classes=10)
    with pytest.raises(ConfigError, match=r"integers in 0\.\.9"):
        vae.encode(digits.train[:2], torch.tensor([3, 10]))
    with pytest.raises(ConfigError, match=r"integers in 0\.\.9"):
        vae.encode(digits.train[:2], torch.tensor([-1, 3]))
    # with Pyro's validation off (how training steps run) the range is not read back: a label
    # outside it has an all-zero one-hot context
    with pyro.validation_enabled(False):
        assert torch.equal(vae.one_hot(torch.tensor([10, 2])),
                           torch.eye(10)[[2]].expand(2, 10) * torch.tensor([[0.0], [1.0]]))
    # so fit checks every split's labels once, up front, naming the split
    labels = dict(digits.labels)
    labels["val"] = labels["val"].clone()
    labels["val"][5] = -1
    broken = pyro_vae.data.Dataset(digits.name, digits.data_shape, digits.train, digits.val,
                                   digits.test, labels)
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(ConfigError, match=r"^val labels of 'digits': labels must be integers"):
        fit(vae, broken, epochs=1, progress=False, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters()))


class LogisticPrior(nn.Module):
    """A user-written prior: independent standard logistic coordinates, with a learned scale."""

    def __init__(self, init_scale: float = 1.0):
        super().__init__()
        self.init_scale = init_scale

    def setup(self, latent_dim):
        self.log_scale = nn.Parameter(torch.full((latent_dim,), math.log(self.init_scale)))

    def distribution(self):
        base = dist.Uniform(torch.zeros_like(self.log_scale), torch.ones_like(self.log_scale))
        transforms = [dist.transforms.SigmoidTransform().inv,
                      dist.transforms.AffineTransform(0.0, self.log_scale.exp())]
        return dist.TransformedDistribution(base, transforms).to_event(1)

    def options(self):
        return {"init_scale": self.init_scale}


@pytest.fixture
def logistic_prior():
    """The user's prior registered for one test only: the catalogue other modules see (and the
    tests they parametrize over it) does not depend on which modules were collected."""
    pyro_vae.register("prior", "test-logistic")(LogisticPrior)
    yield LogisticPrior
    unregister("prior", "test-logistic")


def test_user_written_prior_plugs_in_trains_and_restores(digits, tmp_path, logistic_prior):
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 2, prior="test-logistic", hidden=(16,))
    before = vae.prior.log_scale.detach().clone()
    fit(vae, digits, "iwae", particles=3, epochs=2, out=tmp_path / "run", progress=False,
        device="cpu")
    assert not torch.equal(before, vae.prior.log_scale.detach())
    run = load_run(tmp_path / "run")
    assert isinstance(run.vae.prior, LogisticPrior)
    assert torch.equal(run.vae.prior.log_scale, vae.prior.log_scale.detach())
    # the same object, given directly rather than by name, is the same model
    direct = VAE(digits.data_shape, 2, prior=LogisticPrior(), hidden=(16,))
    assert direct.config["prior"] == "test-logistic"


def test_unregister_restores_the_catalogue_and_guards_the_built_ins(logistic_prior):
    assert "test-logistic" in PRIORS
    with pytest.raises(ConfigError, match="built in"):
        unregister("prior", "normal")
    with pytest.raises(ConfigError, match="no prior named"):
        unregister("prior", "not-there")


def test_register_refuses_incomplete_components():
    with pytest.raises(ConfigError, match="lacks"):
        pyro_vae.register("prior", "incomplete")(type("Incomplete", (nn.Module,), {}))
    with pytest.raises(ConfigError, match="kind"):
        pyro_vae.register("decoder", "x")


def _refused_before_training(tmp_path, vae, data, objective, **options):
    out = tmp_path / "run"
    with pytest.raises(PyroVAEError) as info:
        fit(vae, data, objective, out=out, progress=False, device="cpu", **options)
    assert not out.exists()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_impossible_combinations_fail_fast_in_one_line(digits, tmp_path):
    small = dict(hidden=(8,))
    message = _refused_before_training(tmp_path, VAE(digits.data_shape, 2, guide="full-rank", **small),
                                       digits, "elbo", free_bits=0.5)
    assert "factorized" in message
    message = _refused_before_training(tmp_path, VAE(digits.data_shape, 2, **small), digits,
                                       "dreg", beta=0.5)
    assert "beta" in message
    with pytest.raises(ConfigError, match="conditional"):
        VAE(digits.data_shape, 2, prior="vamp", conditional=True, num_classes=10, **small)
    message = _refused_before_training(tmp_path, VAE(digits.data_shape, 2, prior="vamp", **small),
                                       digits, "meanfield")
    assert "meanfield" in message and "elbo" in message


def test_readme_component_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("**Your own component.**")[1].split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(example.replace('"logistic"', '"readme-example-logistic"'), namespace)
    vae = namespace["vae"]
    trace = pyro.poutine.trace(vae.model).get_trace(torch.rand(5, 64))
    assert trace.nodes["z"]["fn"].log_prob(trace.nodes["z"]["value"]).shape == (5,)
    assert math.isfinite(float(trace.log_prob_sum().detach()))
