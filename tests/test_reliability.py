"""Checkpoints, exact resume, interrupts, divergence and safe loading."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pyro
import pytest
import torch

import pyro_vae
from pyro_vae import VAE, fit, load_run
from pyro_vae.callbacks import Callback
from pyro_vae.models.likelihoods import Bernoulli
from pyro_vae.runs import RunError, load_checkpoint
from pyro_vae.training import TrainingError, resume

TINY = dict(latent_dim=2, hidden=(32,))


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def _weights(run_dir):
    return torch.load(run_dir / "weights.pt", weights_only=True)


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _fit(digits, out, epochs, **options):
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, **TINY)
    return fit(vae, digits, "iwae", particles=3, epochs=epochs, out=out, progress=False,
               device="cpu", **options)


def test_resume_is_bit_for_bit_equal_to_an_uninterrupted_run(digits, tmp_path):
    _fit(digits, tmp_path / "straight", 4)
    _fit(digits, tmp_path / "resumed", 2)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 3
    resume(tmp_path / "resumed", epochs=4, device="cpu", progress=False)
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")
    assert _same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    with pytest.raises(pyro_vae.PyroVAEError, match="already trained 4 epochs"):
        resume(tmp_path / "resumed", epochs=4, device="cpu", progress=False)


def test_resume_under_a_learning_rate_schedule_is_bit_for_bit(digits, tmp_path):
    """The rate is a function of the epoch: a run resumed at epoch 3 of the burda schedule (its
    second stage) continues exactly as the uninterrupted run."""
    _fit(digits, tmp_path / "straight", 5, lr_schedule="burda")
    _fit(digits, tmp_path / "resumed", 2, lr_schedule="burda")
    resume(tmp_path / "resumed", epochs=5, device="cpu", progress=False)
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")
    assert _same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    # and the schedule changed something: a constant rate ends elsewhere
    _fit(digits, tmp_path / "constant", 5)
    assert not _same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "constant"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_checkpoints_and_the_resumed_run_matches(tmp_path, signum):
    epochs = "40"
    common = ["--epochs", epochs, "--hidden", "32", "--latent-dim", "2", "--quiet",
              "--eval-particles", "0", "--batch-size", "16"]
    command = [sys.executable, "-m", "pyro_vae.cli", "train"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    subprocess.run(command + common + ["--out", str(straight)], check=True, capture_output=True)

    process = subprocess.Popen(command + common + ["--out", str(interrupted)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().count("\n") == 0 and "resume with: pyro-vae train --resume" in err
    assert signal.Signals(signum).name in err
    checkpoint = load_checkpoint(interrupted)
    finished = len(_metrics(interrupted))
    assert 2 <= finished < int(epochs)
    assert checkpoint["epoch"] == finished + 1  # the epoch in progress, at its position

    subprocess.run(command[:-1] + ["train", "--resume", str(interrupted), "--quiet"], check=True,
                   capture_output=True)
    assert _metrics(straight) == _metrics(interrupted)
    assert _same_weights(_weights(straight), _weights(interrupted))


class _FailingBernoulli(Bernoulli):
    """Scores NaN from its ``fail_after``-th call on: a divergence injected mid-run."""

    name = "bernoulli"  # restores as a plain Bernoulli

    def __init__(self, fail_after: int):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def distribution(self, decoder_output):
        self.calls += 1
        if self.calls > self.fail_after:
            decoder_output = decoder_output * float("nan")
        return super().distribution(decoder_output)


@pytest.mark.parametrize("every", [0.0, 30.0], ids=["every epoch", "default interval"])
def test_a_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_good_checkpoint(
        digits, tmp_path, every):
    pyro.set_rng_seed(0)
    steps_per_epoch = -(-len(digits.train) // 128)
    # calls: 1 dry run + per epoch: steps + 1 validation pass (+ a re-score when it fails)
    likelihood = _FailingBernoulli(fail_after=1 + 2 * (steps_per_epoch + 1) + 3)
    vae = VAE(digits.data_shape, likelihood=likelihood, **TINY)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        fit(vae, digits, "elbo", epochs=5, log_every=1, out=out, progress=False, device="cpu",
            checkpoint_every=every)
    message = str(info.value)
    assert "\n" not in message
    assert "the loss became nan at step" in message and "(epoch 3)" in message
    # checkpointed after every epoch, or (the default interval, seconds) after the first only
    kept = 2 if every == 0 else 1
    assert "log p(x|z)" in message and f"end of epoch {kept})" in message
    checkpoint = load_checkpoint(out)
    assert checkpoint["epoch"] == kept + 1 and checkpoint["position"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert len(_metrics(out)) == 2
    assert torch.isfinite(load_run(out).vae.decoder.net[0].weight).all()


Payload = namedtuple("Payload", "path")


class _Malicious:
    """Unpickling this runs code: it would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_carrying_code_is_refused_and_no_code_runs(digits, tmp_path):
    _fit(digits, tmp_path / "run", 1)
    marker = tmp_path / "code-ran"
    for name in ("weights.pt", "checkpoint.pt"):
        target = tmp_path / "run" / name
        original = target.read_bytes()
        torch.save({"model": _Malicious(marker)}, target, pickle_protocol=2)
        with pytest.raises(RunError, match="cannot be loaded safely"):
            load_run(tmp_path / "run") if name == "weights.pt" else load_checkpoint(tmp_path / "run")
        assert not marker.exists()
        # the same bytes through plain pickle would have run the payload (the test is real)
        target.write_bytes(original)
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump(_Malicious(marker), handle)
    with open(tmp_path / "plain.pkl", "rb") as handle:
        pickle.load(handle).close()
    assert marker.exists()


def test_a_full_disk_is_reported_before_training(digits, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    out = tmp_path / "run"
    with pytest.raises(RunError, match="not enough free disk space"):
        _fit(digits, out, 1)
    assert not out.exists()


# -- checkpoints on a time interval (checkpoint_every) -----------------------------------------

class _Clock:
    """A fake clock for ``checkpoint_every``: it advances ``seconds`` at every epoch's end (after
    the checkpointer has decided on that epoch)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Tick(Callback):
    def __init__(self, clock, seconds, stop_after=None):
        self.clock, self.seconds, self.stop_after = clock, seconds, stop_after

    def on_epoch_end(self, trainer, row):
        self.clock.now += self.seconds
        if row["epoch"] == self.stop_after:
            trainer.stop_requested = True


def _record_checkpoints(monkeypatch):
    from pyro_vae import training

    clock, written = _Clock(), []
    real = training.Trainer.save_checkpoint

    def save(trainer, *args, **kwargs):
        state = trainer.state
        written.append((state.epoch - 1, state.position))  # epochs finished, position
        real(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "_clock", clock)
    monkeypatch.setattr(training.Trainer, "save_checkpoint", save)
    return clock, written


@pytest.mark.parametrize("every, expected", [
    (25.0, [1, 4, 7, 8]),   # the first epoch, then once 25 s have passed, and the end
    (0.0, [1, 2, 3, 4, 5, 6, 7, 8]),  # every epoch (the old policy), nothing more at the end
    (1e6, [1, 8]),          # the first epoch and the end
])
def test_checkpoints_follow_the_interval_and_the_end_is_always_checkpointed(
        digits, tmp_path, monkeypatch, every, expected):
    clock, written = _record_checkpoints(monkeypatch)
    _fit(digits, tmp_path / "run", 8, checkpoint_every=every, batch_size=500,
         callbacks=[_Tick(clock, 10.0)])
    assert written == [(epoch, 0) for epoch in expected]
    assert load_checkpoint(tmp_path / "run")["epoch"] == 9
    assert json.loads((tmp_path / "run" / "config.json").read_text())["training"][
        "checkpoint_every"] == every


def test_a_run_stopped_by_a_callback_is_checkpointed_where_it_stopped(digits, tmp_path,
                                                                     monkeypatch):
    clock, written = _record_checkpoints(monkeypatch)
    _fit(digits, tmp_path / "run", 8, batch_size=500, callbacks=[_Tick(clock, 1.0, stop_after=3)])
    assert written == [(1, 0), (3, 0)]
    resume(tmp_path / "run", epochs=5, device="cpu", progress=False)  # continues from epoch 4
    assert [row["epoch"] for row in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_a_resumed_run_counts_the_interval_from_its_start(digits, tmp_path, monkeypatch):
    _fit(digits, tmp_path / "run", 2, batch_size=500)
    clock, written = _record_checkpoints(monkeypatch)
    callbacks = [_Tick(clock, 10.0)]
    resume(tmp_path / "run", epochs=8, device="cpu", progress=False, callbacks=callbacks)
    # not after its first epoch (the run has a checkpoint): once 30 s (the default) have
    # passed since the resumed training started (epoch 6), then at the end
    assert written == [(6, 0), (8, 0)]


def test_a_kill_between_checkpoints_loses_only_the_epochs_after_the_last_and_resumes_exactly(
        tmp_path):
    """SIGKILL cannot be caught: the run resumes from its last checkpoint (here the first
    epoch's: the interval is an hour), replays the epochs after it with the same random
    numbers, and ends exactly where the uninterrupted run ends."""
    common = ["--epochs", "12", "--hidden", "32", "--latent-dim", "2", "--quiet",
              "--eval-particles", "0", "--batch-size", "16", "--checkpoint-every", "3600"]
    command = [sys.executable, "-m", "pyro_vae.cli", "train"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command + common + ["--out", str(straight)], check=True, capture_output=True)
    process = subprocess.Popen(command + common + ["--out", str(killed)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.02)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    finished = len(_metrics(killed))
    assert 3 <= finished < 12
    assert load_checkpoint(killed)["epoch"] == 2  # the first epoch's: the later ones are lost
    done = subprocess.run(command[:-1] + ["train", "--resume", str(killed), "--quiet",
                                          "--eval-particles", "0"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert _metrics(straight) == _metrics(killed)
    assert _same_weights(_weights(straight), _weights(killed))
