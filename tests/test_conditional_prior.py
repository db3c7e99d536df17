"""The conditional prior p(z | y) = N(μ_y, diag σ_y²) of a conditional VAE: its density in the
model, its draws, what training does to it, how it is recorded, and what it refuses."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from torch import nn

from pyro_vae import VAE, fit, load_run, log_weights
from pyro_vae.errors import ConfigError


def _cvae(**options) -> VAE:
    return VAE(64, 3, hidden=(8,), conditional=True, num_classes=4, conditional_prior=True,
               **options)


def _set_class_prior(vae: VAE, loc: torch.Tensor, scale: torch.Tensor) -> None:
    with torch.no_grad():
        vae.class_prior.loc.copy_(loc)
        vae.class_prior.log_scale.copy_(scale.log())


def _hand_log_density(z, loc, scale):
    return torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)


def test_a_fresh_conditional_prior_is_the_standard_normal():
    vae = _cvae()
    z, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 1, 0])
    prior = vae.prior_distribution(y, 6)
    assert prior.batch_shape == (6,) and prior.event_shape == (3,)
    assert torch.equal(prior.log_prob(z), _hand_log_density(z, torch.zeros(3), torch.ones(3)))


@pytest.mark.parametrize("prior", ["normal", "learned-normal"])
def test_the_model_scores_z_under_the_class_prior(prior):
    torch.manual_seed(0)
    vae = _cvae(prior=prior)
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.2
    _set_class_prior(vae, loc, scale)
    base_loc, base_scale = torch.zeros(3), torch.ones(3)
    if prior == "learned-normal":                          # the label-free part, trained too
        with torch.no_grad():
            vae.prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
            vae.prior.raw_scale.copy_(torch.tensor([0.3, -0.2, 1.0]))
        base_loc, base_scale = vae.prior.loc.detach(), vae.prior.scale.detach()
    x, y = torch.rand(6, 64), torch.tensor([0, 1, 2, 3, 1, 0])
    for num_data in (None, 60):                            # the whole data, and a minibatch
        trace = pyro.poutine.trace(vae.model).get_trace(x, y, num_data=num_data)
        site = trace.nodes["z"]
        assert site["fn"].batch_shape == (6,) and site["fn"].event_shape == (3,)
        expected = _hand_log_density(site["value"], base_loc + loc[y], base_scale * scale[y])
        # the same float32 operations up to the order of a 3-term sum: a few ulps
        torch.testing.assert_close(site["fn"].log_prob(site["value"]), expected)
    trace.log_prob_sum().backward()
    assert vae.class_prior.loc.grad.abs().sum() > 0
    assert vae.class_prior.log_scale.grad.abs().sum() > 0


def test_the_untraced_log_weights_use_the_class_prior():
    torch.manual_seed(0)
    vae = _cvae()
    _set_class_prior(vae, torch.randn(4, 3), torch.rand(4, 3) + 0.2)
    x, y = torch.rand(8, 64), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    pyro.set_rng_seed(2)
    fast = log_weights(vae.model, vae.guide, x, y, particles=4, num_data=80)
    pyro.set_rng_seed(2)
    with pyro.poutine.block():                             # a handler: the traced Pyro path
        traced = log_weights(vae.model, vae.guide, x, y, particles=4, num_data=80)
    for field in ("log_likelihood", "log_prior", "log_guide"):
        assert torch.equal(getattr(fast, field), getattr(traced, field)), field


def _identity_decoder_vae(loc, scale) -> VAE:
    """z in R², a linear decoder set to the identity and a Normal likelihood: the decoder mean
    that ``sample`` returns is the z drawn from the prior."""
    classes = loc.shape[0]
    vae = VAE(2, 2, decoder="linear", likelihood="normal", hidden=(8,), conditional=True,
              num_classes=classes, conditional_prior=True)
    with torch.no_grad():
        vae.decoder.linear.weight.copy_(torch.cat([torch.eye(2), torch.zeros(2, classes)], 1))
        vae.decoder.linear.bias.zero_()
    _set_class_prior(vae, loc, scale)
    return vae


def test_samples_of_a_class_are_drawn_from_its_prior():
    loc = torch.tensor([[-3.0, 0.5], [0.0, 2.0], [4.0, -1.0]])
    scale = torch.tensor([[0.5, 1.0], [2.0, 0.25], [1.0, 1.0]])
    vae = _identity_decoder_vae(loc, scale)
    n = 3000
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(n)
    z = vae.sample(3 * n, labels)
    for c in range(3):
        draws = z[labels == c]
        # the sample mean within 3 standard errors σ/√n, the sample standard deviation within 3
        # of its standard errors σ/√(2(n − 1)) (normal draws)
        assert ((draws.mean(0) - loc[c]).abs() < 3 * scale[c] / math.sqrt(n)).all(), c
        assert ((draws.std(0) - scale[c]).abs() < 3 * scale[c] / math.sqrt(2 * (n - 1))).all(), c
    # one label for all, and the default labels cycling through the classes
    assert ((vae.sample(n, 2).mean(0) - loc[2]).abs() < 3 * scale[2] / math.sqrt(n)).all()
    cycled = vae.sample(3 * n)
    for c in range(3):
        assert ((cycled[c::3].mean(0) - loc[c]).abs() < 3 * scale[c] / math.sqrt(n)).all(), c
    with pytest.raises(ConfigError, match=r"^sample\(5\) takes one label or 5 labels, not 3$"):
        vae.sample(5, torch.tensor([0, 1, 2]))


class LabelBlind(nn.Module):
    """A network that ignores the labels it is given, so z alone must carry the class."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.config = {"in_features": in_features, "out_features": out_features}
        self.body = nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(),
                                  nn.Linear(64, out_features))

    def forward(self, inputs, context=None):
        return self.body(inputs)


def _spread(means: torch.Tensor) -> float:
    """The mean distance between two different rows."""
    k = means.shape[0]
    return float(torch.cdist(means, means).sum() / (k * (k - 1)))


def test_training_moves_the_class_means_to_their_classes(digits, tmp_path):
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 2, conditional=True, num_classes=10, conditional_prior=True,
              encoder=LabelBlind(64, 4), decoder=LabelBlind(2, 64))
    fit(vae, digits, "elbo", epochs=10, lr=1e-2, batch_size=64, out=tmp_path, progress=False,
        device="cpu")
    means = vae.class_prior.loc.detach()
    x, y = digits.train, digits.labels["train"]
    with torch.no_grad():
        codes = vae.encode(x, y).mean
    centroids = torch.stack([codes[y == c].mean(0) for c in range(10)])
    # What the class means could show by chance: the spread of the class centroids of the codes
    # under shuffled labels (labels that say nothing about the codes), the largest of 20.
    generator = torch.Generator().manual_seed(0)
    chance = max(_spread(torch.stack([codes[shuffled == c].mean(0) for c in range(10)]))
                 for shuffled in (y[torch.randperm(len(y), generator=generator)]
                                  for _ in range(20)))
    assert _spread(means) > 3 * chance, (_spread(means), chance)   # from 0 at the start
    # For fixed codes the KL terms are smallest at μ_y = the centroid of class y's codes: the
    # learned means must have gone most of the way there, leaving under a quarter of the
    # centroids' between-class variance unexplained
    residual = ((means - centroids) ** 2).sum()
    between = ((centroids - centroids.mean(0)) ** 2).sum()
    assert residual < 0.25 * between, (float(residual), float(between))
    # the run records the prior and restores its class means
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model["conditional_prior"] is True
    assert torch.equal(load_run(tmp_path).vae.class_prior.loc, vae.class_prior.loc.detach())


def test_the_config_records_the_conditional_prior():
    vae = _cvae()
    assert vae.config["conditional_prior"] is True
    assert VAE.from_config(vae.config).conditional_prior
    label_free = VAE(64, 3, hidden=(8,), conditional=True, num_classes=4)
    assert "conditional_prior" not in label_free.config   # as configs written before it existed
    assert not VAE.from_config(label_free.config).conditional_prior
    assert not any(name.startswith("class_prior") for name in label_free.state_dict())


@pytest.mark.parametrize("options,expected", [
    (dict(conditional_prior=True), r"conditional_prior needs a conditional VAE"),
    (dict(conditional=True, num_classes=4, conditional_prior=True, prior="mog"),
     r"conditional_prior applies to the 'normal' and 'learned-normal' priors, not 'mog'"),
    (dict(conditional=True, num_classes=4, conditional_prior=True, prior="laplace"),
     r"conditional_prior applies to .*, not 'laplace'"),
    (dict(conditional=True, num_classes=4, conditional_prior="yes"),
     r"conditional_prior must be true or false, not 'yes'"),
])
def test_refusals_are_one_line(options, expected):
    with pytest.raises(ConfigError, match=f"^{expected}") as info:
        VAE(64, 3, hidden=(8,), **options)
    assert "\n" not in str(info.value)


def test_the_class_prior_needs_labels():
    vae = _cvae()
    with pytest.raises(ConfigError, match=r"^the conditional prior p\(z \| y\) needs labels y$"):
        vae.prior_distribution()
    with pytest.raises(ConfigError, match=r"labels must be integers in 0\.\.3"):
        vae.prior_distribution(torch.tensor([0, 4]), 2)
