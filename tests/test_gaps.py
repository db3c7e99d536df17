"""Naive Monte Carlo from the prior and the amortization gap, against exact answers on
linear-Gaussian (probabilistic PCA) VAEs and hand-written Pyro models."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae import evaluate, log_weights
from pyro_vae.errors import ConfigError
from pyro_vae.gaps import amortization_gaps, naive_log_likelihood, prior_guide, refine
from pyro_vae.lvm import data_plate, program

from helpers import make_linear_gaussian, set_diagonal_guide

#: float32 rounding of a log-density of a few nats summed over a handful of terms (as in
#: test_exactness, where the exact posterior's weights agree with log p(x) to this)
FLOAT32 = 2e-4


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# -- naive Monte Carlo ----------------------------------------------------------------------------
def test_naive_estimate_is_within_its_standard_error_of_the_exact_log_likelihood():
    # latent_dim 2: the weights p(x|z) are bounded, and their relative variance
    # χ²(p(z|x) ‖ p(z)) is about 10 here, so at K = 20000 the delta-method SE is ≈ 0.02–0.1 and
    # the log-of-a-mean bias, ≈ se²/2, is below a tenth of the SE: the errors (est − exact)/se
    # are then close to standard normal.
    problem = make_linear_gaussian()
    x = problem.x[:200]
    estimate = naive_log_likelihood(problem.vae, x, particles=20000)
    exact = problem.exact_log_likelihood(x)
    se = estimate.log_likelihood_mc_se.double()
    assert (se > 0).all() and (estimate.ess < 20000).all()  # the prior is no posterior
    z = (estimate.log_likelihood.double() - exact) / se
    n = z.shape[0]
    # P(|Z| > 3) = 0.27 %: at least 95 % of the datapoints inside 3 SE
    assert float((z.abs() < 3).double().mean()) >= 0.95, z
    # the mean of n independent standard normals is N(0, 1/n)
    assert abs(float(z.mean())) < 3 / math.sqrt(n), float(z.mean())
    # and the SE is not inflated: the sample SD of n normals is 1 ± 1/sqrt(2n) (0.05 here)
    assert 0.7 < float(z.std()) < 1.3, float(z.std())
    assert estimate.summary["particles"] == 20000 and estimate.summary["num_datapoints"] == n
    assert estimate.summary["mean_ess"] == pytest.approx(float(estimate.ess.mean()))


def test_naive_ess_collapses_with_the_latent_dimension_while_iwae_stays_accurate():
    # The ESS fraction is ≈ 1 / (1 + χ²(p(z|x) ‖ p(z))), and χ² + 1 is a product over latent
    # dimensions of exp(m²/(2 − v)) / sqrt(v(2 − v)) ≥ 1/sqrt(v(2 − v)) ≥ 1.67, the posterior
    # variance v ≤ σ²/(1 + σ²) = 0.2 (σ = 0.5, every column of W of norm ≥ 1): each doubling of
    # the dimension divides the ESS fraction by at least 1.67.
    particles = 2000
    fractions = []
    for latent_dim in (1, 2, 4, 8):
        problem = make_linear_gaussian(data_dim=16, latent_dim=latent_dim, num_data=100)
        exact = problem.exact_log_likelihood()
        naive = naive_log_likelihood(problem.vae, problem.x, particles=particles)
        fractions.append(naive.summary["ess_fraction"])
        # a guide near the posterior (shifted and widened): IWAE within 3 MC SE of log p(x),
        # its bias ≈ se²/2 per datapoint taken out as in test_exactness
        set_diagonal_guide(problem, loc_shift=0.1, scale_factor=1.3)
        iwae = evaluate(problem.vae, problem.x, particles=particles)
        difference = float(iwae.log_likelihood.double().mean() - exact.mean())
        bias = float(iwae.log_likelihood_mc_se.pow(2).mean() / 2)
        mc_se = iwae.summary["log_likelihood_mc_se"]
        assert abs(difference + bias) <= 3 * mc_se, (latent_dim, difference, mc_se)
        assert float(iwae.ess.mean()) / particles > fractions[-1]
    for wider, narrower in zip(fractions, fractions[1:]):
        assert narrower < wider / 1.67, fractions
    # at 8 dimensions the few weights that count miss the posterior's mass: the estimate falls
    # many of its own reported standard errors below log p(x)
    shortfall = float((exact - naive.log_likelihood.double()).mean())
    assert shortfall > 3 * naive.summary["log_likelihood_mc_se"], (shortfall, naive.summary)


def _two_layer(data_dim: int = 4):
    """z2 ~ N(0, I₂), z1 | z2 ~ N(A z2, 0.5² I₃), x | z1 ~ N(decoder(z1), 0.3² I)."""
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(3, 2, generator=generator)
    decoder = nn.Linear(3, data_dim)

    def model(x, num_data=None):
        pyro.module("two_layer.decoder", decoder)
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ A.T, 0.5).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z1), 0.3).to_event(1), obs=x)

    return model, decoder, A


def test_prior_guide_of_a_two_layer_model_weighs_by_the_likelihood_alone():
    model, decoder, A = _two_layer()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    guide = prior_guide(model)
    trace = pyro.poutine.trace(guide).get_trace(x)
    sites = {name: site for name, site in trace.nodes.items()
             if site["type"] != "args" and not site_is_subsample(site)}
    # exactly the model's latent sites, with the model's distributions; no data, no parameters
    assert all(site["type"] != "param" for site in sites.values())
    assert [n for n, s in sites.items() if s["type"] == "sample"] == ["z2", "z1"]
    z1, z2 = sites["z1"], sites["z2"]
    assert torch.equal(z1["fn"].base_dist.loc, z2["value"] @ A.T)
    assert torch.equal(z1["fn"].base_dist.scale, torch.full((5, 3), 0.5))
    assert torch.equal(z2["fn"].base_dist.loc, torch.zeros(5, 2))

    pyro.set_rng_seed(0)
    with torch.no_grad():
        weights = log_weights(model, guide, x, particles=7)
    value = weights.sites["z1"].value  # [7, 5, 3]
    assert value.shape == (7, 5, 3) and weights.sites["z2"].value.shape == (7, 5, 2)
    by_hand = dist.Normal(decoder(value), 0.3).to_event(1).log_prob(x)
    assert torch.allclose(weights.total(), by_hand, atol=1e-5)
    assert torch.equal(weights.log_prior, weights.log_guide)  # log p(z) − log q(z) = 0 exactly


def test_naive_estimate_combines_particle_chunks_exactly():
    # the chunks' log-sum-exps combined with logaddexp are the log-sum-exp of all the weights
    model, decoder, _ = _two_layer()
    lvm = program(model, lambda x, num_data=None: None, modules={"decoder": decoder})
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    estimate = naive_log_likelihood(lvm, x, particles=10, chunk=4, seed=7)
    guide = prior_guide(lvm.model)
    torch.manual_seed(7)
    with torch.no_grad(), pyro.validation_enabled(False):
        log_w = torch.cat([log_weights(lvm.model, guide, x, particles=k).total()
                           for k in (4, 4, 2)])
    expected = torch.logsumexp(log_w, 0) - math.log(10)
    ess = torch.logsumexp(log_w, 0).mul(2).sub(torch.logsumexp(2 * log_w, 0)).exp()
    assert torch.allclose(estimate.log_likelihood, expected, atol=1e-5)
    assert torch.allclose(estimate.ess, ess, rtol=1e-4)
    assert torch.allclose(estimate.log_likelihood_mc_se, ((10 / ess - 1) / 10).sqrt(), atol=1e-5)
    # seeded: the same seed gives the same numbers, and the caller's random state is untouched
    state = torch.get_rng_state()
    again = naive_log_likelihood(lvm, x, particles=10, chunk=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.log_likelihood, estimate.log_likelihood)


def test_naive_estimate_runs_the_model_in_eval_mode_and_restores_its_mode():
    # 8 datapoints × 100 particles is more than one probe: the memory plan measures passes too
    model, decoder, _ = _two_layer()
    modes = []

    class Recorder(nn.Module):
        def forward(self, z):
            modes.append(self.training)
            return decoder(z)

    recorder = Recorder()

    def recorded(x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(recorder(z), 0.3).to_event(1), obs=x)

    lvm = program(recorded, lambda x, num_data=None: None, modules={"recorder": recorder})
    lvm.train()
    naive_log_likelihood(lvm, torch.zeros(8, 4), particles=100)
    assert modes and not any(modes) and lvm.training and recorder.training


def test_prior_guide_sums_out_an_enumerated_site_exactly():
    # x ~ Σ_c π_c N(μ_c, I): with the mixture index c as the only latent, each weight sums c
    # out, Σ_c π_c N(x; μ_c, I) = p(x): every weight equals p(x), the ESS is K, the SE zero.
    probs = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([[-2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])

    def model(x, num_data=None):
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(means[c], 1.0).to_event(1), obs=x)

    lvm = program(model, lambda x, num_data=None: None)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4)) * 2
    estimate = naive_log_likelihood(lvm, x, particles=50)
    components = dist.Normal(means, 1.0).to_event(1).log_prob(x.unsqueeze(1))  # [8, 3]
    exact = torch.logsumexp(components + probs.log(), -1)
    assert torch.allclose(estimate.log_likelihood, exact, atol=1e-5)
    assert torch.allclose(estimate.ess, torch.full((8,), 50.0), rtol=1e-4)


# -- refinement -----------------------------------------------------------------------------------
def _shift_kl(problem, shift: float) -> float:
    """KL(N(m + δ, V) ‖ N(m, V)) = Σ_i δ²/(2 V_ii) for the diagonal exact posterior N(m, V)."""
    _, _, cov = problem.exact_posterior()
    return float((shift**2 / (2 * cov.diagonal())).sum())


def _state(module: nn.Module):
    return {name: (p.detach().clone(), p.requires_grad) for name, p in module.named_parameters()}


def _assert_unchanged(module: nn.Module, before) -> None:
    after = _state(module)
    assert after.keys() == before.keys()
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), name  # bit-identical
        assert after[name][1] == flag, name


@pytest.mark.usefixtures("float64")
def test_refinement_recovers_the_exact_posterior_and_the_closed_form_amortization_gap():
    # W has orthogonal columns, so the posterior is a diagonal Gaussian: the best diagonal guide
    # is the posterior itself, KL(q* ‖ p(z|x)) = 0 and ELBO(q*) = log p(x). The encoder is
    # shifted by δ = 0.5 in every dimension, so ELBO(q) = log p(x) − Σ_i δ²/(2 V_ii) and the
    # amortization gap is that KL (2.75 nats). In float64 the only error left is Monte Carlo
    # (and rounding, 1e-9 here): near the posterior the refined weights' spread is
    # sqrt(2 KL(q* ‖ p)) and their mean log p(x) − KL, so the refined ELBO is within 3 SE of
    # log p(x) as long as the residual KL < 18/K, and its errors are then ≈ standard normal.
    problem = make_linear_gaussian()
    shift = 0.5
    set_diagonal_guide(problem, loc_shift=shift)
    vae, x = problem.vae, problem.x[:100]
    vae.decoder.linear.bias.requires_grad_(False)  # requires_grad flags come back as they were
    before = _state(vae)
    result = refine(vae, x, steps=200, lr=0.05, objective="stl", eval_particles=1000)
    _assert_unchanged(vae, before)
    assert "forward" not in vae.encoder.__dict__ and vae.training

    exact = problem.exact_log_likelihood(x)
    error, se = result.elbo - exact, result.elbo_se
    assert result.elbo.dtype == torch.float64
    assert float((error.abs() <= 3 * se + 1e-9).double().mean()) >= 0.95, error / se
    # the sum of n independent errors against its own standard error
    assert abs(float(error.sum())) <= 3 * float(se.pow(2).sum().sqrt()) + 100 * 1e-9
    kl = _shift_kl(problem, shift)
    assert kl == pytest.approx(2.75, rel=1e-6)
    amortized = (result.amortized_elbo.double() - (exact - kl)) / result.amortized_elbo_se.double()
    assert float((amortized.abs() < 3).double().mean()) >= 0.95
    gap_z = (result.amortization_gap.double() - kl) / result.amortization_gap_se.double()
    n = gap_z.shape[0]
    assert float((gap_z.abs() < 3).double().mean()) >= 0.95, gap_z
    assert abs(float(gap_z.mean())) < 3 / math.sqrt(n), float(gap_z.mean())
    assert (result.amortization_gap > -3 * result.amortization_gap_se).all()
    # the refined guide is the posterior: its locations are the exact posterior means
    A, b, cov = problem.exact_posterior()
    loc = result.encoder_output[:, :2]
    assert torch.allclose(loc, x @ A.T + b, atol=1e-3)


def test_default_refinement_closes_the_gap_of_a_shifted_encoder():
    # the default gradient (the ELBO's, one particle, Adam with a decaying step) leaves a
    # residual KL of a few hundredths of a nat: each datapoint's gap still within 3 SE
    # (≈ 0.07: the amortized weights' spread sqrt(2 · 2.75)/sqrt(K)) of the closed-form KL
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.5)
    result = refine(problem.vae, problem.x[:100], steps=200)
    kl = _shift_kl(problem, 0.5)
    gap_z = (result.amortization_gap.double() - kl) / result.amortization_gap_se.double()
    assert float((gap_z.abs() < 3).double().mean()) >= 0.95, gap_z
    assert result.summary["amortization_gap"] == pytest.approx(
        float(result.amortization_gap.mean()))


def _scalar_program():
    """z ~ N(0, 1), x | z ~ N(z, 1), so p(z|x) = N(x/2, 1/2) and p(x) = N(x; 0, 2); the guide
    holds its encoder in a closure and calls it on x for a (loc, raw scale) pair, set to N(0, 1)
    for every x, off the posterior by KL(N(0, 1) ‖ N(x/2, 1/2)) = x²/4 + (1 − log 2)/2."""
    linear = nn.Linear(1, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.0, math.log(math.e - 1)]))  # softplus⁻¹(1)

    class Encoder(nn.Module):
        def forward(self, x):
            return tuple(linear(x).split(1, dim=-1))

    encoder = Encoder()

    def model(x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, num_data=None):
        loc, raw = encoder(x)
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))

    lvm = program(model, guide, modules={"linear": linear}, encoder=encoder)
    x = torch.linspace(-3, 3, 40).unsqueeze(-1)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x.squeeze(-1))
    kl = x.squeeze(-1) ** 2 / 4 + (1 - math.log(2)) / 2
    return lvm, encoder, x, exact, kl


@pytest.mark.usefixtures("float64")
def test_refinement_of_a_hand_written_program_whose_encoder_returns_a_tuple():
    # refined, each datapoint's guide is its posterior N(x/2, 1/2): ELBO within 3 SE of log p(x)
    lvm, encoder, x, exact, kl = _scalar_program()
    before = _state(lvm)
    result = refine(lvm, x, steps=300, lr=0.05, objective="stl", eval_particles=1000)
    _assert_unchanged(lvm, before)
    assert "forward" not in encoder.__dict__
    assert isinstance(result.encoder_output, tuple)
    loc, raw = result.encoder_output
    assert torch.allclose(loc, x / 2, atol=1e-3)
    assert torch.allclose(nn.functional.softplus(raw), torch.full((40, 1), math.sqrt(0.5)),
                          atol=1e-3)
    error, se = result.elbo - exact, result.elbo_se
    assert float((error.abs() <= 3 * se + 1e-9).double().mean()) >= 0.95, error / se
    gap_z = (result.amortization_gap - kl) / result.amortization_gap_se
    assert float((gap_z.abs() < 3).double().mean()) >= 0.95, gap_z


def test_no_steps_leave_the_amortized_guide_and_a_gap_of_exactly_zero():
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.3)
    result = refine(problem.vae, problem.x[:20], steps=0, eval_particles=100)
    assert torch.equal(result.elbo, result.amortized_elbo)
    assert torch.equal(result.amortization_gap, torch.zeros(20))
    encoded = problem.vae.encoder_output(problem.x[:20]).detach()
    assert torch.equal(result.encoder_output, encoded)


def test_amortization_gaps_decompose_the_inference_gap():
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.5)
    x = problem.x[:50]
    exact = problem.exact_log_likelihood(x)
    problem.vae.exact_log_likelihood = problem.exact_log_likelihood
    gaps = amortization_gaps(problem.vae, x, particles=1000, steps=200, objective="stl")
    assert gaps.exact and torch.equal(gaps.log_likelihood_se, torch.zeros(50))
    assert torch.allclose(gaps.log_likelihood.double(), exact, atol=1e-5)
    # the family holds the posterior: no approximation gap, only float32 rounding and MC error
    inside = gaps.approximation_gap.abs() <= 3 * gaps.approximation_gap_se + FLOAT32
    assert float(inside.double().mean()) >= 0.95, gaps.approximation_gap
    kl = _shift_kl(problem, 0.5)
    gap_z = (gaps.amortization_gap.double() - kl) / gaps.amortization_gap_se.double()
    assert float((gap_z.abs() < 3).double().mean()) >= 0.95
    assert torch.allclose(gaps.inference_gap, gaps.approximation_gap + gaps.amortization_gap,
                          atol=1e-5)
    assert gaps.summary["exact"] is True


def test_a_linear_gaussian_vae_gets_its_exact_log_likelihood_from_pyro_vae_exact():
    exact_module = pytest.importorskip("pyro_vae.exact")
    problem = make_linear_gaussian()
    x = problem.x[:10]
    gaps = amortization_gaps(problem.vae, x, particles=10, steps=0)
    assert gaps.exact
    assert torch.allclose(gaps.log_likelihood.double(), problem.exact_log_likelihood(x),
                          atol=1e-5)
    assert torch.allclose(gaps.log_likelihood,
                          exact_module.exact_log_likelihood(problem.vae, x).float())


def test_without_a_closed_form_log_likelihood_is_the_amortized_iwae_estimate():
    # the IWAE estimate is biased low by ≈ se²/2 per datapoint; with that taken out the mean
    # over datapoints is within 3 MC SE of the exact mean; the approximation gap (here the whole
    # gap: no refinement) is then the IWAE estimate minus the ELBO
    lvm, _, x, exact, kl = _scalar_program()
    gaps = amortization_gaps(lvm, x, particles=1000, steps=0)
    assert not gaps.exact
    se = gaps.log_likelihood_se.double()
    assert (se > 0).all()
    difference = float((gaps.log_likelihood.double() - exact).mean())
    bias = float(se.pow(2).mean() / 2)
    assert abs(difference + bias) <= 3 * float(se.pow(2).sum().sqrt() / 40)
    assert torch.equal(gaps.amortization_gap, torch.zeros(40))
    assert torch.equal(gaps.approximation_gap, gaps.log_likelihood - gaps.elbo)
    gap_z = (gaps.inference_gap.double() - kl) / gaps.inference_gap_se.double()
    assert float((gap_z.abs() < 3).double().mean()) >= 0.95, gap_z


def test_refinement_restores_the_model_when_it_fails():
    problem = make_linear_gaussian()
    vae = problem.vae
    before = _state(vae)
    calls = {"n": 0}
    distribution = vae.likelihood.distribution

    def failing(*args, **kwargs):
        if "forward" in vae.encoder.__dict__:  # refining: the lookup is in place
            assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("stop")
        return distribution(*args, **kwargs)

    vae.likelihood.distribution = failing
    with pytest.raises(RuntimeError, match="stop"):
        refine(vae, problem.x[:10], steps=10)
    assert calls["n"] == 4
    del vae.likelihood.distribution
    _assert_unchanged(vae, before)
    assert "forward" not in vae.encoder.__dict__ and vae.training
    assert torch.equal(vae.encoder_output(problem.x[:3]),
                       vae.encoder.linear(problem.x[:3]))


# -- one-line refusals -----------------------------------------------------------------------------
def _observed_only():
    def model(x, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)
    return program(model, lambda x, num_data=None: None)


def _global_latent():
    def model(x, num_data=None):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(g, 1.0).expand([2]).to_event(1), obs=x)
    return program(model, lambda x, num_data=None: None)


def test_bad_inputs_are_refused_in_one_line():
    problem = make_linear_gaussian()
    vae, x = problem.vae, problem.x[:4]
    with pytest.raises(ConfigError) as error:
        naive_log_likelihood(vae, x, particles=0)
    assert "particles" in one_line(error)
    with pytest.raises(ConfigError) as error:
        naive_log_likelihood(vae, x, chunk=0)
    assert "chunk" in one_line(error)
    with pytest.raises(ConfigError) as error:
        refine(vae, x, particles=0)
    assert "particles" in one_line(error)
    with pytest.raises(ConfigError) as error:
        refine(vae, x, eval_particles=0)
    assert "eval_particles" in one_line(error)
    with pytest.raises(ConfigError) as error:
        refine(vae, x, steps=-1)
    assert "steps" in one_line(error)
    with pytest.raises(ConfigError) as error:
        refine(vae, x, lr=0.0)
    assert "learning rate" in one_line(error)
    with pytest.raises(ConfigError) as error:
        refine(vae, x, objective="iwae")
    assert "iwae" in one_line(error)
    with pytest.raises(ConfigError) as error:
        naive_log_likelihood(vae, torch.zeros(3, 5))
    assert "data_dim" in one_line(error)

    with pytest.raises(ConfigError) as error:
        refine(_global_latent(), torch.zeros(3, 2))
    assert "encoder" in one_line(error) and "refine_steps" in one_line(error)
    with pytest.raises(ConfigError) as error:
        naive_log_likelihood(_observed_only(), torch.zeros(3, 2))
    assert "no latent sites" in one_line(error)
    with pytest.raises(ConfigError) as error:
        naive_log_likelihood(_global_latent(), torch.zeros(3, 2))
    assert "'g'" in one_line(error) and "outside plate 'data'" in one_line(error)
    with pytest.raises(ConfigError) as error:
        prior_guide(42)
    one_line(error)


@pytest.mark.usefixtures("float64")
def test_the_refined_elbo_is_scored_on_draws_the_refinement_did_not_see():
    """Refined with one particle per step, the guide has fitted the noise of its own draws: scored
    on those same draws its ELBO would come out high. Scored on fresh draws it is log p(x) minus
    the refined guide's closed-form KL to the exact posterior, within 3 standard errors."""
    from pyro_vae.exact import linear_gaussian

    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.5)
    vae, x = problem.vae, problem.x[:60]
    steps = particles = 300
    result = refine(vae, x, steps=steps, lr=0.01, objective="elbo", eval_particles=particles)
    q = vae.guide_family.distribution(result.encoder_output)
    kl = linear_gaussian(vae).kl_from(q, x).value
    error = (problem.exact_log_likelihood(x) - result.elbo.double()) - kl
    se = float(result.elbo_se.double().pow(2).sum().sqrt()) / x.shape[0]
    assert abs(float(error.mean())) < 3 * se, (float(error.mean()), se)
