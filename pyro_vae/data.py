"""Data sets: the bundled ``digits``, MNIST, Fashion-MNIST and KMNIST (torchvision; local files
or ``download``), and ``.npy`` / ``.csv`` array files (a ``.npy`` may be memory-mapped).

Every data set is split once, by a fixed seed that does not depend on the training seed, into
train / validation / test parts (80 / 10 / 10 %), so that ``evaluate --split test`` of any run
on the same data sees the same datapoints. Data are flattened to ``[N, prod(data_shape)]``
float32 tensors and kept on the training device, except memory-mapped arrays, which stay on
disk and are read a minibatch at a time.
"""

from __future__ import annotations

import csv
import math
import os
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
    #: how to load these data again (``load_data`` keyword arguments), recorded in config.json
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


def _read_csv(path: Path) -> np.ndarray:
    try:
        return _parse_csv(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (it is not UTF-8)") from None


def _parse_csv(path: Path) -> np.ndarray:
    rows: list[list[float]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                values = [float(cell) for cell in row]
            except ValueError:
                if line_number == 1 and not rows:
                    continue  # a header line
                bad = next(c for c in row if not _is_number(c))
                raise DataError(f"{path}: line {line_number} holds a non-number: {bad!r}") from None
            if rows and len(values) != len(rows[0]):
                raise DataError(f"{path}: line {line_number} has {len(values)} columns, "
                                f"expected {len(rows[0])} (ragged CSV)")
            rows.append(values)
    if not rows:
        raise DataError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_array(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, expected a .npy or .csv file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        if np.issubdtype(array.dtype, np.complexfloating):
            raise DataError(f"{path}: array of dtype {array.dtype} is complex; expected real numbers")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"{path}: array of dtype {array.dtype} is not numeric")
        return array
    raise DataError(f"unsupported data file type {suffix or '(none)'!r} for {path}; "
                    "use .npy or .csv")


def _data_shape(array: np.ndarray, source: str) -> tuple[int, ...]:
    if array.ndim == 2:
        return (array.shape[1],)
    if array.ndim == 3:
        return (1, array.shape[1], array.shape[2])
    if array.ndim == 4:
        return tuple(array.shape[1:])
    raise DataError(f"{source}: expected an array of shape [N, D], [N, H, W] or [N, C, H, W], "
                    f"got shape {list(array.shape)}")


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


def from_array(array: np.ndarray | torch.Tensor, name: str = "array",
               labels: np.ndarray | torch.Tensor | None = None) -> Dataset:
    """Split an array of datapoints (first axis) into a :class:`Dataset`.

    A memory-mapped array (``np.load(..., mmap_mode="r")``) stays on disk: it is scanned once
    in chunks for non-finite values, and its splits are :class:`LazyRows`.
    """
    if not isinstance(array, np.memmap):
        array = np.asarray(array)
    data_shape = _data_shape(array, name)
    if len(array) == 0 or math.prod(data_shape) == 0:
        raise DataError(f"{name}: no datapoints (array of shape {list(array.shape)})")
    if isinstance(array, np.memmap) and labels is None:
        for start in range(0, len(array), SCAN_ROWS):
            with np.errstate(over="ignore", invalid="ignore"):
                chunk = torch.from_numpy(np.array(array[start:start + SCAN_ROWS], np.float32))
            try:
                check_finite(chunk.reshape(len(chunk), -1), name)
            except DataError:
                row = start + int((~torch.isfinite(chunk.reshape(len(chunk), -1))).any(1)
                                  .nonzero()[0])
                raise DataError(f"{name}: data contain NaN or infinite values, or values beyond "
                                f"the float32 range (first in row {row})") from None
        parts = split_indices(len(array))
        return Dataset(name=name, data_shape=data_shape,
                       train=LazyRows(array, parts["train"].numpy()),
                       val=LazyRows(array, parts["val"].numpy()),
                       test=LazyRows(array, parts["test"].numpy()),
                       labels={s: None for s in parts})
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf, refused below
        x = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)).reshape(len(array), -1)
    check_finite(x, name)
    parts = split_indices(len(x))
    label_tensor = None if labels is None else torch.as_tensor(np.asarray(labels)).long()
    return Dataset(
        name=name, data_shape=data_shape,
        train=x[parts["train"]], val=x[parts["val"]], test=x[parts["test"]],
        labels={s: None if label_tensor is None else label_tensor[idx] for s, idx in parts.items()},
    )


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits, grey levels 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    return from_array(images, name="digits", labels=bunch.target)


def default_data_dir() -> Path:
    """Where torchvision data sets live by default: ``$PYRO_VAE_DATA`` or ~/.cache/pyro-vae."""
    return Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae")).expanduser()


def load_torchvision(name: str, data_dir: str | Path | None = None,
                     download: bool = False) -> Dataset:
    """MNIST, Fashion-MNIST or KMNIST through torchvision, grey levels scaled to [0, 1].

    The official training set is split by a fixed seed into train and validation (90 / 10 %);
    the official test set is the test split. Labels are kept (for conditional VAEs).
    """
    import torchvision

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    raw = root / cls.__name__ / "raw"
    try:
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
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, round(len(images) * VAL_FRACTION))
    if len(images) - n_val < 1 or len(test.data) < 1:
        raise DataError(f"data set {name!r} in {raw} is too small to split")
    train_idx, val_idx = order[: len(images) - n_val], order[len(images) - n_val:]
    targets = torch.as_tensor(train.targets).long()
    height, width = train.data.shape[-2:]
    return Dataset(
        name=name, data_shape=(1, int(height), int(width)),
        train=images[train_idx], val=images[val_idx],
        test=test.data.float().div_(255).reshape(len(test.data), -1),
        labels={"train": targets[train_idx], "val": targets[val_idx],
                "test": torch.as_tensor(test.targets).long()},
    )


def binarize(dataset: Dataset, mode: str) -> Dataset:
    """Binary data from grey levels in [0, 1] (Bernoulli(x), with a fixed seed).

    ``static``: every split is sampled once. ``dynamic``: validation and test are sampled once
    (so evaluations are deterministic), and training minibatches are resampled at every step.
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
    generator = torch.Generator().manual_seed(BINARIZE_SEED)
    sample = lambda x: torch.bernoulli(x.cpu(), generator=generator).to(x.device)  # noqa: E731
    return Dataset(dataset.name, dataset.data_shape,
                   dataset.train if mode == "dynamic" else sample(dataset.train),
                   sample(dataset.val), sample(dataset.test), dict(dataset.labels),
                   dynamic_binarization=mode == "dynamic", source=dict(dataset.source))


def load_data(spec: str | Path, device: torch.device | str = "cpu", *,
              data_dir: str | Path | None = None, download: bool = False,
              binarize_mode: str | None = None) -> Dataset:
    """Load a named data set (``digits``, ``mnist``, ``fashion-mnist``, ``kmnist``) or an array
    file (``.npy`` / ``.csv``), optionally binarized (``static`` or ``dynamic``)."""
    spec = str(spec)
    if spec == "digits":
        dataset = load_digits()
    elif spec in TORCHVISION_DATASETS:
        dataset = load_torchvision(spec, data_dir, download)
    elif spec.endswith((".npy", ".csv", ".NPY", ".CSV")) or "/" in spec or Path(spec).exists():
        path = Path(spec).expanduser()
        dataset = from_array(_read_array(path), name=str(path))
    else:
        raise DataError(f"unknown data set {spec!r}; use one of: {', '.join(NAMED_DATASETS)}, "
                        "or a path to a .npy or .csv file")
    if binarize_mode is not None:
        dataset = binarize(dataset, binarize_mode)
    dataset.source = {"name": dataset.name, "binarize": binarize_mode,
                      **({"data_dir": str(Path(data_dir).expanduser())} if data_dir else {})}
    return dataset.to(device)
