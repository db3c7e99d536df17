"""A user's callback sees every run the same way, through fit and resume."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vae import VAE, fit, resume
from pyro_vae.callbacks import Callback, EarlyStopping
from pyro_vae.errors import ConfigError


class Recorder(Callback):
    def __init__(self, fail_at_step: int | None = None):
        self.events: list[tuple] = []
        self.fail_at_step = fail_at_step

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer.state.epoch, trainer.state.step))

    def on_loss(self, trainer, step, value):
        self.events.append(("loss", step, value))
        if step == self.fail_at_step:
            raise RuntimeError("stop here")

    def on_step_end(self, trainer):
        self.events.append(("step", trainer.state.step))

    def on_epoch_end(self, trainer, row):
        self.events.append(("epoch", row["epoch"], row["step"]))

    def on_fit_end(self, trainer, error):
        self.events.append(("end", error))

    def kinds(self, kind):
        return [event[1:] for event in self.events if event[0] == kind]


def _vae(digits):
    torch.manual_seed(0)
    return VAE(digits.data_shape, 2, hidden=(8,))


def test_hooks_run_in_order_with_the_documented_steps(digits, tmp_path):
    recorder = Recorder()
    # 1437 training rows / 200 = 8 steps per epoch; loss read at step 1 and every 3
    result = fit(_vae(digits), digits, epochs=2, batch_size=200, log_every=3, device="cpu",
                 out=tmp_path / "run", progress=False, callbacks=[recorder])
    steps_per_epoch = math.ceil(len(digits.train) / 200)
    assert recorder.events[0] == ("start", 1, 0)
    assert recorder.events[-1] == ("end", None)
    assert [s for (s,) in recorder.kinds("step")] == list(range(1, 2 * steps_per_epoch + 1))
    logged = [s for s, _ in recorder.kinds("loss")]
    assert logged == [1] + [s for s in range(3, 2 * steps_per_epoch + 1, 3)]
    assert recorder.kinds("epoch") == [(1, steps_per_epoch), (2, 2 * steps_per_epoch)]
    assert [row["epoch"] for row in result.history] == [1, 2]
    # a loss is reported before its step's update: the step event follows it
    first_loss = recorder.events.index(("loss", 1, recorder.kinds("loss")[0][1]))
    assert recorder.events[first_loss + 1] == ("step", 1)


def test_resume_runs_the_same_callbacks_from_the_checkpoint(digits, tmp_path):
    out = tmp_path / "run"
    fit(_vae(digits), digits, epochs=1, batch_size=500, log_every=1, device="cpu", out=out,
        progress=False)
    recorder = Recorder()
    resume(out, epochs=2, device="cpu", progress=False, callbacks=[recorder])
    assert recorder.events[0] == ("start", 2, 3)  # epoch 2, after 3 steps of epoch 1
    assert [s for s, _ in recorder.kinds("loss")] == [4, 5, 6]
    assert recorder.kinds("epoch") == [(2, 6)]
    assert recorder.events[-1] == ("end", None)


def test_a_callback_that_raises_ends_training_and_is_told(digits):
    recorder = Recorder(fail_at_step=3)
    vae = _vae(digits)
    with pytest.raises(RuntimeError, match="stop here"):
        fit(vae, digits, epochs=1, batch_size=200, log_every=1, device="cpu", progress=False,
            callbacks=[recorder])
    kind, error = recorder.events[-1]
    assert kind == "end" and isinstance(error, RuntimeError)
    assert [s for (s,) in recorder.kinds("step")] == [1, 2]  # step 3 never updated


def test_a_callback_must_be_a_callback(digits):
    with pytest.raises(ConfigError, match="a callback must be a pyro_vae.callbacks.Callback"):
        fit(_vae(digits), digits, epochs=1, device="cpu", progress=False,
            callbacks=[lambda trainer: None])


def test_early_stopping_ends_cleanly_after_patience_epochs_without_improvement(digits, tmp_path):
    class Flat(Callback):  # pretend the validation ELBO never improves after epoch 1
        def on_epoch_end(self, trainer, row):
            row["val_elbo"] = -10.0

    stopper = EarlyStopping(patience=2)
    result = fit(_vae(digits), digits, epochs=10, batch_size=500, device="cpu",
                 out=tmp_path / "run", progress=False, callbacks=[Flat(), stopper])
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert stopper.stopped_epoch == 3
    assert (tmp_path / "run" / "samples.png").exists()
    with pytest.raises(ConfigError, match="patience must be a positive integer"):
        EarlyStopping(patience=0)


def test_training_and_resuming_hold_the_run_lock(digits, tmp_path):
    from pyro_vae import runs

    seen = []

    class TryTheLock(Callback):
        def on_fit_start(self, trainer):
            with pytest.raises(runs.RunError, match="is in use by another pyro-vae process"):
                with runs.lock_run(trainer.run_dir):
                    pass
            seen.append(trainer.state.epoch)

    out = tmp_path / "run"
    fit(_vae(digits), digits, epochs=1, batch_size=500, device="cpu", out=out, progress=False,
        callbacks=[TryTheLock()])
    resume(out, epochs=2, device="cpu", progress=False, callbacks=[TryTheLock()])
    assert seen == [1, 2]
    with runs.lock_run(out):  # held elsewhere: a resume is refused, and the run is unchanged
        before = (out / "metrics.jsonl").read_bytes()
        with pytest.raises(runs.RunError, match="is in use by another pyro-vae process"):
            resume(out, epochs=3, device="cpu", progress=False)
        assert (out / "metrics.jsonl").read_bytes() == before
