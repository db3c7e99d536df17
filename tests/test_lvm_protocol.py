"""Any latent-variable model through the toolkit: a VAE written as Pyro's examples write one
(``model(x)``, ``guide(x)``, ``pyro.module``, no minibatch scale, no pyro_vae base class) and a
hand-written two-layer hierarchical VAE go through fit (checkpoint and exact resume), evaluate,
diagnose, compare and compare_estimators, in Python and on the command line with --import."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch

import pyro_vae
from helpers import invoke
from lvm_models import ExampleVAE, HandM2, TwoLayerVAE
from pyro_vae import evaluate, fit, load_run, lvm, resume
from pyro_vae.comparison import compare_runs
from pyro_vae.diagnostics import diagnose
from pyro_vae.errors import ConfigError, PyroVAEError
from pyro_vae.estimators import compare_estimators
from pyro_vae.log_weights import log_weights
from pyro_vae.objectives import make_objective

PLUGIN = str(Path(__file__).with_name("lvm_models.py"))
FAST = {"epochs": 2, "batch_size": 256, "progress": False, "lr": 3e-3}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def partly_labelled(digits):
    from pyro_vae.data import keep_labels

    return keep_labels(digits, 10, seed=0)


@pytest.mark.parametrize("cls", [ExampleVAE, TwoLayerVAE, HandM2])
def test_fit_checkpoints_and_resumes_exactly(cls, digits, partly_labelled, tmp_path):
    if cls is HandM2:  # semi-supervised: 10 labels per class, the rest hidden
        digits = partly_labelled
    pyro.set_rng_seed(0)
    whole = cls()
    fit(whole, digits, "iwae", particles=3, out=tmp_path / "whole", **FAST)
    pyro.set_rng_seed(0)
    first = cls()
    fit(first, digits, "iwae", particles=3, out=tmp_path / "part", **{**FAST, "epochs": 1})
    # a class without a config is given back as a fresh instance; one with a config rebuilds
    given = cls() if cls is ExampleVAE else None
    resumed = resume(tmp_path / "part", epochs=2, device="cpu", progress=False, model=given).vae
    expected = _weights(whole)
    assert set(_weights(resumed)) == set(expected)
    for name, value in _weights(resumed).items():
        assert torch.equal(value, expected[name]), name
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["model"]["class"] == f"lvm_models:{cls.__name__}"
    assert config["model"]["rebuildable"] is (cls is not ExampleVAE)


def test_a_model_without_config_is_restored_with_model_or_refused_in_one_line(digits, tmp_path):
    pyro.set_rng_seed(1)
    model = ExampleVAE()
    fit(model, digits, out=tmp_path, **{**FAST, "epochs": 1})
    with pytest.raises(PyroVAEError) as error:
        load_run(tmp_path)
    assert "\n" not in str(error.value) and "load_run(run_dir, model=...)" in str(error.value)
    run = load_run(tmp_path, model=ExampleVAE())
    x = digits.test[:5]
    pyro.set_rng_seed(2)
    a = log_weights(*lvm.programs(model), x, particles=4).total()
    pyro.set_rng_seed(2)
    b = log_weights(*lvm.programs(run.vae), x, particles=4).total()
    assert torch.equal(a, b)
    with pytest.raises(PyroVAEError):  # another architecture does not take the weights
        load_run(tmp_path, model=ExampleVAE(z_dim=3))


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_program_without_num_data_is_scaled_as_a_subsampled_plate(digits, objective):
    """A minibatch of B from N weighs every datapoint term by N/B, outside the log-mean-exp:
    with the same draws the loss is exactly N/B times the batch's own."""
    model = ExampleVAE()
    x = digits.train[:10]
    loss = make_objective(objective, 3)
    pyro.set_rng_seed(3)
    scaled = loss.differentiable_loss(*lvm.programs(model), x, None, num_data=100)
    pyro.set_rng_seed(3)
    plain = loss.differentiable_loss(*lvm.programs(model), x, None)
    assert torch.allclose(scaled, 10 * plain, rtol=1e-6, atol=0)
    # and the same as the same model written with a subsampled plate
    pyro.set_rng_seed(3)
    weights = log_weights(*lvm.programs(model), x, None, particles=3, num_data=100)
    assert weights.scale == 10.0


def test_evaluate_agrees_with_pyros_trace_elbo(digits):
    """The per-datapoint ELBO of evaluate, summed over a batch, is Pyro's Trace_ELBO of the same
    program (both Monte Carlo: within 3 combined standard errors)."""
    pyro.set_rng_seed(4)
    model = ExampleVAE()
    fit(model, digits, **{**FAST, "epochs": 1})
    x = digits.test[:40]
    with torch.no_grad():
        ours = log_weights(*lvm.programs(model), x, particles=400).total().sum(-1).double()
    elbo = pyro.infer.Trace_ELBO(num_particles=1)
    pyro.set_rng_seed(5)
    theirs = torch.tensor([-elbo.loss(model.model, model.guide, x) for _ in range(400)],
                          dtype=torch.float64)
    se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
    assert abs(float(ours.mean() - theirs.mean())) < 3 * se
    summary = evaluate(model, x, particles=400).summary
    assert abs(summary["elbo"] * 40 - float(theirs.mean())) < 3 * se + 40 * 4 * summary["elbo_se"]


def test_diagnose_reports_every_site_and_the_sites_add_up_to_the_kl(digits):
    """Per-site KL per dimension from the trace: z₂'s closed form against N(0, I), z₁'s Monte
    Carlo against p(z₁ | z₂) at the joint draws (the guide draws z₂ from z₁); their totals add
    up to the ELBO's KL within the Monte Carlo error of z₂'s closed form."""
    pyro.set_rng_seed(6)
    model = TwoLayerVAE()
    fit(model, digits, **FAST)
    diagnosis = diagnose(model, digits, particles=100)
    assert set(diagnosis.sites) == {"z1", "z2"}
    z1, z2 = diagnosis.sites["z1"], diagnosis.sites["z2"]
    assert (z1.units, z2.units) == (model.z1, model.z2)
    assert z1.kl_method == "monte carlo" and z2.kl_method == "closed form"
    # the Monte Carlo error of the closed form's stand-in: log q(z2|z1) − log p(z2) − KL
    x = digits.test
    pyro.set_rng_seed(7)
    with torch.no_grad():
        site = log_weights(*lvm.programs(model), x, particles=100).sites["z2"]
    draws = (site.guide.log_prob(site.value) - site.prior.log_prob(site.value)
             - torch.distributions.kl_divergence(site.guide, site.prior)).double()
    se = float(draws.mean(0).std() / math.sqrt(x.shape[0]))
    total = float(z1.kl_per_dim.sum() + z2.kl_per_dim.sum())
    assert abs(total - diagnosis.evaluation["kl"]) < 3 * se + 1e-4
    summary = diagnosis.summary()
    assert set(summary["sites"]) == {"z1", "z2"} and "site z2" in diagnosis.format()
    posterior = diagnosis.inference_data["posterior"]
    assert set(posterior.data_vars) == {"z1", "z2"}


@pytest.mark.parametrize("cls", [ExampleVAE, HandM2])
def test_compare_and_compare_estimators_take_any_model(cls, digits, partly_labelled):
    pyro.set_rng_seed(8)
    a, b = cls(), cls()
    fit(a, partly_labelled if cls is HandM2 else digits, **FAST)
    comparison = compare_runs(a, b, digits, particles=50, names=("trained", "fresh"))
    assert comparison.better == "trained" and comparison.significant
    estimators = ("elbo", "iwae") if cls is HandM2 else ("elbo", "iwae", "dreg")
    rows = compare_estimators(a, digits.val[:16], estimators, (1, 4), repeats=4,
                              timing_repeats=2)
    assert len(rows) == 2 * len(estimators)
    for row in rows:
        assert math.isfinite(row["bound"]) and row["decoder_grad_var"] > 0
        assert row["encoder_grad_var"] > 0 or row["objective"] == "dreg"


def test_parameter_roles_split_guide_from_model(digits):
    """φ are the parameters log q depends on, θ those only log p depends on, even when one
    pyro.module registers the whole model in both programs."""
    model = TwoLayerVAE()
    guide, decoder, foreign = lvm.parameter_roles(model, digits.val[:4])
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(guide) == ids([*model.q_z1.parameters(), *model.q_z2.parameters()])
    assert ids(decoder) == ids([*model.p_z1.parameters(), *model.p_x.parameters()])
    assert foreign == []


def test_programs_outside_the_protocol_are_refused_in_one_line(digits):
    class NoPlate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(64))

        def model(self, x):
            z = pyro.sample("z", pyro.distributions.Normal(self.loc, 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Normal(z, 1.0).expand([x.shape[0], 64])
                        .to_event(2), obs=x)

        def guide(self, x):
            pyro.sample("z", pyro.distributions.Normal(self.loc, 1.0).to_event(1))

    class Foreign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", pyro.distributions.Normal(0.0, self.scale))
                pyro.sample("x", pyro.distributions.Normal(z.unsqueeze(-1), 1.0)
                            .expand([x.shape[0], 64]).to_event(1), obs=x)

        def guide(self, x):
            loc = pyro.param("loc", torch.zeros(()))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", pyro.distributions.Normal(loc, 1.0))

    for model, words in ((NoPlate(), "declares no datapoint plate"),
                         (Foreign(), "is not a parameter of Foreign"),
                         (torch.nn.Linear(2, 2), "has no model(x, y=None, num_data=None)"),
                         ("vae", "takes a latent-variable model")):
        with pytest.raises(ConfigError) as error:
            fit(model, digits, **FAST)
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        pyro_vae.lvm.require(ExampleVAE(), "sample", "pyro-vae sample")
    assert str(error.value) == ("pyro-vae sample needs a sample(n) method; ExampleVAE has no "
                                "'sample'")


def test_program_wraps_two_functions(digits):
    encoder, decoder = torch.nn.Linear(64, 4), torch.nn.Linear(2, 64)

    def model(x, num_data=None):
        with lvm.data_plate(x, num_data):
            z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def guide(x, num_data=None):
        with lvm.data_plate(x, num_data):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", pyro.distributions.Normal(loc, log_scale.exp()).to_event(1))

    program = pyro_vae.program(model, guide, modules={"encoder": encoder, "decoder": decoder},
                               data_dim=64)
    before = decoder.weight.detach().clone()
    result = fit(program, digits, **FAST)
    assert not torch.equal(before, decoder.weight)  # the functions' networks were trained
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"]
    with pytest.raises(ConfigError):
        pyro_vae.program(model, "guide")


@pytest.mark.parametrize("name", ["pyro-example", "two-layer", "hand-m2"])
def test_the_command_line_imports_a_plug_in_and_every_command_finds_it(name, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    labels = ["--labels-per-class", "10"] if name == "hand-m2" else []
    for out, seed in ((run, "0"), (other, "1")):
        outcome = invoke(["train", "--import", PLUGIN, "--model", name, "--epochs", "1",
                          "--batch-size", "512", "--eval-particles", "0", "--quiet",
                          "--seed", seed, "--out", str(out), *labels], capsys)
        assert outcome.code == 0, outcome.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["plugins"] == [PLUGIN] and config["model"]["rebuildable"] is True
    outcome = invoke(["evaluate", str(run), "--particles", "20", "--json"], capsys)
    assert outcome.code == 0, outcome.stderr
    assert math.isfinite(json.loads(outcome.stdout)["log_likelihood"])
    outcome = invoke(["diagnose", str(run), "--particles", "30", "--json"], capsys)
    assert outcome.code == 0, outcome.stderr
    assert set(json.loads(outcome.stdout)["sites"]) == {
        "pyro-example": {"latent"}, "two-layer": {"z1", "z2"}, "hand-m2": {"z"}}[name]
    outcome = invoke(["compare", str(run), str(other), "--particles", "20", "--json"], capsys)
    assert outcome.code == 0, outcome.stderr
    outcome = invoke(["compare-estimators", str(run), "--objectives", "elbo,iwae",
                      "--particles", "1,2", "--repeats", "3", "--json"], capsys)
    assert outcome.code == 0, outcome.stderr and len(json.loads(outcome.stdout)) == 4
    outcome = invoke(["train", "--resume", str(run), "--epochs", "2", "--quiet",
                      "--eval-particles", "0"], capsys)
    assert outcome.code == 0, outcome.stderr
    # explore draws what the model's capabilities allow and says what it skipped
    outcome = invoke(["explore", str(run), "--particles", "10", "--top", "4", "--json"], capsys)
    assert outcome.code == 0, outcome.stderr
    explored = json.loads(outcome.stdout)
    expected = {"pyro-example": ["interpolation.png", "traversals.png", "latent_scatter.png",
                                 "reconstructions.png"],
                "two-layer": ["interpolation.png", "traversals.png", "latent_scatter.png"],
                "hand-m2": ["interpolation.png", "traversals.png", "latent_scatter.png",
                            "reconstructions.png"]}[name]
    assert explored["skipped"] == expected
    assert {Path(f).name for f in explored["figures"]} >= {"anomalies.png"}


def test_a_missing_plug_in_is_one_line(digits, tmp_path, capsys):
    outcome = invoke(["train", "--import", "no_such_plugin_module", "--epochs", "1"], capsys)
    assert outcome.code == 2 and len(outcome.stderr.strip().splitlines()) == 1
    assert "cannot import the plug-in 'no_such_plugin_module'" in outcome.stderr
    run = tmp_path / "run"
    assert invoke(["train", "--import", PLUGIN, "--model", "two-layer", "--epochs", "1",
                   "--quiet", "--eval-particles", "0", "--out", str(run)], capsys).code == 0
    config = json.loads((run / "config.json").read_text())
    config["plugins"] = [str(tmp_path / "gone.py")]
    (run / "config.json").write_text(json.dumps(config))
    outcome = invoke(["evaluate", str(run), "--particles", "5"], capsys)
    assert outcome.code == 2 and len(outcome.stderr.strip().splitlines()) == 1
    assert "this run needs the plug-in" in outcome.stderr and "gone.py" in outcome.stderr


def test_readme_your_own_model_example_runs(capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("## Your own model")[1].split("```python")[1].split("```")[0]
    small = (example.replace("epochs=50", "epochs=1").replace("particles=1000", "particles=20")
             .replace("particles=100)", "particles=30)"))
    assert small.count("epochs=1") == 1 and "particles=30" in small
    namespace: dict = {}
    exec(compile(small, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "site z1" in printed and "site z2" in printed
    assert math.isfinite(float(printed.splitlines()[0]))


def test_a_mixture_summed_out_in_the_model_has_no_separate_kl(digits):
    """With c summed out of log Σ_c p(c) p(z|c) p(x|z) no term is log p(x|z) alone: evaluate
    reports the ELBO and the log-likelihood and leaves reconstruction and KL out, saying why."""
    from pyro_vae.catalogue import MixtureVAE

    summary = evaluate(MixtureVAE(digits.data_shape, latent_dim=2, clusters=3, hidden=(16,)),
                       digits, particles=10).summary
    assert summary["reconstruction"] is None and summary["kl"] is None
    assert "not separate terms" in summary["terms_note"]
    assert math.isfinite(summary["elbo"]) and summary["log_likelihood"] >= summary["elbo"] - 1.0


def test_semi_supervised_training_on_the_command_line_reports_the_test_accuracy(tmp_path,
                                                                                 capsys):
    run = tmp_path / "m2"
    outcome = invoke(["train", "--semi-supervised", "--labels-per-class", "5", "--epochs", "1",
                      "--latent-dim", "2", "--hidden", "16", "--batch-size", "512", "--quiet",
                      "--eval-particles", "5", "--out", str(run)], capsys)
    assert outcome.code == 0, outcome.stderr
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert 0.0 <= evaluation["test_accuracy"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["labels_per_class"] == 5
    assert config["model"]["class"] == "pyro_vae.catalogue:SemiSupervisedVAE"
    run_back = load_run(run)
    labels = run_back.data().split_labels("train")
    assert int((labels >= 0).sum()) == 5 * 10  # the same hidden labels, from the record
