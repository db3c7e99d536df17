"""Data files as they come: byte-order marks, huge fields, files that are not what their name
says, pipes and devices, long or unreadable names; and the data fingerprint a run records
(``Dataset.source``) and :func:`pyro_vae.data.load_recorded` checks.

Every bad file ends in one :class:`~pyro_vae.errors.DataError` line that names it, with no
warning printed and no wait.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.data import SPLIT_SEED, load_data, load_recorded, split_indices
from pyro_vae.errors import DataError

ROWS = np.arange(30, dtype=np.float32).reshape(10, 3) / 30


def quietly(call, *args, **kwargs):
    """``call(*args, **kwargs)``, failing the test if it emits any warning but a deprecation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, shown
    return result


def refused(spec, match: str, **kwargs) -> str:
    """The one-line DataError message that loading ``spec`` ends with (no warning)."""
    with pytest.raises(DataError, match=match) as info:
        quietly(load_data, spec, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def all_rows(dataset) -> torch.Tensor:
    """The rows of ``dataset`` in file order (undoing the fixed split permutation)."""
    parts = split_indices(len(dataset.split("all")))
    order = torch.cat([parts[s] for s in ("train", "val", "test")])
    rows = torch.empty_like(dataset.split("all"))
    rows[order] = dataset.split("all")
    return rows


# -- CSV ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["", "a,b,c\n"])
def test_a_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path, header):
    path = tmp_path / "bom.csv"
    lines = "\n".join(",".join(map(repr, row)) for row in ROWS.tolist())
    path.write_bytes(b"\xef\xbb\xbf" + (header + lines + "\n").encode())
    dataset = quietly(load_data, str(path))
    assert dataset.data_shape == (3,) and len(dataset.split("all")) == len(ROWS)
    np.testing.assert_array_equal(all_rows(dataset).numpy(), ROWS)


def test_a_header_after_blank_lines_is_still_a_header(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\nx,y,z\n" + "\n".join(",".join(map(str, r)) for r in ROWS.tolist()) + "\n")
    assert len(quietly(load_data, str(path)).split("all")) == len(ROWS)


def test_a_first_line_of_numbers_and_text_is_refused_not_dropped_as_a_header(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("0.1,0.2x\n0.3,0.4\n0.5,0.6\n0.7,0.8\n")  # a typo, not a header
    assert "typo.csv" in refused(str(path), "line 1 mixes numbers and text")


def test_a_row_of_empty_cells_is_a_missing_value_not_a_blank_line(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("0.1,0.2\n,\n0.5,0.6\n0.7,0.8\n")
    refused(str(path), "line 2 has an empty cell")


def test_a_csv_field_over_the_csv_modules_limit_is_one_line(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("0.5,0.5\n0.1," + "1" * 200_000 + "\n0.2,0.3\n")
    message = refused(str(path), "field")
    assert "huge.csv" in message and "line 2" in message


def test_csv_values_that_overflow_float32_are_refused_without_a_warning(tmp_path):
    path = tmp_path / "overflow.csv"
    path.write_text("0.1,0.2\n0.3,1e39\n0.5,0.6\n0.7,0.8\n")
    assert "overflow.csv" in refused(str(path), "float32 range")
    path.write_text("0.1,0.2\n0.3," + "9" * 5000 + "\n0.5,0.6\n0.7,0.8\n")
    refused(str(path), "infinite")


def test_random_bytes_as_csv_are_one_line(tmp_path):
    path = tmp_path / "noise.csv"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "noise.csv" in refused(str(path), "not UTF-8")


# -- .npy that is not one -------------------------------------------------------------------------

class Tripwire:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _npz_as_npy(path: Path) -> None:
    np.savez(path.with_suffix(".npz"), x=ROWS)
    path.with_suffix(".npz").rename(path)


def _pickle_as_npy(path: Path) -> None:
    path.write_bytes(pickle.dumps(Tripwire(str(path.parent / "unpickled"))))


def _object_npy(path: Path) -> None:
    np.save(path, np.array([[Tripwire(str(path.parent / "unpickled"))]] * 4, dtype=object),
            allow_pickle=True)


def _truncated_npy(path: Path) -> None:
    np.save(path, ROWS)
    path.write_bytes(path.read_bytes()[:-7])


def _truncated_header(path: Path) -> None:
    np.save(path, ROWS)
    path.write_bytes(path.read_bytes()[:20])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage_header(path: Path) -> None:
    path.write_bytes(b"\x93NUMPY\x01\x00" + (40).to_bytes(2, "little") + b"{'descr': '<f4', (((((" +
                     b" " * 17 + b"\n")


@pytest.mark.parametrize("make, match", [
    (_npz_as_npy, "zip archive"), (_pickle_as_npy, "pickle"), (_object_npy, "Python objects"),
    (_truncated_npy, "truncated"), (_truncated_header, "not a readable .npy"),
    (_random_bytes, "not a readable .npy"), (_empty, "not a readable .npy"),
    (_garbage_header, "not a readable .npy"),
], ids=["npz", "pickle", "object-array", "truncated", "truncated-header", "random-bytes", "empty",
        "garbage-header"])
def test_a_file_that_is_not_a_numeric_npy_array_is_one_line_naming_it(tmp_path, make, match):
    path = tmp_path / "data.npy"
    make(path)
    assert str(path) in refused(str(path), match)
    assert not (tmp_path / "unpickled").exists(), "a pickle was loaded"


def test_npy_values_beyond_float32_are_refused_without_a_warning(tmp_path):
    np.save(tmp_path / "big.npy", np.full((10, 3), 1e300))
    refused(str(tmp_path / "big.npy"), "float32 range")
    np.save(tmp_path / "td.npy", np.zeros((10, 3), "m8[s]"))
    refused(str(tmp_path / "td.npy"), "not numeric")


def test_a_npy_in_each_format_version_reads_the_same(tmp_path):
    from numpy.lib import format as npformat

    for version in ((1, 0), (2, 0), (3, 0)):
        path = tmp_path / f"v{version[0]}.npy"
        with open(path, "wb") as handle:
            npformat.write_array(handle, ROWS, version=version)
        np.testing.assert_array_equal(all_rows(quietly(load_data, str(path))).numpy(), ROWS)


# -- paths that are not regular files -------------------------------------------------------------

def _unblock_after(fifo: Path, seconds: float) -> threading.Thread:
    """Open ``fifo`` for writing after ``seconds`` (and close it), so that a reader that wrongly
    waits on it is released instead of hanging the test run."""
    def writer():
        deadline = time.monotonic() + seconds + 30
        time.sleep(seconds)
        while time.monotonic() < deadline:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: nobody is reading (the good case)
                if exc.errno != errno.ENXIO:
                    return
                time.sleep(0.05)
                continue
            os.write(fd, b"1,2\n3,4\n5,6\n")
            os.close(fd)
            return
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_a_named_pipe_is_refused_at_once(tmp_path, suffix):
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    _unblock_after(fifo, 5.0)
    started = time.monotonic()
    message = refused(str(fifo), "named pipe")
    assert time.monotonic() - started < 5.0, "waited on the pipe"
    assert str(fifo) in message


def test_a_directory_and_a_device_are_refused(tmp_path):
    (tmp_path / "dir.npy").mkdir()
    refused(str(tmp_path / "dir.npy"), "directory")
    if os.path.exists("/dev/zero"):
        assert "/dev/zero" in refused("/dev/zero", "character device")


def test_a_file_name_too_long_is_one_line(tmp_path):
    path = tmp_path / ("x" * 300 + ".npy")
    refused(str(path), "too long")
    refused(str(tmp_path / ("y" * 300)), "too long")


def test_a_missing_file_and_an_unknown_user_home_are_one_line(tmp_path):
    refused(str(tmp_path / "nope.csv"), "not found")
    refused("~no-such-user-here/data.npy", "not found")


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "secret.npy"
    np.save(path, ROWS)
    path.chmod(0)
    if os.geteuid() != 0:  # root reads anything: simulate the refusal below instead
        refused(str(path), "permission denied")
    real_open = os.open

    def denying_open(file, flags, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    assert str(path) in refused(str(path), "permission denied")


def test_the_command_line_prints_one_line_for_a_pipe_and_writes_no_run(tmp_path, capsys):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    _unblock_after(fifo, 5.0)
    out = tmp_path / "run"
    code = quietly(main, ["train", "--data", str(fifo), "--epochs", "1", "--quiet",
                          "--eval-particles", "0", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pyro-vae train: error: "), err
    assert "named pipe" in err[0] and not out.exists()


# -- what a run records, and loading it again -----------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_is_recorded_by_absolute_path_size_sha256_and_split_seed(tmp_path, monkeypatch):
    np.save(tmp_path / "rows.npy", ROWS)
    monkeypatch.chdir(tmp_path)
    dataset = quietly(load_data, "rows.npy", binarize_mode="static")
    path = (tmp_path / "rows.npy").resolve()
    assert dataset.source == {
        "name": str(path), "binarize": "static", "binarize_seed": 0, "split_seed": SPLIT_SEED,
        "fingerprint": {"size": path.stat().st_size, "sha256": _sha256(path)}}
    assert dataset.name == str(path)
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in ROWS.tolist()))
    source = quietly(load_data, "rows.csv").source
    assert source["name"] == str(csv_path.resolve())
    assert source["fingerprint"] == {"size": csv_path.stat().st_size, "sha256": _sha256(csv_path)}


def test_a_named_data_set_is_recorded_by_name_with_a_fingerprint_of_its_arrays(digits):
    assert digits.source["name"] == "digits" and digits.source["split_seed"] == SPLIT_SEED
    fingerprint = digits.source["fingerprint"]
    assert set(fingerprint) == {"size", "sha256"} and len(fingerprint["sha256"]) == 64
    assert quietly(load_data, "digits").source["fingerprint"] == fingerprint
    assert quietly(load_recorded, dict(digits.source)).data_shape == (1, 8, 8)
    tampered = {**digits.source, "fingerprint": {**fingerprint, "sha256": "0" * 64}}
    with pytest.raises(DataError, match="^data set 'digits': its contents differ from the data "
                                        "this run was trained on"):
        load_recorded(tampered)


def test_load_recorded_loads_the_same_file_the_same_way(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, ROWS)
    source = load_data(str(path), binarize_mode="dynamic").source
    again = quietly(load_recorded, json.loads(json.dumps(source)))
    assert again.dynamic_binarization and again.source == source
    for split in ("val", "test"):
        assert torch.equal(again.split(split), load_data(str(path), binarize_mode="dynamic")
                           .split(split))


def test_load_recorded_refuses_a_file_whose_contents_changed(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, ROWS)
    source = load_data(str(path)).source
    changed = ROWS.copy()
    changed[4, 1] += 0.25  # same size, one value differs
    np.save(path, changed)
    with pytest.raises(DataError) as info:
        load_recorded(source)
    assert str(info.value) == (
        f"{path.resolve()}: the file's contents differ from the data this run was trained on "
        "(size/sha256 recorded in config.json); pass the right file with --data")
    old_run = {k: v for k, v in source.items() if k not in ("fingerprint", "split_seed")}
    assert torch.equal(all_rows(load_recorded(old_run)), torch.from_numpy(changed))  # no check


def test_load_recorded_names_a_moved_file_and_takes_it_with_data(tmp_path, monkeypatch):
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(",".join(map(str, r)) for r in ROWS.tolist()) + "\n")
    monkeypatch.chdir(tmp_path)
    source = load_data("rows.csv").source
    assert source["name"] == str(path.resolve())  # recorded absolute, though given relative
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "renamed.csv"
    shutil.move(path, moved)
    with pytest.raises(DataError) as info:
        load_recorded(source)
    assert str(info.value) == (f"{path.resolve()} (the data this run was trained on) is not "
                               "there; if it moved, pass it with --data")
    dataset = quietly(load_recorded, source, "elsewhere/renamed.csv")
    assert torch.equal(all_rows(dataset), all_rows(load_data(str(moved))))
    other = tmp_path / "other.csv"
    other.write_text("\n".join(",".join(map(str, r)) for r in (ROWS + 1).tolist()) + "\n")
    with pytest.raises(DataError, match=f"^{other}: the file's contents differ"):
        load_recorded(source, str(other))
    with pytest.raises(DataError, match="^data set 'digits': its contents differ"):
        load_recorded(source, "digits")


def test_load_recorded_uses_the_recorded_split_seed(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(200, dtype=np.float32).reshape(100, 2))
    source = {**load_data(str(path)).source, "split_seed": 7}
    dataset = load_recorded(source)
    expected = split_indices(100, 7)["test"]
    assert torch.equal(dataset.split("test")[:, 0], expected.float() * 2)
    assert dataset.source["split_seed"] == 7


@pytest.mark.parametrize("source, match", [
    ({"name": "digits", "fingerprint": {"size": 1}}, "fingerprint is not valid"),
    ({"name": "digits", "fingerprint": "abc"}, "fingerprint is not valid"),
    ({"name": "digits", "split_seed": "0"}, "split_seed"),
    ({"name": "digits", "binarize": "sometimes"}, "binarization"),
    ({}, "records no data set"),
    ({"name": "no-such-file.npy"}, "is not there; if it moved, pass it with --data"),
])
def test_load_recorded_refuses_a_damaged_record_in_one_line(source, match):
    with pytest.raises(DataError, match=match) as info:
        load_recorded(source)
    assert "\n" not in str(info.value)


def test_a_trained_run_records_its_file_and_loads_it_back(tmp_path, capsys, monkeypatch):
    data = tmp_path / "rows.npy"
    np.save(data, np.random.default_rng(0).random((40, 6)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "rows.npy", "--epochs", "1", "--hidden", "8",
                 "--latent-dim", "2", "--quiet", "--eval-particles", "0",
                 "--out", "run"]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert recorded["name"] == str(data.resolve())
    assert recorded["fingerprint"] == {"size": data.stat().st_size, "sha256": _sha256(data)}
    assert recorded["split_seed"] == SPLIT_SEED
    assert torch.equal(load_recorded(recorded).split("test"), load_data(str(data)).split("test"))
