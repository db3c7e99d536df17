"""Discrete latents: the categorical and relaxed-categorical priors and guides, and the
Gaussian mixture they make, VAE(prior="categorical", guide="categorical", decoder="linear",
likelihood="normal"), scored by Pyro's enumeration and score-function ELBOs against the exact
enumerated bound."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as td

from pyro_vae import VAE
from pyro_vae.errors import ConfigError
from pyro_vae.guides import posteriors
from pyro_vae.models import priors

FLOAT_EPS = torch.finfo(torch.float32).eps
DATA_DIM, CLUSTERS, BATCH = 2, 3, 8
MEANS = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, -1.0]])  # [clusters, data_dim]
SIGMA = 0.8


def build(prior: str = "categorical", guide: str = "categorical", seed: int = 0,
          **kwargs) -> VAE:
    torch.manual_seed(seed)
    kwargs.setdefault("likelihood_options", {"scale": SIGMA})
    return VAE(DATA_DIM, CLUSTERS, prior=prior, likelihood="normal", guide=guide,
               encoder="linear", decoder="linear", **kwargs)


def gmm(enumerate: bool = False, exact_posterior: bool = False, seed: int = 0) -> VAE:
    """A GMM with cluster means MEANS: the linear decoder maps e_c to W e_c + b = MEANS[c].

    With ``exact_posterior`` the linear encoder is the Bayes posterior: under a uniform prior
    and a shared isotropic σ, log p(c|x) = μ_cᵀx/σ² − |μ_c|²/(2σ²) + const, linear in x."""
    vae = build(seed=seed, guide_options={"enumerate": enumerate})
    with torch.no_grad():
        vae.decoder.linear.weight.copy_(MEANS.T)
        vae.decoder.linear.bias.zero_()
        if exact_posterior:
            vae.encoder.linear.weight.copy_(MEANS / SIGMA**2)
            vae.encoder.linear.bias.copy_(-MEANS.pow(2).sum(-1) / (2 * SIGMA**2))
    return vae


def gmm_data(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLUSTERS, (BATCH,), generator=generator)
    return MEANS[labels] + SIGMA * torch.randn(BATCH, DATA_DIM, generator=generator)


def exact_elbo_terms(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand, from the weights: q(c|x) [batch, C] and f(c) = log p(c) + log p(x|c) − log q(c|x)
    [batch, C]; the ELBO of datapoint n is Σ_c q(c|x_n) f_n(c)."""
    log_q = F.log_softmax(vae.encoder.linear(x), dim=-1)
    log_prior = F.log_softmax(vae.prior.logits, dim=-1)
    cluster_means = vae.decoder.linear.weight.T + vae.decoder.linear.bias  # row c: W e_c + b
    log_lik = td.Normal(cluster_means, SIGMA).log_prob(x[:, None, :]).sum(-1)  # [batch, C]
    return log_q.exp(), log_prior + log_lik - log_q


def gmm_log_likelihood(x: torch.Tensor) -> torch.Tensor:
    """log p(x_n) = log Σ_c (1/C) N(x_n; μ_c, σ²I), in float64."""
    x, means = x.double(), MEANS.double()
    log_lik = td.Normal(means, SIGMA).log_prob(x[:, None, :]).sum(-1)
    return log_lik.logsumexp(-1) - math.log(CLUSTERS)


# -- building, options, config ----------------------------------------------------------------
@pytest.mark.parametrize("kind, name, cls", [
    ("prior", "categorical", priors.CategoricalPrior),
    ("prior", "relaxed-categorical", priors.RelaxedCategoricalPrior),
    ("guide", "categorical", posteriors.CategoricalGuide),
    ("guide", "relaxed-categorical", posteriors.RelaxedCategoricalGuide),
])
def test_components_build_by_name_and_by_object_alike(kind, name, cls):
    registry = priors.PRIORS if kind == "prior" else posteriors.POSTERIORS
    assert registry[name] is cls and cls.name == name
    pair = {"prior": name, "guide": name}
    by_name = build(**pair)
    by_object = build(**{**pair, kind: cls()})
    assert by_object.config == by_name.config
    assert by_name.config[kind] == name
    by_object.load_state_dict(by_name.state_dict())  # strict: the same parameters and buffers
    assert isinstance(by_name.guide_family if kind == "guide" else by_name.prior, cls)


@pytest.mark.parametrize("prior, prior_options, guide, guide_options", [
    ("categorical", {"learn": True}, "categorical", {"enumerate": True}),
    ("categorical", {"learn": False}, "categorical", {"enumerate": False}),
    ("relaxed-categorical", {"temperature": 0.3}, "relaxed-categorical", {"temperature": 2.0}),
])
def test_config_round_trips_with_weights(prior, prior_options, guide, guide_options):
    vae = build(prior, guide, prior_options=prior_options, guide_options=guide_options)
    config = vae.config
    assert config["prior_options"] == prior_options
    assert config["guide_options"] == guide_options
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.3)
    rebuilt = VAE.from_config(config)
    rebuilt.load_state_dict(vae.state_dict())
    assert rebuilt.config == config
    assert getattr(rebuilt.guide_family, "infer", {}) == getattr(vae.guide_family, "infer", {})
    x = gmm_data()
    z = vae.encode(x).sample((2,))
    with torch.no_grad():
        assert torch.equal(rebuilt.prior.distribution().log_prob(z),
                           vae.prior.distribution().log_prob(z))
        assert torch.equal(rebuilt.encode(x).log_prob(z), vae.encode(x).log_prob(z))


@pytest.mark.parametrize("kind, name, options", [
    ("prior", "categorical", {"learn": "false"}),
    ("prior", "categorical", {"learn": 1}),
    ("prior", "categorical", {"learn": None}),
    ("prior", "categorical", {"components": 3}),
    ("prior", "relaxed-categorical", {"temperature": 0.0}),
    ("prior", "relaxed-categorical", {"temperature": -0.5}),
    ("prior", "relaxed-categorical", {"temperature": math.nan}),
    ("prior", "relaxed-categorical", {"temperature": math.inf}),
    ("prior", "relaxed-categorical", {"temperature": "hot"}),
    ("prior", "relaxed-categorical", {"temperature": True}),
    ("guide", "categorical", {"enumerate": "false"}),
    ("guide", "categorical", {"enumerate": 0}),
    ("guide", "categorical", {"enumerate": "parallel"}),
    ("guide", "relaxed-categorical", {"temperature": 0}),
    ("guide", "relaxed-categorical", {"temperature": "cold"}),
    ("guide", "relaxed-categorical", {"temperature": False}),
    ("guide", "relaxed-categorical", {"tau": 0.5}),
])
def test_bad_options_are_refused_in_one_line(kind, name, options):
    with pytest.raises(ConfigError) as info:
        build(**{kind: name, f"{kind}_options": options})
    assert "\n" not in str(info.value)


def test_guide_capabilities_are_declared():
    categorical = posteriors.CategoricalGuide()
    assert categorical.has_rsample is False and categorical.infer == {}
    assert posteriors.CategoricalGuide(enumerate=True).infer == {"enumerate": "parallel"}
    relaxed = posteriors.RelaxedCategoricalGuide()
    assert relaxed.has_rsample is True and getattr(relaxed, "infer", {}) == {}
    # the attribute agrees with the distribution it builds
    logits = torch.randn(4, CLUSTERS)
    categorical.setup(CLUSTERS)
    relaxed.setup(CLUSTERS)
    assert categorical.distribution(logits).has_rsample is False
    assert relaxed.distribution(logits).has_rsample is True
    # the continuous families declare nothing and read as reparameterized, not enumerated
    for family in ("normal", "full-rank", "flow"):
        guide = posteriors.POSTERIORS[family]()
        assert getattr(guide, "has_rsample", True) and getattr(guide, "infer", {}) == {}


# -- densities ---------------------------------------------------------------------------------
def test_categorical_prior_is_uniform_one_hot_and_learned_logits_match_torch():
    vae = build()
    p = vae.prior.distribution()
    assert p.batch_shape == () and p.event_shape == (CLUSTERS,)
    assert torch.allclose(p.probs, torch.full((CLUSTERS,), 1 / CLUSTERS), rtol=0, atol=FLOAT_EPS)
    z = p.sample((50,))
    assert bool(((z == 0) | (z == 1)).all()) and torch.equal(z.sum(-1), torch.ones(50))
    assert torch.allclose(p.log_prob(torch.eye(CLUSTERS)),
                          torch.full((CLUSTERS,), -math.log(CLUSTERS)), atol=FLOAT_EPS * 4)
    assert list(vae.prior.parameters()) == []
    learned = build(prior_options={"learn": True})
    assert [name for name, _ in learned.prior.named_parameters()] == ["logits"]
    with torch.no_grad():
        learned.prior.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    reference = td.OneHotCategorical(logits=torch.tensor([0.5, -1.0, 2.0]))
    eye = torch.eye(CLUSTERS)
    assert torch.allclose(learned.prior.distribution().log_prob(eye), reference.log_prob(eye),
                          atol=4 * FLOAT_EPS)


def _concrete_log_density(z: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The Concrete density (Maddison et al. 2017, eq. 5), in float64: log p(z) =
    log (n−1)! + (n−1) log τ + Σ_k (log π_k − (τ+1) log z_k) − n log Σ_k π_k z_k^−τ."""
    z, log_pi = z.double(), F.log_softmax(logits.double(), -1)
    n = z.shape[-1]
    return (math.lgamma(n) + (n - 1) * math.log(tau) + (log_pi - (tau + 1) * z.log()).sum(-1)
            - n * (log_pi - tau * z.log()).logsumexp(-1))


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_relaxed_prior_density_is_the_concrete_density(tau):
    vae = build("relaxed-categorical", "relaxed-categorical", prior_options={"temperature": tau})
    p = vae.prior.distribution()
    assert p.batch_shape == () and p.event_shape == (CLUSTERS,)
    torch.manual_seed(2)
    z = p.sample((6, 5))
    reference = td.RelaxedOneHotCategorical(torch.tensor(tau), logits=torch.zeros(CLUSTERS))
    assert torch.allclose(p.log_prob(z), reference.log_prob(z), atol=1e-5)
    # against the paper's formula: float32 log z and logsumexp, relative error ~ C·eps
    by_formula = _concrete_log_density(z, torch.zeros(CLUSTERS), tau)
    assert torch.allclose(p.log_prob(z).double(), by_formula, rtol=1e-5, atol=1e-4)


def test_guide_log_probs_equal_the_torch_distributions_at_the_encoder_output():
    x = gmm_data()
    vae = build()
    logits = vae.encoder(x)
    q = vae.encode(x)
    assert q.batch_shape == (BATCH,) and q.event_shape == (CLUSTERS,)
    z = q.sample((4,))
    assert torch.allclose(q.log_prob(z), td.OneHotCategorical(logits=logits).log_prob(z),
                          atol=1e-6)
    relaxed = build("relaxed-categorical", "relaxed-categorical",
                    guide_options={"temperature": 0.7})
    logits = relaxed.encoder(x)
    q = relaxed.encode(x)
    z = q.sample((4,))
    reference = td.RelaxedOneHotCategorical(torch.tensor(0.7), logits=logits)
    assert torch.allclose(q.log_prob(z), reference.log_prob(z), atol=1e-5)
    assert torch.allclose(q.log_prob(z).double(), _concrete_log_density(z, logits, 0.7),
                          rtol=1e-5, atol=1e-4)


def test_relaxed_families_sample_on_the_simplex_with_gradients_to_the_encoder():
    vae = build("relaxed-categorical", "relaxed-categorical")
    torch.manual_seed(3)
    x = gmm_data()
    # sum of C float32 numbers in [0, 1] after a softmax: rounding below C·eps
    for z in (vae.prior.distribution().sample((200,)), vae.encode(x).sample((25,))):
        assert bool((z >= 0).all())
        assert torch.allclose(z.sum(-1), torch.ones(z.shape[:-1]), rtol=0,
                              atol=CLUSTERS * FLOAT_EPS)
    trace = pyro.poutine.trace(vae.guide).get_trace(x)
    z = trace.nodes["z"]["value"]
    assert z.requires_grad and trace.nodes["z"]["infer"] == {}
    weights = torch.randn(CLUSTERS, generator=torch.Generator().manual_seed(4))
    (z * weights).sum().backward()
    for parameter in vae.encoder.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_posterior_mean_and_samples():
    x = gmm_data()
    vae = gmm()
    assert torch.allclose(vae.posterior_mean(x), F.softmax(vae.encoder(x), -1), atol=1e-6)
    samples = vae.sample(40)  # decoder means at prior draws: the cluster means
    assert samples.shape == (40, DATA_DIM)
    distance = (samples[:, None, :] - MEANS).abs().amax(-1).amin(-1)
    assert bool((distance <= 1e-5).all())
    relaxed = build("relaxed-categorical", "relaxed-categorical")
    mean = relaxed.posterior_mean(x)  # no closed form: the sample mean, still on the simplex
    assert mean.shape == (BATCH, CLUSTERS) and bool((mean > 0).all())
    assert torch.allclose(mean.sum(-1), torch.ones(BATCH), atol=CLUSTERS * FLOAT_EPS)
    assert relaxed.sample(5).shape == (5, DATA_DIM)
    assert relaxed.reconstruct(x).shape == (BATCH, DATA_DIM)


# -- the Gaussian mixture under Pyro's inference ----------------------------------------------
@pytest.mark.parametrize("enumerate", [False, True])
def test_gmm_model_and_guide_trace(enumerate):
    x = gmm_data()
    vae = gmm(enumerate=enumerate)
    guide_trace = pyro.poutine.trace(vae.guide).get_trace(x)
    site = guide_trace.nodes["z"]
    assert site["infer"] == ({"enumerate": "parallel"} if enumerate else {})
    assert site["value"].shape == (BATCH, CLUSTERS)
    assert torch.equal(site["value"].sum(-1), torch.ones(BATCH))
    model_trace = pyro.poutine.trace(
        pyro.poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    assert [f.name for f in model_trace.nodes["x"]["cond_indep_stack"]] == ["data"]
    # the one-hot z selects its cluster mean
    labels = site["value"].argmax(-1)
    assert torch.allclose(model_trace.nodes["x"]["fn"].mean, MEANS[labels], atol=1e-6)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (BATCH,)
    # the continuous guides' sites are as they were: no infer entries
    normal = VAE(DATA_DIM, 2, likelihood="normal", hidden=(4,))
    assert pyro.poutine.trace(normal.guide).get_trace(x).nodes["z"]["infer"] == {}


def test_enumerated_elbo_equals_the_exact_sum_over_clusters():
    x = gmm_data()
    vae = gmm(enumerate=True)
    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x)
    with torch.no_grad():
        q, f = exact_elbo_terms(vae, x)
    exact = (q * f).sum()
    assert math.isfinite(float(loss.detach()))
    # float32 sums of BATCH·C terms of size |f|: relative error ≲ BATCH·C·eps ≈ 3e-6
    assert torch.allclose(-loss.detach(), exact, rtol=1e-5, atol=1e-5)
    # exact gradients reach the encoder although z has no rsample
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in vae.encoder.parameters())


def test_enumerated_elbo_is_the_log_likelihood_at_the_exact_posterior():
    """With q(c|x) = p(c|x) the bound is tight: ELBO = log p(x) = log Σ_c p(c) p(x|c)."""
    x = gmm_data()
    vae = gmm(enumerate=True, exact_posterior=True)
    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    log_likelihood = float(gmm_log_likelihood(x).sum())
    # float32 against float64: relative ~ BATCH·C·eps on the summed terms
    assert abs(-loss - log_likelihood) <= 1e-5 * abs(log_likelihood) + 1e-5


def test_score_function_elbo_runs_and_is_unbiased():
    """TraceGraph_ELBO on the sampled (non-enumerated) guide: its K-particle estimate of the
    ELBO lies within 4 standard errors of the exact value, the standard error computed exactly
    from Var_q[Σ_n f_n] = Σ_n Var_{q(c|x_n)}[f_n(c)] (datapoints drawn independently)."""
    x = gmm_data()
    vae = gmm(enumerate=False)
    particles = 2000
    elbo = pyro.infer.TraceGraph_ELBO(num_particles=particles, vectorize_particles=True,
                                      max_plate_nesting=1)
    pyro.set_rng_seed(5)
    loss = elbo.loss_and_grads(vae.model, vae.guide, x)
    assert math.isfinite(loss)
    with torch.no_grad():
        q, f = exact_elbo_terms(vae, x)
        mean = (q * f).sum(-1)
        variance = (q * (f - mean[:, None]).pow(2)).sum()
    standard_error = float(variance.sqrt()) / math.sqrt(particles)
    assert standard_error > 0
    assert abs(-loss - float(mean.sum())) < 4 * standard_error
    # the score-function term gives the encoder a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
