"""Experiment tracking as training callbacks: TensorBoard and MLflow.

``fit(vae, data, ..., callbacks=[TensorBoardCallback("tb/run1")])`` (or ``pyro-vae train
--tensorboard DIR``) writes, on the main process only:

=========================  ================  ==================================================
tag                        step              what
=========================  ================  ==================================================
``config`` (text)          start step        ``config.json`` as a JSON code block (at step 0,
                                             or a resumed run's checkpoint step); also as
                                             hparams (flattened keys ``training.lr``, …)
``train/loss``             step              training loss per datapoint, on the steps the
                                             trainer reads it (the first, then every
                                             ``log_every``)
``epoch/train_loss``       epoch             the epoch's mean training loss per datapoint
``epoch/val_elbo``,        epoch             validation ELBO per datapoint and its standard
``epoch/val_elbo_se``                        error
``epoch/beta``             epoch             β at the end of the epoch
``epoch/time_s``           epoch             the epoch's wall-clock seconds
``reconstructions``,       epoch             the images of ``reconstructions.png`` (validation
``samples`` (images)                         data) and ``samples.png``
=========================  ================  ==================================================

(TensorBoard lists the text under ``config/text_summary``, PyTorch's name for text tags.)
A resumed run that writes into the same directory continues the curves: its steps and epochs
follow the checkpoint's, in a new event file that TensorBoard reads after the first.

:class:`MLflowCallback` logs the same numbers to an MLflow tracking store (the configuration as
flattened params, the scalars as metrics, the two images as artifacts at the end).

The images never change training: they are drawn with a fixed seed in a forked random-number
state, without gradients, in eval mode (each module's mode is restored afterwards), so a run
with a tracking callback has bit-identical weights to one without.
"""

from __future__ import annotations

import json
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .lvm import device_of
from .callbacks import Callback
from .errors import ConfigError

#: Seed of the tracked images (that of the run's ``reconstructions.png`` and ``samples.png``).
IMAGE_SEED = 0
#: The scalars of an epoch: tag → key of the epoch's ``metrics.jsonl`` row.
EPOCH_SCALARS = {"epoch/train_loss": "train_loss", "epoch/val_elbo": "val_elbo",
                 "epoch/val_elbo_se": "val_elbo_se", "epoch/beta": "beta",
                 "epoch/time_s": "epoch_time_s"}
LOSS_TAG = "train/loss"


# -- shared helpers ------------------------------------------------------------------------------

def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1e-3}}`` → ``{"training.lr": 1e-3}``; numbers and strings stay, a
    bool becomes ``"true"``/``"false"``, a list or other value its JSON text, ``None`` is left
    out."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Python's and NumPy's global random-number states restored afterwards (MLflow draws run
    names and identifiers from them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def isolated_inference(vae, seed: int = IMAGE_SEED) -> Iterator[None]:
    """Run inference without touching training: a forked random-number state (CPU, and the
    VAE's CUDA device) seeded with ``seed``, Python's and NumPy's global states restored, no
    gradients, eval mode (every module's own mode restored afterwards)."""
    from .evaluation import seed_generators

    device = device_of(vae)
    devices = [device] if device.type == "cuda" else []
    modes = [(module, module.training) for module in vae.modules()]
    try:
        with preserved_global_rng(), torch.random.fork_rng(devices=devices), torch.no_grad():
            # the generators write_figures seeds, forked
            seed_generators(device, seed)
            vae.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def tracked_images(trainer, seed: int = IMAGE_SEED) -> dict[str, torch.Tensor]:
    """``{"reconstructions": …, "samples": …}``: the run's two figures (validation data, as
    ``reconstructions.png``; prior draws, as ``samples.png``) as ``[3, H, W]`` tensors in
    [0, 1], computed without changing training (:func:`isolated_inference`)."""
    from . import plots
    from .training import labels_for

    vae, dataset = trainer.vae, trainer.dataset
    from . import lvm

    images = {}
    if not (lvm.has(vae, "data_shape") or lvm.has(vae, "data_dim")):
        return images
    with isolated_inference(vae, seed):
        val = dataset.rows("val")
        if len(val) and lvm.has(vae, "reconstruct"):
            x = val[:32].to(device_of(vae))
            labels = labels_for(vae, dataset, "val")
            labels = None if labels is None else labels[:32].to(device_of(vae))
            images["reconstructions"] = plots.reconstruction_grid(vae, x, labels=labels)
        if lvm.has(vae, "sample"):
            images["samples"] = plots.sample_grid(vae)
    return images


def _check_writable_dir(path: Path, what: str) -> None:
    """Refuse, in one line, a directory that cannot be created or written (nothing is created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {ancestor} is not a directory")
    try:  # a real probe: permission bits say little under root or on network file systems
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not writable: {exc.strerror or exc}") from None


def _is_main(trainer) -> bool:
    context = getattr(trainer, "context", None)
    return context is None or context.is_main


# -- TensorBoard ---------------------------------------------------------------------------------

class TensorBoardCallback(Callback):
    """Write a run's configuration, losses, validation ELBO and images for TensorBoard into
    ``log_dir`` (see the module for the tags). ``images=False`` leaves the images out.

    Needs the ``tensorboard`` package (``pip install "pyro-vae[tensorboard]"``); without it, or
    with a ``log_dir`` that cannot be written, construction fails with a
    :class:`~pyro_vae.errors.ConfigError`.
    """

    def __init__(self, log_dir: str | Path, images: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError('TensorBoard logging (--tensorboard) needs the tensorboard package: '
                              'pip install "pyro-vae[tensorboard]"') from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir).expanduser()
        _check_writable_dir(self.log_dir, "TensorBoard log directory")
        self.images = images
        self.writer = None

    def on_fit_start(self, trainer) -> None:
        if not _is_main(trainer):
            return
        self.close()
        try:
            self.writer = self._writer_class(log_dir=str(self.log_dir))
        except OSError as exc:
            raise ConfigError(f"TensorBoard log directory {self.log_dir} cannot be written: "
                              f"{exc.strerror or exc}") from None
        config = trainer.run_config or {}
        text = "```json\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=trainer.state.step)
        self._write_hparams(config)
        self.writer.flush()

    def _write_hparams(self, config: dict[str, Any]) -> None:
        """The configuration in the HParams dashboard, in this run's own event file (the
        writer's ``add_hparams`` would start another run in a subdirectory)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {tag: 0.0 for tag in ("epoch/val_elbo", "epoch/train_loss")}  # names only
        for summary in hparams(flatten_config(config), metrics):
            self.writer.file_writer.add_summary(summary)

    def on_loss(self, trainer, step: int, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(LOSS_TAG, value, global_step=step)

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        epoch = row["epoch"]
        for tag, key in EPOCH_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], global_step=epoch)
        if self.images:
            for tag, image in tracked_images(trainer).items():
                self.writer.add_image(tag, image, global_step=epoch, dataformats="CHW")
        self.writer.flush()

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -- MLflow --------------------------------------------------------------------------------------

class MLflowCallback(Callback):
    """Log a run to MLflow: the configuration as params (flattened: ``training.lr``, …), the
    scalars of :class:`TensorBoardCallback` as metrics (``train/loss`` by step, ``epoch/*`` by
    epoch), and at the end ``reconstructions.png`` and ``samples.png`` as artifacts under
    ``images/``. ``tracking_uri`` ``None`` is MLflow's default (``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory); ``artifact_location`` is where a new
    experiment keeps its artifacts (default MLflow's: ``./mlruns`` for a database store);
    ``run_name`` defaults to the run directory's name. Each ``fit`` or ``resume`` is one MLflow run; a resumed run's steps and
    epochs continue the checkpoint's.

    Needs ``mlflow-skinny`` (and SQLAlchemy and Alembic for a ``sqlite:`` store):
    ``pip install "pyro-vae[mlflow]"``.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "pyro-vae",
                 run_name: str | None = None, images: bool = True,
                 artifact_location: str | Path | None = None):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError('MLflow tracking needs the mlflow-skinny package: '
                              'pip install "pyro-vae[mlflow]"') from None
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.images = images
        self.artifact_location = (None if artifact_location is None else
                                  Path(artifact_location).expanduser().resolve().as_uri()
                                  if "://" not in str(artifact_location) else str(artifact_location))
        self.client = None
        self.run_id: str | None = None
        self._pending: list = []

    def on_fit_start(self, trainer) -> None:
        if not _is_main(trainer):
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = getattr(trainer, "run_dir", None)
        try:
            with preserved_global_rng():
                client = MlflowClient(self.tracking_uri)
                experiment = client.get_experiment_by_name(self.experiment)
                experiment_id = (experiment.experiment_id if experiment is not None else
                                 client.create_experiment(
                                     self.experiment, artifact_location=self.artifact_location))
                tags = {"pyro_vae.start_step": str(trainer.state.step)}
                if run_dir is not None:
                    tags["pyro_vae.run_dir"] = str(run_dir)
                run = client.create_run(experiment_id, tags=tags, run_name=self.run_name or (
                    None if run_dir is None else Path(run_dir).name))
        except Exception as exc:  # MlflowException, a missing SQLAlchemy, a bad path, …
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = self.tracking_uri or "the default MLflow tracking store"
            raise ConfigError(f"MLflow tracking at {where}: {first}") from None
        self.client, self.run_id, self._pending = client, run.info.run_id, []
        params = [Param(key, str(value)) for key, value in
                  flatten_config(trainer.run_config or {}).items()]
        with preserved_global_rng():
            for start in range(0, len(params), 100):  # MLflow's limit per batch
                client.log_batch(self.run_id, params=params[start:start + 100])

    def _metric(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        self._pending.append(Metric(key, float(value), get_current_time_millis(), int(step)))

    def _flush(self) -> None:
        with preserved_global_rng():
            for start in range(0, len(self._pending), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
        self._pending = []

    def on_loss(self, trainer, step: int, value: float) -> None:
        if self.client is not None:
            self._metric(LOSS_TAG, value, step)

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        if self.client is None:
            return
        for tag, key in EPOCH_SCALARS.items():
            if row.get(key) is not None:
                self._metric(tag, row[key], row["epoch"])
        self._flush()

    def on_fit_end(self, trainer, error: BaseException | None) -> None:
        if self.client is None:
            return
        from .training import TrainingInterrupted

        client, run_id = self.client, self.run_id
        try:
            self._flush()
            if error is None and self.images:
                from torchvision.utils import save_image

                with tempfile.TemporaryDirectory() as folder, preserved_global_rng():
                    for name, image in tracked_images(trainer).items():
                        save_image(image, str(Path(folder) / f"{name}.png"))
                    client.log_artifacts(run_id, folder, artifact_path="images")
        finally:
            self.client = None
            status = ("FINISHED" if error is None else
                      "KILLED" if isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
                      else "FAILED")
            with preserved_global_rng():
                client.set_terminated(run_id, status=status)
