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
