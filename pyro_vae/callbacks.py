"""Training callbacks: what happens around the steps of :class:`pyro_vae.training.Trainer`.

The trainer runs the steps; everything else a run does is a callback: the progress bar, the
divergence check, ``metrics.jsonl`` and the weights, ``checkpoint.pt``, the SIGINT/SIGTERM stop
and experiment tracking (:mod:`pyro_vae.tracking`). :func:`pyro_vae.fit` and
:func:`pyro_vae.resume` share one trainer, so a callback behaves the same in both. A user adds
one with ``fit(..., callbacks=[MyCallback()])``::

    class PrintValidation(Callback):
        def on_epoch_end(self, trainer, row):
            print(row["epoch"], row["val_elbo"])

Hooks (every one optional; each receives the trainer, whose public attributes are ``vae``,
``dataset``, ``config`` (:class:`~pyro_vae.config.TrainConfig`), ``run_config`` (what
``config.json`` holds), ``run_dir`` (``None`` without one, and on torchrun ranks other than 0),
``context`` (:class:`~pyro_vae.distributed.Context`), ``state`` (``epoch``, ``step``,
``position``), ``history``, ``optimizer`` and ``objective``):

- ``on_fit_start(trainer)``: before the first step (after a checkpoint has been restored);
- ``on_loss(trainer, step, value)``: the training loss per datapoint of step ``step``
  (1-based), read on the host every ``log_every`` steps and on the first; it runs before that
  step's optimizer update, so a callback that raises leaves the parameters as they were;
- ``on_step_end(trainer)``: after every optimizer update (``trainer.state.step`` counts them);
- ``on_epoch_end(trainer, row)``: ``row`` is the epoch's line of ``metrics.jsonl``
  (``epoch``, ``step``, ``train_loss``, ``beta``, ``val_elbo``, ``val_elbo_se``,
  ``epoch_time_s``, ``elapsed_s``);
- ``on_fit_end(trainer, error)``: always, last; ``error`` is the exception that ends training,
  or ``None``.

A callback ends training cleanly after the current epoch by setting
``trainer.stop_requested = True`` (as :class:`EarlyStopping` does).

Under torchrun every rank calls every hook at the same point; a callback that writes files
checks ``trainer.context.is_main``.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

from . import runs
from .errors import ConfigError, TrainingError, TrainingInterrupted


class Callback:
    """Base class of training callbacks; override the hooks you need (see the module)."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_loss(self, trainer, step: int, value: float) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar over all steps of the run, showing the last loss read and the epoch."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_fit_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        config = trainer.config
        self.bar = tqdm(total=config.epochs * trainer.steps_per_epoch, initial=trainer.state.step,
                        disable=not (self.enabled and trainer.context.is_main), unit="step",
                        desc=f"train {config.objective}", dynamic_ncols=True)

    def on_loss(self, trainer, step: int, value: float) -> None:
        self.bar.set_postfix(loss=f"{value:.3f}", epoch=trainer.state.epoch, refresh=False)

    def on_step_end(self, trainer) -> None:
        self.bar.update(1)

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        if self.bar is not None:
            self.bar.close()


class DivergenceStop(Callback):
    """Stops the run in one line when the loss read back is not finite, naming the term of the
    bound that is not (the check runs before the optimizer update: the parameters are intact)."""

    def on_loss(self, trainer, step: int, value: float) -> None:
        if not math.isfinite(value):
            trainer.state.step += 1
            raise TrainingError(trainer.divergence_message(value))


class MetricsWriter(Callback):
    """Adds each epoch's row to ``metrics.jsonl``. The file is kept encoded in memory (it holds
    the run's history when training starts, a resumed run's included): each epoch the row is
    encoded here and the whole file handed, as bytes, to the trainer's background writer, which
    replaces it atomically (fsync'ed; a crash never tears a line). No JSON is read or written on
    that thread: work it did under the GIL would hold up the training steps.

    ``weights.pt`` is written with each checkpoint (:meth:`~pyro_vae.training.Trainer.
    save_checkpoint`): the weights of the checkpoint's step, at the end the final ones. A
    callback added to the run sees the epoch's row and weights on disk in its own
    ``on_epoch_end`` (the trainer writes the weights then too)."""

    def __init__(self):
        self._lines: list[bytes] = []

    def on_fit_start(self, trainer) -> None:
        self._lines = [runs.metrics_line(row) for row in trainer.history]

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        self._lines.append(runs.metrics_line(row))
        if trainer.run_dir is not None:
            path, data = trainer.run_dir / runs.METRICS_FILE, b"".join(self._lines)
            trainer.write_later(lambda: runs.write_bytes(path, data))


class Checkpointer(Callback):
    """Writes ``checkpoint.pt`` at the end of an epoch when it is due
    (``trainer.checkpoint_due()``): after the run's first epoch, then once ``checkpoint_every``
    seconds (config) have passed since the last checkpoint; 0 checkpoints every epoch. The
    trainer always checkpoints the end of training, and :class:`SignalStop` a signal's stop.
    A run killed between checkpoints (SIGKILL, a power cut) resumes from the last one and
    replays the epochs after it exactly: at most the interval of work is lost. Every rank takes
    part (the ranks' random-number states are gathered into the checkpoint)."""

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        if trainer.checkpoint_due():
            trainer.save_checkpoint()


class SignalStop(Callback):
    """SIGINT/SIGTERM become a stop after the current step: the state at that step is
    checkpointed and :class:`~pyro_vae.errors.TrainingInterrupted` says how to resume. A second
    Ctrl-C stops at once. Under torchrun the ranks agree on a stop at logging steps (a
    collective), so that all of them stop after the same step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def on_step_end(self, trainer) -> None:
        context, state = trainer.context, trainer.state
        if not context.distributed:
            stop_signal = self.signal_name
        elif state.step % trainer.config.log_every == 0:
            stop_signal = context.agreed_signal(self.signal_name)
        else:
            return
        if stop_signal is None:
            return
        trainer.save_checkpoint(mid_epoch=True)
        if trainer.run_dir is not None:
            outcome = f"; checkpoint saved; resume with: pyro-vae train --resume {trainer.run_dir}"
        elif not context.is_main:
            outcome = f" (rank {context.rank}; rank 0 saves the checkpoint)"
        else:
            outcome = "; no run directory, nothing saved"
        raise TrainingInterrupted(f"{stop_signal} at epoch {state.epoch}, step {state.step}"
                                  f"{outcome}")

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class EarlyStopping(Callback):
    """Ends training cleanly when the validation ELBO has not improved by more than
    ``min_delta`` nats per datapoint for ``patience`` epochs (the run directory, figures and
    checkpoint are those of the last epoch trained; ``resume`` can continue it)."""

    def __init__(self, patience: int = 10, min_delta: float = 0.0):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"EarlyStopping: patience must be a positive integer, not "
                              f"{patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0
                and math.isfinite(min_delta)):
            raise ConfigError(f"EarlyStopping: min_delta must be a non-negative number, not "
                              f"{min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best = -math.inf
        self.stale = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, trainer) -> None:
        for row in trainer.history:  # a resumed run: its epochs so far count
            self._update(row["val_elbo"])

    def _update(self, value: float) -> None:
        if value > self.best + self.min_delta:
            self.best, self.stale = value, 0
        else:
            self.stale += 1

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        self._update(row["val_elbo"])
        if self.stale >= self.patience:
            trainer.stop_requested = True
            self.stopped_epoch = row["epoch"]


def default_callbacks(progress: bool = True) -> list[Callback]:
    """What every run does, in this order: progress, divergence stop, metrics and weights,
    checkpoint, signal stop."""
    return [ProgressBar(progress), DivergenceStop(), MetricsWriter(), Checkpointer(), SignalStop()]
