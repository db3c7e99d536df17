"""The objectives of Rainforth et al. (2018), "Tighter variational bounds are not necessarily
better": ``miwae`` (MIWAE(M, K)), ``ciwae`` (CIWAE_β) and ``piwae`` (PIWAE(M, K)).

Bounds against the exact log p(x) of a linear-Gaussian VAE (3 standard errors over
datapoints); values and gradients against a hand-written plain-torch reference on the same
draws (float64, 1e-5 relative); PIWAE's split of the gradient on a Pyro program with a global
latent, chained local sites and a guide factor, against the package's own IWAE_MK and
MIWAE(M, K); the options through the command line."""

from __future__ import annotations

import json
import math
import statistics

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyro_vae import VAE, load_run
from pyro_vae.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.estimators import compare_estimators
from pyro_vae.objectives import make_objective

from helpers import make_linear_gaussian, set_diagonal_guide


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a − b over datapoints and its standard error."""
    d = (a - b).double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def _bound(problem, name, k, seed, **options) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        bound, _ = make_objective(name, k, **options).per_datapoint_bound(
            problem.vae.model, problem.vae.guide, problem.x)
    return bound.double()


@pytest.fixture
def imperfect():
    """The linear-Gaussian VAE with a guide shifted and too wide: every bound is loose."""
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.3, scale_factor=1.6)
    return problem


# -- bounds against the exact log p(x) ------------------------------------------------------------
@pytest.mark.parametrize("name,options", [("miwae", {"groups": 4}), ("ciwae", {}),
                                          ("ciwae", {"elbo_weight": 0.9}),
                                          ("piwae", {"groups": 4})])
def test_each_bound_is_below_the_exact_log_likelihood(imperfect, name, options):
    exact = imperfect.exact_log_likelihood()
    for k in (1, 5, 50):
        gap, se = _paired(exact, _bound(imperfect, name, k, seed=k, **options))
        assert gap > -3 * se, (name, k, gap, se)


def test_ciwae_lies_between_the_elbo_and_iwae_on_the_same_draws(imperfect):
    # ELBO ≤ IWAE_K on every draw (Jensen), and CIWAE_β is their convex combination.
    k, seed = 8, 3
    elbo = _bound(imperfect, "elbo", k, seed)
    iwae = _bound(imperfect, "iwae", k, seed)
    for weight in (0.0, 0.3, 0.5, 1.0):
        ciwae = _bound(imperfect, "ciwae", k, seed, elbo_weight=weight)
        assert torch.allclose(ciwae, weight * elbo + (1 - weight) * iwae, rtol=0, atol=1e-5)
        assert bool((elbo <= ciwae + 1e-5).all() and (ciwae <= iwae + 1e-5).all())
    assert torch.equal(_bound(imperfect, "ciwae", k, seed, elbo_weight=0.0), iwae)
    assert torch.equal(_bound(imperfect, "ciwae", k, seed, elbo_weight=1.0), elbo)
    # and the ordering is strict for this guide, far beyond the float tolerance
    assert float((iwae - elbo).min()) > 1e-3


def test_miwae_with_one_group_is_iwae_draw_for_draw(imperfect):
    vae, x = imperfect.vae, imperfect.x[:32]
    results = []
    for name in ("iwae", "miwae"):
        pyro.set_rng_seed(7)
        loss = make_objective(name, 6).differentiable_loss(vae.model, vae.guide, x)
        results.append((loss.detach(), torch.autograd.grad(loss, list(vae.parameters()))))
    (iwae_loss, iwae_grads), (miwae_loss, miwae_grads) = results
    assert torch.equal(iwae_loss, miwae_loss)
    assert all(torch.equal(a, b) for a, b in zip(iwae_grads, miwae_grads))
    assert torch.equal(_bound(imperfect, "miwae", 6, 2, groups=1), _bound(imperfect, "iwae", 6, 2))


def test_miwae_expects_iwae_k_below_iwae_mk(imperfect):
    """E MIWAE(M, K) = E IWAE_K (the mean of M independent copies); IWAE_MK, of as many draws,
    is higher, and the exact log p(x) higher still."""
    groups, k = 8, 4
    exact = imperfect.exact_log_likelihood()
    miwae = _bound(imperfect, "miwae", k, seed=11, groups=groups)
    iwae_k = _bound(imperfect, "iwae", k, seed=12)
    iwae_mk = _bound(imperfect, "iwae", groups * k, seed=13)
    difference, se = _paired(miwae, iwae_k)
    assert abs(difference) <= 3 * se, (difference, se)
    gap, se = _paired(iwae_mk, miwae)
    assert gap > 3 * se, (gap, se)
    gap, se = _paired(exact, iwae_mk)
    assert gap > -3 * se, (gap, se)


def test_piwae_reports_iwae_mk_on_the_same_draws(imperfect):
    groups, k = 3, 4
    piwae = _bound(imperfect, "piwae", k, seed=5, groups=groups)
    assert torch.equal(piwae, _bound(imperfect, "iwae", groups * k, seed=5))


# -- gradients against a hand-written reference ---------------------------------------------------
DATA_DIM, LATENT_DIM, SIGMA, MIN_SCALE = 5, 2, 0.7, 1e-4  # MIN_SCALE: the normal guide's default


def _plain_problem(batch: int = 6):
    """Encoder and decoder parameters (float64 leaves) and data, and a VAE holding copies
    (built under float64 as the default dtype, so that its constants are float64 too)."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64))

    params = {"encoder_weight": draw(2 * LATENT_DIM, DATA_DIM, scale=0.4),
              "encoder_bias": draw(2 * LATENT_DIM, scale=0.4),
              "decoder_weight": draw(DATA_DIM, LATENT_DIM),
              "decoder_bias": draw(DATA_DIM)}
    x = draw(batch, DATA_DIM)
    vae = VAE(DATA_DIM, LATENT_DIM, likelihood="normal", likelihood_options={"scale": SIGMA},
              encoder="linear", decoder="linear")
    with torch.no_grad():
        vae.encoder.linear.weight.copy_(params["encoder_weight"])
        vae.encoder.linear.bias.copy_(params["encoder_bias"])
        vae.decoder.linear.weight.copy_(params["decoder_weight"])
        vae.decoder.linear.bias.copy_(params["decoder_bias"])
    return params, x, vae


def _plain_log_weights(params, x, eps):
    """log w = log N(x; W_d z + b_d, σ²I) + log N(z; 0, I) − log q(z|x), with
    z = μ(x) + σ(x) ε and (μ, softplus⁻¹(σ − floor)) = W_e x + b_e: ``[particles, batch]``."""
    out = x @ params["encoder_weight"].T + params["encoder_bias"]
    loc, raw_scale = out[:, :LATENT_DIM], out[:, LATENT_DIM:]
    scale = F.softplus(raw_scale) + MIN_SCALE
    z = loc + scale * eps
    mean = z @ params["decoder_weight"].T + params["decoder_bias"]
    log_likelihood = torch.distributions.Normal(mean, SIGMA).log_prob(x).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_guide = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return log_likelihood + log_prior - log_guide


def _iwae(log_w):
    return (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])).sum()


def _miwae(log_w, groups):
    grouped = log_w.reshape(groups, -1, log_w.shape[-1])
    return (torch.logsumexp(grouped, 1) - math.log(grouped.shape[1])).mean(0).sum()


def _ciwae(log_w, weight):
    return weight * log_w.mean(0).sum() + (1 - weight) * _iwae(log_w)


ENCODER, DECODER = ("encoder_weight", "encoder_bias"), ("decoder_weight", "decoder_bias")
VAE_NAMES = {"encoder_weight": "encoder.linear.weight", "encoder_bias": "encoder.linear.bias",
             "decoder_weight": "decoder.linear.weight", "decoder_bias": "decoder.linear.bias"}


def _reference_gradients(bound, params, x, eps):
    """The value of ``bound(log_w)`` and its autograd gradient for every parameter."""
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    value = bound(_plain_log_weights(leaves, x, eps))
    grads = torch.autograd.grad(value, list(leaves.values()))
    return float(value.detach()), dict(zip(leaves, grads))


def _package_gradients(vae, objective, x, seed, traced):
    pyro.set_rng_seed(seed)
    if traced:
        with pyro.poutine.block():  # any active handler sends the core down the traced path
            loss = objective.differentiable_loss(vae.model, vae.guide, x)
    else:
        loss = objective.differentiable_loss(vae.model, vae.guide, x)
    named = dict(vae.named_parameters())
    grads = torch.autograd.grad(loss, [named[VAE_NAMES[n]] for n in VAE_NAMES])
    # the loss is −bound (scale 1 without num_data)
    return -float(loss.detach()), {name: -g for name, g in zip(VAE_NAMES, grads)}


def _noise(seed, particles, batch):
    """The standard normal draws behind z ~ q(z|x) at ``seed`` (loc 0, scale 1: exactly ε)."""
    pyro.set_rng_seed(seed)
    zero = torch.zeros(batch, LATENT_DIM, dtype=torch.float64)
    return torch.distributions.Normal(zero, 1.0).rsample((particles,))


def _assert_close(actual, expected, names):
    for name in names:
        assert torch.allclose(actual[name], expected[name], rtol=1e-5, atol=1e-10), \
            (name, actual[name], expected[name])


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("traced", [False, True], ids=["fast-path", "traced"])
@pytest.mark.parametrize("groups,k", [(3, 4), (2, 1), (1, 5)])
def test_piwae_gradients_are_iwae_mk_for_the_model_and_miwae_for_the_guide(traced, groups, k):
    params, x, vae = _plain_problem()
    eps = _noise(1, groups * k, x.shape[0])
    value, grads = _package_gradients(vae, make_objective("piwae", k, groups=groups), x, 1,
                                      traced)
    iwae_value, iwae_grads = _reference_gradients(_iwae, params, x, eps)
    _, miwae_grads = _reference_gradients(lambda w: _miwae(w, groups), params, x, eps)
    assert value == pytest.approx(iwae_value, rel=1e-12)  # the same draws, and the value IWAE_MK
    _assert_close(grads, iwae_grads, DECODER)
    _assert_close(grads, miwae_grads, ENCODER)
    if groups > 1 and k > 1:  # the two gradients differ: the test can tell them apart
        for name in ENCODER:
            assert not torch.allclose(miwae_grads[name], iwae_grads[name], rtol=1e-3)


@pytest.mark.parametrize("traced", [False, True], ids=["fast-path", "traced"])
def test_piwae_gradients_stay_finite_when_a_group_lies_far_below_the_others(traced):
    """In float32, with a guide much wider than the posterior: the groups' log mean weights
    differ by hundreds of nats, so IWAE_MK's coefficient a of a whole group underflows to 0
    while MIWAE's b does not. The gradients are still IWAE_MK's and MIWAE's (the hand-written
    ones, float32 on the same draws)."""
    groups, k = 4, 4
    params, x, vae = _plain_problem()
    params = {name: value.float() for name, value in params.items()}
    params["encoder_bias"][LATENT_DIM:] += 25.0  # σ(x) ≈ 25: z lands far out in the prior
    with torch.no_grad():
        vae.encoder.linear.bias.copy_(params["encoder_bias"])
    x = x.float()
    pyro.set_rng_seed(3)
    zero = torch.zeros(x.shape[0], LATENT_DIM)
    eps = torch.distributions.Normal(zero, 1.0).rsample((groups * k,))
    with torch.no_grad():
        grouped = _plain_log_weights(params, x, eps).reshape(groups, k, -1)
        group_bounds = torch.logsumexp(grouped, 1)
        spread = (group_bounds.max(0).values - group_bounds.min(0).values).max()
    assert spread > 200.0  # exp(spread) overflows float32: the case the test is about
    value, grads = _package_gradients(vae, make_objective("piwae", k, groups=groups), x, 3,
                                      traced)
    iwae_value, iwae_grads = _reference_gradients(_iwae, params, x, eps)
    _, miwae_grads = _reference_gradients(lambda w: _miwae(w, groups), params, x, eps)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert value == pytest.approx(iwae_value, rel=1e-5)
    for names, expected in ((DECODER, iwae_grads), (ENCODER, miwae_grads)):
        for name in names:
            assert torch.allclose(grads[name], expected[name], rtol=1e-4, atol=1e-3), \
                (name, grads[name], expected[name])


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("traced", [False, True], ids=["fast-path", "traced"])
@pytest.mark.parametrize("name,options,bound", [
    ("miwae", {"groups": 3}, lambda w: _miwae(w, 3)),
    ("ciwae", {"elbo_weight": 0.3}, lambda w: _ciwae(w, 0.3)),
])
def test_miwae_and_ciwae_gradients_equal_the_hand_written_ones(traced, name, options, bound):
    params, x, vae = _plain_problem()
    k = 4
    particles = k * options.get("groups", 1)
    eps = _noise(2, particles, x.shape[0])
    value, grads = _package_gradients(vae, make_objective(name, k, **options), x, 2, traced)
    expected_value, expected_grads = _reference_gradients(bound, params, x, eps)
    assert value == pytest.approx(expected_value, rel=1e-12)
    _assert_close(grads, expected_grads, ENCODER + DECODER)


# -- PIWAE on a Pyro program: a global latent, chained local sites, a guide factor ----------------
X = torch.tensor([0.4, -1.1, 2.3, 0.9, -0.2])


def model(x):
    theta_loc = pyro.param("theta_loc", torch.tensor(0.3))
    theta_w = pyro.param("theta_w", torch.tensor([0.8, -0.5, 0.4]))
    g = pyro.sample("g", dist.Normal(theta_loc, 1.0))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(g, 1.0))
        z2 = pyro.sample("z2", dist.Normal(theta_w[0] * z1, 1.0))
        pyro.sample("x", dist.Normal(theta_w[1] * z2 + z1 + theta_w[2] * g, 0.8), obs=x)


def make_guide(with_factor: bool):
    def guide(x):
        loc = pyro.param("phi_g_loc", torch.tensor(0.2))
        scale = pyro.param("phi_g_scale", torch.tensor(0.7), constraint=constraints.positive)
        a = pyro.param("phi_a", torch.tensor([0.5, 0.3, 0.2]))
        scales = pyro.param("phi_scales", torch.tensor([0.9, 1.2]),
                            constraint=constraints.positive)
        g = pyro.sample("g", dist.Normal(loc, scale))
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(a[0] * x + a[1] * g, scales[0]))
            # drawn given z1: the path from z2 to φ runs through z1 as well
            z2 = pyro.sample("z2", dist.Normal(a[2] * z1 + 0.3 * x, scales[1]))
            if with_factor:
                factor = pyro.param("phi_factor", torch.tensor(0.15))
                pyro.factor("guide_term", factor * (z1 * z2).tanh(), has_rsample=True)
    return guide


def _program_gradients(name, particles, seed, guide, **options):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = make_objective(name, particles, **options).differentiable_loss(model, guide, X)
    params = dict(pyro.get_param_store().named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss.detach()), dict(zip(params, grads))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain-guide", "guide-factor"])
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_piwae_splits_the_gradient_on_a_program_with_global_latents(with_factor, beta):
    """θ (``theta_*``) gets the gradient of IWAE_MK, φ (``phi_*``) that of MIWAE(M, K), both
    the package's own (an ELBO over the global g plus the local bound given g), on the same
    draws."""
    guide = make_guide(with_factor)
    groups, k, seed = 3, 2, 4
    value, grads = _program_gradients("piwae", k, seed, guide, groups=groups, beta=beta)
    iwae_value, iwae_grads = _program_gradients("iwae", groups * k, seed, guide, beta=beta)
    _, miwae_grads = _program_gradients("miwae", k, seed, guide, groups=groups, beta=beta)
    assert value == pytest.approx(iwae_value, rel=1e-12)
    for name, grad in grads.items():
        expected = (iwae_grads if name.startswith("theta") else miwae_grads)[name]
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-10), (name, grad, expected)
    differ = [n for n in grads if n.startswith("phi")
              and not torch.allclose(miwae_grads[n], iwae_grads[n], rtol=1e-3)]
    assert "phi_g_loc" in differ and "phi_a" in differ


# -- a discrete latent: MIWAE's score-function gradient -------------------------------------------
@pytest.mark.usefixtures("float64")
def test_miwae_score_function_gradient_is_unbiased_with_groups():
    """A Bernoulli guide site (score function, leave-one-out within each group): over R draws
    the mean of MIWAE(2, 2)'s value and gradient is within 3 standard errors (widened for the 3
    quantities checked together, Bonferroni) of the exact E IWAE_2 (MIWAE(2, 2) averages two
    independent copies of it) and its gradient, by enumerating two Bernoulli draws."""
    x = torch.tensor([0.8, -1.3])

    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=x)

    def discrete_guide(x):
        q = pyro.param("q", torch.tensor([0.6, 0.45]), constraint=constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(q))

    def exact_loss():
        q = pyro.param("q")
        values = torch.tensor([0.0, 1.0])
        first, second = torch.meshgrid(values, values, indexing="ij")

        def log_w(c, b):
            return (dist.Bernoulli(0.3).log_prob(c) + dist.Normal(2 * c - 1, 1.0).log_prob(x[b])
                    - dist.Bernoulli(q[b]).log_prob(c))

        total = 0.0
        for b in range(x.shape[0]):
            probability = dist.Bernoulli(q[b]).log_prob(first).exp() * \
                dist.Bernoulli(q[b]).log_prob(second).exp()
            bound = torch.logsumexp(torch.stack([log_w(first, b), log_w(second, b)]), 0) - \
                math.log(2)
            total = total + (probability * bound).sum()
        return -total

    pyro.clear_param_store()
    objective = make_objective("miwae", 2, groups=2)
    replicates, samples = 400, []
    for seed in range(replicates):
        pyro.set_rng_seed(seed)
        loss = objective.differentiable_loss(discrete_model, discrete_guide, x)
        (grad,) = torch.autograd.grad(loss, [pyro.get_param_store().get_param("q").unconstrained()])
        samples.append(torch.cat([loss.detach().reshape(1), grad]))
    samples = torch.stack(samples)
    expected = exact_loss()
    (expected_grad,) = torch.autograd.grad(expected, [pyro.param("q").unconstrained()])
    target = torch.cat([expected.detach().reshape(1), expected_grad])
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(replicates)
    limit = statistics.NormalDist().inv_cdf(1 - 0.0027 / (2 * 3))
    assert bool(((mean - target).abs() <= limit * se).all()), (mean, target, se)
    assert bool((expected_grad.abs() > 3 * se[1:]).all())  # a gradient the test can see


# -- options and refusals -------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: make_objective("miwae", groups=0), "groups must be a positive integer"),
    (lambda: make_objective("piwae", groups=True), "groups must be a positive integer"),
    (lambda: make_objective("miwae", groups=2.0), "groups must be a positive integer"),
    (lambda: make_objective("ciwae", elbo_weight=1.5), "elbo_weight must be a number from 0"),
    (lambda: make_objective("ciwae", elbo_weight=float("nan")), "from 0 to 1"),
    (lambda: make_objective("iwae", groups=2), "groups applies to objectives 'miwae' and"),
    (lambda: make_objective("miwae", elbo_weight=0.5), "elbo_weight applies to objective"),
    (lambda: make_objective("miwae", particles=0, groups=2), "particles must be a positive"),
    (lambda: make_objective("piwae", free_bits=0.5), "does not support free bits"),
    (lambda: make_objective("ciwae", free_bits=0.5), "does not support free bits"),
])
def test_options_that_cannot_work_are_refused_in_one_line(call, match):
    with pytest.raises(ConfigError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.usefixtures("float64")
def test_piwae_refuses_a_discrete_guide_site_in_one_line():
    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def discrete_guide(x):
        probs = pyro.param("probs", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(probs))

    with pytest.raises(ConfigError, match="'c' is not reparameterizable.*piwae") as error:
        make_objective("piwae", 2, groups=2).loss(discrete_model, discrete_guide, X)
    assert "\n" not in str(error.value)


def test_train_records_groups_and_elbo_weight_and_load_run_rebuilds_them(tmp_path):
    runs = {"miwae": ["--groups", "2", "--particles", "3"],
            "piwae": ["--groups", "2", "--particles", "2"],
            "ciwae": ["--elbo-weight", "0.25", "--particles", "3"]}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(["train", "--objective", name, *flags, "--epochs", "1", "--hidden", "16",
                     "--latent-dim", "2", "--quiet", "--eval-particles", "0",
                     "--out", str(out)]) == 0
        training = json.loads((out / "config.json").read_text())["training"]
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert math.isfinite(row["train_loss"])
        config = load_run(out).config["training"]
        objective = make_objective(config["objective"], config["particles"],
                                   groups=config["groups"], elbo_weight=config["elbo_weight"])
        if name == "ciwae":
            assert training["elbo_weight"] == 0.25 and training["groups"] is None
            assert objective.elbo_weight == 0.25 and objective.num_particles == 3
        else:
            assert training["groups"] == 2 and training["elbo_weight"] is None
            assert objective.groups == 2 and objective.num_particles == 2 * training["particles"]


def test_compare_estimators_snr_of_piwae_is_iwae_mk_for_the_decoder_and_miwae_for_the_encoder(
        imperfect):
    """Rainforth et al. (2018): on the same draws PIWAE(M, K)'s decoder gradients are those of
    IWAE_MK and its encoder gradients those of MIWAE(M, K), so are their SNRs; MIWAE's encoder
    SNR is above IWAE_MK's."""
    x, groups, k = imperfect.x[:8], 8, 8
    options = dict(repeats=200, timing_repeats=1, seed=3)
    iwae = compare_estimators(imperfect.vae, x, ("iwae",), (groups * k,), **options)[0]
    grouped = compare_estimators(imperfect.vae, x, ("piwae", "miwae"), (k,), groups=groups,
                                 **options)
    piwae, miwae = grouped
    assert piwae["bound"] == pytest.approx(iwae["bound"], rel=1e-6)
    assert piwae["decoder_snr"] == pytest.approx(iwae["decoder_snr"], rel=1e-4)
    assert piwae["encoder_snr"] == pytest.approx(miwae["encoder_snr"], rel=1e-4)
    assert miwae["encoder_snr"] > iwae["encoder_snr"]
