"""The checks a run makes before it starts: the device exists, the data fit the VAE (dimension,
labels, the likelihood's support), the disk can hold checkpoints, and the objective can score
the model on two datapoints with Pyro's validation on (:func:`dry_run`)."""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pyro
import torch

from . import lvm, runs
from .data import Dataset, from_array, iter_chunks, load_data
from .errors import ConfigError, PyroVAEError, TrainingError


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
    """Refuse data that do not fit the model: dimension (where the model declares
    ``data_dim``), labels (a conditional or semi-supervised model), then the likelihood's
    support (where the model can check it)."""
    lvm.check_protocol(vae)
    data_dim = getattr(vae, "data_dim", None)
    if data_dim is not None and dataset.data_dim != data_dim:
        raise ConfigError(f"data {dataset.name!r} have {dataset.data_dim} dimensions per "
                          f"datapoint, but the model expects {data_dim}")
    kind = ("a conditional" if lvm.is_conditional(vae) else
            "a semi-supervised" if lvm.is_semi_supervised(vae) else None)
    if kind is not None:
        if dataset.split_labels("train") is None:
            raise ConfigError(f"{kind} model needs labelled data; {dataset.name!r} has no labels")
        num_classes = getattr(vae, "num_classes", None)
        if num_classes is not None and dataset.num_classes > num_classes:
            raise ConfigError(f"data {dataset.name!r} have {dataset.num_classes} classes, but the "
                              f"model was built for {num_classes}")
    if lvm.is_conditional(vae) and callable(getattr(vae, "labels", None)):
        with pyro.validation_enabled(True):  # every label once, so steps need not check
            for split in ("train", "val", "test"):
                labels = dataset.split_labels(split)
                try:
                    vae.labels(labels)
                except ConfigError as exc:
                    raise ConfigError(f"{split} labels of {dataset.name!r}: {exc}") from None
    check_support = _support_check(vae)
    if check_support is not None:
        for split in ("train", "val", "test"):
            for chunk in iter_chunks(dataset.rows(split)):  # streamed for memory-mapped data
                check_support(chunk)


def _support_check(vae):
    likelihood = getattr(vae, "likelihood", None)
    if likelihood is not None and callable(getattr(likelihood, "check_support", None)):
        return likelihood.check_support
    check = getattr(vae, "check_support", None)
    return check if callable(check) else None


def labels_for(vae, dataset: Dataset, split: str) -> torch.Tensor | None:
    """The labels the model takes for ``split``: every split's for a conditional model, the
    training split's (``-1`` where unlabelled) for a semi-supervised one, else ``None``."""
    if lvm.is_conditional(vae):
        return dataset.split_labels(split)
    if lvm.is_semi_supervised(vae) and split == "train":
        return dataset.split_labels(split)
    return None


def check_free_space(vae, run_dir: Path, created: bool) -> None:
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
    device = lvm.device_of(vae)
    x = dataset.train[:2].to(device)
    y = labels_for(vae, dataset, "train")
    y = None if y is None else y[:2].to(device)
    # its warnings (Pyro's model/guide checks) come from the validated first step, once
    with refusals("the model cannot be scored on the data"), torch.no_grad(), \
            pyro.validation_enabled(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = objective.differentiable_loss(*lvm.programs(vae), x, y)
        del weights
        from .log_weights import program_structure

        if not program_structure(*lvm.programs(vae), x, y).has_data_plate:
            raise ConfigError(f"{type(vae).__name__} declares no datapoint plate: put every "
                              "site of one datapoint in pyro.plate(\"data\", ...) "
                              "(pyro_vae.lvm.data_plate)")
        _, _, foreign = lvm.parameter_roles(vae, x, y)
        if foreign:
            raise ConfigError(f"Pyro parameter {foreign[0]!r} is not a parameter of "
                              f"{type(vae).__name__}; pyro-vae trains the module's parameters: "
                              "make it an nn.Parameter (or PyroParam) of the module")


@contextmanager
def refusals(what: str):
    """Pyro's and torch's validation errors (raised as ValueError & co.) become one line."""
    try:
        yield
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        if isinstance(exc, PyroVAEError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainingError(f"{what}: {first}") from exc
