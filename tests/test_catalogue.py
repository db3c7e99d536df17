"""The catalogue models (pyro_vae.catalogue) against hand computations of their weights.

For fixed draws (the latent values a traced run of the guide produced), each model's
log-weights are recomputed here from the networks and the densities written out as formulas,

    log N(z; μ, σ) = Σ_d [−½((z_d − μ_d)/σ_d)² − log σ_d − ½ log 2π],  σ = softplus(ρ) + 10⁻⁴,
    log Bernoulli(x; sigmoid(l)) = Σ_d [x_d log sigmoid(l_d) + (1 − x_d) log sigmoid(−l_d)],

in float64, where the two agree to rounding (1e-10 on sums of a few dozen terms). The
mixture VAE must equal, weight for weight, the VAE whose ``mog`` prior is its marginal; M2's
per-datapoint bound must equal the explicit loop over classes. Training is checked by the bound
on held-out digits: it must rise by more than three paired standard errors (a chance of about
1/700 to pass without any real improvement, for normally distributed differences).
"""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_vae import VAE, log_weights, make_objective
from pyro_vae.catalogue import MIN_SCALE, HierarchicalVAE, MixtureVAE, SemiSupervisedVAE
from pyro_vae.errors import ConfigError, DataError

EXACT = 1e-10


def log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def loc_scale(output):
    loc, raw = output.chunk(2, dim=-1)
    return loc, F.softplus(raw) + MIN_SCALE


def log_bernoulli(x, logits):
    return (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)


def log_mean_exp(values, dim=0):
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def bound_and_weights(model, x, y, objective, particles, seed=0):
    """The objective's per-datapoint bound, and the log-weights of the same draws."""
    pyro.set_rng_seed(seed)
    bound, _ = make_objective(objective, particles).per_datapoint_bound(model.model, model.guide,
                                                                      x, y)
    pyro.set_rng_seed(seed)
    weights = log_weights(model.model, model.guide, x, y, particles=particles)
    return bound, weights


# -- the hierarchical VAE -------------------------------------------------------------------------
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("latent_dims", [(3,), (3, 2), (4, 3, 2)])
@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("iwae", 4)])
def test_hierarchical_weights_equal_the_hand_computation(latent_dims, objective, particles):
    """log w = log p(z_L) + Σ_l log p(z_l | z_{l+1}) + log p(x | z_1) − log q(z_1 | x)
    − Σ_l log q(z_l | z_{l−1}), each factor from its network; the objective's bound is the
    mean (elbo) or log-mean-exp (iwae) of these weights over the particles."""
    torch.manual_seed(0)
    model = HierarchicalVAE(5, latent_dims, hidden=[(4,)] * len(latent_dims))
    x = torch.rand(6, 5)
    bound, weights = bound_and_weights(model, x, None, objective, particles)
    z = [weights.sites[f"z{l}"].value.reshape(particles, 6, -1)
         for l in range(1, len(latent_dims) + 1)]
    with torch.no_grad():
        top = z[-1]
        expected = log_normal(top, torch.zeros_like(top), torch.ones_like(top))
        for l in range(len(latent_dims) - 1):              # p(z_{l+1} | z_{l+2}), 0-based
            expected += log_normal(z[l], *loc_scale(model.decoders[l + 1](z[l + 1])))
        expected += log_bernoulli(x, model.decoders[0](z[0]))
        below = [x.expand(particles, 6, 5), *z[:-1]]
        for l in range(len(latent_dims)):                  # q(z_{l+1} | layer below)
            expected -= log_normal(z[l], *loc_scale(model.encoders[l](below[l])))
    assert torch.allclose(weights.total().detach(), expected, rtol=0, atol=EXACT)
    reduced = expected.mean(0) if objective == "elbo" else log_mean_exp(expected)
    assert torch.allclose(bound.detach(), reduced, rtol=0, atol=EXACT)


def test_the_default_hierarchy_is_burdas_architecture():
    """latent 100-50: 200-200 tanh between x and z1, 100-100 between z1 and z2, both ways."""
    model = HierarchicalVAE(784)
    widths = [[layer.out_features for layer in net.net if isinstance(layer, torch.nn.Linear)]
              for net in (*model.encoders, *model.decoders)]
    assert widths == [[200, 200, 200], [100, 100, 100], [200, 200, 784], [100, 100, 200]]
    assert all(isinstance(layer, torch.nn.Tanh) for net in model.encoders
               for layer in net.net if not isinstance(layer, torch.nn.Linear))
    assert model.config["hidden"] == [[200, 200], [100, 100]]


# -- the mixture VAE ------------------------------------------------------------------------------
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("learn_weights", [True, False])
@pytest.mark.parametrize("particles", [1, 4])
def test_the_mixture_equals_the_vae_with_its_marginal_as_prior(learn_weights, particles):
    """With c summed out in the model, log w = log p(x|z) + log Σ_c π_c N(z; μ_c, σ_c²)
    − log q(z|x): the weights of VAE(prior="mog") holding the same parameters, at the same z."""
    torch.manual_seed(1)
    mixture = MixtureVAE(5, latent_dim=3, clusters=4, hidden=(6,), learn_weights=learn_weights)
    with torch.no_grad():  # away from the initial, symmetric values
        for parameter in mixture.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    vae = VAE(5, 3, prior="mog", prior_options={"components": 4}, hidden=(6,))
    vae.encoder.load_state_dict(mixture.encoder.state_dict())
    vae.decoder.load_state_dict(mixture.decoder.state_dict())
    with torch.no_grad():
        vae.prior.logits.copy_(mixture.mixture.logits)
        vae.prior.locs.copy_(mixture.mixture.locs)
        vae.prior.raw_scales.copy_(mixture.mixture.raw_scales)
    x = torch.rand(7, 5)
    pyro.set_rng_seed(3)
    ours = log_weights(mixture.model, mixture.guide, x, particles=particles)
    pyro.set_rng_seed(3)
    theirs = log_weights(vae.model, vae.guide, x, particles=particles)
    z = ours.sites["z"].value.reshape(particles, 7, 3)
    assert torch.equal(z, theirs.sites["z"].value.reshape(particles, 7, 3))
    assert torch.allclose(ours.total(), theirs.total(), rtol=0, atol=EXACT)
    with torch.no_grad():  # the marginal by hand: a loop over the clusters
        pi = mixture.mixture.logits.softmax(-1)
        scales = F.softplus(mixture.mixture.raw_scales) + MIN_SCALE
        marginal = torch.logsumexp(torch.stack([
            pi[c].log() + log_normal(z, mixture.mixture.locs[c], scales[c]) for c in range(4)]), 0)
        expected = (log_bernoulli(x, mixture.decoder(z)) + marginal
                    - log_normal(z, *loc_scale(mixture.encoder(x))))
    assert torch.allclose(ours.total().detach(), expected, rtol=0, atol=EXACT)


@pytest.mark.usefixtures("float64")
def test_cluster_probabilities_are_the_posterior_of_c_at_the_guide_mean():
    torch.manual_seed(2)
    mixture = MixtureVAE(5, latent_dim=3, clusters=4, hidden=(6,))
    with torch.no_grad():
        mixture.mixture.logits.copy_(torch.randn(4))
    x = torch.rand(7, 5)
    probabilities = mixture.cluster_probabilities(x)
    with torch.no_grad():
        z = loc_scale(mixture.encoder(x))[0]
        scales = F.softplus(mixture.mixture.raw_scales) + MIN_SCALE
        joint = torch.stack([mixture.mixture.logits.log_softmax(-1)[c]
                             + log_normal(z, mixture.mixture.locs[c], scales[c])
                             for c in range(4)], -1)
    assert torch.allclose(probabilities, joint.softmax(-1), rtol=0, atol=EXACT)
    assert torch.allclose(probabilities.sum(-1), torch.ones(7), rtol=0, atol=EXACT)


# -- M2 -------------------------------------------------------------------------------------------
def m2_by_hand(model: SemiSupervisedVAE, x, y, weights, objective):
    """The per-datapoint bound by an explicit loop over datapoints, particles and classes."""
    C, alpha = model.num_classes, model.alpha
    particles = weights.particles
    z_labelled = weights.sites["z_labelled"].value.reshape(particles, x.shape[0], -1)
    z_latent = weights.sites["z"].value.reshape(C, particles, x.shape[0], -1)
    eye = torch.eye(C)
    bounds = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            log_q_y = model.classifier(x[b]).log_softmax(-1)
            per_particle = []
            for k in range(particles):
                def log_w(c, z):  # log p(c) p(z) p(x | c, z) / q(z | x, c)
                    decoder_input = torch.cat([z, eye[c]])
                    encoder_input = torch.cat([x[b], eye[c]])
                    return (-math.log(C) + log_normal(z, torch.zeros_like(z), torch.ones_like(z))
                            + log_bernoulli(x[b], model.decoder(decoder_input))
                            - log_normal(z, *loc_scale(model.encoder(encoder_input))))

                if y is not None and y[b] >= 0:
                    label = int(y[b])
                    per_particle.append(log_w(label, z_labelled[k, b]) + alpha * log_q_y[label])
                else:
                    terms = torch.stack([log_w(c, z_latent[c, k, b]) - log_q_y[c]
                                         for c in range(C)])
                    if objective == "elbo":  # E_q(c|x) [log w(c)]
                        per_particle.append((log_q_y.exp() * terms).sum())
                    else:                    # log Σ_c q(c|x) w(c)
                        per_particle.append(torch.logsumexp(log_q_y + terms, 0))
            per_particle = torch.stack(per_particle)
            bounds.append(per_particle.mean() if objective == "elbo"
                          else log_mean_exp(per_particle))
    return torch.stack(bounds)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("labels", ["labelled", "unlabelled", "mixed", "none"])
@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("iwae", 1), ("iwae", 4)])
def test_m2_bound_equals_the_sum_over_classes(labels, objective, particles):
    """Per datapoint: labelled, log p(x, y) by the K-particle bound plus α log q(y|x);
    unlabelled (label −1, or y=None), the bound with y summed out under q(y|x)."""
    torch.manual_seed(4)
    model = SemiSupervisedVAE(4, num_classes=3, latent_dim=2, hidden=(5,), alpha=0.7)
    x = torch.rand(6, 4)
    y = {"labelled": torch.tensor([0, 2, 1, 1, 0, 2]),
         "unlabelled": torch.full((6,), -1),
         "mixed": torch.tensor([2, -1, 0, -1, -1, 1]),
         "none": None}[labels]
    bound, weights = bound_and_weights(model, x, y, objective, particles)
    expected = m2_by_hand(model, x, y, weights, objective)
    assert torch.allclose(bound.detach(), expected, rtol=0, atol=EXACT)


@pytest.mark.usefixtures("float64")
def test_m2_unlabelled_importance_weights_do_not_involve_the_classifier():
    """Σ_c q(c|x) w(c) = Σ_c p(x, c, z_c) / q(z_c|x, c): changing q(y|x) leaves the iwae
    bound of unlabelled data unchanged (same draws), while it moves the elbo."""
    torch.manual_seed(5)
    model = SemiSupervisedVAE(4, num_classes=3, latent_dim=2, hidden=(5,))
    x = torch.rand(6, 4)

    def bounds():
        values = []
        for name, particles in (("iwae", 3), ("elbo", 1)):
            pyro.set_rng_seed(0)
            objective = make_objective(name, particles)
            values.append(objective.per_datapoint_bound(model.model, model.guide, x)[0])
        return values

    iwae_before, elbo_before = bounds()
    with torch.no_grad():
        for parameter in model.classifier.parameters():
            parameter.add_(torch.randn_like(parameter))
    iwae_after, elbo_after = bounds()
    assert torch.allclose(iwae_before, iwae_after, rtol=0, atol=EXACT)
    assert (elbo_before - elbo_after).abs().max() > 1e-3


# -- training -------------------------------------------------------------------------------------
def small(kind: str, shape):
    if kind == "hierarchical":
        return HierarchicalVAE(shape, (8, 4), hidden=((32, 32), (16, 16)))
    if kind == "mixture":
        return MixtureVAE(shape, latent_dim=4, clusters=5, hidden=(64, 64))
    return SemiSupervisedVAE(shape, num_classes=10, latent_dim=4, hidden=(64, 64))


@pytest.mark.parametrize("kind", ["hierarchical", "mixture", "m2"])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_training_raises_the_held_out_bound(digits, kind, objective):
    """40 Adam steps on minibatches of 64 training digits (M2: half of them labelled); the
    ELBO of 180 validation digits (10 particles each, the same seed before and after, y=None)
    must rise by more than three standard errors of its paired per-datapoint differences."""
    pyro.set_rng_seed(0)
    model = small(kind, digits.data_shape)
    train, val = digits.train, digits.val
    labels = digits.split_labels("train").clone()
    labels[::2] = -1
    loss_fn = make_objective(objective, 1 if objective == "elbo" else 5)
    held_out = make_objective("elbo", 10)

    def bound():
        pyro.set_rng_seed(1)
        with torch.no_grad():
            return held_out.per_datapoint_bound(model.model, model.guide, val)[0]

    before = bound()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for step in range(40):
        batch = torch.randint(len(train), (64,), generator=order)
        y = labels[batch] if kind == "m2" else None
        loss = loss_fn.differentiable_loss(model.model, model.guide, train[batch], y,
                                           num_data=len(train))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    difference = bound() - before
    se = difference.std() / math.sqrt(len(difference))
    assert difference.mean() > 3 * se, (float(difference.mean()), float(se))


# -- capabilities, config, refusals ---------------------------------------------------------------
MODELS = [  # (the model, the dimension of its posterior_mean)
    (lambda: HierarchicalVAE((1, 8, 8), (6, 3), hidden=((16,), (8, 8)), activation="relu",
                             likelihood="continuous-bernoulli"), 6),
    (lambda: MixtureVAE((1, 8, 8), latent_dim=3, clusters=4, hidden=(16,), likelihood="bernoulli",
                        activation="tanh", learn_weights=False), 3),
    (lambda: SemiSupervisedVAE((1, 8, 8), num_classes=4, latent_dim=5, hidden=(16, 8), alpha=2.5,
                               activation="elu", classifier_hidden=()), 5),
]


@pytest.mark.parametrize("build,_", MODELS, ids=["hierarchical", "mixture", "m2"])
def test_config_rebuilds_an_identical_model(build, _):
    """type(m)(**config), through JSON: the same config, the same parameters and buffers by
    name and shape; with m's state loaded, the same weights at the same draws."""
    torch.manual_seed(0)
    model = build()
    config = json.loads(json.dumps(model.config))
    rebuilt = type(model)(**config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(5, 64)
    totals = []
    for m in (model, rebuilt):
        pyro.set_rng_seed(7)
        totals.append(log_weights(m.model, m.guide, x, particles=3).total())
    assert torch.equal(*totals)


@pytest.mark.parametrize("build,latent", MODELS, ids=["hierarchical", "mixture", "m2"])
def test_capabilities(build, latent):
    torch.manual_seed(0)
    model = build()
    x = torch.rand(5, 64)
    assert model.data_dim == 64 and model.data_shape == (1, 8, 8)
    assert model.sample(3).shape == (3, 64)
    assert model.reconstruct(x).shape == (5, 64)
    assert model.posterior_mean(x).shape == (5, latent)
    model.check_support(x)
    with pytest.raises(DataError, match="row 0"):
        model.check_support(x - 1)


def test_posterior_means_and_classification():
    torch.manual_seed(0)
    x = torch.rand(5, 64)
    hierarchical = HierarchicalVAE(64, (6, 3), hidden=((8,), (8,)))
    assert torch.equal(hierarchical.posterior_mean(x), loc_scale(hierarchical.encoders[0](x))[0])
    m2 = SemiSupervisedVAE(64, num_classes=4, latent_dim=3, hidden=(8,))
    probabilities = m2.classify(x)
    assert probabilities.shape == (5, 4)
    assert torch.allclose(probabilities.sum(-1), torch.ones(5))
    assert m2.num_classes == 4 and m2.semi_supervised
    eye = torch.eye(4)
    means = torch.stack([loc_scale(m2.encoder(torch.cat([x, eye[c].expand(5, 4)], -1)))[0]
                         for c in range(4)], 1)                      # [batch, C, d]
    assert torch.allclose(m2.posterior_mean(x), (probabilities.unsqueeze(-1) * means).sum(1),
                          atol=1e-6)
    y = torch.tensor([0, 3, -1, 2, -1])
    given = m2.posterior_mean(x, y)
    assert torch.allclose(given[1], means[1, 3])
    assert torch.allclose(given[2], m2.posterior_mean(x)[2])


@pytest.mark.parametrize("build,message", [
    (lambda: HierarchicalVAE(0), "data_shape"),
    (lambda: HierarchicalVAE((8, -8)), "data_shape"),
    (lambda: HierarchicalVAE("64"), "data_shape"),
    (lambda: HierarchicalVAE(64, latent_dims=()), "at least one"),
    (lambda: HierarchicalVAE(64, latent_dims=(10, 0)), "latent_dims"),
    (lambda: HierarchicalVAE(64, latent_dims=(10, 5), hidden=((32,),)), "one sequence"),
    (lambda: HierarchicalVAE(64, hidden=((32, -1), (8,))), "hidden"),
    (lambda: HierarchicalVAE(64, hidden="200"), "hidden"),
    (lambda: HierarchicalVAE(64, activation="swish"), "activation"),
    (lambda: HierarchicalVAE(64, likelihood="gauss"), "likelihood"),
    (lambda: HierarchicalVAE(64, likelihood=None), "likelihood"),
    (lambda: MixtureVAE(64, clusters=0), "clusters"),
    (lambda: MixtureVAE(64, latent_dim=2.5), "latent_dim"),
    (lambda: MixtureVAE(64, hidden=(256, 0)), "hidden"),
    (lambda: MixtureVAE(64, learn_weights="yes"), "learn_weights"),
    (lambda: SemiSupervisedVAE(64, num_classes=1), "num_classes"),
    (lambda: SemiSupervisedVAE(64, alpha=-1.0), "alpha"),
    (lambda: SemiSupervisedVAE(64, alpha=float("nan")), "alpha"),
    (lambda: SemiSupervisedVAE(64, latent_dim=0), "latent_dim"),
    (lambda: SemiSupervisedVAE(64, classifier_hidden=(0,)), "classifier_hidden"),
])
def test_bad_arguments_are_one_line_config_errors(build, message):
    with pytest.raises(ConfigError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("call,message", [
    (lambda m, x: m["hierarchical"].model(x, torch.zeros(4, dtype=torch.long)), "takes none"),
    (lambda m, x: m["mixture"].guide(x, torch.zeros(4, dtype=torch.long)), "takes none"),
    (lambda m, x: m["m2"].model(x, torch.tensor([0, 1, 4, -1])), "labels must be"),
    (lambda m, x: m["m2"].guide(x, torch.tensor([0, 1, -2, -1])), "labels must be"),
    (lambda m, x: m["m2"].guide(x, torch.zeros(4)), "labels must be"),
    (lambda m, x: m["m2"].guide(x, torch.zeros(3, dtype=torch.long)), "labels must be"),
    (lambda m, x: m["m2"].sample(2, y=4), "sample labels"),
])
def test_bad_labels_are_one_line_config_errors(call, message):
    models = {"hierarchical": HierarchicalVAE(8, (2,), hidden=((4,),)),
              "mixture": MixtureVAE(8, 2, clusters=2, hidden=(4,)),
              "m2": SemiSupervisedVAE(8, num_classes=4, latent_dim=2, hidden=(4,))}
    with pytest.raises(ConfigError, match=message) as error:
        call(models, torch.rand(4, 8))
    assert "\n" not in str(error.value)
