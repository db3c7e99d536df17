"""Fuzzing the command line and the TOML file: every invocation ends with exit 0, or with one line
on stderr and exit 2; never a traceback, never a printed warning, never a hang, and never a
change to an existing run's files.

The default profile runs a few hundred examples (with the data readers' fuzz tests); the
``slow`` profile ten times as many (``pytest -m slow tests/test_cli_fuzz.py``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import invoke, snapshot, train_tiny_run

from pyro_vae import config

#: seconds one invocation may take before it counts as a hang
BOUND_S = 60.0
FAST_PROFILE = dict(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

#: everything a user could type as a value
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
NUMBERS = st.one_of(st.integers(-10, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                    st.sampled_from(["1e3", "-0", "0x10", "1_000", "inf", "nan", "", " 3"]))


def _value_text(option: config.Option) -> st.SearchStrategy[str]:
    """Valid-looking and garbage text for one option's flag."""
    if option.choices is not None:
        return st.one_of(st.sampled_from(list(option.choices())), TEXT)
    if option.name in ("latent_dim", "hidden", "batch_size", "particles", "val_particles"):
        small = st.integers(-2, 40).map(str)  # sizes stay small: a huge model is its own test
        return st.one_of(small, st.lists(st.integers(-1, 32), max_size=3).map(
            lambda v: ",".join(map(str, v))), TEXT) if option.name == "hidden" else \
            st.one_of(small, TEXT)
    if option.name in ("data", "data_dir", "out", "tensorboard"):
        return st.one_of(st.sampled_from(["digits", "mnist", "/nonexistent/x.npy", ".", "",
                                          "a" * 300]), TEXT)
    if option.name in ("epochs", "eval_particles"):
        return st.one_of(st.integers(-2, 3).map(str), TEXT)
    return st.one_of(NUMBERS, TEXT)


FUZZED_OPTIONS = [o for o in config.OPTIONS
                  if o.name not in ("download", "out", "tensorboard", "eval_particles")]


@st.composite
def train_argv(draw) -> list[str]:
    argv = ["train", "--dry-run", "--quiet"]
    for option in draw(st.lists(st.sampled_from(FUZZED_OPTIONS), max_size=6, unique=True)):
        if option.kind is config.BOOLEAN:
            argv.append(draw(st.sampled_from([option.flag, "--no-" + option.flag[2:]])))
        else:
            argv += [option.flag, draw(_value_text(option))]
    for kind in draw(st.lists(st.sampled_from(config.COMPONENT_SECTIONS), max_size=2)):
        argv += [f"--{kind}-option", draw(st.one_of(
            st.sampled_from(["components=3", "df=2.5", "scale=0.1", "layers=2", "x=1", "=",
                             "levels=9", "enumerate=true"]), TEXT))]
    return argv


def _ends_cleanly(outcome, elapsed: float) -> None:
    lines = outcome.stderr.strip().splitlines()
    assert elapsed < BOUND_S, f"took {elapsed:.0f} s"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert not outcome.warnings, outcome.warnings
    if outcome.code == 0:
        assert not lines, outcome.stderr
    else:
        assert outcome.code == 2, (outcome.code, outcome.stderr)
        assert len(lines) == 1, outcome.stderr


def _run(argv: list[str], capsys):
    started = time.perf_counter()
    outcome = invoke(argv, capsys)
    return outcome, time.perf_counter() - started


@settings(max_examples=80, **FAST_PROFILE)
@given(argv=train_argv())
def test_fuzzed_train_flags_end_cleanly(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _ends_cleanly(*_run(argv, capsys))
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


# -- TOML files ---------------------------------------------------------------------------------

def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


SCALARS = st.one_of(st.booleans(), st.integers(-5, 300), st.floats(), TEXT,
                    st.sampled_from(list(config.BY_NAME["prior"].choices()) + ["digits", "cpu",
                                                                              "iwae", "8,8"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["name", "components", "x"]),
                                                 inner, max_size=2)), max_leaves=5)
KEYS = st.one_of(st.sampled_from([o.name for o in FUZZED_OPTIONS]
                                 + [o.name.replace("_", "-") for o in FUZZED_OPTIONS]),
                 st.sampled_from(["prior", "likelihood", "guide", "learning_rate", "Epochs"]))


@st.composite
def toml_documents(draw) -> str:
    if draw(st.integers(0, 9)) == 0:  # now and then, text that may not be TOML at all
        return draw(st.text(max_size=40))
    table = draw(st.dictionaries(KEYS, VALUES, max_size=6))
    for name in ("hidden", "latent_dim", "latent-dim", "batch_size", "batch-size"):
        if isinstance(table.get(name), int):  # sizes stay small: a huge model is its own test
            table[name] = table[name] % 64
        if isinstance(table.get(name), list):
            table[name] = [v % 64 if isinstance(v, int) and not isinstance(v, bool) else v
                           for v in table[name]]
    lines = []
    for key, value in table.items():
        if isinstance(value, dict) and key in config.COMPONENT_SECTIONS:
            lines.append(f"[{key}]")  # written last below: a table ends the top level
            continue
        lines.insert(0, f"{json.dumps(key)} = {_toml(value)}")
    for key, value in table.items():
        if isinstance(value, dict) and key in config.COMPONENT_SECTIONS:
            lines.append(f"[{key}]\n" + "\n".join(f"{json.dumps(k)} = {_toml(v)}"
                                                  for k, v in value.items()))
    return "\n".join(line for line in lines if not (line.startswith("[") and "\n" not in line))


@settings(max_examples=80, **FAST_PROFILE)
@given(document=toml_documents())
def test_fuzzed_toml_files_end_cleanly(document, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fuzz.toml"
    path.write_text(document)
    _ends_cleanly(*_run(["train", "--config", str(path), "--dry-run", "--quiet"], capsys))


# -- commands on an existing run ----------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("fuzz") / "run", "--eval-particles", "5")


SMALL = st.one_of(st.integers(-1, 12).map(str), TEXT)
RUN_FILES = ("config.json", "weights.pt", "checkpoint.pt", "metrics.jsonl", "evaluation.json")


@st.composite
def run_argv(draw, run: Path) -> list[str]:
    command = draw(st.sampled_from(["evaluate", "sample", "diagnose", "compare", "explore",
                                    "plot", "train"]))
    argv = [command, str(run)] if command != "train" else ["train", "--resume", str(run)]
    if command == "compare":
        argv.append(str(run))
    flags = {"evaluate": ["--particles", "--seed", "--split", "--batch-size", "--json"],
             "sample": ["--n", "--seed", "--label", "--out"],
             "diagnose": ["--particles", "--seed", "--split", "--json"],
             "compare": ["--particles", "--seed", "--split", "--json"],
             "explore": ["--particles", "--top", "--split", "--out", "--json"],
             "plot": ["--data"], "train": ["--epochs", "--eval-particles", "--seed", "--prior"]}
    for flag in draw(st.lists(st.sampled_from(flags[command]), max_size=3, unique=True)):
        if flag == "--json":
            argv.append(flag)
        elif flag == "--split":
            argv += [flag, draw(st.one_of(st.sampled_from(["train", "val", "test", "all"]), TEXT))]
        elif flag == "--out":
            argv += [flag, draw(st.sampled_from([str(run), str(run / "samples.png"),
                                                 str(run / "config.json"), "x.png", "x.npy",
                                                 "x.txt", "a" * 300 + ".png", "/nonexistent/x"]))]
        elif flag == "--data":
            argv += [flag, draw(st.sampled_from(["digits", "mnist", "/nonexistent.npy", ""]))]
        elif flag == "--epochs":  # a resume that trains is allowed to change the run: not here
            argv += [flag, draw(st.sampled_from(["1", "0", "-1", "x"]))]
        elif flag == "--prior":
            argv += [flag, "mog"]
        else:
            argv += [flag, draw(SMALL)]
    return argv


@settings(max_examples=40, **FAST_PROFILE)
@given(data=st.data())
def test_fuzzed_commands_never_change_an_existing_run(data, fuzz_run, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(fuzz_run)
    argv = data.draw(run_argv(fuzz_run))
    if argv[0] == "train" and "--epochs" not in argv:
        argv += ["--epochs", "1"]  # the run has trained 1 epoch: a resume to 1 is refused
    _ends_cleanly(*_run(argv, capsys))
    after = snapshot(fuzz_run)
    for name in RUN_FILES:
        assert after[name] == before[name], f"{' '.join(argv)} changed {name}"
    for name, content in before.items():  # figures may be written again, never lost
        assert name in after, f"{' '.join(argv)} removed {name}"


@pytest.mark.slow
@settings(max_examples=800, **FAST_PROFILE)
@given(argv=train_argv())
def test_fuzzed_train_flags_end_cleanly_long(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _ends_cleanly(*_run(argv, capsys))


@pytest.mark.slow
@settings(max_examples=800, **FAST_PROFILE)
@given(document=toml_documents())
def test_fuzzed_toml_files_end_cleanly_long(document, capsys, tmp_path, monkeypatch):
    test_fuzzed_toml_files_end_cleanly.hypothesis.inner_test(document, capsys, tmp_path,
                                                             monkeypatch)
