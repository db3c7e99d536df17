"""Run directories: ``config.json``, ``weights.pt``, ``metrics.jsonl`` and the figures.

Weights are a plain ``state_dict`` of tensors, saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``: loading a run never unpickles arbitrary objects.
Files are written to a temporary name and renamed, so a crash never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PyroVAEError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
METRICS_FILE = "metrics.jsonl"
#: The full training state (model, optimizer, RNG, position in the epoch) for ``--resume``.
CHECKPOINT_FILE = "checkpoint.pt"


class RunError(PyroVAEError):
    """A run directory that cannot be created or read."""


def prepare_run_dir(out: str | Path) -> Path:
    """Create ``out`` for a new run, refusing one that already holds files; checks that it is
    writable before any training starts."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise RunError(f"--out {path} already holds files; choose a new directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        if created and path.exists():
            path.rmdir()
        raise RunError(f"cannot write to --out {path}: {exc.strerror or exc}") from None
    return path


def _atomic_write(path: Path, write) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    _atomic_write(run_dir / CONFIG_FILE, lambda s: s.write(text))


def save_weights(run_dir: Path, vae: torch.nn.Module) -> None:
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    _atomic_write(run_dir / WEIGHTS_FILE, lambda s: torch.save(state, s))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically: a crash mid-write leaves the previous one intact."""
    _atomic_write(run_dir / CHECKPOINT_FILE, lambda s: torch.save(state, s))


def _safe_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: no pickled code ever runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's refusals come in many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path} cannot be loaded safely (only tensors and plain containers are "
                       f"accepted): {first}") from None


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir).expanduser() / CHECKPOINT_FILE
    if not path.exists():
        raise RunError(f"{run_dir} has no {CHECKPOINT_FILE} to resume from")
    checkpoint = _safe_load(path)
    required = {"model", "optimizer", "rng", "epoch", "position", "step", "order", "loss_sum"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise RunError(f"{path} is not a pyro-vae checkpoint")
    return checkpoint


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a") as stream:
        stream.write(json.dumps(row) + "\n")
        stream.flush()


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` (atomically) with ``rows``."""
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    _atomic_write(Path(run_dir) / METRICS_FILE, lambda s: s.write(text))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Run:
    """A restored run: its directory, resolved configuration, VAE and metric history."""

    path: Path
    config: dict[str, Any]
    vae: Any
    history: list[dict[str, Any]] = field(default_factory=list)

    def data(self, data: str | None = None):
        """The data set the run was trained on (or ``data``), on the VAE's device, loaded the
        same way (data directory, binarization)."""
        from .data import load_data

        if data is not None:
            return load_data(data, device=self.vae.device)
        source = self.config.get("data", {})
        return load_data(source.get("name"), device=self.vae.device,
                         data_dir=source.get("data_dir"), binarize_mode=source.get("binarize"))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Restore a run directory written by :func:`pyro_vae.fit` / ``pyro-vae train``."""
    from .vae import VAE

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunError(f"run directory not found: {path}")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.exists():
            raise RunError(f"{path} is not a pyro-vae run: {required.name} is missing")
    try:
        config = json.loads(config_path.read_text())
        model_config = config["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunError(f"{config_path} is not a valid run configuration ({exc})") from None
    if not isinstance(model_config, dict):
        raise RunError(f"{config_path} is not a valid run configuration "
                       "(its 'model' section is not a table of options)")
    try:
        vae = VAE.from_config(model_config)
    except (TypeError, PyroVAEError) as exc:
        raise RunError(f"{config_path} is not a valid run configuration "
                       f"(cannot rebuild the model: {exc})") from None
    state = _safe_load(weights_path)
    if not isinstance(state, dict):
        raise RunError(f"{weights_path} does not hold a state_dict")
    try:
        vae.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise RunError(f"{weights_path} does not match the configuration in {CONFIG_FILE}: "
                       f"{str(exc).splitlines()[0]}") from None
    return Run(path=path, config=config, vae=vae.to(device), history=read_metrics(path))
