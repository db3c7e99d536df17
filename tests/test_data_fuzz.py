"""Fuzzing the data readers (Hypothesis): random ``.npy`` arrays of every dtype and shape, random
bytes behind a ``.npy`` name, random numeric tables and random text or bytes as ``.csv``.

For every input, :func:`pyro_vae.load_data` either returns a data set whose rows are finite
float32 values, exactly what NumPy reads (or the numbers written) where that is well defined, or
raises a :class:`~pyro_vae.errors.PyroVAEError` with a one-line message naming the file. Any
other exception, a warning, or an example slower than the deadline fails the test.

The default run draws a few hundred examples (deterministically: ``derandomize=True``, no example
database); the ``slow`` variants draw 2,000 (``pytest -m slow tests/test_data_fuzz.py``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.lib import format as npformat

from pyro_vae.data import _is_number, load_data, split_indices
from pyro_vae.errors import PyroVAEError


def fuzz(max_examples: int):
    """Deterministic Hypothesis settings with a 2 s deadline per example."""
    return settings(max_examples=max_examples, deadline=2000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- the property ---------------------------------------------------------------------------------

REFUSED = object()  # the expected outcome of an input that must be refused


def load(path: Path):
    """``load_data(path)``: the data set, or the one-line message it was refused with.

    Fails on any other exception and on any warning (other than a deprecation), since warnings
    reach stderr of the command line.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load_data(str(path))
        except PyroVAEError as exc:
            result = str(exc)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, shown
    if isinstance(result, str):
        assert result and "\n" not in result and "\r" not in result, repr(result)
        assert path.name in result, f"the message does not name the file: {result!r}"
    return result


def rows_in_file_order(dataset) -> np.ndarray:
    everything = dataset.split("all")
    parts = split_indices(len(everything))
    order = torch.cat([parts[s] for s in ("train", "val", "test")])
    rows = torch.empty_like(everything)
    rows[order] = everything
    return rows.numpy()


def check(path: Path, expected) -> None:
    """Load ``path``: refused (one line) if ``expected`` is REFUSED, else rows equal to it;
    ``expected=None`` checks only the invariants (a refusal or finite float32 rows)."""
    result = load(path)
    event("refused" if isinstance(result, str) else "accepted")
    if isinstance(result, str):
        assert expected is REFUSED or expected is None, f"refused: {result}"
        return
    assert expected is not REFUSED, f"accepted data that must be refused: {result.name}"
    rows = rows_in_file_order(result)
    assert rows.dtype == np.float32 and rows.ndim == 2 and np.isfinite(rows).all()
    assert rows.shape[1] == result.data_dim and len(rows) >= 3
    assert result.source["fingerprint"] == {"size": path.stat().st_size,
                                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if expected is not None:
        np.testing.assert_array_equal(rows, expected)


def expected_rows(array: np.ndarray):
    """What a data file holding ``array`` must give: REFUSED, or its rows as float32."""
    if array.dtype.kind not in "biuf" or array.ndim not in (2, 3, 4) or array.size == 0:
        return REFUSED
    if len(array) < 3:
        return REFUSED
    with np.errstate(over="ignore", invalid="ignore"):
        rows = np.asarray(array, dtype=np.float32).reshape(len(array), -1)
    return rows if np.isfinite(rows).all() else REFUSED


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="pyro-vae-fuzz-")


# -- .npy: random arrays --------------------------------------------------------------------------

NUMERIC_DTYPES = st.one_of(
    hnp.boolean_dtypes(), hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(sizes=(16, 32, 64), endianness="?"))
OTHER_DTYPES = st.one_of(
    hnp.complex_number_dtypes(), hnp.datetime64_dtypes(), hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3),
    st.just(np.dtype(np.longdouble)), st.just(np.dtype([("a", "<f4"), ("b", "<i2")])))
SHAPES = st.one_of(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6),
                   hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))


PLAUSIBLE_SHAPES = st.tuples(st.integers(3, 12), st.integers(1, 5)) | hnp.array_shapes(
    min_dims=3, max_dims=4, min_side=3, max_side=4)


@st.composite
def npy_arrays(draw) -> np.ndarray:
    if draw(st.booleans()):  # data as they should be: numeric, finite, [N >= 3, ...]
        dtype = draw(NUMERIC_DTYPES)
        elements = (st.floats(-1e4, 1e4, width=min(64, 8 * dtype.itemsize))
                    if dtype.kind == "f" else None)
        array = draw(hnp.arrays(dtype, draw(PLAUSIBLE_SHAPES), elements=elements))
        return np.asfortranarray(array) if draw(st.booleans()) else array
    shape = draw(SHAPES)
    if draw(st.integers(0, 9)) == 0:  # Python objects: must be refused, never unpickled
        return np.array(draw(st.lists(st.one_of(st.integers(), st.text(max_size=2), st.none()),
                                      min_size=1, max_size=6)) + [None], dtype=object)
    dtype = draw(st.one_of(NUMERIC_DTYPES, NUMERIC_DTYPES, OTHER_DTYPES))
    if dtype.kind == "f" and draw(st.booleans()):  # mostly ordinary values: exercise success
        elements = st.floats(-1e4, 1e4, width=min(64, 8 * dtype.itemsize))
        array = draw(hnp.arrays(dtype, shape, elements=elements))
    elif dtype == np.longdouble:
        array = draw(hnp.arrays(np.float64, shape)).astype(np.longdouble)
    else:
        array = draw(hnp.arrays(dtype, shape))
    return np.asfortranarray(array) if draw(st.booleans()) else array


def check_npy_array(array: np.ndarray) -> None:
    with scratch() as tmp:
        path = Path(tmp) / "fuzz.npy"
        np.save(path, array, allow_pickle=array.dtype.hasobject)
        check(path, expected_rows(array))


@fuzz(80)
@given(npy_arrays())
def test_npy_arrays_of_any_dtype_and_shape(array):
    check_npy_array(array)


@pytest.mark.slow
@fuzz(600)
@given(npy_arrays())
def test_npy_arrays_of_any_dtype_and_shape_long(array):
    check_npy_array(array)


# -- .npy: random bytes, broken headers, truncated files ------------------------------------------

def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@st.composite
def npy_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "magic", "body", "truncated", "flipped"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "magic":
        return b"\x93NUMPY" + draw(st.binary(max_size=300))
    dtype = draw(st.sampled_from([np.bool_, np.uint8, np.int16, np.float16]) | NUMERIC_DTYPES)
    good = _saved(draw(hnp.arrays(dtype, draw(PLAUSIBLE_SHAPES | SHAPES))))
    header_end = good.index(b"\n") + 1
    if kind == "body":  # a valid header, then random data (mostly as long as the header says)
        size = len(good) - header_end
        size = draw(st.sampled_from([size, size, size + draw(st.integers(1, 9))])
                    | st.integers(0, 2 * size))
        return good[:header_end] + draw(st.binary(min_size=size, max_size=size))
    if kind == "truncated":
        return good[:draw(st.integers(0, len(good)))]
    flipped = bytearray(good)  # a few bytes of the header (or data) changed
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, min(len(good), header_end + 16) - 1))
        flipped[at] = draw(st.integers(0, 255))
    return bytes(flipped)


def numpy_reads(data: bytes):
    """What ``np.load`` reads from ``data`` as a .npy array, or REFUSED (never unpickling;
    arrays whose header promises more bytes than the file holds are truncated: refused)."""
    buffer = io.BytesIO(data)
    try:
        version = npformat.read_magic(buffer)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, _, dtype = npformat.read_array_header_2_0(buffer)
        else:
            return REFUSED
        if dtype.hasobject or any(type(n) is not int or n < 0 for n in shape):
            return REFUSED
        if int(np.prod(shape, dtype=object)) * dtype.itemsize > len(data) - buffer.tell():
            return REFUSED
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy refuses the bytes
        return REFUSED
    return expected_rows(array) if isinstance(array, np.ndarray) else REFUSED


def check_npy_bytes(data: bytes) -> None:
    with scratch() as tmp:
        path = Path(tmp) / "bytes.npy"
        path.write_bytes(data)
        check(path, numpy_reads(data))


@fuzz(50)
@given(npy_bytes())
def test_random_and_damaged_bytes_as_npy(data):
    check_npy_bytes(data)


@pytest.mark.slow
@fuzz(400)
@given(npy_bytes())
def test_random_and_damaged_bytes_as_npy_long(data):
    check_npy_bytes(data)


# -- .csv: random numeric tables ------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(-1e6, 1e6), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10 ** 6, 10 ** 6), st.integers(-10 ** 60, 10 ** 60),
    st.sampled_from([1e38, 3.4028235e38, 3.5e38, -1e39, 1e-46, 5e-324]))
CLEAN_NUMBERS = st.floats(-1e6, 1e6) | st.integers(-10 ** 6, 10 ** 6)
NUMBER_FORMATS = st.sampled_from(["{!r}", "{:e}", "{:.3f}", " {!r} ", "{:g}", "+{!r}"])
HEADER_NAMES = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF,
                                     blacklist_characters='",;\t|\r\n'),
                       min_size=1, max_size=6).filter(lambda t: not _is_number(t) and t.strip())


def _cell(value, fmt: str) -> str:
    if isinstance(value, int):
        return str(value)
    if fmt == "+{!r}" and not (0 <= value < math.inf and math.copysign(1.0, value) > 0):
        fmt = "{!r}"
    return fmt.format(value)


@st.composite
def csv_tables(draw) -> tuple[bytes, object]:
    """A CSV table of numbers (text) and the rows the reader must give (or REFUSED)."""
    n_cols = draw(st.integers(1, 5))
    numbers = draw(st.sampled_from([CLEAN_NUMBERS, CLEAN_NUMBERS, NUMBERS]))
    table = draw(st.lists(st.lists(numbers, min_size=n_cols, max_size=n_cols),
                          min_size=draw(st.sampled_from([0, 3])), max_size=12))
    fmt = draw(NUMBER_FORMATS)
    cells = [[_cell(v, fmt) for v in row] for row in table]
    delimiter = draw(st.sampled_from([","] * 6 + [";", "\t", "|"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    header = draw(st.none() | st.lists(HEADER_NAMES, min_size=n_cols, max_size=n_cols))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, quoting=quoting, lineterminator=ending)
    lines = ([header] if header else []) + cells
    blanks = draw(st.sets(st.integers(0, len(lines)), max_size=3))
    for index, line in enumerate(lines + [None]):
        if index in blanks:
            out.write(ending)
        if line is not None:
            writer.writerow(line)
    text = out.getvalue()
    if not draw(st.booleans()):
        text = text.rstrip("\r\n")
    raw = (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode()
    if delimiter != "," and n_cols > 1:
        return raw, REFUSED  # one cell per line, "1;2": not a number
    with np.errstate(over="ignore"):
        values = np.array([[float(c) for c in row] for row in cells], dtype=np.float64)
        rows = values.astype(np.float32).reshape(len(cells), n_cols)
    if len(rows) < 3 or not np.isfinite(rows).all():
        return raw, REFUSED
    return raw, rows


def check_csv_table(case) -> None:
    raw, expected = case
    with scratch() as tmp:
        path = Path(tmp) / "table.csv"
        path.write_bytes(raw)
        check(path, expected)
        if expected is not REFUSED and b'"' not in raw:  # a second opinion: NumPy's reader
            lines = [line for line in raw.decode("utf-8-sig").splitlines() if line.strip()]
            if not _is_number(lines[0].split(",")[0]):
                lines = lines[1:]  # the header
            with warnings.catch_warnings(), np.errstate(over="ignore"):
                warnings.simplefilter("ignore")
                numpy_rows = np.loadtxt(lines, delimiter=",", ndmin=2, comments=None)
            np.testing.assert_array_equal(numpy_rows.astype(np.float32), expected)


@fuzz(60)
@given(csv_tables())
def test_random_numeric_tables_as_csv(case):
    check_csv_table(case)


@pytest.mark.slow
@fuzz(500)
@given(csv_tables())
def test_random_numeric_tables_as_csv_long(case):
    check_csv_table(case)


# -- .csv: random text and random bytes -----------------------------------------------------------

CSV_ALPHABET = st.sampled_from(list("0123456789.,-+eE \"';\t\r\n") + ["\ufeff", "nan", "inf",
                                                                      "1e39", "9" * 50, "\x00",
                                                                      "é", "_", "0x1"])


@st.composite
def csv_texts(draw) -> bytes:
    text = "".join(draw(st.lists(CSV_ALPHABET, max_size=120)))
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text.encode()


def check_csv_bytes(raw: bytes) -> None:
    with scratch() as tmp:
        path = Path(tmp) / "text.csv"
        path.write_bytes(raw)
        check(path, None)


@st.composite
def damaged_tables(draw) -> bytes:
    """A table of numbers with a few characters inserted, deleted or replaced."""
    text = bytearray(draw(csv_tables())[0])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        new = draw(CSV_ALPHABET).encode()
        if edit == "insert" or at == len(text):
            text[at:at] = new
        elif edit == "delete":
            del text[at]
        else:
            text[at:at + 1] = new
    return bytes(text)


CSV_INPUTS = st.one_of(damaged_tables(), csv_texts(), st.binary(max_size=400))


@fuzz(50)
@given(CSV_INPUTS)
def test_random_text_and_bytes_as_csv(raw):
    check_csv_bytes(raw)


@pytest.mark.slow
@fuzz(500)
@given(CSV_INPUTS)
def test_random_text_and_bytes_as_csv_long(raw):
    check_csv_bytes(raw)
