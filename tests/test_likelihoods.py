"""Likelihoods: shapes under Pyro's validation, exact log-densities against reference formulas,
the discretized categorical's sampling, support checks, options, and a short training run each."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import pyro_vae
from pyro_vae.data import from_array
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.log_weights import log_weights
from pyro_vae.models import likelihoods as lk
from pyro_vae.models.likelihoods import LIKELIHOODS

NEW = ("laplace", "beta", "categorical", "poisson", "negative-binomial")
UNIT_INTERVAL = ("beta", "categorical", "bernoulli", "continuous-bernoulli")
COUNTS = ("poisson", "negative-binomial")
#: float32 machine epsilon: the tolerances below are multiples of it times the magnitude summed.
EPS32 = torch.finfo(torch.float32).eps


def valid_data(name: str, n: int = 5, d: int = 6, seed: int = 0) -> torch.Tensor:
    """Data inside the support of likelihood ``name``, with the edge values included."""
    generator = torch.Generator().manual_seed(seed)
    if name in COUNTS:
        x = torch.poisson(torch.full((n, d), 3.0), generator=generator)
        x[0, 0] = 0.0
        return x
    if name in UNIT_INTERVAL:
        x = torch.randint(0, 17, (n, d), generator=generator).float() / 16  # digit-like levels
        x[0, 0], x[0, 1] = 0.0, 1.0
        return x
    return torch.randn(n, d, generator=generator)


def assert_close_float32(ours: torch.Tensor, reference: np.ndarray, magnitude: np.ndarray) -> None:
    """``ours`` (float32, a sum over D terms) equals the float64 ``reference`` up to float32
    rounding: 64 ε₃₂ per unit of the summed term magnitudes (a few roundings per term)."""
    ours = ours.detach().double().numpy()
    tolerance = 64 * EPS32 * (np.asarray(magnitude) + 1.0)
    assert ours.shape == reference.shape
    assert np.all(np.abs(ours - reference) <= tolerance), np.max(np.abs(ours - reference))


# -- the VAE's model under Pyro's validation ------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_model_trace_is_valid_and_shaped(name):
    pyro.set_rng_seed(0)
    n, d = 5, 6
    vae = pyro_vae.VAE(d, 2, likelihood=name, hidden=(8,))
    x = valid_data(name, n, d)
    with pyro.validation_enabled(True):
        trace = pyro.poutine.trace(vae.model).get_trace(x)
        trace.compute_log_prob()
        site = trace.nodes["x"]
        assert site["fn"].event_shape == (d,)
        assert site["log_prob"].shape == (n,)
        assert torch.isfinite(site["log_prob"]).all()
        # vectorized particles: decoder output [K, B, k*D] against data [B, D]
        weights = log_weights(vae.model, vae.guide, x, particles=3)
        assert weights.log_likelihood.shape == (3, n)
        assert torch.isfinite(weights.log_likelihood).all()
    decoded = vae.decode(torch.randn(4, 2))
    assert decoded.batch_shape == (4,) and decoded.event_shape == (d,)
    assert decoded.mean.shape == (4, d)
    assert torch.isfinite(decoded.mean).all()
    assert vae.sample(3).shape == (3, d)


@pytest.mark.parametrize("name", NEW)
def test_distribution_expands_for_plates(name):
    likelihood = LIKELIHOODS[name]()
    likelihood.setup(4)
    fn = likelihood.distribution(torch.randn(3, likelihood.decoder_outputs(4)))
    x = valid_data(name, 3, 4)
    expanded = fn.expand((2, 3))
    assert expanded.batch_shape == (2, 3) and expanded.event_shape == (4,)
    assert torch.equal(expanded.log_prob(x), fn.log_prob(x).expand(2, 3))
    # a plate larger than the batch makes Pyro broadcast (expand) the distribution itself
    with pyro.validation_enabled(True), pyro.plate("outer", 2, dim=-2), \
            pyro.plate("data", 3, dim=-1):
        trace = pyro.poutine.trace(lambda: pyro.sample("x", fn, obs=x)).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["x"]["log_prob"].shape == (2, 3)


# -- exact log-densities -------------------------------------------------------------------------
def _decoder_output(likelihood, batch=(3, 4), d=5, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, likelihood.decoder_outputs(d), generator=generator)


@pytest.mark.parametrize("options", [{"scale": 0.7}, {"scale": "decoder"}, {"scale": "per-dim"},
                                     {"scale": "shared", "init_scale": 2.5}])
@pytest.mark.parametrize("name, reference", [("laplace", stats.laplace), ("normal", stats.norm)])
def test_location_scale_log_density(name, reference, options):
    likelihood = LIKELIHOODS[name](**options)
    likelihood.setup(5)
    out = _decoder_output(likelihood)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    if options["scale"] == "decoder":
        loc, raw = out[..., :5].double(), out[..., 5:].double()
        scale = F.softplus(raw) + lk.MIN_SCALE
    else:
        loc = out.double()
        value = options["scale"] if isinstance(options["scale"], float) \
            else options.get("init_scale", 1.0)
        scale = torch.full_like(loc, value)
    terms = reference.logpdf(x.double().numpy(), loc.numpy(), scale.numpy())
    ours = likelihood.distribution(out).log_prob(x)
    assert ours.shape == (3, 4)
    assert_close_float32(ours, terms.sum(-1), np.abs(terms).sum(-1))


def test_laplace_and_normal_share_the_scale_machinery():
    assert issubclass(lk.Laplace, lk.LocationScale) and issubclass(lk.Normal, lk.LocationScale)
    assert lk.Laplace.family is dist.Laplace and lk.Normal.family is dist.Normal
    # the learned scale keeps its parameter name, so saved runs still load
    normal = lk.Normal("per-dim")
    normal.setup(3)
    assert list(normal.state_dict()) == ["raw_scale"]
    assert torch.allclose(F.softplus(normal.raw_scale) + lk.MIN_SCALE, torch.ones(3))
    fixed = lk.Laplace(0.25)
    fixed.setup(3)
    assert list(fixed.state_dict()) == ["fixed_scale"]
    b = fixed.distribution(torch.zeros(2, 3)).base_dist.scale
    assert torch.equal(b, torch.full((2, 3), 0.25))


def test_poisson_log_density():
    likelihood = lk.Poisson()
    out = _decoder_output(likelihood)
    x = valid_data("poisson", 4, 5)
    rate = F.softplus(out.double()) + lk.MIN_RATE
    terms = stats.poisson.logpmf(x.double().numpy(), rate.numpy())
    ours = likelihood.distribution(out).log_prob(x)
    assert_close_float32(ours, terms.sum(-1), np.abs(terms).sum(-1))
    # and torch's own Poisson agrees
    torch_terms = torch.distributions.Poisson(rate.float()).log_prob(x)
    assert torch.allclose(ours, torch_terms.sum(-1))


def test_negative_binomial_log_density():
    likelihood = lk.NegativeBinomial()
    out = _decoder_output(likelihood)
    x = valid_data("negative-binomial", 4, 5)
    total_count = F.softplus(out[..., :5].double()) + lk.MIN_CONCENTRATION
    logits = out[..., 5:].double()
    # torch counts successes (prob sigmoid(logits)) before r failures; scipy's nbinom counts
    # failures before n successes, so its success probability is 1 − sigmoid(logits).
    terms = stats.nbinom.logpmf(x.double().numpy(), total_count.numpy(),
                                torch.sigmoid(-logits).numpy())
    fn = likelihood.distribution(out)
    assert_close_float32(fn.log_prob(x), terms.sum(-1), np.abs(terms).sum(-1))
    assert torch.allclose(fn.mean.double(), total_count * logits.exp(), rtol=1e-5)


def test_beta_log_density_at_clamped_values():
    likelihood = lk.Beta()
    assert likelihood.EPSILON == lk.ClampedBeta.EPSILON == 1e-3
    out = _decoder_output(likelihood)
    x = valid_data("beta", 4, 5)
    x[1, :3] = torch.tensor([5e-4, 1.0 - 5e-4, 0.5])  # inside the clamped margins
    alpha = F.softplus(out[..., :5]) + lk.MIN_CONCENTRATION
    beta = F.softplus(out[..., 5:]) + lk.MIN_CONCENTRATION
    eps = likelihood.EPSILON
    clamped = x.clamp(eps, 1 - eps)
    fn = likelihood.distribution(out)
    ours = fn.log_prob(x)
    expected = torch.distributions.Beta(alpha, beta).log_prob(clamped).sum(-1)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-5)
    terms = stats.beta.logpdf(clamped.double().numpy(), alpha.double().numpy(),
                              beta.double().numpy())
    assert_close_float32(ours, terms.sum(-1), np.abs(terms).sum(-1))
    # 0 is scored exactly as ε, and 1 exactly as 1 − ε
    edge = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    moved = torch.tensor([[eps, 1 - eps, eps, 1 - eps, eps]])
    assert torch.equal(fn.log_prob(edge), fn.log_prob(moved))
    assert torch.allclose(fn.mean, alpha / (alpha + beta))


@pytest.mark.parametrize("levels, values", [
    (17, "digits"),        # values k/16 are exactly the 17 levels
    (5, "anywhere"),       # arbitrary values in [0, 1] are rounded to the nearest of 5 levels
])
def test_categorical_log_density_is_log_softmax_at_the_rounded_level(levels, values):
    likelihood = lk.Categorical(levels)
    d = 5
    out = _decoder_output(likelihood, d=d)
    generator = torch.Generator().manual_seed(3)
    if values == "digits":
        x = torch.randint(0, 17, (4, d), generator=generator).float() / 16
    else:
        x = torch.rand(4, d, generator=generator)
    x[0, 0], x[0, 1] = 0.0, 1.0
    # reference by explicit loops over the block-major layout: block l = logits of level l
    logits = out.double().numpy().reshape(3, 4, levels, d)
    ref = np.zeros((3, 4))
    for k in range(3):
        for b in range(4):
            for j in range(d):
                column = logits[k, b, :, j]
                level = int(np.rint(float(x[b, j]) * (levels - 1)))
                ref[k, b] += column[level] - np.log(np.exp(column - column.max()).sum()) \
                    - column.max()
    ours = likelihood.distribution(out).log_prob(x)
    assert ours.shape == (3, 4)
    # each term's log-sum-exp adds L roundings of numbers up to max|logit|
    assert_close_float32(ours, ref, np.abs(logits).max(-2).sum(-1) * levels)
    if values == "digits":
        assert torch.equal(torch.round(x * 16), x * 16)  # the rounding had nothing to do


def test_categorical_mean_and_layout():
    likelihood = lk.Categorical(4)
    # block l gets a large logit only for dimension l: the mean of dimension l is l/3
    out = torch.full((1, 4 * 4), -30.0)
    for level in range(4):
        out[0, level * 4 + level] = 30.0
    fn = likelihood.distribution(out)
    assert torch.allclose(fn.mean, torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]]), atol=1e-6)
    assert torch.allclose(likelihood.distribution(torch.zeros(2, 16)).mean, torch.full((2, 4), 0.5))


def test_categorical_samples_lie_on_the_levels_and_match_the_mean():
    torch.manual_seed(0)
    levels, d, n = 5, 3, 20_000
    base = lk.DiscretizedUnitInterval(torch.randn(d, levels, generator=torch.Generator().manual_seed(4)))
    samples = base.sample((n,))
    assert samples.shape == (n, d)
    grid = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    assert torch.isin(samples, grid).all()
    # the empirical mean within 3 standard errors (SE from the sample standard deviation)
    standard_error = samples.std(dim=0) / math.sqrt(n)
    assert (samples.mean(0) - base.mean).abs().le(3 * standard_error).all(), \
        (samples.mean(0), base.mean, standard_error)
    # and every level's frequency within 3 binomial standard errors of its probability
    frequencies = (samples[..., None] == grid).float().mean(0)
    probs = base.probs
    assert (frequencies - probs).abs().le(3 * (probs * (1 - probs) / n).sqrt() + 1 / n).all()
    assert torch.allclose(base.variance, ((grid - base.mean[:, None]) ** 2 * probs).sum(-1))
    # log_prob of a sample is the log-probability of its level
    level_index = torch.round(samples[:5] * (levels - 1)).long()
    assert torch.allclose(base.log_prob(samples[:5]),
                          probs.log().gather(-1, level_index.T).T, atol=1e-6)


# -- support checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW + ("bernoulli", "continuous-bernoulli", "normal"))
def test_valid_data_pass_the_support_check(name):
    LIKELIHOODS[name]().check_support(valid_data(name, 50, 8))


def test_digits_and_float_counts_pass():
    digits = pyro_vae.load_data("digits").train
    for name in ("beta", "categorical"):
        LIKELIHOODS[name]().check_support(digits)
    counts = torch.tensor([[0.0, 3.0, 12.0], [1.0, 2.0, 1e6]])
    for name in COUNTS:
        LIKELIHOODS[name]().check_support(counts)


BAD = [
    *[(name, value, "[0, 1]") for name in ("beta", "categorical")
      for value in (-0.25, 1.5, math.nan, math.inf)],
    *[(name, value, "non-negative integer counts") for name in COUNTS
      for value in (-1.0, 0.5, 2.999, math.nan, math.inf, -math.inf)],
]


@pytest.mark.parametrize("name, value, need", BAD)
def test_out_of_support_data_are_refused_in_one_line(name, value, need):
    x = valid_data(name, 6, 4)
    x[3, 2] = value
    with pytest.raises(DataError) as caught:
        LIKELIHOODS[name]().check_support(x)
    message = str(caught.value)
    assert "\n" not in message
    assert f"likelihood {name!r}" in message and need in message
    assert f"{value:g}" in message and "(row 3)" in message


def test_fit_refuses_out_of_support_data_before_training():
    counts = np.full((30, 4), 2.0, dtype=np.float32)
    counts[7, 1] = 0.5
    vae = pyro_vae.VAE(4, 2, likelihood="poisson", hidden=(8,))
    with pytest.raises(DataError, match="likelihood 'poisson' needs non-negative integer counts"):
        pyro_vae.fit(vae, from_array(counts, name="counts"), "elbo", epochs=1, progress=False,
                     device="cpu")


# -- options -------------------------------------------------------------------------------------
ROUND_TRIP = [
    ("laplace", {}), ("laplace", {"scale": "per-dim"}), ("laplace", {"scale": "decoder"}),
    ("laplace", {"scale": 0.3, "init_scale": 2.0}), ("laplace", {"scale": "0.5"}),
    ("normal", {"scale": 2}), ("beta", {}), ("categorical", {}), ("categorical", {"levels": 17}),
    ("categorical", {"levels": "9"}), ("categorical", {"levels": np.int64(3)}),
    ("poisson", {}), ("negative-binomial", {}), ("bernoulli", {}), ("continuous-bernoulli", {}),
]


@pytest.mark.parametrize("name, options", ROUND_TRIP)
def test_options_round_trip(name, options):
    likelihood = LIKELIHOODS[name](**options)
    assert likelihood.name == name
    rebuilt = type(likelihood)(**likelihood.options())
    assert rebuilt.options() == likelihood.options()
    vae = pyro_vae.VAE(4, 2, likelihood=name, likelihood_options=options, hidden=(8,))
    again = pyro_vae.VAE.from_config(vae.config)
    assert again.config == vae.config
    assert again.decoder(torch.zeros(1, 2)).shape[-1] == likelihood.decoder_outputs(4)


def test_decoder_outputs_per_likelihood():
    d = 7
    assert lk.Laplace().decoder_outputs(d) == d and lk.Laplace("decoder").decoder_outputs(d) == 2 * d
    assert lk.Beta().decoder_outputs(d) == 2 * d
    assert lk.Categorical().decoder_outputs(d) == 256 * d
    assert lk.Categorical(17).decoder_outputs(d) == 17 * d
    assert lk.Poisson().decoder_outputs(d) == d
    assert lk.NegativeBinomial().decoder_outputs(d) == 2 * d


@pytest.mark.parametrize("name, options, fragment", [
    ("laplace", {"scale": -1.0}, "positive"),
    ("laplace", {"scale": 0}, "positive"),
    ("laplace", {"scale": math.nan}, "positive"),
    ("laplace", {"scale": math.inf}, "positive"),
    ("laplace", {"scale": "wide"}, "scale must be one of"),
    ("laplace", {"scale": True}, "scale must be one of"),
    ("laplace", {"init_scale": 0.0}, "init_scale"),
    ("normal", {"scale": "wide"}, "scale must be one of"),
    ("categorical", {"levels": 1}, "at least 2"),
    ("categorical", {"levels": -3}, "at least 2"),
    ("categorical", {"levels": 2.5}, "integer"),
    ("categorical", {"levels": "many"}, "integer"),
    ("categorical", {"levels": True}, "integer"),
    ("beta", {"epsilon": 0.1}, "bad options"),
    ("poisson", {"rate": 1.0}, "bad options"),
])
def test_bad_options_raise_config_error_in_one_line(name, options, fragment):
    with pytest.raises(ConfigError) as caught:
        pyro_vae.VAE(4, 2, likelihood=name, likelihood_options=options, hidden=(8,))
    message = str(caught.value)
    assert "\n" not in message and fragment in message and name in message


def test_every_likelihood_is_registered_under_its_name():
    for name, cls in LIKELIHOODS.items():
        assert cls.name == name
        assert all(hasattr(cls, method) for method in lk.PROTOCOL)


# -- a short training run each -------------------------------------------------------------------
@pytest.fixture(scope="module")
def counts():
    array = np.random.default_rng(0).poisson(3, size=(300, 10)).astype(np.float32)
    return from_array(array, name="counts")


@pytest.mark.parametrize("name, options", [
    ("laplace", {}), ("beta", {}), ("categorical", {"levels": 17}),
    ("poisson", {}), ("negative-binomial", {}),
])
def test_short_training_run(name, options, digits, counts):
    data = counts if name in COUNTS else digits
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE(data.data_shape, 4, likelihood=name, likelihood_options=options,
                       hidden=(32,))
    history = pyro_vae.fit(vae, data, "elbo", epochs=2, progress=False, device="cpu").history
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_elbo"])
    first, second = history
    # the validation ELBO does not get worse (it rises in these seeded runs); the allowance is
    # the standard error of the difference of two means over the same validation points
    allowance = math.hypot(first["val_elbo_se"], second["val_elbo_se"])
    assert second["val_elbo"] > first["val_elbo"] - allowance, (first, second)
    assert second["train_loss"] < first["train_loss"], (first, second)
