"""Training: stochastic variational inference with one ``torch.optim`` optimizer.

:class:`Trainer` runs the steps: it drives an objective from :mod:`pyro_vae.objectives`
through :class:`pyro_vae.distributed.LossModule` (its ``differentiable_loss`` as an
``nn.Module`` that owns the VAE's parameters), the same computation ``pyro.infer.SVI``
performs, with three choices that make it fast:

- Pyro's argument/support validation runs on the first step only (bad input is caught there),
  then is switched off;
- one Adam optimizer over all of the VAE's parameters, torch's fused implementation where the
  device has one (:func:`make_optimizer`);
- the loss is read back to the host every ``log_every`` steps, not every step.

Everything around the steps (progress, the divergence stop, ``metrics.jsonl``, checkpoints,
SIGINT/SIGTERM, experiment tracking) is a callback (:mod:`pyro_vae.callbacks`); :func:`fit`
and :func:`resume` share the trainer and its callbacks. The options and their defaults come
from one schema (:mod:`pyro_vae.config`).
"""

from __future__ import annotations

import errno
from contextlib import nullcontext
import inspect
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pyro
import torch

from .lvm import device_of
from . import distributed, lvm, plugins, runs
from . import config as schema
from .callbacks import Callback, default_callbacks
from .checkpoints import LoopState, checkpoint_processes, load_state, state_dict
from .checks import (as_dataset, check_compatible, check_free_space, dry_run, labels_for,
                     refusals, resolve_device)
from .config import TrainConfig
from .data import Dataset, LazyRows
from .errors import ConfigError, TrainingError, TrainingInterrupted
from .evaluation import elbo_per_datapoint, seed_generators
from .log_weights import log_weights
from .objectives import make_objective

__all__ = ["Trainer", "FitResult", "TrainConfig", "TrainingError", "TrainingInterrupted", "fit",
           "resume", "resolve_device", "check_compatible", "labels_for", "as_dataset",
           "dry_run", "write_figures", "FigureWriter", "checkpoint_processes"]

_HOOKS = ("on_fit_start", "on_loss", "on_step_end", "on_epoch_end", "on_fit_end")
#: the clock of the checkpoint interval (``checkpoint_every``); a test replaces it
_clock = time.monotonic


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained VAE, the per-epoch metrics, and the run directory."""

    vae: Any
    history: list[dict[str, Any]]
    config: dict[str, Any]
    run_dir: Path | None = None
    #: the data trained on (on the training device)
    dataset: Dataset | None = None
    #: the figures while a background thread writes them (the command line's run), else None
    figures: "FigureWriter | None" = None

    def wait_for_figures(self) -> None:
        """Return once the run's figures are written (at once unless a background thread is
        writing them); raises what writing them raised (a full disk: ``OSError``)."""
        writer, self.figures = self.figures, None
        if writer is not None:
            writer.wait()


@dataclass
class Strata:
    """The training rows of stratified minibatches (``labelled_batch``)."""

    #: ``[num_data]`` bool: which rows are unlabelled (where the epoch's order is read)
    unlabelled: torch.Tensor
    #: the indices of the labelled rows (host)
    labelled_rows: torch.Tensor
    #: unlabelled rows per step: ``batch_size − labelled_batch``
    unlabelled_batch: int

    @property
    def num_labelled(self) -> int:
        return len(self.labelled_rows)

    @property
    def num_unlabelled(self) -> int:
        return len(self.unlabelled) - len(self.labelled_rows)


def _overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def _checked(callbacks: Sequence[Callback]) -> list[Callback]:
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise ConfigError(f"a callback must be a pyro_vae.callbacks.Callback, not "
                              f"{type(callback).__name__}")
    return list(callbacks)


class Trainer:
    """The epoch loop of one run, with its callbacks (see :mod:`pyro_vae.callbacks`).

    ``run_dir`` is where rank 0 writes (``None``: nowhere); ``checkpoint`` (a loaded
    ``checkpoint.pt``) continues a run exactly where it stopped, with ``history`` its metrics
    so far. Under torchrun (``context``) each rank trains on its shard of every minibatch (see
    :mod:`pyro_vae.distributed`). :meth:`run` returns the per-epoch metrics."""

    def __init__(self, vae, dataset: Dataset, config: TrainConfig, objective, *,
                 device: torch.device, run_dir: Path | None = None,
                 run_config: dict[str, Any] | None = None,
                 context: distributed.Context = distributed.SINGLE,
                 callbacks: Sequence[Callback] = (), progress: bool = True,
                 checkpoint: dict | None = None, history: list[dict[str, Any]] | None = None):
        self.vae, self.config, self.objective = vae, config, objective
        self.device, self.run_dir, self.context = device, run_dir, context
        self.run_config = run_config or {}
        own = default_callbacks(progress)
        self.callbacks = [*own, *_checked(callbacks)]
        # each hook's overriding methods, looked up once (the loop calls them every step):
        # the run's own callbacks', then the user's
        self._hooks = {hook: ([getattr(c, hook) for c in own if _overrides(c, hook)],
                              [getattr(c, hook) for c in self.callbacks[len(own):]
                               if _overrides(c, hook)])
                       for hook in _HOOKS}
        #: writes metrics.jsonl, weights.pt and checkpoint.pt in the background (rank 0)
        self._files = runs.BackgroundWriter()
        pyro.set_rng_seed(config.seed + context.rank)
        vae.to(device)
        self.dataset = dataset.to(device)
        self.optimizer = make_optimizer(vae.parameters(), config.lr)
        self.loss_module = distributed.wrap(vae, objective, context)
        self.order_generator = torch.Generator().manual_seed(config.seed)
        self.state = LoopState() if checkpoint is None else load_state(
            checkpoint, vae, self.optimizer, self.order_generator, context,
            num_train=len(self.dataset.train),
            where=str(run_dir / runs.CHECKPOINT_FILE) if run_dir is not None else "the checkpoint")
        #: (epoch, position, step) of the state that checkpoint.pt holds; None before the first
        self.checkpointed: tuple[int, int, int] | None = (
            None if checkpoint is None
            else (self.state.epoch, self.state.position, self.state.step))
        self._checkpoint_time = _clock()  # the interval counts from the start of training
        self._weights_step: int | None = None  # the step of the weights last queued for weights.pt
        self.history = list(history or [])
        self.num_data = self.dataset.train.shape[0]
        self.steps_per_epoch = math.ceil(self.num_data / config.batch_size)
        #: the last step's (x, y) parts: one, or the unlabelled and the labelled one
        self._batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._loss_sum: torch.Tensor | None = None
        #: set by a callback (``trainer.stop_requested = True``) to end training cleanly after
        #: the current epoch, as if ``epochs`` had been reached (see ``EarlyStopping``)
        self.stop_requested = False
        # Minibatch indices live where the rows are read: on the device for in-memory data, on
        # the host for memory-mapped rows (read there, so a device-side order would be copied
        # back every step, a synchronisation on a GPU); pinned on CUDA so that the labels'
        # indices go up asynchronously.
        streamed = isinstance(self.dataset.train, LazyRows)
        self._index_device = torch.device("cpu") if streamed else device
        self._pin = streamed and device.type == "cuda"
        #: the labelled and unlabelled training rows of stratified minibatches, else None
        self.strata: Strata | None = None
        if config.labelled_batch is not None:
            labelled = labels_for(vae, self.dataset, "train") >= 0
            self.strata = Strata(
                unlabelled=(~labelled).to(self._index_device),
                labelled_rows=torch.nonzero(labelled.cpu()).flatten(),
                unlabelled_batch=config.batch_size - config.labelled_batch)
            self.steps_per_epoch = math.ceil(self.strata.num_unlabelled
                                             / self.strata.unlabelled_batch)
        if self.state.order is not None:
            self.state.order = self._placed(self.state.order)
        if not context.is_main:
            self.state.loss_sum = 0.0  # the checkpoint's sum is every rank's: counted on rank 0

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The last step's minibatch ``(x, y)`` (its two parts joined, with stratified
        minibatches), or ``None`` before the first step."""
        batches = self._batches
        if len(batches) <= 1:
            return batches[0] if batches else None
        return (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))

    def _labelled_stream(self, epoch: int) -> torch.Tensor:
        """The labelled rows of epoch ``epoch``'s stratified minibatches, ``labelled_batch`` per
        step: permutations of the labelled rows one after another, enough for every step of the
        epoch. Drawn from a generator seeded with the run's seed and the epoch, so that a run
        resumed in mid-epoch draws them again exactly, with nothing added to the checkpoint."""
        strata = self.strata
        rows = strata.labelled_rows
        generator = torch.Generator().manual_seed(self.config.seed * 2 ** 24 + epoch)
        needed = self.steps_per_epoch * self.config.labelled_batch
        stream = torch.cat([rows[torch.randperm(len(rows), generator=generator)]
                            for _ in range(math.ceil(needed / len(rows)))])
        return self._placed(stream)

    def _placed(self, order: torch.Tensor) -> torch.Tensor:
        order = order.to(self._index_device)
        return order.pin_memory() if self._pin else order

    def _emit(self, hook: str, *args) -> None:
        own, users = self._hooks[hook]
        for method in own:
            method(self, *args)
        if users and hook == "on_epoch_end":  # a user's callback sees the epoch's files on disk
            if self._weights_step != self.state.step:
                self.save_weights()
            self.wait_for_files()
        for method in users:
            method(self, *args)

    def write_later(self, job) -> None:
        """Queue ``job`` (a function that writes a file of the run directory) on the background
        writer; raises the error of an earlier write that failed (:class:`~pyro_vae.runs.
        BackgroundWriter`)."""
        self._files.submit(job)

    def wait_for_files(self) -> None:
        """Return once every queued file is written; raises the error of a write that failed."""
        self._files.wait()

    def save_weights(self) -> None:
        """Queue ``weights.pt`` (the model's state now) on the background writer; with a
        run directory only (rank 0, or the one process)."""
        if self.run_dir is not None:
            data = runs.serialized({k: v.detach().cpu() for k, v in self.vae.state_dict().items()})
            path = self.run_dir / runs.WEIGHTS_FILE
            self.write_later(lambda: runs.write_bytes(path, data))
        self._weights_step = self.state.step

    def save_checkpoint(self, mid_epoch: bool = False) -> None:
        """Write ``checkpoint.pt`` (rank 0, or the one process). Every rank calls this at the
        same point, since under torchrun the ranks' random-number states are gathered for it.
        ``mid_epoch``: the epoch's loss so far is summed over the ranks into the checkpoint."""
        if mid_epoch and self._loss_sum is not None:
            self.state.loss_sum = float(self.context.all_sum(self._loss_sum))
        rank_states = self.context.rng_states()
        self.save_weights()  # weights.pt goes with each checkpoint, before it
        if self.run_dir is not None:
            # the state is serialized now; the writer thread writes and fsyncs it
            data = runs.serialized(state_dict(self.vae, self.optimizer, self.state,
                                              self.order_generator, rank_states))
            path = self.run_dir / runs.CHECKPOINT_FILE
            self.write_later(lambda: runs.write_bytes(path, data))
        self.checkpointed = (self.state.epoch, self.state.position, self.state.step)
        self._checkpoint_time = _clock()

    def checkpoint_due(self) -> bool:
        """Whether the end of this epoch is checkpointed: at the end of the run's first epoch
        (the run can be resumed from then on), and then once ``config.checkpoint_every``
        seconds have passed since the last checkpoint (0: every epoch). The end of training is
        always checkpointed (:meth:`run`), and a signal's stop too (``SignalStop``). Under
        torchrun the ranks agree (any rank's clock decides: a collective)."""
        every = self.config.checkpoint_every
        if self.checkpointed is None or not every:
            return True
        due = _clock() - self._checkpoint_time >= every
        if self.context.distributed:
            flag = torch.tensor([int(due)], dtype=torch.int64, device=self.device)
            due = bool(self.context.all_sum(flag) > 0)
        return due

    def divergence_message(self, value: float) -> str:
        """The one line that stops a run whose loss became ``value`` (not finite)."""
        x, y = self.batch
        term = _nonfinite_term(self.vae, x, y, self.num_data)
        state = self.state
        kept = ""
        if self.run_dir is not None and self.checkpointed is not None:
            epoch, position, step = self.checkpointed
            at = f"end of epoch {epoch - 1}" if position == 0 else f"epoch {epoch}, step {step}"
            kept = f"; the last good checkpoint ({at}) is kept in {self.run_dir}"
        return (f"the loss became {value} at step {state.step} (epoch {state.epoch}): {term}"
                f"{kept}; try a smaller --lr")

    def run(self) -> list[dict[str, Any]]:
        """Train up to ``config.epochs``; returns the per-epoch metrics."""
        error: BaseException | None = None
        try:
            self._emit("on_fit_start")
            # A diverging loss is reported once, by the checks, not by Pyro's warning per step.
            with pyro.validation_enabled(False), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
                self._epochs()
        except OSError as exc:
            error = exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                error = TrainingError(f"the disk is full ({exc.filename or self.run_dir}); the "
                                      "last complete checkpoint is kept")
                raise error from None
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._files.close()  # every queued file written (an error was raised, or is moot)
            self._emit("on_fit_end", error)
        return self.history

    def _epochs(self) -> None:
        config, state, context = self.config, self.state, self.context
        train, num_data = self.dataset.train, self.num_data
        train_labels = labels_for(self.vae, self.dataset, "train")
        strata = self.strata
        binarize = self.dataset.dynamic_binarization
        started = time.perf_counter()
        validate_next = True  # validate the first step of this process, then run fast
        while state.epoch <= config.epochs and not self.stop_requested:
            epoch_start = time.perf_counter()
            lr = schema.scheduled_lr(config.lr, config.lr_schedule, state.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if state.order is None:
                state.order = self._placed(torch.randperm(num_data, generator=self.order_generator))
                state.position, state.loss_sum = 0, 0.0
            self._loss_sum = loss_sum = torch.tensor(state.loss_sum, device=self.device)
            if strata is None:
                stream, size, step_size = state.order, num_data, config.batch_size
            else:  # the unlabelled rows in the epoch's order; the labelled ones cycled
                stream = state.order[strata.unlabelled[state.order]]
                size, step_size = strata.num_unlabelled, strata.unlabelled_batch
                labelled_stream = self._labelled_stream(state.epoch)
            while state.position < size:
                global_batch = stream[state.position:state.position + step_size]
                if strata is None:
                    parts = ((context.shard(global_batch), num_data),)
                else:
                    at = (state.position // step_size) * config.labelled_batch
                    parts = ((global_batch, strata.num_unlabelled),
                             (labelled_stream[at:at + config.labelled_batch],
                              strata.num_labelled))
                if config.anneal_steps:
                    self.objective.beta = config.beta * min(1.0, state.step / config.anneal_steps)
                loss, batches = None, []
                for batch, count in parts:
                    x = train[batch]
                    if binarize:
                        x = torch.bernoulli(x)
                    y = (None if train_labels is None
                         else train_labels[batch.to(self.device, non_blocking=True)])
                    batches.append((x, y))
                    if validate_next:
                        with refusals("the first training step failed"), \
                                pyro.validation_enabled(True):
                            part = self.loss_module(x, y, num_data=count)
                    else:
                        part = self.loss_module(x, y, num_data=count)
                    loss = part if loss is None else loss + part
                validate_next = False
                self._batches = batches
                # Every log_every steps the loss is read back (the only host sync), before the
                # optimizer step, so a divergence is caught with the parameters intact.
                if (state.step + 1) % config.log_every == 0 or state.step == 0:
                    reading = loss.detach()
                    if context.distributed:  # the ranks' mean: all of them stop together
                        reading = context.all_sum(reading.clone()) / context.world_size
                    self._emit("on_loss", state.step + 1, float(reading) / num_data)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                # The loss estimates the data set's total; weight by this batch's share of the
                # epoch (of its unlabelled rows, with stratified minibatches).
                loss_sum += loss.detach() * (batches[0][0].shape[0] / size)
                state.position += global_batch.shape[0]
                state.step += 1
                self._emit("on_step_end")
            # with stratified minibatches each step estimates the total over all rows too
            train_loss = float(context.all_sum(loss_sum)) / num_data
            if not math.isfinite(train_loss):  # a step between two readings diverged
                raise TrainingError(self.divergence_message(train_loss))
            val_elbo, val_elbo_se = _validation_elbo(self.vae, self.dataset, config.val_particles,
                                                     state.epoch, context)
            row = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
                   "beta": self.objective.beta, "val_elbo": val_elbo, "val_elbo_se": val_elbo_se,
                   "epoch_time_s": time.perf_counter() - epoch_start,
                   "elapsed_s": time.perf_counter() - started}
            self.history.append(row)
            state.epoch, state.order, state.position, state.loss_sum = state.epoch + 1, None, 0, 0.0
            self._loss_sum = None
            self._emit("on_epoch_end", row)
        if self.checkpointed != (state.epoch, state.position, state.step):
            self.save_checkpoint()  # the end of training is always checkpointed
        self.wait_for_files()  # a failed write (a full disk) is reported here at the latest


def _fit_signature() -> inspect.Signature:
    P = inspect.Parameter  # noqa: N806
    parameters = [P("vae", P.POSITIONAL_OR_KEYWORD), P("data", P.POSITIONAL_OR_KEYWORD),
                  P("objective", P.POSITIONAL_OR_KEYWORD,
                    default=schema.BY_NAME["objective"].default, annotation=str)]
    for option in schema.TRAINING:
        if option.name != "objective":
            parameters.append(P(option.name, P.KEYWORD_ONLY, default=option.default,
                                annotation=schema._python_type(option)))
    parameters += [P("out", P.KEYWORD_ONLY, default=None, annotation=str | Path | None),
                   P("progress", P.KEYWORD_ONLY, default=True, annotation=bool),
                   P("callbacks", P.KEYWORD_ONLY, default=(), annotation=Sequence[Callback]),
                   P("extra_config", P.KEYWORD_ONLY, default=None, annotation=dict | None)]
    return inspect.Signature(parameters, return_annotation=FitResult)


def fit(vae, data: Dataset | str | Path | torch.Tensor,
        objective: str = schema.BY_NAME["objective"].default, *, out: str | Path | None = None,
        progress: bool = True, callbacks: Sequence[Callback] = (),
        extra_config: dict | None = None, **options: Any) -> FitResult:
    """Train ``vae`` on ``data`` with ``objective`` (a name from the contract).

    The keyword options are those of section ``training`` of :mod:`pyro_vae.config` (the same
    names, types and defaults as the flags of ``pyro-vae train``): ``particles`` defaults to 1
    for ``elbo``/``meanfield``/``stl`` and 5 for the importance-weighted objectives (per group
    for ``miwae``/``piwae``); ``alpha`` is the Rényi α; ``groups`` is M, the groups of K
    particles of ``miwae`` and ``piwae``; ``elbo_weight`` is the ELBO's share in ``ciwae``;
    ``anneal_steps`` > 0 raises β linearly from 0 to ``beta`` over that many
    steps (KL warm-up); ``free_bits`` is λ in nats per latent dimension (Kingma et al. 2016).
    ``callbacks`` are added to the run's own (:mod:`pyro_vae.callbacks`).

    Every epoch records the training loss per datapoint (the negative bound being optimized),
    the validation ELBO per datapoint and the wall-clock time; with ``out`` the run directory
    receives ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (after
    the first epoch, then once ``checkpoint_every`` seconds have passed since the last one,
    and at the end; see :class:`~pyro_vae.callbacks.Checkpointer`), ``weights.pt`` (written
    with each checkpoint: at the end, the final weights) and, at the end, ``reconstructions.png``,
    ``samples.png`` and ``loss.png``.

    All input is checked before the run directory is created. A program with sites outside
    plate ``"data"`` (global latents, factors or observations) is refused then: the validation
    ELBO per datapoint that every epoch records does not exist for it.
    """
    return _fit(vae, data, objective, out=out, progress=progress, callbacks=callbacks,
                extra_config=extra_config, **options)


def _fit(vae, data: Dataset | str | Path | torch.Tensor,
         objective: str = schema.BY_NAME["objective"].default, *, out: str | Path | None = None,
         progress: bool = True, callbacks: Sequence[Callback] = (),
         extra_config: dict | None = None, background_figures: bool = False,
         **options: Any) -> FitResult:
    """:func:`fit`; with ``background_figures`` the figures are written by a thread
    (:func:`write_figures`) while the caller goes on (the command line's final evaluation):
    ``FitResult.wait_for_figures`` joins it."""
    callbacks = _checked(callbacks)  # before any run directory exists
    config, dataset, loss_fn, context = _prepare(vae, data, objective, options)
    torch_device = context.device
    if context.distributed and not context.is_main:
        out = None  # rank 0 alone writes the run directory
    full_config = {
        "model": lvm.model_config(vae),
        "training": asdict(config),
        "data": {**dataset.source, "name": dataset.name, "data_shape": list(dataset.data_shape),
                 "num_train": len(dataset.train), "num_val": len(dataset.val),
                 "num_test": len(dataset.test)},
        **(extra_config or {}),
    }
    needed = plugins.plugins_of(vae)
    if needed:
        full_config["plugins"] = needed
    existed = out is not None and Path(out).expanduser().exists()
    run_dir = runs.prepare_run_dir(out) if out is not None else None
    if run_dir is not None:
        check_free_space(vae, run_dir, created=not existed)
    with runs.lock_run(run_dir) if run_dir is not None else nullcontext():
        try:
            if run_dir is not None:
                runs.write_config(run_dir, full_config)
            history = Trainer(vae, dataset, config, loss_fn, device=torch_device, run_dir=run_dir,
                              run_config=full_config, context=context, callbacks=callbacks,
                              progress=progress).run()
        except BaseException:
            if (run_dir is not None and not runs.read_metrics(run_dir)
                    and not (run_dir / runs.CHECKPOINT_FILE).exists()):
                # Nothing worth keeping (no epoch ended, no checkpoint): no half-written run.
                for child in run_dir.iterdir() if existed else ():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                if not existed:
                    shutil.rmtree(run_dir, ignore_errors=True)
            raise
        figures = None
        if run_dir is not None:
            figures = write_figures(vae, dataset.to(torch_device), history, run_dir,
                                    background=background_figures)
    return FitResult(vae=vae, history=history, config=full_config, run_dir=run_dir,
                     dataset=dataset.to(torch_device), figures=figures)


fit.__signature__ = _fit_signature()


def _prepare(vae, data, objective: str, options: dict[str, Any]):
    """Everything fit checks before it writes anything: the options, the data against the VAE,
    the objective, the device, and a validated dry run of the objective on two datapoints."""
    if isinstance(options.get("device"), torch.device):
        options["device"] = str(options["device"])
    config = schema.training_config({"objective": objective, **options}, where="fit")
    dataset = as_dataset(data)
    check_compatible(vae, dataset)
    loss_fn = make_objective(config.objective, config.particles, config.beta,
                             free_bits=config.free_bits, alpha=config.alpha,
                             groups=config.groups, elbo_weight=config.elbo_weight)
    context = distributed.context_from_environment(resolve_device(config.device))
    vae.to(context.device)
    dry_run(vae, loss_fn, dataset)
    check_validation(vae, dataset)
    if config.labelled_batch is not None:
        check_labelled_batch(vae, dataset, config, context.distributed)
    return config, dataset, loss_fn, context


def _has_global_terms(vae, dataset: Dataset, rows: torch.Tensor) -> bool:
    """Whether the model's program has terms outside plate ``"data"`` (global latents, factors
    or observations), scored on the training ``rows`` (a property of the program, not of the
    rows)."""
    device = lvm.device_of(vae)
    labels = labels_for(vae, dataset, "train")
    with torch.no_grad(), pyro.validation_enabled(False):
        weights = log_weights(*lvm.programs(vae), dataset.train[rows].to(device),
                              None if labels is None else labels[rows].to(device))
    return weights.global_terms is not None or bool(weights.global_components)


def check_validation(vae, dataset: Dataset) -> None:
    """Refuse, in one line and before anything is written, a model whose validation ELBO per
    datapoint (scored after every epoch) does not exist: a program with terms outside plate
    ``"data"``. Without this the refusal would come only after the first epoch's training."""
    rows = torch.arange(min(2, len(dataset.train)))
    if len(rows) and _has_global_terms(vae, dataset, rows):
        raise ConfigError(f"fit scores a validation ELBO per datapoint after every epoch, and "
                          f"{type(vae).__name__} has sites outside plate \"data\" (global "
                          "latents, factors or observations), which no per-datapoint number "
                          "holds; train it with pyro.infer.SVI and its objectives instead")


def check_labelled_batch(vae, dataset: Dataset, config: TrainConfig,
                         distributed_run: bool = False) -> None:
    """Refuse, in one line, a ``labelled_batch`` that stratified minibatches cannot serve: a
    model that is not semi-supervised, training labels that are not part hidden, a labelled
    part not smaller than the batch or larger than the labelled rows, torchrun, and a model
    with terms outside plate ``"data"`` (each step scores its two parts apart, so such terms
    would be counted twice)."""
    count = config.labelled_batch
    if not lvm.is_semi_supervised(vae):
        raise ConfigError("labelled_batch applies to a semi-supervised model (--semi-supervised, "
                          "M2), not this one")
    labels = labels_for(vae, dataset, "train")
    labelled = 0 if labels is None else int((labels >= 0).sum())
    unlabelled = 0 if labels is None else len(labels) - labelled
    if not labelled or not unlabelled:
        raise ConfigError(f"labelled_batch needs training data with both labelled and unlabelled "
                          f"rows (--labels-per-class); this data has {labelled} labelled and "
                          f"{unlabelled} unlabelled")
    if count >= config.batch_size:
        raise ConfigError(f"labelled_batch {count} must be smaller than batch_size "
                          f"{config.batch_size} (the rest of each batch is unlabelled)")
    if count > labelled:
        raise ConfigError(f"labelled_batch {count} exceeds the {labelled} labelled training "
                          "datapoints")
    if distributed_run:
        raise ConfigError("labelled_batch is not supported under torchrun; drop it there")
    rows = torch.nonzero(labels >= 0).flatten()[:2].to(labels.device)
    if _has_global_terms(vae, dataset, rows):
        raise ConfigError(f"labelled_batch scores a step's labelled and unlabelled rows apart, "
                          f"and {type(vae).__name__} has sites outside plate \"data\" (global "
                          "latents, factors or observations) that would be counted twice; drop "
                          "labelled_batch for this model")


def check_only(vae, data: Dataset | str | Path | torch.Tensor,
               objective: str = schema.BY_NAME["objective"].default, **options: Any) -> TrainConfig:
    """Make every check :func:`fit` makes before training (the options, the data against the
    VAE, the objective scoring the model on two datapoints with validation on), and train
    nothing, write nothing; returns the resolved :class:`TrainConfig`. ``pyro-vae train
    --dry-run`` runs this."""
    return _prepare(vae, data, objective, options)[0]


def resume(run_dir: str | Path, epochs: int | None = None, device: str = "auto",
           progress: bool = True, callbacks: Sequence[Callback] = (),
           data: str | Path | None = None, *, model: Any = None) -> FitResult:
    """Continue the run in ``run_dir`` from its ``checkpoint.pt`` (up to ``epochs`` in all,
    default: the run's own). On the same device with the same software the result is exactly
    that of an uninterrupted run: model, optimizer, random-number and epoch-position state are
    all restored. A run trained under torchrun resumes exactly under torchrun with as many
    processes (each rank takes back its own random-number stream), or in one process. The
    data are the run's own, checked against the size and SHA-256 it recorded; ``data`` finds
    them elsewhere when the run or the file has moved. ``model`` is a fresh instance of the
    run's model, for one that its config cannot rebuild (see :func:`pyro_vae.load_run`)."""
    return _resume_run(run_dir, epochs, device, progress, callbacks, data, model=model)


def _resume_run(run_dir: str | Path, epochs: int | None = None, device: str = "auto",
                progress: bool = True, callbacks: Sequence[Callback] = (),
                data: str | Path | None = None, *, model: Any = None,
                background_figures: bool = False) -> FitResult:
    """:func:`resume`; ``background_figures`` as for :func:`_fit`."""
    run = runs.load_run(run_dir, model=model)
    # another process training or resuming this run is refused before anything is written
    with runs.lock_run(run.path) if _is_main_process() else nullcontext():
        runs.clean_temporary_files(run.path)
        return _resume(run, epochs, device, progress, callbacks, data, background_figures)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resume(run, epochs, device, progress, callbacks, data,
            background_figures: bool = False) -> FitResult:
    checkpoint = runs.load_checkpoint(run.path, vae=run.vae)
    processes = checkpoint_processes(checkpoint)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and world_size != processes:
        raise ConfigError(f"{run.path} was checkpointed by {processes} process(es); resume it "
                          + (f"with torchrun --nproc_per_node={processes}" if processes > 1
                             else "without torchrun"))
    training = run.config.get("training")
    where = run.path / runs.CONFIG_FILE
    if not isinstance(training, dict):
        raise runs.RunError(f"{where} has no valid 'training' section; the run cannot be resumed")
    try:
        config = schema.training_config({**training, "device": "cpu"}, where=str(where))
    except ConfigError as exc:
        raise runs.RunError(f"{exc} (the run's training configuration)") from None
    if epochs is not None:
        config.epochs = epochs
    config.device = str(device)
    config.validate()
    finished = int(checkpoint["epoch"]) - 1
    if config.epochs <= finished:
        raise ConfigError(f"{run.path} has already trained {finished} epochs; ask for more "
                          f"with --epochs (more than {finished})")
    data_name = run.config.get("data", {}).get("name")
    if data_name in (None, "tensor", "array"):
        raise runs.RunError(f"{run.path} was trained on in-memory data; it cannot be resumed "
                            "from the command line (call fit with the same data instead)")
    dataset = run.data(None if data is None else str(data), verify=True)
    vae = run.vae
    check_compatible(vae, dataset)
    loss_fn = make_objective(config.objective, config.particles, config.beta,
                             free_bits=config.free_bits, alpha=config.alpha,
                             groups=config.groups, elbo_weight=config.elbo_weight)
    context = distributed.context_from_environment(resolve_device(config.device))
    torch_device = context.device
    vae.to(torch_device)
    dry_run(vae, loss_fn, dataset)
    check_validation(vae, dataset)
    if config.labelled_batch is not None:
        check_labelled_batch(vae, dataset, config, context.distributed)
    history = [row for row in run.history if row["epoch"] <= finished]
    full_config = {**run.config, "training": asdict(config)}
    run_dir = run.path if context.is_main else None  # rank 0 alone writes
    # the trainer restores the checkpoint (and refuses a damaged one) before anything is written
    trainer = Trainer(vae, dataset, config, loss_fn, device=torch_device, run_dir=run_dir,
                      run_config=full_config, context=context, callbacks=callbacks,
                      progress=progress, checkpoint=checkpoint, history=history)
    if run_dir is not None:
        runs.write_metrics(run_dir, history)  # drop a row written after the checkpoint, if any
        runs.write_config(run_dir, full_config)
    history = trainer.run()
    figures = None
    if run_dir is not None:
        figures = write_figures(vae, dataset.to(torch_device), history, run_dir,
                                background=background_figures)
    return FitResult(vae=vae, history=history, config=full_config, run_dir=run_dir,
                     dataset=dataset.to(torch_device), figures=figures)


def _nonfinite_term(vae, x, y, num_data: int) -> str:
    """Which term of the bound is not finite at the current parameters (for the stop message)."""
    if any(not bool(torch.isfinite(p).all()) for p in vae.parameters()):
        return "the parameters became non-finite (the optimizer step diverged)"
    with torch.no_grad():
        weights = log_weights(*lvm.programs(vae), x, y, num_data=num_data)
    for name, term in (("log p(x|z)", weights.log_likelihood), ("log p(z)", weights.log_prior),
                       ("log q(z|x)", weights.log_guide)):
        if not bool(torch.isfinite(term).all()):
            return f"the term {name} is not finite"
    return "every term is finite again at the current parameters (a transient overflow)"


def _validation_elbo(vae, dataset: Dataset, particles: int, epoch: int,
                     context: distributed.Context) -> tuple[float, float]:
    """The validation split's mean ELBO per datapoint and its standard error.

    Under torchrun each rank scores a contiguous part of the split (its own seed) and the sums
    Σ ELBO, Σ ELBO² and the count are all-reduced: every rank gets the same two numbers for
    1/N of the work. In one process this is ``evaluate``'s ELBO and its standard error on the
    split with ``seed=epoch``, the same numbers, from one pass that computes nothing else
    (:func:`~pyro_vae.evaluation.elbo_per_datapoint`)."""
    if not context.distributed:
        labels = labels_for(vae, dataset, "val")
        elbo = elbo_per_datapoint(vae, dataset.rows("val"), labels, particles, seed=epoch)
        n = elbo.shape[0]
        se = float(elbo.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        return float(elbo.mean()), se
    rows = dataset.rows("val")
    part = torch.arange(len(rows)).tensor_split(context.world_size)[context.rank]
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    if len(part):
        lo, hi = int(part[0]), int(part[-1]) + 1
        shard = (LazyRows(rows.array, rows.index[lo:hi], rows.device)
                 if isinstance(rows, LazyRows) else rows[lo:hi])
        labels = labels_for(vae, dataset, "val")
        elbo = elbo_per_datapoint(vae, shard, None if labels is None else labels[lo:hi],
                                  particles, seed=epoch * context.world_size + context.rank
                                  ).double()
        totals = torch.stack([elbo.sum(), elbo.pow(2).sum(),
                              torch.tensor(float(len(elbo)), dtype=torch.float64)]).to(totals)
    total, squares, n = (float(t) for t in context.all_sum(totals))
    mean = total / n
    variance = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(variance / n)


def write_figures(vae, dataset: Dataset, history: list[dict], run_dir: Path, *,
                  background: bool = False) -> "FigureWriter | None":
    """``reconstructions.png`` (validation data) and ``samples.png`` where the model can
    reconstruct and sample (:mod:`pyro_vae.lvm`), and ``loss.png``.

    The model's outputs (reconstructions, prior samples) are computed here, on the caller's
    thread, under a random state forked and seeded with 0. Turning them into files (the image grids'
    PNG encoding, the loss curves drawn with PIL: a few tenths of a second) needs
    neither the model nor a random state: with ``background`` it runs in a thread, and the
    :class:`FigureWriter` returned joins it (``wait``); otherwise it runs here and ``None`` is
    returned."""
    from . import plots

    device = device_of(vae)
    image = lvm.has(vae, "data_shape") or lvm.has(vae, "data_dim")
    shape = plots._data_shape(vae) if image else ()
    grids = []  # (images [n, D] on the CPU, file, images per row)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_generators(device, 0)
        if image and lvm.has(vae, "reconstruct"):
            rows = plots.reconstruction_rows(vae, dataset.val,
                                             labels=labels_for(vae, dataset, "val"))
            grids.append((rows.detach().cpu(), run_dir / "reconstructions.png", 8))
        if image and lvm.has(vae, "sample"):
            grids.append((vae.sample(64).detach().cpu(), run_dir / "samples.png", 8))
    rows = [dict(row) for row in history]

    def draw() -> None:
        for images, path, per_row in grids:
            plots.save_grid(images, shape, path, nrow=per_row)
        plots.save_loss(rows, run_dir / "loss.png")

    if not background:
        draw()
        return None
    return FigureWriter(draw)


class FigureWriter:
    """A run's figures being written by a background thread (:func:`write_figures`). The thread
    is not a daemon: the process waits for it before it exits, so a figure is never left half
    written; :meth:`wait` joins it and raises what writing the figures raised."""

    def __init__(self, draw):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._draw, args=(draw,),
                                        name="pyro-vae figures")
        self._thread.start()

    def _draw(self, draw) -> None:
        try:
            draw()
        except BaseException as exc:  # handed to the thread that waits
            self._error = exc

    def wait(self) -> None:
        """Block until the figures are written; raise (once) the error that writing them met."""
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def make_optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    """The one Adam over all of a model's parameters: torch's fused implementation where the
    parameters' device has one (CPU, CUDA: a few kernels per step instead of a dozen small
    operations per parameter tensor; the same update up to float rounding), the default
    implementation elsewhere."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(parameters, lr=lr)
