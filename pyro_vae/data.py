"""Data sets: the bundled ``digits``, MNIST, Fashion-MNIST and KMNIST (torchvision; local files
or ``download``), and ``.npy`` / ``.csv`` array files (a ``.npy`` may be memory-mapped).

Every data set is split once, by a fixed seed that does not depend on the training seed, into
train / validation / test parts (80 / 10 / 10 %), so that ``evaluate --split test`` of any run
on the same data sees the same datapoints. Data are flattened to ``[N, prod(data_shape)]``
float32 tensors and kept on the training device, except memory-mapped arrays, which stay on
disk and are read a minibatch at a time.

Only regular files are read (a named pipe or a device is refused at once, never waited on); a
``.npy`` is read from its header and memory-mapped, never unpickled. A data set records a
fingerprint of what it held (the SHA-256 of a file's bytes, or of a named data set's arrays),
so that :func:`load_recorded` refuses to evaluate or resume a run on different data.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

SPLITS = ("train", "val", "test", "all")
#: torchvision data sets by name: class name in ``torchvision.datasets``.
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
NAMED_DATASETS = ("digits", *TORCHVISION_DATASETS)
BINARIZATIONS = ("static", "dynamic")
#: Seed of the fixed ("static") binarization, independent of the training seed.
BINARIZE_SEED = 0
#: Fractions of a data set held out for validation and test.
VAL_FRACTION = TEST_FRACTION = 0.1
#: Seed of the fixed train/val/test permutation (independent of the training seed).
SPLIT_SEED = 0


#: Rows read per chunk when a memory-mapped array is scanned (finiteness, support checks).
SCAN_ROWS = 8192


class LazyRows:
    """Rows of a memory-mapped ``.npy`` array, read on demand as float32 tensors.

    Behaves like the 2-D tensor ``[rows, data_dim]`` for what training and evaluation do with
    a split (``shape``, ``len``, slicing, indexing with an index tensor, ``to(device)``), while
    only the rows asked for are read, so memory does not grow with the file. On CUDA, rows are
    staged through pinned memory and copied asynchronously.
    """

    ndim = 2
    dtype = torch.float32  # what its rows are read as

    def __init__(self, array: np.ndarray, index: np.ndarray, device: torch.device | str = "cpu"):
        self.array, self.index, self.device = array, np.asarray(index, dtype=np.int64), torch.device(device)
        self.data_dim = math.prod(array.shape[1:])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), self.data_dim))

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        values = np.array(self.array[rows], dtype=np.float32).reshape(len(rows), -1)
        tensor = torch.from_numpy(values)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self._read(self.index[[key]])[0]
        if torch.is_tensor(key):
            key = key.detach().cpu().numpy()
        return self._read(self.index[key])

    def to(self, device: torch.device | str) -> "LazyRows":
        return LazyRows(self.array, self.index, device)

    def materialize(self) -> torch.Tensor:
        return self[:]


def iter_chunks(x: "torch.Tensor | LazyRows", rows: int = SCAN_ROWS):
    """``x`` in consecutive chunks of at most ``rows`` rows, each a tensor."""
    for start in range(0, len(x), rows):
        yield x[start:start + rows]


@dataclass
class Dataset:
    """A data set split into train / val / test, with optional integer labels."""

    name: str
    data_shape: tuple[int, ...]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    labels: dict[str, torch.Tensor | None] = field(default_factory=dict)
    #: resample each training minibatch as Bernoulli(x) (dynamic binarization)
    dynamic_binarization: bool = False
    #: how to load these data again and what they held, recorded in config.json ("data"):
    #: ``name`` (a named data set, or a file's absolute path), ``binarize``, ``data_dir`` (if
    #: given), ``split_seed`` and ``fingerprint`` ``{"size", "sha256"}``; see :func:`load_recorded`
    source: dict = field(default_factory=dict)

    @property
    def data_dim(self) -> int:
        return math.prod(self.data_shape)

    @property
    def is_image(self) -> bool:
        return len(self.data_shape) == 3

    @property
    def num_classes(self) -> int | None:
        train_labels = self.labels.get("train")
        return None if train_labels is None else int(train_labels.max()) + 1

    def rows(self, name: str) -> "torch.Tensor | LazyRows":
        """The datapoints of split ``name`` (``train``, ``val``, ``test`` or ``all``) as stored:
        a tensor, or :class:`LazyRows` for a memory-mapped file (nothing is read yet)."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        if name != "all":
            return getattr(self, name)
        parts = [self.train, self.val, self.test]
        if all(isinstance(p, LazyRows) for p in parts):
            return LazyRows(parts[0].array, np.concatenate([p.index for p in parts]),
                            parts[0].device)
        return torch.cat([p if torch.is_tensor(p) else p.materialize() for p in parts])

    def split(self, name: str) -> torch.Tensor:
        """The datapoints of split ``name`` as one tensor (read into memory if memory-mapped)."""
        rows = self.rows(name)
        return rows if torch.is_tensor(rows) else rows.materialize()

    @property
    def streamed(self) -> bool:
        """Whether the data are read from a memory-mapped file minibatch by minibatch."""
        return isinstance(self.train, LazyRows)

    def split_labels(self, name: str) -> torch.Tensor | None:
        if name == "all":
            parts = [self.labels.get(s) for s in ("train", "val", "test")]
            return None if any(p is None for p in parts) else torch.cat(parts)
        return self.labels.get(name)

    def to(self, device: torch.device | str) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(self.name, self.data_shape, move(self.train), move(self.val),
                       move(self.test), {k: move(v) for k, v in self.labels.items()},
                       self.dynamic_binarization, dict(self.source))


#: Bytes read at a time when a data file is hashed.
HASH_CHUNK = 1 << 20
#: The first bytes of a zip archive (``.npz``) and of a pickle (protocol 2 and later).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
_NPY_MAGIC = b"\x93NUMPY"
#: What a path that is not a regular file is, by ``stat`` test.
_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _os_error(path: Path, exc: OSError) -> DataError:
    """One line for a data file that cannot be opened or read."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return DataError(f"data file not found: {path}")
    if exc.errno == errno.EISDIR:
        return DataError(f"data path is a directory, expected a .npy or .csv file: {path}")
    if exc.errno == errno.ENAMETOOLONG:
        return DataError(f"{path}: file name too long for the file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DataError(f"{path}: permission denied; the data file cannot be read")
    return DataError(f"{path}: the data file cannot be read ({exc.strerror or exc})")


def _open_regular(path: Path):
    """``path`` opened for binary reading; only a regular file is opened.

    The file is opened without blocking and checked with ``fstat`` on the open descriptor, so a
    named pipe, a device or a directory is refused at once (never read, never waited on), and
    what is checked is what is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_error(path, exc) from None
    except ValueError:  # an embedded NUL character
        raise DataError(f"data path {str(path)!r} is not a valid file name") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise DataError(f"data path is a directory, expected a .npy or .csv file: {path}")
        if not stat.S_ISREG(mode):
            kind = next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")
            raise DataError(f"{path}: {kind}, not a regular file; only regular .npy or .csv "
                            "files are read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _fingerprint_stream(handle) -> dict:
    """Size and SHA-256 of a file's bytes, read from ``handle`` in chunks of ``HASH_CHUNK``."""
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _fingerprint_arrays(*arrays) -> dict:
    """Size (bytes) and SHA-256 of arrays (dtype, shape and bytes of each, in order)."""
    digest, size = hashlib.sha256(), 0
    for array in arrays:
        if torch.is_tensor(array):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{list(array.shape)};".encode())
        digest.update(memoryview(array).cast("B") if array.size else b"")
        size += array.nbytes
    return {"size": size, "sha256": digest.hexdigest()}


def _read_file(path: Path, expected: dict | None = None,
               mismatch: str | None = None) -> tuple[np.ndarray, dict]:
    """The array in a ``.npy`` or ``.csv`` file and the file's fingerprint (size, SHA-256).

    With ``expected`` (a recorded fingerprint), a file whose fingerprint differs is refused
    with ``mismatch`` before it is parsed.
    """
    suffix = path.suffix.lower()
    with _open_regular(path) as handle:
        if suffix not in (".npy", ".csv"):
            raise DataError(f"unsupported data file type {suffix or '(none)'!r} for {path}; "
                            "use .npy or .csv")
        try:
            if suffix == ".csv":
                content = handle.read()
                fingerprint = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
            else:
                fingerprint = _fingerprint_stream(handle)
                handle.seek(0)
            if expected is not None and not _same_fingerprint(fingerprint, expected):
                raise DataError(mismatch or f"{path}: the file's contents differ from the "
                                "recorded data")
            array = _read_csv(path, content) if suffix == ".csv" else _read_npy(path, handle)
        except OSError as exc:
            raise _os_error(path, exc) from None
    return array, fingerprint


def _read_csv(path: Path, content: bytes | None = None) -> np.ndarray:
    if content is None:
        with _open_regular(path) as handle:
            content = handle.read()
    try:
        text = content.decode("utf-8-sig")  # a byte-order mark is not part of the first cell
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (it is not UTF-8)") from None
    return _parse_csv(path, text)


def _parse_csv(path: Path, text: str) -> np.ndarray:
    rows: list[list[float]] = []
    header_seen = False
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line (a line of empty cells is a row of missing values)
            try:
                values = [float(cell) for cell in row]
            except ValueError:
                bad = next(c for c in row if not _is_number(c))
                if not rows and not header_seen:
                    header_seen = True
                    if not any(_is_number(c) for c in row):
                        continue  # a header line: names only
                    shown = bad if len(bad) <= 40 else bad[:40] + "..."
                    raise DataError(f"{path}: line {reader.line_num} mixes numbers and text "
                                    f"({shown!r}); a header line holds names only") from None
                if not bad.strip():
                    raise DataError(f"{path}: line {reader.line_num} has an empty cell "
                                    "(a missing value)") from None
                shown = bad if len(bad) <= 40 else bad[:40] + "..."
                raise DataError(f"{path}: line {reader.line_num} holds a non-number: "
                                f"{shown!r}") from None
            if rows and len(values) != len(rows[0]):
                raise DataError(f"{path}: line {reader.line_num} has {len(values)} columns, "
                                f"expected {len(rows[0])} (ragged CSV)")
            rows.append(values)
    except csv.Error as exc:
        reason = str(exc)
        if "field limit" in reason:
            reason = (f"a field is longer than {csv.field_size_limit()} characters, "
                      "so this is not a table of numbers")
        raise DataError(f"{path}: line {reader.line_num}: not a readable CSV file "
                        f"({' '.join(reason.split())})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    with np.errstate(all="ignore"):  # overflow to inf, refused later
        return np.asarray(rows, dtype=np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_npy_header(path: Path, handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the header of a ``.npy`` file (never unpickles)."""
    start = handle.read(len(_NPY_MAGIC))
    handle.seek(0)
    if start.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: not a readable .npy array: it is a zip archive (an .npz "
                        "file?); save one array with numpy.save")
    if start.startswith(_PICKLE_MAGIC):
        raise DataError(f"{path}: not a readable .npy array: it is a Python pickle, which is "
                        "never loaded; save a numeric array with numpy.save")
    if start != _NPY_MAGIC:
        raise DataError(f"{path}: not a readable .npy array (no NumPy header)")
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:  # version 3.0 (a UTF-8 header): numpy reads it in a private function
            reader = getattr(np.lib.format, "_read_array_header", None)
            if reader is None:
                from numpy.lib import _format_impl

                reader = _format_impl._read_array_header
            shape, fortran, dtype = reader(handle, version)
    except Exception as exc:  # noqa: BLE001 - a corrupt header can fail in many ways
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{path}: not a readable .npy array (bad header: {reason})") from None
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise DataError(f"{path}: not a readable .npy array (bad shape {shape!r} in its header)")
    return shape, bool(fortran), np.dtype(dtype)


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if dtype.hasobject:
        raise DataError(f"{path}: the array holds Python objects (dtype {dtype}), which are "
                        "never unpickled; expected real numbers")
    if dtype.kind == "c":
        raise DataError(f"{path}: array of dtype {dtype} is complex; expected real numbers")
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: array of dtype {dtype} is not numeric")


def _read_npy(path: Path, handle) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped (read-only) from the open ``handle``."""
    shape, fortran, dtype = _read_npy_header(path, handle)
    _check_dtype(dtype, path)
    _data_shape(shape, str(path))
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)  # refused by from_array with its shape
    offset = handle.tell()
    available = os.fstat(handle.fileno()).st_size - offset
    needed = count * dtype.itemsize
    if available < needed:
        raise DataError(f"{path}: truncated .npy file: its header promises {needed} bytes of "
                        f"data (shape {list(shape)}, dtype {dtype}), the file holds {available}")
    try:
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran else "C")
    except (ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a readable .npy array ({reason})") from None


def _read_array(path: Path) -> np.ndarray:
    """The array in a ``.npy`` (memory-mapped) or ``.csv`` file."""
    return _read_file(Path(path))[0]


def _data_shape(shape, source: str) -> tuple[int, ...]:
    shape = tuple(shape.shape if hasattr(shape, "shape") else shape)
    if len(shape) == 2:
        return (shape[1],)
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4:
        return tuple(shape[1:])
    raise DataError(f"{source}: expected an array of shape [N, D], [N, H, W] or [N, C, H, W], "
                    f"got shape {list(shape)}")


def check_finite(x: torch.Tensor, source: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0])
        raise DataError(f"{source}: data contain NaN or infinite values, or values beyond the "
                        f"float32 range (first in row {row})")


def split_indices(n: int, seed: int = SPLIT_SEED) -> dict[str, torch.Tensor]:
    """The fixed train/val/test index sets of a data set of size ``n``."""
    n_val, n_test = max(1, round(n * VAL_FRACTION)), max(1, round(n * TEST_FRACTION))
    if n - n_val - n_test < 1:
        raise DataError(f"need at least 3 datapoints to form train/val/test splits, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
            "test": order[n - n_test:]}


def _split_indices(n: int, name: str, seed: int) -> dict[str, torch.Tensor]:
    try:
        return split_indices(n, seed)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


def from_array(array: np.ndarray | torch.Tensor, name: str = "array",
               labels: np.ndarray | torch.Tensor | None = None, *,
               split_seed: int = SPLIT_SEED) -> Dataset:
    """Split an array of datapoints (first axis) into a :class:`Dataset`.

    A memory-mapped array (``np.load(..., mmap_mode="r")``) stays on disk: it is scanned once
    in chunks for non-finite values, and its splits are :class:`LazyRows`. ``split_seed`` seeds
    the train/val/test permutation (keep the default to get the splits every run uses).
    """
    if torch.is_tensor(array):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.memmap):
        array = np.asarray(array)
    _check_dtype(array.dtype, name)
    data_shape = _data_shape(array, name)
    if len(array) == 0 or math.prod(data_shape) == 0:
        raise DataError(f"{name}: no datapoints (array of shape {list(array.shape)})")
    if isinstance(array, np.memmap) and labels is None:
        for start in range(0, len(array), SCAN_ROWS):
            with np.errstate(all="ignore"):
                chunk = torch.from_numpy(np.array(array[start:start + SCAN_ROWS], np.float32))
            chunk = chunk.reshape(len(chunk), -1)
            bad = ~torch.isfinite(chunk)
            if bool(bad.any()):
                row = start + int(bad.any(1).nonzero()[0])
                raise DataError(f"{name}: data contain NaN or infinite values, or values beyond "
                                f"the float32 range (first in row {row})")
        parts = _split_indices(len(array), name, split_seed)
        return Dataset(name=name, data_shape=data_shape,
                       train=LazyRows(array, parts["train"].numpy()),
                       val=LazyRows(array, parts["val"].numpy()),
                       test=LazyRows(array, parts["test"].numpy()),
                       labels={s: None for s in parts})
    with np.errstate(all="ignore"):  # overflow shows up as inf, refused below
        values = np.ascontiguousarray(array, dtype=np.float32)
    if not values.flags.writeable:  # torch warns about read-only arrays
        values = values.copy()
    x = torch.from_numpy(values).reshape(len(values), -1)
    check_finite(x, name)
    parts = _split_indices(len(x), name, split_seed)
    label_tensor = None if labels is None else torch.as_tensor(np.array(labels)).long()
    return Dataset(
        name=name, data_shape=data_shape,
        train=x[parts["train"]], val=x[parts["val"]], test=x[parts["test"]],
        labels={s: None if label_tensor is None else label_tensor[idx] for s, idx in parts.items()},
    )


#: Where scikit-learn ships the digits, inside its package folder
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def _digits_file() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn (whose
    import takes seconds), or ``None``."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not imported
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(folder).joinpath(*_DIGITS_FILE)
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``sklearn.datasets.load_digits()`` gives them: ``images`` ``[1797, 8, 8]``
    (grey levels 0..16, float64) and ``target`` (int). Read with numpy from the file that
    scikit-learn ships, as scikit-learn itself reads it (``np.loadtxt`` on the decompressed
    CSV), without importing scikit-learn; through scikit-learn where that file is not found or
    not readable."""
    import gzip

    path = _digits_file()
    if path is not None:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as stream:
                table = np.loadtxt(stream, delimiter=",")
        except (OSError, EOFError, ValueError):
            table = None
        if table is not None and table.ndim == 2 and table.shape[1] == 65:
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target


def load_digits(split_seed: int = SPLIT_SEED) -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits, grey levels 0..16 scaled to [0, 1]
    (read without importing scikit-learn: :func:`digits_arrays`)."""
    images, target = digits_arrays()
    images = (images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    dataset = from_array(images, name="digits", labels=target, split_seed=split_seed)
    labels = np.asarray(target, np.int64)
    dataset.source = {"fingerprint": _fingerprint_arrays(images, labels)}
    return dataset


def default_data_dir() -> Path:
    """Where torchvision data sets live by default: ``$PYRO_VAE_DATA`` or ~/.cache/pyro-vae."""
    return Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae")).expanduser()


def load_torchvision(name: str, data_dir: str | Path | None = None,
                     download: bool = False, split_seed: int = SPLIT_SEED) -> Dataset:
    """MNIST, Fashion-MNIST or KMNIST through torchvision, grey levels scaled to [0, 1].

    The official training set is split by a fixed seed into train and validation (90 / 10 %);
    the official test set is the test split. Labels are kept (for conditional VAEs).
    """
    import torchvision

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    raw = root / cls.__name__ / "raw"
    try:
        with warnings.catch_warnings():  # torchvision's notes on read-only buffers and the like
            warnings.simplefilter("ignore", UserWarning)
            train = cls(root=str(root), train=True, download=download)
            test = cls(root=str(root), train=False, download=download)
    except RuntimeError as exc:
        if "not found" in str(exc).lower():
            raise DataError(f"data set {name!r} not found: expected its IDX files in {raw}; "
                            "pass --download to fetch it, or --data-dir DIR") from None
        reason = " ".join(str(exc).split())[:300]  # torchvision's messages span lines
        raise DataError(f"data set {name!r} could not be read or downloaded into {raw}: "
                        f"{reason}") from None
    except (OSError, ValueError) as exc:  # a failed download, a corrupt or truncated file
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(f"data set {name!r} could not be loaded from {raw}: {reason}") from None
    images = train.data.float().div_(255).reshape(len(train.data), -1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, round(len(images) * VAL_FRACTION))
    if len(images) - n_val < 1 or len(test.data) < 1:
        raise DataError(f"data set {name!r} in {raw} is too small to split")
    train_idx, val_idx = order[: len(images) - n_val], order[len(images) - n_val:]
    targets = torch.as_tensor(train.targets).long()
    height, width = train.data.shape[-2:]
    fingerprint = _fingerprint_arrays(train.data, targets, test.data,
                                      torch.as_tensor(test.targets).long())
    return Dataset(
        name=name, data_shape=(1, int(height), int(width)),
        train=images[train_idx], val=images[val_idx],
        test=test.data.float().div_(255).reshape(len(test.data), -1),
        labels={"train": targets[train_idx], "val": targets[val_idx],
                "test": torch.as_tensor(test.targets).long()},
        source={"fingerprint": fingerprint},
    )


def binarize(dataset: Dataset, mode: str, seed: int = BINARIZE_SEED) -> Dataset:
    """Binary data from grey levels in [0, 1] (Bernoulli(x), drawn with ``seed``).

    ``static``: every split is sampled once. ``dynamic``: validation and test are sampled once
    (so evaluations are deterministic), and training minibatches are resampled at every step.
    The seed is recorded in a run's ``config.json`` (``binarize_seed``), so the run is evaluated
    on the same binary test images wherever it is loaded.
    """
    if mode not in BINARIZATIONS:
        raise DataError(f"unknown binarization {mode!r}; use static or dynamic")
    dataset = Dataset(dataset.name, dataset.data_shape, *(dataset.split(s) for s in
                                                          ("train", "val", "test")),
                      dict(dataset.labels), source=dict(dataset.source))  # binary copies in memory
    for split in ("train", "val", "test"):
        values = dataset.split(split)
        if not (float(values.min()) >= 0.0 and float(values.max()) <= 1.0):
            raise DataError(f"--binarize needs data in [0, 1]; {dataset.name!r} holds values "
                            f"from {float(values.min()):g} to {float(values.max()):g}")
    generator = torch.Generator().manual_seed(seed)
    sample = lambda x: torch.bernoulli(x.cpu(), generator=generator).to(x.device)  # noqa: E731
    return Dataset(dataset.name, dataset.data_shape,
                   dataset.train if mode == "dynamic" else sample(dataset.train),
                   sample(dataset.val), sample(dataset.test), dict(dataset.labels),
                   dynamic_binarization=mode == "dynamic", source=dict(dataset.source))


def load_data(spec: str | Path, device: torch.device | str = "cpu", *,
              data_dir: str | Path | None = None, download: bool = False,
              binarize_mode: str | None = None, split_seed: int = SPLIT_SEED) -> Dataset:
    """Load a named data set (``digits``, ``mnist``, ``fashion-mnist``, ``kmnist``) or an array
    file (``.npy`` / ``.csv``), optionally binarized (``static`` or ``dynamic``).

    Only regular files are read (a named pipe, a device or a directory is refused at once). The
    data set's ``source`` records how to load it again and what it held: ``name`` (a named data
    set's name, or a file's absolute resolved path), ``binarize``, ``data_dir`` (when given),
    ``split_seed`` and ``fingerprint`` (``{"size", "sha256"}`` of a file's bytes, or of the
    arrays a named data set was loaded from); :func:`load_recorded` checks it.
    """
    return _load_data(spec, device, data_dir=data_dir, download=download,
                      binarize_mode=binarize_mode, split_seed=split_seed)


def _exists(path: str) -> bool:
    """Whether something is at ``path`` (an unreadable or odd one counts: reading it tells)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    except OSError:
        return True
    return True


def _same_fingerprint(actual: dict, expected: dict) -> bool:
    return (actual.get("size") == expected.get("size")
            and str(actual.get("sha256")).lower() == str(expected.get("sha256")).lower())


def _load_data(spec: str | Path, device: torch.device | str = "cpu", *,
               data_dir: str | Path | None = None, download: bool = False,
               binarize_mode: str | None = None, split_seed: int = SPLIT_SEED,
               expected: dict | None = None, mismatch: str | None = None,
               binarize_seed: int = BINARIZE_SEED) -> Dataset:
    """:func:`load_data`; with ``expected`` (a recorded fingerprint), data whose fingerprint
    differs are refused with the one-line ``mismatch``."""
    spec = str(spec)
    if spec in NAMED_DATASETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if spec == "digits":
                dataset = load_digits(split_seed)
            else:
                dataset = load_torchvision(spec, data_dir, download, split_seed)
        fingerprint = dataset.source["fingerprint"]
        if expected is not None and not _same_fingerprint(fingerprint, expected):
            raise DataError(mismatch or f"data set {spec!r}: its contents differ from the "
                            "recorded data")
    elif spec.endswith((".npy", ".csv", ".NPY", ".CSV")) or "/" in spec or os.path.exists(spec):
        try:
            path = Path(spec).expanduser()
        except RuntimeError:  # "~user/..." of an unknown user
            path = Path(spec)
        array, fingerprint = _read_file(path, expected, mismatch)
        dataset = from_array(array, name=str(path.resolve()), split_seed=split_seed)
    else:
        shown = spec if len(spec) <= 80 else spec[:80] + "..."
        raise DataError(f"unknown data set {shown!r}; use one of: {', '.join(NAMED_DATASETS)}, "
                        "or a path to a .npy or .csv file")
    if binarize_mode is not None:
        dataset = binarize(dataset, binarize_mode, binarize_seed)
    dataset.source = {"name": dataset.name, "binarize": binarize_mode,
                      **({"binarize_seed": binarize_seed} if binarize_mode else {}),
                      **({"data_dir": str(Path(data_dir).expanduser())} if data_dir else {}),
                      "split_seed": split_seed, "fingerprint": fingerprint}
    return dataset.to(device)


#: The label of a training datapoint whose label is hidden (semi-supervised training).
UNLABELLED = -1


def keep_labels(dataset: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """``dataset`` with the labels of ``per_class`` training datapoints of each class kept
    (chosen at random with ``seed``) and the others hidden (:data:`UNLABELLED`), for
    semi-supervised training; validation and test labels are untouched. Recorded in the
    dataset's ``source`` (``labels_per_class``, ``label_seed``), so a resumed or evaluated run
    hides the same labels."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise DataError(f"labels per class must be a positive integer, not {per_class!r}")
    labels = dataset.split_labels("train")
    if labels is None:
        raise DataError(f"--labels-per-class needs labelled data; {dataset.name!r} has no labels")
    labels_cpu = labels.cpu()
    generator = torch.Generator().manual_seed(int(seed))
    keep = torch.zeros(len(labels_cpu), dtype=torch.bool)
    for label in torch.unique(labels_cpu[labels_cpu >= 0]).tolist():
        rows = torch.nonzero(labels_cpu == label).flatten()
        if len(rows) < per_class:
            raise DataError(f"class {label} of {dataset.name!r} has {len(rows)} training "
                            f"datapoints, fewer than --labels-per-class {per_class}")
        keep[rows[torch.randperm(len(rows), generator=generator)[:per_class]]] = True
    hidden = torch.where(keep, labels_cpu, torch.full_like(labels_cpu, UNLABELLED))
    result = Dataset(dataset.name, dataset.data_shape, dataset.train, dataset.val, dataset.test,
                     {**dataset.labels, "train": hidden.to(labels.device)},
                     dataset.dynamic_binarization,
                     {**dataset.source, "labels_per_class": per_class, "label_seed": int(seed)})
    return result


def _recorded_fingerprint(source: dict) -> dict | None:
    fingerprint = source.get("fingerprint")
    if fingerprint is None:
        return None  # a run from before fingerprints were recorded: nothing to check
    size = fingerprint.get("size") if isinstance(fingerprint, dict) else None
    digest = fingerprint.get("sha256") if isinstance(fingerprint, dict) else None
    if not (type(size) is int and size >= 0 and isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdefABCDEF" for c in digest)):
        raise DataError("config.json: the recorded data fingerprint is not valid (expected "
                        '{"size": bytes, "sha256": 64 hex digits})')
    return {"size": size, "sha256": digest}


def load_recorded(source: dict, data: str | Path | None = None,
                  device: torch.device | str = "cpu") -> Dataset:
    """The data a run was trained on, loaded as it was (data directory, binarization, split
    seed), from ``source``: the ``"data"`` section of the run's config.json.

    ``data`` (a name or path, e.g. after the run or the file moved) is loaded instead of the
    recorded ``name``, the same way. When the run recorded a fingerprint, the data loaded must
    match it (size and SHA-256), or they are refused in one line; a run recorded before
    fingerprints is loaded without the check. A recorded file that is not there any more is
    refused in one line that says to pass it with ``--data``.
    """
    if source is None:
        source = {}
    if not isinstance(source, dict):
        raise DataError('config.json: its "data" section is not a JSON object')
    expected = _recorded_fingerprint(source)
    split_seed = source.get("split_seed", SPLIT_SEED)
    if type(split_seed) is not int or not 0 <= split_seed < 2 ** 63:
        raise DataError(f"config.json: the recorded split_seed {split_seed!r} is not a "
                        "non-negative integer")
    data_dir = source.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise DataError(f"config.json: the recorded data_dir {data_dir!r} is not a path")
    binarize_mode = source.get("binarize")
    if binarize_mode is not None and binarize_mode not in BINARIZATIONS:
        raise DataError(f"config.json: the recorded binarization {binarize_mode!r} is not one of "
                        f"{', '.join(BINARIZATIONS)}")
    binarize_seed = source.get("binarize_seed", BINARIZE_SEED)
    if type(binarize_seed) is not int or not 0 <= binarize_seed < 2 ** 63:
        raise DataError(f"config.json: the recorded binarize_seed {binarize_seed!r} is not a "
                        "non-negative integer")
    if data is None:
        name = source.get("name")
        if not isinstance(name, str) or not name:
            raise DataError("config.json records no data set for this run; pass the data with "
                            "--data")
        if name not in NAMED_DATASETS and not _exists(name):
            raise DataError(f"{name} (the data this run was trained on) is not there; if it "
                            "moved, pass it with --data")
        spec = name
    else:
        spec = str(data)
    if spec in NAMED_DATASETS:
        where = f" in {data_dir}" if data_dir and spec in TORCHVISION_DATASETS else ""
        mismatch = (f"data set {spec!r}{where}: its contents differ from the data this run was "
                    "trained on (size/sha256 recorded in config.json); pass the right data with "
                    "--data")
    else:
        mismatch = (f"{spec}: the file's contents differ from the data this run was trained on "
                    "(size/sha256 recorded in config.json); pass the right file with --data")
    dataset = _load_data(spec, device, data_dir=data_dir, binarize_mode=binarize_mode,
                         split_seed=split_seed, expected=expected, mismatch=mismatch,
                         binarize_seed=binarize_seed)
    kept = source.get("labels_per_class")
    if kept is not None:
        label_seed = source.get("label_seed", 0)
        if type(kept) is not int or kept < 1 or type(label_seed) is not int or label_seed < 0:
            raise DataError("config.json: the recorded labels_per_class/label_seed are not "
                            "positive integers")
        dataset = keep_labels(dataset, kept, label_seed)
    return dataset
