"""Run directories: ``config.json``, ``weights.pt``, ``metrics.jsonl`` and the figures.

Weights are a plain ``state_dict`` of tensors, saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``: loading a run never unpickles arbitrary objects.
Every file of a run (``config.json``, ``weights.pt``, ``checkpoint.pt``, ``metrics.jsonl``,
``evaluation.json`` and the figures) is written to a temporary file in the same directory,
flushed to disk and renamed over its name (:func:`atomic_write`): a crash or a full disk never
leaves a torn or empty file, and the previous version stays intact. The files get the mode a
plain ``open()`` would give them (``0666 & ~umask``, or the mode of the file they replace).

Readers refuse damage in one line that names the file (:class:`RunError`). Training and resume
hold ``.lock`` in the run directory (:func:`lock_run`), so two processes never write one run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import numbers
import os
import queue
import re
import stat
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .lvm import device_of
from .errors import PyroVAEError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
METRICS_FILE = "metrics.jsonl"
#: The full training state (model, optimizer, RNG, position in the epoch) for ``--resume``.
CHECKPOINT_FILE = "checkpoint.pt"
#: Held (``flock``) by the process that trains or resumes the run (:func:`lock_run`).
LOCK_FILE = ".lock"
EVALUATION_FILE = "evaluation.json"
FIGURE_FILES = ("reconstructions.png", "samples.png", "loss.png")
#: The keys every row of ``metrics.jsonl`` has.
METRICS_KEYS = ("epoch", "step", "train_loss", "val_elbo")

# ``tempfile.mkstemp(prefix=".NAME.")`` names: the prefix and 8 characters of its alphabet.
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")
_PROBE_FILE = re.compile(r"\.probe-[a-z0-9_]{8}")  # prepare_run_dir's writability probe
_STATE_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, METRICS_FILE)
# files that commands other than train/resume also write (``pyro-vae plot``, the final
# evaluation), without the run's lock: a temporary file of theirs is removed only once stale
_UNLOCKED_FILES = (EVALUATION_FILE, *FIGURE_FILES)
#: a temporary file of :data:`_UNLOCKED_FILES` younger than this may still be being written
STALE_AFTER_S = 60.0
_IN_USE = ("{} is in use by another pyro-vae process (training or resuming it); wait for it to "
           "finish or stop it")
#: the run directories whose lock this process holds (their real paths)
_HELD: set[str] = set()


class RunError(PyroVAEError):
    """A run directory that cannot be created or read."""


# -- writing -----------------------------------------------------------------------------------

def _umask() -> int:
    try:  # Linux ≥ 4.7 reports it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: those of the file it
    replaces, or ``0666 & ~umask`` for a new one (``mkstemp`` alone would give 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every system allows it)."""
    try:
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: str | Path, write) -> None:
    """Write ``path`` through ``write(stream)`` (a binary file object) atomically: into a
    temporary file ``.NAME.XXXXXXXX`` in the same directory, flushed and fsync'ed, then renamed
    over ``path``. On any failure (a full disk, an interrupt) the temporary file is removed and
    ``path`` keeps its previous content. The file gets the mode ``open()`` would give it."""
    path = Path(path)
    mode = _file_mode(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            with contextlib.suppress(OSError):  # a file system without modes: keep its own
                os.fchmod(stream.fileno(), mode)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    atomic_write(Path(run_dir) / CONFIG_FILE, lambda s: s.write(text))


def save_weights(run_dir: Path, vae: torch.nn.Module) -> None:
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    atomic_write(Path(run_dir) / WEIGHTS_FILE, lambda s: torch.save(state, s))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically: a crash mid-write leaves the previous one intact."""
    atomic_write(Path(run_dir) / CHECKPOINT_FILE, lambda s: torch.save(state, s))


def serialized(state: Any) -> bytes:
    """``torch.save(state)`` as bytes: a snapshot, taken now, that another thread can write."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda stream: stream.write(data))


class BackgroundWriter:
    """Writes a run's files in order on a thread of its own, so that their fsyncs (milliseconds
    each on most disks, three files every epoch) overlap training instead of pausing it.

    ``submit(job)`` queues a function that writes (atomically, as every run file is written);
    the jobs run one at a time in the order submitted. After one fails, those queued after it
    are dropped (nothing is written after a failure: a full disk keeps the last complete
    files) and its error is raised, once, on the submitting thread by the next ``submit`` or
    ``wait``. ``wait`` returns once every queued job has run; ``close`` also stops the thread
    (it is not a daemon: a process never exits with a write half done)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed = False

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if not self._failed:
                    job()
            except BaseException as exc:  # handed to the submitting thread
                self._failed, self._error = True, exc
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def submit(self, job) -> None:
        self._raise()
        if self._failed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="pyro-vae run files")
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> None:
        if self._thread is not None:
            self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Run what is queued and stop the thread; an error is kept for :meth:`wait`."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row to ``metrics.jsonl``. The file (one short line per epoch) is
    rewritten atomically with the row added, so a full disk or a crash never tears a line."""
    write_metrics(run_dir, [*read_metrics(run_dir), row])


def metrics_line(row: dict[str, Any]) -> bytes:
    """One row of ``metrics.jsonl`` as its file holds it."""
    return (json.dumps(row) + "\n").encode()


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` (atomically) with ``rows``."""
    text = b"".join(metrics_line(row) for row in rows)
    atomic_write(Path(run_dir) / METRICS_FILE, lambda s: s.write(text))


# -- the run directory: a new one, its lock, stray temporary files --------------------------------

def _temporary_files(path: Path) -> list[Path]:
    """The temporary files that :func:`atomic_write` (``.NAME.XXXXXXXX`` for a file NAME of a
    run) and :func:`prepare_run_dir` (``.probe-XXXXXXXX``) leave behind when killed mid-write."""
    names = (*_STATE_FILES, *_UNLOCKED_FILES)
    found = []
    try:
        children = list(path.iterdir())
    except OSError:
        return []
    for child in children:
        match = _TEMP_FILE.fullmatch(child.name)
        if ((match and match["name"] in names) or _PROBE_FILE.fullmatch(child.name)) \
                and not child.is_dir():
            found.append(child)
    return found


@contextlib.contextmanager
def _probe_lock(path: Path) -> Iterator[bool]:
    """Take the run's lock for a moment, if it exists and no process holds it: yields whether
    no other process is training or resuming the run (``True`` when this process holds it)."""
    key = os.path.realpath(path)
    if key in _HELD:
        yield True
        return
    try:
        handle = os.open(path / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        yield True  # every trainer creates the lock file: none has ever held this run
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without flock
            yield True
            return
        yield True
    finally:
        os.close(handle)  # releases the lock


def clean_temporary_files(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files that a process killed mid-write leaves in ``run_dir``
    (``.checkpoint.pt.XXXXXXXX``, ``.weights.pt.XXXXXXXX``, … and ``.probe-XXXXXXXX``; nothing
    else), and return them. Nothing is removed while another process trains or resumes the run
    (it holds :func:`lock_run`); the temporary file of a figure or of ``evaluation.json`` (which
    other commands write without the lock) only once it is older than :data:`STALE_AFTER_S`.
    Best effort: a file that cannot be removed is left, silently."""
    path = Path(run_dir).expanduser()
    stray = _temporary_files(path)
    if not stray:
        return []
    removed = []
    with _probe_lock(path) as free:
        if not free:
            return []
        now = time.time()
        for child in stray:
            match = _TEMP_FILE.fullmatch(child.name)
            try:
                if (match and match["name"] in _UNLOCKED_FILES
                        and now - child.stat().st_mtime < STALE_AFTER_S):
                    continue
                child.unlink()
            except OSError:
                continue
            removed.append(child)
    return removed


@contextlib.contextmanager
def lock_run(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock (``flock`` on ``run_dir/.lock``) while training or resuming
    it: a second process that asks for it gets :class:`RunError` at once. The lock goes when the
    block ends or the process dies (the kernel releases it; the file stays). Not re-entrant:
    the same process asking twice is refused too. On a file system without ``flock`` the run
    goes on unlocked."""
    path = Path(run_dir).expanduser()
    key = os.path.realpath(path)
    if key in _HELD:
        raise RunError(_IN_USE.format(path))
    try:
        handle = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                         0o666)
    except OSError as exc:
        raise RunError(f"cannot lock {path}: {exc.strerror or exc}") from None
    locked = True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise RunError(_IN_USE.format(path)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(handle)
            raise RunError(f"cannot lock {path}: {exc.strerror or exc}") from None
        locked = False  # a file system without flock: nothing to hold
    _HELD.add(key)
    try:
        yield path
    finally:
        _HELD.discard(key)
        if locked:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def _is_new_start(path: Path, children: list[Path]) -> bool:
    """Whether ``path`` holds only what a run killed before its first checkpoint leaves: its
    ``config.json`` (no weights, no checkpoint, no metrics row), ``.lock`` and temporary files."""
    temporary = set(_temporary_files(path))
    for child in children:
        if child in temporary or (child.name == LOCK_FILE and child.is_file()):
            continue
        if child.name == CONFIG_FILE and child.is_file() and not child.is_symlink():
            try:
                config = json.loads(child.read_bytes())
            except (OSError, ValueError):
                return False
            if not (isinstance(config, dict) and isinstance(config.get("model"), dict)
                    and "training" in config):
                return False  # somebody else's config.json: never removed
            continue
        if child.name == METRICS_FILE and child.is_file() and not child.is_symlink():
            try:
                if child.read_bytes().strip():
                    return False
            except OSError:
                return False
            continue
        return False
    return True


def prepare_run_dir(out: str | Path) -> Path:
    """Create ``out`` for a new run, refusing one that already holds files; checks that it is
    writable before any training starts.

    A directory that holds only what a start killed before its first checkpoint leaves
    (``config.json`` with no weights, checkpoint or metrics, ``.lock``, temporary files) is
    cleared and used; one that another process is training is refused."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} exists and is not a directory")
    if path.is_dir():
        try:
            children = list(path.iterdir())
        except OSError as exc:
            raise RunError(f"cannot read --out {path}: {exc.strerror or exc}") from None
        if children:
            if not _is_new_start(path, children):
                raise RunError(f"--out {path} already holds files; choose a new directory")
            with _probe_lock(path) as free:
                if not free:
                    raise RunError(_IN_USE.format(path))
                for child in children:
                    if child.name != LOCK_FILE:
                        try:
                            child.unlink(missing_ok=True)
                        except OSError as exc:
                            raise RunError(f"cannot clear --out {path} (the files of a run that "
                                           f"never reached a checkpoint): "
                                           f"{exc.strerror or exc}") from None
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


# -- reading -----------------------------------------------------------------------------------

def _load_failure(exc: BaseException) -> str:
    """The useful part of ``torch.load``'s refusal, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = text.strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    for end in (". Please", ". This is", ". If you", " Check the documentation"):
        text = text.split(end, 1)[0]
    return text.rstrip(".")[:200]


def _safe_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: no pickled code ever runs.
    torch's and pickle's warnings are kept quiet: the refusal is the one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # the unpickler's refusals come in many exception types
        failure = exc
    try:
        with open(path, "rb") as stream:
            head = stream.read(2)
    except OSError:
        head = b""
    if head[:1] == b"\x80" and head != b"\x80\x02":  # a pickle, not torch.save's format
        raise RunError(f"{path} cannot be loaded safely: it is a raw pickle (which can run code "
                       "when loaded), not a file written by pyro-vae")
    if "WeightsUnpickler error" in str(failure):
        raise RunError(f"{path} cannot be loaded safely (only tensors and plain containers are "
                       f"accepted, and it holds other objects): {_load_failure(failure)}")
    raise RunError(f"{path} cannot be loaded: it is damaged or not written by pyro-vae "
                   f"({_load_failure(failure)})")


def load_checkpoint(run_dir: str | Path, vae=None, num_train: int | None = None) -> dict[str, Any]:
    """``checkpoint.pt`` of ``run_dir``, checked (:func:`pyro_vae.checkpoints.validate_checkpoint`):
    its structure and types always, the model and optimizer state against ``vae`` when given, the
    epoch's order against ``num_train`` (default: the ``num_train`` of ``config.json``)."""
    from .checkpoints import validate_checkpoint

    path = Path(run_dir).expanduser() / CHECKPOINT_FILE
    if not path.exists():
        raise RunError(f"{run_dir} has no {CHECKPOINT_FILE} to resume from")
    checkpoint = _safe_load(path)
    if num_train is None:
        with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
            recorded = json.loads((path.parent / CONFIG_FILE).read_bytes())["data"]["num_train"]
            num_train = recorded if _is_int(recorded) and recorded > 0 else None
    validate_checkpoint(checkpoint, vae, num_train, where=str(path))
    return checkpoint


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metrics_row(path: Path, number: int, raw: bytes) -> dict[str, Any]:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{path} line {number} is not valid JSON (not UTF-8 text); fix or delete "
                       "that line (each line is one epoch's JSON object)") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or delete that "
                       "line (each line is one epoch's JSON object)") from None
    if not (isinstance(row, dict) and all(key in row for key in METRICS_KEYS)
            and _is_int(row["epoch"]) and _is_int(row["step"])
            and _is_number(row["train_loss"]) and _is_number(row["val_elbo"])):
        raise RunError(f"{path} line {number} is not a metrics row (a JSON object with integers "
                       "epoch and step and numbers train_loss and val_elbo); fix or delete that "
                       "line")
    return row


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (``[]`` when there is none). An unterminated last line that
    is not valid JSON (an older version killed mid-append) is dropped; any other damage is a
    :class:`RunError` that names the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    unterminated = lines.pop()  # what follows the last newline: b"" in a whole file
    rows = [_metrics_row(path, number, line)
            for number, line in enumerate(lines, 1) if line.strip()]
    if unterminated.strip():
        try:
            json.loads(unterminated.decode("utf-8"))
        except ValueError:  # torn mid-write (JSONDecodeError, UnicodeDecodeError)
            return rows
        rows.append(_metrics_row(path, len(lines) + 1, unterminated))
    return rows


@dataclass
class Run:
    """A restored run: its directory, resolved configuration, VAE and metric history."""

    path: Path
    config: dict[str, Any]
    vae: Any
    history: list[dict[str, Any]] = field(default_factory=list)

    def data(self, data: str | None = None, *, verify: bool = False):
        """The data set the run was trained on, on the VAE's device, loaded the same way (data
        directory, binarization, split seed) and checked against the size and SHA-256 the run
        recorded: a different file at the recorded path is refused in one line. ``data`` names
        other data to score the run on (``evaluate --data``); with ``verify`` it must be the
        run's own data, found elsewhere (a run moved to another folder or machine)."""
        from .data import load_data, load_recorded

        if data is not None and not verify:
            return load_data(data, device=device_of(self.vae))
        return load_recorded(self.config.get("data", {}), data, device=device_of(self.vae))


def _invalid(config_path: Path, why: str) -> RunError:
    return RunError(f"{config_path} is not a valid run configuration ({why}); restore the file "
                    "that training wrote")


def _positive_ints(value: Any, empty: bool = False) -> bool:
    return (isinstance(value, list) and (empty or bool(value))
            and all(_is_int(v) and v >= 1 for v in value))


#: what each key of config.json's sections holds, when present: (check, what it expects)
_MODEL_KEYS = {
    "data_shape": (_positive_ints, "a list of positive integers"),
    "latent_dim": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "hidden": (lambda v: _positive_ints(v, empty=True), "a list of positive integers"),
    "conditional": (lambda v: isinstance(v, bool), "true or false"),
    "conditional_prior": (lambda v: isinstance(v, bool), "true or false"),
    "num_classes": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
    **{key: (lambda v: isinstance(v, str), "a string")
       for key in ("prior", "likelihood", "guide", "activation", "class")},
    **{key: (lambda v: isinstance(v, (str, dict)), "a network name or a table")
       for key in ("encoder", "decoder")},
    "options": (lambda v: isinstance(v, dict), "a table of options"),
    "rebuildable": (lambda v: isinstance(v, bool), "true or false"),
    **{key: (lambda v: v is None or isinstance(v, dict), "a table of options")
       for key in ("prior_options", "likelihood_options", "guide_options")},
}
_DATA_KEYS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "data_dir": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "binarize": (lambda v: v in (None, "static", "dynamic"), "null, static or dynamic"),
    "data_shape": (_positive_ints, "a list of positive integers"),
    **{key: (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
       for key in ("num_train", "num_val", "num_test")},
}


def _check_config(config_path: Path, config: Any) -> None:
    """The sections of ``config.json`` and the types of what they hold (one line otherwise)."""
    from . import config as schema

    if not isinstance(config, dict):
        raise _invalid(config_path, f"it holds {type(config).__name__}, not a JSON object")
    for name in ("model", "training", "data"):
        if name not in config:
            raise _invalid(config_path, f"it has no {name!r} section")
        if not isinstance(config[name], dict):
            raise _invalid(config_path, f"its {name!r} section is not a table of options")
    model = config["model"]
    for key in (() if "class" in model else ("data_shape", "latent_dim")):
        if key not in model:
            raise _invalid(config_path, f"its 'model' section has no {key!r}")
    for section, keys in (("model", _MODEL_KEYS), ("data", _DATA_KEYS)):
        for key, (accept, expected) in keys.items():
            if key in config[section] and not accept(config[section][key]):
                raise _invalid(config_path, f"{section}.{key} should be {expected}, not "
                                            f"{config[section][key]!r}")
    for key, value in config["training"].items():
        option = schema.BY_NAME.get(key)
        if option is not None and option.section == "training":
            try:
                option.check(value)
            except PyroVAEError:
                raise _invalid(config_path, f"training.{key} should be {option.expected}, not "
                                            f"{value!r}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", *,
             model: torch.nn.Module | None = None) -> Run:
    """Restore a run directory written by :func:`pyro_vae.fit` / ``pyro-vae train``.

    The plug-ins the run recorded (:mod:`pyro_vae.plugins`) are imported first, then the model
    is rebuilt from ``config.json`` (:func:`pyro_vae.lvm.rebuild`) and its weights loaded. A
    model that cannot be rebuilt from its config (a class defined in a script or notebook, or
    one without ``config``) is passed as ``model``: a fresh instance of the same architecture,
    into which the weights are loaded.

    Temporary files left by a process killed mid-write are removed first
    (:func:`clean_temporary_files`). A damaged or hand-edited ``config.json``, weights that do
    not fit it, or a damaged ``metrics.jsonl`` are a :class:`RunError` that names the file."""
    from . import lvm, plugins
    from .checkpoints import describe_mismatch

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunError(f"run directory not found: {path}")
    clean_temporary_files(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.exists():
            raise RunError(f"{path} is not a pyro-vae run: {required.name} is missing")
    try:
        config = json.loads(config_path.read_bytes())
    except OSError as exc:
        raise RunError(f"cannot read {config_path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _invalid(config_path, "it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _invalid(config_path, f"not valid JSON: {exc}") from None
    _check_config(config_path, config)
    try:
        plugins.import_recorded(config.get("plugins"), str(config_path))
    except PyroVAEError as exc:
        raise RunError(str(exc)) from None
    if model is not None:
        lvm.check_protocol(model, "load_run")
        vae = model
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vae = lvm.rebuild(config["model"])
        except PyroVAEError as exc:
            if "class" not in config["model"] and "cannot be rebuilt" not in str(exc):
                raise _invalid(config_path, f"cannot rebuild the model: {_first_line(exc)}") \
                    from None
            raise RunError(f"{path}: {_first_line(exc)}") from None
        except (TypeError, ValueError, RuntimeError, LookupError, AttributeError,
                OverflowError) as exc:  # PyroVAEError is a ValueError
            raise _invalid(config_path, f"cannot rebuild the model: {_first_line(exc)}") from None
    state = _safe_load(weights_path)
    if not isinstance(state, dict):
        raise RunError(f"{weights_path} does not hold a state_dict")
    mismatch = describe_mismatch(vae, state)
    if mismatch is None:
        try:
            vae.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            mismatch = _first_line(exc)
    if mismatch is not None:
        raise RunError(f"{weights_path} does not match the model in {CONFIG_FILE}: {mismatch}")
    return Run(path=path, config=config, vae=vae.to(device), history=read_metrics(path))


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically (``evaluation.json`` and the like)."""
    text = (json.dumps(value, indent=2) + "\n").encode()
    atomic_write(Path(path), lambda s: s.write(text))
