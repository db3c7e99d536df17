"""Training: stochastic variational inference with one ``torch.optim`` optimizer.

:func:`fit` drives an objective from :mod:`pyro_vae.objectives` through
:class:`pyro_vae.distributed.LossModule` (its ``differentiable_loss`` as an ``nn.Module`` that
owns the VAE's parameters), the same computation ``pyro.infer.SVI`` performs, with three
choices that make it fast:

- Pyro's argument/support validation runs on the first step only (bad input is caught there),
  then is switched off;
- one Adam optimizer over all of the VAE's parameters;
- the loss is read back to the host every ``log_every`` steps, not every step.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed, runs
from .data import Dataset, LazyRows, from_array, iter_chunks, load_data
from .errors import ConfigError, PyroVAEError
from .evaluation import evaluate
from .log_weights import log_weights
from .objectives import DEFAULT_PARTICLES, OBJECTIVES, make_objective


class TrainingError(PyroVAEError):
    """Training cannot go on (for example, the loss became NaN)."""


@dataclass
class TrainConfig:
    """The training half of a run's configuration (written to ``config.json``)."""

    objective: str = "elbo"
    particles: int = 1
    beta: float = 1.0
    alpha: float | None = None
    anneal_steps: int = 0
    free_bits: float = 0.0
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    val_particles: int = 1

    def validate(self) -> "TrainConfig":
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: "
                              f"{', '.join(OBJECTIVES)}")
        if not isinstance(self.anneal_steps, int) or self.anneal_steps < 0:
            raise ConfigError(f"anneal-steps must be a non-negative integer, not {self.anneal_steps!r}")
        for name in ("particles", "epochs", "batch_size", "log_every", "val_particles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, "
                                  f"not {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, not {self.lr!r}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a non-negative number, not {self.beta!r}")
        resolve_device(self.device)
        return self


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained VAE, the per-epoch metrics, and the run directory."""

    vae: Any
    history: list[dict[str, Any]]
    config: dict[str, Any]
    run_dir: Path | None = None


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda[:i]`` must exist."""
    text = str(spec)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {text!r}; use auto, cpu or cuda[:i]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} was asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r} does not exist "
                              f"({torch.cuda.device_count()} CUDA device(s) found)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {text!r}; use auto, cpu or cuda[:i]")
    return device


def as_dataset(data: Dataset | str | Path | torch.Tensor) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_data(data)
    if torch.is_tensor(data):
        return from_array(data.detach().cpu().numpy(), name="tensor")
    raise ConfigError(f"data must be a Dataset, a name, a path or a tensor, not {type(data).__name__}")


def check_compatible(vae, dataset: Dataset) -> None:
    """Refuse data that do not fit the VAE: dimension, labels, then the likelihood's support."""
    if dataset.data_dim != vae.data_dim:
        raise ConfigError(f"data {dataset.name!r} have {dataset.data_dim} dimensions per "
                          f"datapoint, but the VAE expects {vae.data_dim}")
    if vae.conditional:
        if dataset.split_labels("train") is None:
            raise ConfigError(f"a conditional VAE needs labelled data; {dataset.name!r} has no labels")
        if dataset.num_classes > vae.num_classes:
            raise ConfigError(f"data {dataset.name!r} have {dataset.num_classes} classes, but the "
                              f"VAE was built for {vae.num_classes}")
        with pyro.validation_enabled(True):  # every label once, so steps need not check
            for split in ("train", "val", "test"):
                labels = dataset.split_labels(split)
                try:
                    vae.labels(labels)
                except ConfigError as exc:
                    raise ConfigError(f"{split} labels of {dataset.name!r}: {exc}") from None
    for split in ("train", "val", "test"):
        for chunk in iter_chunks(dataset.rows(split)):  # streamed for memory-mapped data
            vae.likelihood.check_support(chunk)


def labels_for(vae, dataset: Dataset, split: str) -> torch.Tensor | None:
    """The labels a conditional VAE needs for ``split`` (``None`` for an unconditional VAE)."""
    return dataset.split_labels(split) if vae.conditional else None


def _check_free_space(vae, run_dir: Path, created: bool) -> None:
    """Refuse to start when the run directory's disk cannot hold a few checkpoints."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in vae.parameters())
    # weights + checkpoint (weights and two Adam moments), twice during an atomic rewrite
    needed = 8 * parameter_bytes + (16 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise runs.RunError(f"not enough free disk space in {run_dir}: {free >> 20} MiB free, "
                            f"about {needed >> 20} MiB needed for checkpoints")


def dry_run(vae, objective, dataset: Dataset) -> None:
    """Score two training datapoints with validation on: a combination that cannot work
    (meanfield without a closed-form KL, free bits with a non-factorized guide, …) fails here,
    in one line, before any run directory exists or any step is taken."""
    x = dataset.train[:2].to(vae.device)
    y = labels_for(vae, dataset, "train")
    y = None if y is None else y[:2].to(vae.device)
    # its warnings (Pyro's model/guide checks) come from the validated first step, once
    with _refusals("the model cannot be scored on the data"), torch.no_grad(), \
            pyro.validation_enabled(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective.differentiable_loss(vae.model, vae.guide, x, y)


@contextmanager
def _refusals(what: str):
    """Pyro's and torch's validation errors (raised as ValueError & co.) become one line."""
    try:
        yield
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        if isinstance(exc, PyroVAEError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainingError(f"{what}: {first}") from exc


def fit(vae, data: Dataset | str | Path | torch.Tensor, objective: str = "elbo", *,
        particles: int | None = None, beta: float = 1.0, alpha: float | None = None,
        anneal_steps: int = 0, free_bits: float = 0.0, epochs: int = 100, batch_size: int = 128,
        lr: float = 1e-3, seed: int = 0, device: str = "auto", out: str | Path | None = None,
        log_every: int = 10, val_particles: int = 1, progress: bool = True,
        extra_config: dict | None = None) -> FitResult:
    """Train ``vae`` on ``data`` with ``objective`` (a name from the contract).

    ``particles`` defaults to 1 for ``elbo``/``meanfield``/``stl`` and 5 for the importance-
    weighted objectives; ``alpha`` is the Rényi α; ``anneal_steps`` > 0 raises β linearly from 0
    to ``beta`` over that many steps (KL warm-up); ``free_bits`` is λ in nats per latent
    dimension (Kingma et al. 2016).

    Every epoch records the training loss per datapoint (the negative bound being optimized),
    the validation ELBO per datapoint and the wall-clock time; with ``out`` the run directory
    receives ``config.json``, ``metrics.jsonl`` (one line per epoch), ``weights.pt`` (rewritten
    every epoch) and, at the end, ``reconstructions.png``, ``samples.png`` and ``loss.png``.

    All input is checked before the run directory is created.
    """
    if objective in OBJECTIVES and particles is None:
        particles = DEFAULT_PARTICLES[objective]
    config = TrainConfig(objective=objective, particles=particles, beta=beta, alpha=alpha,
                         anneal_steps=anneal_steps, free_bits=free_bits, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, device=str(device),
                         log_every=log_every, val_particles=val_particles).validate()
    dataset = as_dataset(data)
    check_compatible(vae, dataset)
    loss_fn = make_objective(config.objective, config.particles, config.beta,
                             free_bits=config.free_bits, alpha=config.alpha)
    if config.anneal_steps and config.objective == "dreg":
        raise ConfigError("objective 'dreg' cannot anneal β (its gradient identity needs β = 1); "
                          "drop --anneal-steps or use 'iwae'")
    torch_device = resolve_device(config.device)
    context = distributed.context_from_environment(torch_device)
    torch_device = context.device
    vae.to(torch_device)
    dry_run(vae, loss_fn, dataset)
    if context.distributed and not context.is_main:
        out = None  # rank 0 alone writes the run directory
    full_config = {
        "model": vae.config,
        "training": asdict(config),
        "data": {**dataset.source, "name": dataset.name, "data_shape": list(dataset.data_shape),
                 "num_train": len(dataset.train), "num_val": len(dataset.val),
                 "num_test": len(dataset.test)},
        **(extra_config or {}),
    }
    existed = out is not None and Path(out).expanduser().exists()
    run_dir = runs.prepare_run_dir(out) if out is not None else None
    if run_dir is not None:
        _check_free_space(vae, run_dir, created=not existed)
    try:
        if run_dir is not None:
            runs.write_config(run_dir, full_config)
        history = _train(vae, dataset, config, loss_fn, torch_device, run_dir,
                         progress and context.is_main, context=context)
    except BaseException:
        if (run_dir is not None and not runs.read_metrics(run_dir)
                and not (run_dir / runs.CHECKPOINT_FILE).exists()):
            # Nothing worth keeping (no epoch ended, no checkpoint): leave no half-written run.
            for child in run_dir.iterdir() if existed else ():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if run_dir is not None:
        write_figures(vae, dataset.to(torch_device), history, run_dir)
    return FitResult(vae=vae, history=history, config=full_config, run_dir=run_dir)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived during training; the state at that step was checkpointed."""


@dataclass
class _LoopState:
    """Everything that makes a run continue exactly where it stopped (see ``checkpoint.pt``)."""

    epoch: int = 1                        # the epoch in progress (or about to start)
    position: int = 0                     # datapoints of that epoch already consumed
    step: int = 0                         # optimizer steps taken so far
    order: torch.Tensor | None = None     # this epoch's permutation, while it is in progress
    loss_sum: float = 0.0                 # the epoch's weighted loss so far


def _state_dict(vae, optimizer, state: _LoopState, order_generator: torch.Generator,
                rank_states: list[dict] | None = None) -> dict:
    device = vae.device
    rng = {"torch": torch.get_rng_state(), "order": order_generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if rank_states is not None:  # under torchrun: every rank's stream, in rank order
        rng["ranks"] = rank_states
    return {"model": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": rng, "epoch": state.epoch,
            "position": state.position, "step": state.step,
            "order": None if state.order is None else state.order.cpu(),
            "loss_sum": state.loss_sum}


def checkpoint_processes(checkpoint: dict) -> int:
    """How many torchrun processes wrote ``checkpoint`` (1 for a single process)."""
    ranks = checkpoint["rng"].get("ranks")
    return 1 if ranks is None else len(ranks)


def _load_state(checkpoint: dict, vae, optimizer, order_generator: torch.Generator,
                context: distributed.Context = distributed.SINGLE) -> _LoopState:
    vae.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"]
    if context.distributed:
        if checkpoint_processes(checkpoint) != context.world_size:
            raise ConfigError(f"the checkpoint was written by {checkpoint_processes(checkpoint)} "
                              f"process(es), and {context.world_size} were started")
        rng = {**rng, **rng["ranks"][context.rank]}  # this rank's own stream
    torch.set_rng_state(rng["torch"])
    order_generator.set_state(rng["order"])
    if "cuda" in rng and vae.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], vae.device)
    order = checkpoint["order"]
    return _LoopState(epoch=int(checkpoint["epoch"]), position=int(checkpoint["position"]),
                      step=int(checkpoint["step"]),
                      order=order,  # placed by the loop (device or host)
                      loss_sum=float(checkpoint["loss_sum"]))


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request that the loop honours after the current step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _nonfinite_term(vae, x, y, num_data: int) -> str:
    """Which term of the bound is not finite at the current parameters (for the stop message)."""
    if any(not bool(torch.isfinite(p).all()) for p in vae.parameters()):
        return "the parameters became non-finite (the optimizer step diverged)"
    with torch.no_grad():
        weights = log_weights(vae.model, vae.guide, x, y, num_data=num_data)
    for name, term in (("log p(x|z)", weights.log_likelihood), ("log p(z)", weights.log_prior),
                       ("log q(z|x)", weights.log_guide)):
        if not bool(torch.isfinite(term).all()):
            return f"the term {name} is not finite"
    return "every term is finite again at the current parameters (a transient overflow)"


def _train(vae, dataset: Dataset, config: TrainConfig, loss_fn, torch_device: torch.device,
           run_dir: Path | None, progress: bool, checkpoint: dict | None = None,
           history: list[dict[str, Any]] | None = None,
           context: distributed.Context = distributed.SINGLE) -> list[dict[str, Any]]:
    """The epoch loop; returns the per-epoch metrics. With ``checkpoint`` it continues a run
    exactly where the checkpoint left it. Under torchrun (``context``) each rank trains on its
    shard of every minibatch (see :mod:`pyro_vae.distributed`)."""
    pyro.set_rng_seed(config.seed + context.rank)
    vae.to(torch_device)
    dataset = dataset.to(torch_device)
    train = dataset.train
    train_labels = labels_for(vae, dataset, "train")
    num_data = train.shape[0]
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    loss_module = distributed.wrap(vae, loss_fn, context)
    order_generator = torch.Generator().manual_seed(config.seed)
    state = _LoopState() if checkpoint is None else _load_state(checkpoint, vae, optimizer,
                                                                order_generator, context)
    # Minibatch indices live where the rows are read: on the device for in-memory data, on the
    # host for memory-mapped rows (read there, so a device-side order would be copied back every
    # step, a synchronisation on a GPU); pinned on CUDA so that the labels' indices go up
    # asynchronously.
    streamed = isinstance(train, LazyRows)
    index_device = torch.device("cpu") if streamed else torch_device
    pin = streamed and torch_device.type == "cuda"

    def placed(order: torch.Tensor) -> torch.Tensor:
        order = order.to(index_device)
        return order.pin_memory() if pin else order

    if state.order is not None:
        state.order = placed(state.order)
    if not context.is_main:
        state.loss_sum = 0.0  # the checkpoint's sum so far is every rank's: counted once, on rank 0
    history = list(history or [])
    steps_per_epoch = math.ceil(num_data / config.batch_size)
    started = time.perf_counter()
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=state.step, disable=not progress,
               unit="step", desc=f"train {config.objective}", dynamic_ncols=True)

    def save_checkpoint() -> None:
        """Rank 0 (or the one process) writes; every rank calls this at the same point, since
        under torchrun the ranks' random-number states are gathered for it."""
        rank_states = context.rng_states()
        if run_dir is not None:
            runs.save_checkpoint(run_dir, _state_dict(vae, optimizer, state, order_generator,
                                                      rank_states))

    validate_next = True  # validate the first step of this process, then run fast
    try:
        # A diverging loss is reported once, by the checks below, not by Pyro's warning per step.
        with pyro.validation_enabled(False), warnings.catch_warnings(), _StopRequest() as stop:
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            while state.epoch <= config.epochs:
                epoch_start = time.perf_counter()
                if state.order is None:
                    state.order = placed(torch.randperm(num_data, generator=order_generator))
                    state.position, state.loss_sum = 0, 0.0
                loss_sum = torch.tensor(state.loss_sum, device=torch_device)
                while state.position < num_data:
                    global_batch = state.order[state.position:state.position + config.batch_size]
                    batch = context.shard(global_batch)
                    x = train[batch]
                    if dataset.dynamic_binarization:
                        x = torch.bernoulli(x)
                    y = (None if train_labels is None
                         else train_labels[batch.to(torch_device, non_blocking=True)])
                    if config.anneal_steps:
                        loss_fn.beta = config.beta * min(1.0, state.step / config.anneal_steps)
                    if validate_next:
                        with _refusals("the first training step failed"), \
                                pyro.validation_enabled(True):
                            loss = loss_module(x, y, num_data=num_data)
                        validate_next = False
                    else:
                        loss = loss_module(x, y, num_data=num_data)
                    # Every log_every steps the loss is read back (the only host sync), before
                    # the optimizer step, so a divergence is caught with the parameters intact.
                    if (state.step + 1) % config.log_every == 0 or state.step == 0:
                        reading = loss.detach()
                        if context.distributed:  # the ranks' mean: all of them stop together
                            reading = context.all_sum(reading.clone()) / context.world_size
                        value = float(reading) / num_data
                        if not math.isfinite(value):
                            state.step += 1
                            raise TrainingError(_divergence_message(
                                value, state, _nonfinite_term(vae, x, y, num_data), run_dir))
                        bar.set_postfix(loss=f"{value:.3f}", epoch=state.epoch, refresh=False)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    # The loss estimates the data set's total; weight by this batch's share.
                    loss_sum += loss.detach() * (x.shape[0] / num_data)
                    state.position += global_batch.shape[0]
                    state.step += 1
                    bar.update(1)
                    # under torchrun the ranks agree on a stop at logging steps only (a
                    # collective), so that all of them stop after the same step
                    if not context.distributed:
                        stop_signal = stop.signal_name
                    elif state.step % config.log_every == 0:
                        stop_signal = context.agreed_signal(stop.signal_name)
                    else:
                        stop_signal = None
                    if stop_signal is not None:
                        # every rank is here at the same step: the epoch's loss so far is theirs
                        # together (rank 0's checkpoint resumes in one process)
                        state.loss_sum = float(context.all_sum(loss_sum))
                        save_checkpoint()
                        if run_dir is not None:
                            outcome = ("; checkpoint saved; resume with: pyro-vae train "
                                       f"--resume {run_dir}")
                        elif not context.is_main:
                            outcome = f" (rank {context.rank}; rank 0 saves the checkpoint)"
                        else:
                            outcome = "; no run directory, nothing saved"
                        raise TrainingInterrupted(f"{stop_signal} at epoch {state.epoch}, "
                                                  f"step {state.step}{outcome}")
                train_loss = float(context.all_sum(loss_sum)) / num_data
                if not math.isfinite(train_loss):
                    raise TrainingError(_divergence_message(
                        train_loss, state, _nonfinite_term(vae, x, y, num_data), run_dir))
                val_elbo, val_elbo_se = _validation_elbo(vae, dataset, config.val_particles,
                                                         state.epoch, context)
                row = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
                       "beta": loss_fn.beta, "val_elbo": val_elbo, "val_elbo_se": val_elbo_se,
                       "epoch_time_s": time.perf_counter() - epoch_start,
                       "elapsed_s": time.perf_counter() - started}
                history.append(row)
                state.epoch, state.order, state.position, state.loss_sum = state.epoch + 1, None, 0, 0.0
                if run_dir is not None:
                    runs.append_metrics(run_dir, row)
                    runs.save_weights(run_dir, vae)
                save_checkpoint()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainingError(f"the disk is full ({exc.filename or run_dir}); the last complete "
                                "checkpoint is kept") from None
        raise
    finally:
        bar.close()
    return history


def _validation_elbo(vae, dataset: Dataset, particles: int, epoch: int,
                     context: distributed.Context) -> tuple[float, float]:
    """The validation split's mean ELBO per datapoint and its standard error.

    Under torchrun each rank scores a contiguous part of the split (its own seed) and the sums
    Σ ELBO, Σ ELBO² and the count are all-reduced: every rank gets the same two numbers for
    1/N of the work. In one process this is ``evaluate`` on the split with ``seed=epoch``."""
    if not context.distributed:
        val = evaluate(vae, dataset, split="val", particles=particles, seed=epoch)
        return val.summary["elbo"], val.summary["elbo_se"]
    rows = dataset.rows("val")
    part = torch.arange(len(rows)).tensor_split(context.world_size)[context.rank]
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    if len(part):
        lo, hi = int(part[0]), int(part[-1]) + 1
        shard = (LazyRows(rows.array, rows.index[lo:hi], rows.device)
                 if isinstance(rows, LazyRows) else rows[lo:hi])
        labels = labels_for(vae, dataset, "val")
        elbo = evaluate(vae, shard, particles=particles,
                        labels=None if labels is None else labels[lo:hi],
                        seed=epoch * context.world_size + context.rank).elbo.double()
        totals = torch.stack([elbo.sum(), elbo.pow(2).sum(),
                              torch.tensor(float(len(elbo)), dtype=torch.float64)]).to(totals)
    total, squares, n = (float(t) for t in context.all_sum(totals))
    mean = total / n
    variance = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(variance / n)


def _divergence_message(value: float, state: _LoopState, term: str, run_dir: Path | None) -> str:
    kept = (f"; the last good checkpoint (end of epoch {state.epoch - 1}) is kept in {run_dir}"
            if run_dir is not None and state.epoch > 1 else "")
    return (f"the loss became {value} at step {state.step} (epoch {state.epoch}): {term}{kept}; "
            "try a smaller --lr")


def resume(run_dir: str | Path, epochs: int | None = None, device: str = "auto",
           progress: bool = True) -> FitResult:
    """Continue the run in ``run_dir`` from its ``checkpoint.pt`` (up to ``epochs`` in all,
    default: the run's own). On the same device with the same software the result is exactly
    that of an uninterrupted run: model, optimizer, random-number and epoch-position state are
    all restored. A run trained under torchrun resumes exactly under torchrun with as many
    processes (each rank takes back its own random-number stream), or in one process."""
    run = runs.load_run(run_dir)
    checkpoint = runs.load_checkpoint(run.path)
    processes = checkpoint_processes(checkpoint)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and world_size != processes:
        raise ConfigError(f"{run.path} was checkpointed by {processes} process(es); resume it "
                          + (f"with torchrun --nproc_per_node={processes}" if processes > 1
                             else "without torchrun"))
    training = dict(run.config.get("training", {}))
    try:
        config = TrainConfig(**training)
    except TypeError as exc:
        raise runs.RunError(f"{run.path}: the training configuration is not valid ({exc})") from None
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
    dataset = run.data()
    vae = run.vae
    check_compatible(vae, dataset)
    loss_fn = make_objective(config.objective, config.particles, config.beta,
                             free_bits=config.free_bits, alpha=config.alpha)
    context = distributed.context_from_environment(resolve_device(config.device))
    torch_device = context.device
    history = [row for row in run.history if row["epoch"] <= finished]
    full_config = {**run.config, "training": asdict(config)}
    run_dir = run.path if context.is_main else None  # rank 0 alone writes
    if run_dir is not None:
        runs.write_metrics(run_dir, history)  # drop a row written after the checkpoint, if any
        runs.write_config(run_dir, full_config)
    history = _train(vae, dataset, config, loss_fn, torch_device, run_dir,
                     progress and context.is_main, checkpoint=checkpoint, history=history,
                     context=context)
    if run_dir is not None:
        write_figures(vae, dataset.to(torch_device), history, run_dir)
    return FitResult(vae=vae, history=history, config=full_config, run_dir=run_dir)


def write_figures(vae, dataset: Dataset, history: list[dict], run_dir: Path) -> None:
    """``reconstructions.png`` (validation data), ``samples.png`` and ``loss.png``."""
    from . import plots

    with torch.random.fork_rng(devices=[vae.device] if vae.device.type == "cuda" else []):
        torch.manual_seed(0)
        plots.save_reconstructions(vae, dataset.val, run_dir / "reconstructions.png",
                                   labels=labels_for(vae, dataset, "val"))
        plots.save_samples(vae, run_dir / "samples.png")
    plots.save_loss(history, run_dir / "loss.png")
