"""Training, determinism, restoring runs, and the model/guide pair under plain Pyro."""

from __future__ import annotations

import json
import math

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, evaluate, fit, load_run
from pyro_vae.cli import main

#: Held-out log-likelihood that README.md states for the default `pyro-vae train` (nats per
#: datapoint, K = 1000, test split), and its standard error over the 180 test datapoints.
README_TEST_LOG_LIKELIHOOD = -23.246
README_TEST_LOG_LIKELIHOOD_SE = 0.183


def _small_vae(digits, seed=0):
    pyro.set_rng_seed(seed)
    return VAE(digits.data_shape, latent_dim=4, hidden=(64,))


def test_training_improves_validation_elbo_clearly(digits):
    result = fit(_small_vae(digits), digits, "elbo", epochs=8, progress=False, device="cpu")
    first, last = result.history[0], result.history[-1]
    se = math.hypot(first["val_elbo_se"], last["val_elbo_se"])
    assert last["val_elbo"] - first["val_elbo"] > 3 * se, (first, last)
    assert [row["epoch"] for row in result.history] == list(range(1, 9))
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("meanfield", 1), ("iwae", 5)])
def test_same_seed_gives_identical_metrics(digits, objective, particles):
    def run():
        vae = _small_vae(digits, seed=7)
        history = fit(vae, digits, objective, particles=particles, epochs=2, seed=7,
                      progress=False, device="cpu").history
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]

    assert run() == run()


def test_run_directory_and_load_run_reproduce_evaluation(digits, tmp_path):
    vae = _small_vae(digits)
    out = tmp_path / "run"
    result = fit(vae, digits, "iwae", particles=3, epochs=2, out=out, progress=False, device="cpu")
    for name in ("config.json", "weights.pt", "metrics.jsonl", "reconstructions.png",
                 "samples.png", "loss.png"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["objective"] == "iwae" and config["model"]["latent_dim"] == 4
    state = torch.load(out / "weights.pt", weights_only=True)
    assert set(state) == set(vae.state_dict())

    run = load_run(out)
    assert run.history == result.history
    before = evaluate(vae, digits, particles=20).summary
    after = evaluate(run.vae, run.data(), particles=20).summary
    assert before == after


def test_model_and_guide_work_with_plain_pyro_svi_and_predictive(digits):
    pyro.clear_param_store()
    vae = _small_vae(digits)
    x = digits.train[:256]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(60)]
    # Pyro's own SVI found and optimized the parameters (through pyro.module)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 3 * 64
    mean_field = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    assert math.isfinite(mean_field)
    predictive = Predictive(vae.model, guide=vae.guide, num_samples=3, return_sites=("z", "x"))
    samples = predictive(x[:10])
    assert samples["z"].shape == (3, 10, 4) and samples["x"].shape == (3, 10, 64)


def test_two_vaes_do_not_share_parameters_through_the_param_store(digits):
    first, second = _small_vae(digits, 0), _small_vae(digits, 1)
    x = digits.train[:64]
    first_params = {n: p.detach().clone() for n, p in first.named_parameters()}
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(p, first_params[n]) for n, p in first.named_parameters())
    moved = [not torch.equal(p, q) for p, q in zip(second.parameters(), _small_vae(digits, 1).parameters())]
    assert all(moved)


def test_minibatch_plate_scale_makes_the_loss_a_data_set_estimate(digits):
    vae = _small_vae(digits)
    x = digits.train[:32]
    pyro.set_rng_seed(0)
    scaled = Trace_ELBO().loss(vae.model, vae.guide, x, num_data=320)
    pyro.set_rng_seed(0)
    unscaled = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert scaled == pytest.approx(10 * unscaled, rel=1e-5)


def test_default_train_command_reaches_the_readme_log_likelihood(tmp_path, capsys):
    # The README's first command: `pyro-vae train` with every default.
    out = tmp_path / "default-run"
    assert main(["train", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["particles"] == 1000 and summary["num_datapoints"] == 180
    margin = 3 * README_TEST_LOG_LIKELIHOOD_SE
    assert abs(summary["log_likelihood"] - README_TEST_LOG_LIKELIHOOD) <= margin, summary
    printed = capsys.readouterr().out
    assert "test log-likelihood" in printed and str(out) in printed


def test_threads_flag_sets_torch_threads_and_is_allowed_on_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    out = tmp_path / "run"
    common = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--quiet",
              "--eval-particles", "0"]
    assert main(["train", *common, "--threads", "3", "--out", str(out)]) == 0
    assert calls == [3]
    assert "threads" not in (out / "config.json").read_text()  # a property of the machine, not the run
    assert main(["train", "--resume", str(out), "--epochs", "2", "--threads", "1",
                 "--quiet"]) == 0
    assert calls == [3, 1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("guide", ["normal", "full-rank"])
def test_evaluate_posterior_means_are_the_guides_closed_form_means(digits, guide):
    """Read from the distribution the particles came from: equal to a fresh encoder pass."""
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 3, hidden=(16,), guide=guide)
    means = evaluate(vae, digits.test, particles=7, batch_size=64).posterior_means
    vae.eval()
    with torch.no_grad():
        assert torch.equal(means, vae.encode(digits.test).mean)


def test_the_burda_schedule_sets_each_epochs_learning_rate():
    """lr·10^(−i/7) for 3^i epochs: epoch 1 at lr, epochs 2–4 at lr·10^(−1/7), epoch 5 at
    lr·10^(−2/7); the optimizer holds that rate during the epoch."""
    from pyro_vae.callbacks import Callback
    from pyro_vae.config import scheduled_lr

    assert [scheduled_lr(1.0, "burda", e) for e in (1, 2, 4, 5, 13, 14)] == pytest.approx(
        [1.0, 10 ** (-1 / 7), 10 ** (-1 / 7), 10 ** (-2 / 7), 10 ** (-2 / 7), 10 ** (-3 / 7)])
    assert scheduled_lr(1.0, "burda", 3280) == scheduled_lr(1.0, "burda", 10 ** 6) == \
        pytest.approx(0.1)
    assert scheduled_lr(0.5, "constant", 99) == 0.5

    class Rates(Callback):
        def __init__(self):
            self.rates = []

        def on_epoch_end(self, trainer, row):
            self.rates.append(trainer.optimizer.param_groups[0]["lr"])

    rates = Rates()
    x = torch.rand(40, 6)
    fit(VAE(6, 2, hidden=(4,)), x, "elbo", epochs=5, batch_size=40, lr=0.01,
        lr_schedule="burda", progress=False, callbacks=[rates])
    assert rates.rates == pytest.approx([0.01] + [0.01 * 10 ** (-1 / 7)] * 3
                                        + [0.01 * 10 ** (-2 / 7)])


# -- the trainer's fast paths: fused Adam, the validation pass, figures in the background ------

def test_the_fused_adam_step_matches_the_default_step_within_float_rounding(digits):
    """The trainer's optimizer (torch's fused Adam on this device) against the default
    implementation over 50 steps from the same parameters and gradients."""
    from pyro_vae.objectives import make_objective
    from pyro_vae.training import make_optimizer

    first, second = _small_vae(digits, 3), _small_vae(digits, 3)
    initial = [p.detach().clone() for p in first.parameters()]
    fused = make_optimizer(first.parameters(), 1e-3)
    assert fused.param_groups[0]["fused"] is True
    default = torch.optim.Adam(second.parameters(), lr=1e-3)
    loss_fn = make_objective("elbo", 1)
    with pyro.validation_enabled(False):
        for step in range(50):
            x = digits.train[(step % 10) * 128:(step % 10 + 1) * 128]
            for vae, optimizer in ((first, fused), (second, default)):
                torch.manual_seed(step)
                optimizer.zero_grad()
                loss_fn.differentiable_loss(vae.model, vae.guide, x, num_data=1437).backward()
                optimizer.step()
    for (name, a), b, start in zip(first.named_parameters(), second.parameters(), initial):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        assert (a - start).abs().max() > 1e-3, name  # each one moved: the comparison is real


def test_a_checkpoint_of_the_default_adam_resumes_with_it_bit_for_bit(digits, tmp_path,
                                                                    monkeypatch):
    """A run checkpointed by an older pyro-vae (the default Adam: ``fused`` None) resumes with
    that implementation, exactly as it would have continued."""
    from pyro_vae import resume, runs, training

    def default_adam(parameters, lr):
        return torch.optim.Adam(list(parameters), lr=lr)

    options = dict(epochs=4, batch_size=500, device="cpu", progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(training, "make_optimizer", default_adam)
        straight = fit(_small_vae(digits), digits, out=tmp_path / "straight", **options)
        fit(_small_vae(digits), digits, out=tmp_path / "old", **{**options, "epochs": 2})
    assert runs.load_checkpoint(tmp_path / "old")["optimizer"]["param_groups"][0]["fused"] is None
    resumed = resume(tmp_path / "old", epochs=4, device="cpu", progress=False)
    assert resumed.history[-1]["val_elbo"] == straight.history[-1]["val_elbo"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.vae.state_dict().values(),
                                                 straight.vae.state_dict().values()))


@pytest.mark.parametrize("case", ["plain", "conditional", "iwae particles", "memory-mapped"])
def test_the_validation_pass_gives_evaluates_elbo_exactly(digits, tmp_path, case):
    import numpy as np

    from pyro_vae import distributed
    from pyro_vae.data import from_array
    from pyro_vae.evaluation import elbo_per_datapoint
    from pyro_vae.training import _validation_elbo

    pyro.set_rng_seed(0)
    dataset, particles = digits, 1
    vae = VAE(digits.data_shape, 3, hidden=(16,), conditional=case == "conditional",
              num_classes=10 if case == "conditional" else None)
    if case == "iwae particles":
        particles = 7
    if case == "memory-mapped":
        np.save(tmp_path / "x.npy", torch.cat([digits.train, digits.val, digits.test]).numpy())
        dataset = from_array(np.load(tmp_path / "x.npy", mmap_mode="r"))
    labels = dataset.split_labels("val") if case == "conditional" else None
    elbo = elbo_per_datapoint(vae, dataset.rows("val"), labels, particles, seed=5)
    full = evaluate(vae, dataset, split="val", particles=particles, seed=5)
    assert torch.equal(elbo, full.elbo)
    mean, se = _validation_elbo(vae, dataset, particles, 5, distributed.SINGLE)
    assert (mean, se) == (full.summary["elbo"], full.summary["elbo_se"])


def test_the_command_line_draws_the_figures_during_the_final_evaluation_as_fit_draws_them(
        tmp_path):
    """``pyro-vae train`` writes the figures from a background thread while it evaluates; they
    are the files that drawing them in the foreground writes, byte for byte."""
    from pyro_vae.training import write_figures

    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--quiet",
                 "--eval-particles", "5", "--device", "cpu", "--out", str(out)]) == 0
    names = ("reconstructions.png", "samples.png", "loss.png")
    assert all((out / name).stat().st_size > 0 for name in names)
    assert (out / "evaluation.json").exists()
    run = load_run(out)
    again = tmp_path / "again"
    again.mkdir()
    assert write_figures(run.vae, run.data(), run.history, again) is None  # drawn here
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")
                and p.name != ".lock"]  # no temporary file left behind
