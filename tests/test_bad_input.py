"""Bad input through the command line: one clear line on stderr, no traceback, no run left behind.

The contract (``pyro_vae/cli.py``): every error a user can cause ends with exactly one line on
stderr (``pyro-vae <command>: error: <message>``, or argparse's one-line usage error), a non-zero
exit status, no traceback, and no run directory: an ``--out`` that did not exist before does not
exist afterwards, and one that did exist is left exactly as it was.

Each case below is one invocation of ``pyro_vae.cli.main`` in this process. Python warnings that
are not deprecations are also counted as stderr output, since the installed ``pyro-vae`` script
prints them there.
The file ends with Hypothesis properties of ``from_array`` and of the [0, 1] support check.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from helpers import invoke, snapshot, train_tiny_run

from pyro_vae.cli import main
from pyro_vae.data import from_array
from pyro_vae.errors import DataError
from pyro_vae.models.likelihoods import Bernoulli

#: Flags that keep a train invocation fast should a case wrongly start training.
FAST = ["--epochs", "1", "--quiet", "--eval-particles", "0"]
#: A small network, for the cases that are meant to reach the first training steps.
TINY = ["--hidden", "16", "--latent-dim", "2"]


# -- running the command line -----------------------------------------------------------------

# -- building the inputs ------------------------------------------------------------------------

class Ctx:
    """What a case builds its command line from: a scratch directory and a trained run."""

    def __init__(self, tmp: Path, request):
        self.tmp = tmp
        self._request = request
        self.used_run = False

    def request_fixture(self, name: str):
        return self._request.getfixturevalue(name)

    def on_exit(self, close: Callable[[], None]) -> None:
        self._request.addfinalizer(close)

    @property
    def run(self) -> Path:
        self.used_run = True
        return self._request.getfixturevalue("trained_run")

    def npy(self, name: str, array) -> str:
        path = self.tmp / name
        np.save(path, array)
        return str(path)

    def text(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def copy_run(self, name: str = "copied-run") -> Path:
        target = self.tmp / name
        shutil.copytree(self.run, target)
        return target


def train(*flags: str) -> Callable[[Ctx], tuple[list[str], Path]]:
    """A train case: ``flags`` may hold callables of ``ctx`` that make a file and return its path."""
    def build(ctx: Ctx) -> tuple[list[str], Path]:
        out = ctx.tmp / "run"
        argv = ["train", *(f(ctx) if callable(f) else f for f in flags), "--out", str(out), *FAST]
        return argv, out
    return build


def data(make: Callable[[Ctx], str]) -> tuple:
    return ("--data", make)


def prepare_existing_out(ctx: Ctx) -> tuple[list[str], Path]:
    out = ctx.tmp / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    (out / "sub").mkdir()
    (out / "sub" / "weights.pt").write_bytes(b"not really weights")
    return ["train", *TINY, "--out", str(out), *FAST], out


def out_below_a_file(ctx: Ctx) -> tuple[list[str], Path]:
    (ctx.tmp / "afile").write_text("a regular file, not a directory\n")
    out = ctx.tmp / "afile" / "run"
    return ["train", *TINY, "--out", str(out), *FAST], out


def out_is_a_file(ctx: Ctx) -> tuple[list[str], Path]:
    out = ctx.tmp / "run"
    out.write_text("a regular file\n")
    return ["train", *TINY, "--out", str(out), *FAST], out


def config_file(content: str, *extra: str) -> Callable[[Ctx], tuple[list[str], Path]]:
    def build(ctx: Ctx) -> tuple[list[str], Path]:
        out = ctx.tmp / "run"
        path = ctx.text("options.toml", content)
        # Not FAST: a flag would override the option under test. epochs/eval_particles come
        # from the file instead, so a run that wrongly starts is still short.
        return ["train", "--config", path, "--out", str(out), "--quiet", *extra], out
    return build


FAST_TOML = "epochs = 1\neval_particles = 0\nhidden = '16'\nlatent_dim = 2\n"


def evaluate(*flags: str | Callable[[Ctx], str]) -> Callable[[Ctx], tuple[list[str], None]]:
    def build(ctx: Ctx) -> tuple[list[str], None]:
        return ["evaluate", *(f(ctx) if callable(f) else f for f in flags)], None
    return build


def sample(run: str | Callable[[Ctx], str], out_name: str = "samples.png", *flags: str,
           make_out: Callable[[Path], None] | None = None):
    def build(ctx: Ctx) -> tuple[list[str], Path]:
        out = ctx.tmp / out_name
        if make_out is not None:
            make_out(out)
        run_dir = run(ctx) if callable(run) else run
        return ["sample", run_dir, "--out", str(out), *flags], out
    return build


def run_dir(ctx: Ctx) -> str:
    return str(ctx.run)


def run_with_file(name: str, content: str | bytes) -> Callable[[Ctx], str]:
    """A copy of the trained run whose file ``name`` holds ``content`` instead."""
    def make(ctx: Ctx) -> str:
        copied = ctx.copy_run()
        data = content.encode() if isinstance(content, str) else content
        (copied / name).write_bytes(data)
        return str(copied)
    return make


def run_with_config(content: str) -> Callable[[Ctx], str]:
    return run_with_file("config.json", content)


def empty_dir(ctx: Ctx) -> str:
    path = ctx.tmp / "not-a-run"
    path.mkdir()
    return str(path)


def command(*parts) -> Callable[[Ctx], tuple[list[str], None]]:
    """Any command; a part may be a callable of ``ctx`` that makes a file and returns its path."""
    def build(ctx: Ctx) -> tuple[list[str], None]:
        return [p(ctx) if callable(p) else p for p in parts], None
    return build


def long_name(suffix: str = "") -> Callable[[Ctx], str]:
    return lambda ctx: str(ctx.tmp / ("a" * 300 + suffix))


def fifo(ctx: Ctx) -> str:
    path = ctx.tmp / "pipe.npy"
    os.mkfifo(path)
    return str(path)


def npz_as_npy(ctx: Ctx) -> str:
    path = ctx.tmp / "archive.npy"
    with path.open("wb") as stream:
        np.savez(stream, x=UNIT)
    return str(path)


def pickle_as_npy(ctx: Ctx) -> str:
    path = ctx.tmp / "pickled.npy"
    path.write_bytes(pickle.dumps({"x": UNIT}))
    return str(path)


def truncated_npy(ctx: Ctx) -> str:
    path = Path(ctx.npy("whole.npy", UNIT))
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def run_with_json(name: str, change: Callable[[Any], Any]) -> Callable[[Ctx], str]:
    """A copy of the trained run whose JSON file ``name`` is edited by ``change``."""
    def make(ctx: Ctx) -> str:
        copied = ctx.copy_run()
        value = json.loads((copied / name).read_text())
        (copied / name).write_text(json.dumps(change(value)))
        return str(copied)
    return make


def edit(section: str, key: str, value) -> Callable[[dict], dict]:
    def change(config: dict) -> dict:
        config[section][key] = value
        return config
    return change


def without(section: str) -> Callable[[dict], dict]:
    return lambda config: {k: v for k, v in config.items() if k != section}


def run_with_checkpoint(change: Callable[[dict], Any]) -> Callable[[Ctx], str]:
    """A copy of the trained run whose checkpoint is replaced by ``change(checkpoint)``."""
    def make(ctx: Ctx) -> str:
        copied = ctx.copy_run()
        checkpoint = torch.load(copied / "checkpoint.pt", weights_only=True)
        torch.save(change(checkpoint), copied / "checkpoint.pt")
        return str(copied)
    return make


def with_entry(key: str, value) -> Callable[[dict], dict]:
    return lambda checkpoint: {**checkpoint, key: value}


def other_runs_state(name: str) -> Callable[[Ctx], str]:
    """A copy of the trained run holding ``name`` of a run with other layer sizes."""
    def make(ctx: Ctx) -> str:
        other = ctx.tmp / "other-run"
        train_tiny_run(other)
        copied = ctx.copy_run()
        shutil.copy(other / name, copied / name)
        return str(copied)
    return make


def raw_pickle(name: str) -> Callable[[Ctx], str]:
    return run_with_file(name, pickle.dumps({"model": {}, "epoch": 1}))


def run_with_moved_data(change: str) -> Callable[[Ctx], str]:
    """A copy of the run trained on an array file, whose file was edited or moved afterwards."""
    def make(ctx: Ctx) -> str:
        run = ctx.request_fixture("npy_run")
        copied = ctx.tmp / "npy-run"
        shutil.copytree(run, copied)
        data = ctx.tmp / "data.npy"
        shutil.copy(json.loads((run / "config.json").read_text())["data"]["name"], data)
        config = json.loads((copied / "config.json").read_text())
        config["data"]["name"] = str(data)
        (copied / "config.json").write_text(json.dumps(config))
        if change == "edited":
            array = np.load(data)
            array[0, 0] = 1.0 - array[0, 0]
            np.save(data, array)
        else:
            data.rename(ctx.tmp / "moved.npy")
        return str(copied)
    return make


def held_lock(ctx: Ctx) -> str:
    """A copy of the trained run whose lock another holder keeps for the whole case."""
    copied = ctx.copy_run()
    stream = open(copied / ".lock", "a")
    fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.on_exit(stream.close)
    return str(copied)


def run_file(name: str, copy: bool = True) -> Callable[[Ctx], str]:
    """The path of file ``name`` in a copy of the trained run."""
    return lambda ctx: str((ctx.copy_run() if copy else ctx.run) / name)


def copied_run(ctx: Ctx) -> str:
    return str(ctx.copy_run())


def a_file(ctx: Ctx) -> str:
    return ctx.text("a-file", "not a directory\n")


NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")

rng = np.random.default_rng(0)
UNIT = rng.random((30, 4)).astype(np.float32)          # valid data in [0, 1]
with_nan = UNIT.copy(); with_nan[7, 2] = np.nan         # noqa: E702
with_inf = UNIT.copy(); with_inf[3, 1] = np.inf         # noqa: E702
out_of_range = UNIT.copy(); out_of_range[5, 0] = 1.5    # noqa: E702




# id, build(ctx) -> (argv, out path or None), expected substring of the error line, marks
CASES = [
    # -- train: the data ------------------------------------------------------------------------
    ("train-missing-data-file", train(*data(lambda c: str(c.tmp / "nope.npy"))), "not found", ()),
    ("train-data-is-directory",
     train(*data(lambda c: (c.tmp / "adir").mkdir() or str(c.tmp / "adir"))), "directory", ()),
    ("train-unsupported-extension-txt", train(*data(lambda c: c.text("x.txt", "0.1,0.2\n"))),
     "unsupported", ()),
    ("train-npy-1d", train(*data(lambda c: c.npy("a.npy", np.zeros(10, np.float32)))), "shape", ()),
    ("train-npy-5d", train(*data(lambda c: c.npy("a.npy", np.zeros((4, 1, 2, 2, 2), np.float32)))),
     "shape", ()),
    ("train-npy-nan", train(*data(lambda c: c.npy("a.npy", with_nan))), "NaN", ()),
    ("train-npy-inf", train(*data(lambda c: c.npy("a.npy", with_inf))), "infinite", ()),
    ("train-npy-strings", train(*data(lambda c: c.npy("a.npy", np.array(["a", "b"])))),
     "not numeric", ()),
    ("train-npy-object-dtype",
     train(*data(lambda c: c.npy("a.npy", np.array([1, "a"], dtype=object)))), "Python objects", ()),
    ("train-npy-not-an-array", train(*data(lambda c: c.text("a.npy", b"hello, not numpy"))),
     "not a readable .npy", ()),
    ("train-npy-too-few-rows", train(*data(lambda c: c.npy("a.npy", UNIT[:2]))), "at least 3", ()),
    ("train-npy-zero-rows", train(*data(lambda c: c.npy("a.npy", UNIT[:0]))), "datapoints", ()),
    ("train-npy-complex", train(*data(lambda c: c.npy("a.npy", UNIT.astype(np.complex64) + 1j))),
     "complex", ()),
    ("train-npy-overflows-float32", train(*data(lambda c: c.npy("a.npy", np.full((10, 3), 1e39)))),
     "infinite", ()),
    ("train-csv-non-numeric-cell",
     train(*data(lambda c: c.text("a.csv", "0.1,0.2\n0.3,oops\n0.5,0.6\n"))), "non-number", ()),
    ("train-csv-ragged", train(*data(lambda c: c.text("a.csv", "0.1,0.2\n0.3\n0.5,0.6\n"))),
     "ragged", ()),
    ("train-csv-empty", train(*data(lambda c: c.text("a.csv", ""))), "no data rows", ()),
    ("train-csv-header-only", train(*data(lambda c: c.text("a.csv", "a,b,c\n"))),
     "no data rows", ()),
    ("train-csv-not-utf8", train(*data(lambda c: c.text("latin.csv", b"0.5,\xe9\xff\n0.1,0.2\n"))),
     "latin.csv", ()),
    ("train-bernoulli-outside-unit-interval",
     train(*data(lambda c: c.npy("a.npy", out_of_range)), "--likelihood", "bernoulli"),
     "[0, 1]", ()),
    ("train-continuous-bernoulli-outside-unit-interval",
     train(*data(lambda c: c.npy("a.npy", out_of_range)), "--likelihood", "continuous-bernoulli"),
     "[0, 1]", ()),
    ("train-unknown-dataset-name", train("--data", "mnistt"), "unknown data set", ()),
    # -- train: names (argparse choices) --------------------------------------------------------
    ("train-unknown-prior", train("--prior", "bogus"), "invalid choice", ()),
    ("train-unknown-likelihood", train("--likelihood", "bogus"), "invalid choice", ()),
    ("train-unknown-guide", train("--guide", "bogus"), "invalid choice", ()),
    ("train-unknown-objective", train("--objective", "bogus"), "invalid choice", ()),
    ("train-unknown-encoder", train("--encoder", "bogus"), "invalid choice", ()),
    ("train-unknown-decoder", train("--decoder", "bogus"), "invalid choice", ()),
    ("train-unknown-flag", train("--latent-dims", "4"), "unrecognized arguments", ()),
    # -- train: numbers -------------------------------------------------------------------------
    ("train-latent-dim-0", train("--latent-dim", "0"), "positive integer", ()),
    ("train-latent-dim-negative", train("--latent-dim", "-3"), "positive integer", ()),
    ("train-particles-0", train("--particles", "0"), "positive integer", ()),
    ("train-batch-size-0", train("--batch-size", "0"), "positive integer", ()),
    ("train-threads-0", train("--threads", "0"), "positive integer", ()),
    ("train-threads-not-a-number", train("--threads", "many"), "positive integer", ()),
    ("train-lr-0", train("--lr", "0"), "positive number", ()),
    ("train-lr-negative", train("--lr", "-1"), "positive number", ()),
    ("train-lr-nan", train("--lr", "nan"), "positive number", ()),
    ("train-epochs-0", train("--epochs", "0"), "positive integer", ()),
    ("train-epochs-abc", train("--epochs", "abc"), "positive integer", ()),
    ("train-beta-negative", train("--beta", "-1"), "non-negative", ()),
    ("train-seed-abc", train("--seed", "abc"), "expected an integer", ()),
    ("train-hidden-not-numbers", train("--hidden", "a,b"), "--hidden", ()),
    ("train-hidden-zero", train("--hidden", "0"), "--hidden", ()),
    ("train-lr-diverges", train(*TINY, "--lr", "1e30"), "smaller --lr", ()),
    # -- train: device --------------------------------------------------------------------------
    ("train-device-cuda-without-gpu", train("--device", "cuda"), "CUDA",
     (pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),)),
    ("train-device-tpu", train("--device", "tpu"), "tpu", ()),
    ("train-device-meta", train("--device", "meta"), "meta", ()),
    # -- train: the config file -----------------------------------------------------------------
    ("train-config-missing", train("--config", "/nonexistent/dir/options.toml"), "not found", ()),
    ("train-config-unknown-key", config_file(FAST_TOML + "learning_rate = 0.1\n"),
     "unknown option", ()),
    ("train-config-invalid-toml", config_file("epochs = = 1\n[unclosed\n"), "not valid TOML", ()),
    ("train-config-latent-dim-0", config_file(FAST_TOML.replace("latent_dim = 2", "latent_dim = 0")),
     "option 'latent_dim' expects a positive integer, or one per stochastic layer", ()),
    ("train-config-epochs-0", config_file(FAST_TOML.replace("epochs = 1", "epochs = 0")),
     "epochs", ()),
    ("train-config-unknown-prior", config_file(FAST_TOML + "prior = 'bogus'\n"),
     "option 'prior' expects one of categorical, flow", ()),
    ("train-config-latent-dim-string",
     config_file(FAST_TOML.replace("latent_dim = 2", "latent_dim = 'abc'")), "latent",
     ()),
    ("train-config-lr-string", config_file(FAST_TOML + "lr = 'fast'\n"), "lr",
     ()),
    ("train-config-hidden-integer", config_file(FAST_TOML.replace("hidden = '16'", "hidden = 16")),
     "hidden", ()),
    # a TOML value says what it means: a string is not a boolean, 1.9 is not an integer
    ("train-config-conditional-string", config_file(FAST_TOML + "conditional = 'false'\n"),
     "'conditional' expects true or false, got 'false'", ()),
    ("train-config-hidden-float", config_file(FAST_TOML.replace("hidden = '16'", "hidden = [1.9]")),
     "'hidden' expects positive integers, as a list", ()),
    ("train-config-hidden-boolean",
     config_file(FAST_TOML.replace("hidden = '16'", "hidden = [true]")),
     "'hidden' expects positive integers, as a list", ()),
    ("train-config-epochs-float", config_file(FAST_TOML.replace("epochs = 1", "epochs = 2.5")),
     "'epochs' expects a positive integer, got 2.5", ()),
    ("train-config-download-number", config_file(FAST_TOML + "download = 1\n"),
     "'download' expects true or false", ()),
    # -- train: component options (a [prior]/[likelihood]/[guide] table, --KIND-option) ----------
    ("train-prior-option-without-value", train("--prior-option", "components"), "KEY=VALUE", ()),
    ("train-prior-option-unknown", train("--prior", "mog", "--prior-option", "colors=4"),
     "bad options for prior 'mog'", ()),
    ("train-config-prior-section-bad-value",
     config_file(FAST_TOML + "[prior]\nname = 'mog'\ncomponents = 0\n"), "components", ()),
    ("train-guide-option-wrong-type",
     train("--guide", "categorical", "--prior", "categorical", "--guide-option",
           "enumerate='false'"), "enumerate", ()),
    # -- train: likelihood options --------------------------------------------------------------
    ("train-likelihood-scale-with-bernoulli",
     train("--likelihood", "bernoulli", "--likelihood-scale", "0.1"), "--likelihood normal", ()),
    ("train-normal-likelihood-scale-negative",
     train("--likelihood", "normal", "--likelihood-scale", "-1"), "positive", ()),
    ("train-normal-likelihood-scale-word",
     train("--likelihood", "normal", "--likelihood-scale", "wide"), "scale", ()),
    # -- train: the run directory ---------------------------------------------------------------
    ("train-out-existing-non-empty-dir", prepare_existing_out, "already holds files", ()),
    ("train-out-is-a-file", out_is_a_file, "not a directory", ()),
    ("train-out-below-a-regular-file", out_below_a_file, "cannot write", ()),
    # -- evaluate -------------------------------------------------------------------------------
    ("evaluate-missing-run-dir", evaluate(lambda c: str(c.tmp / "no-such-run")), "not found", ()),
    ("evaluate-not-a-run", evaluate(empty_dir), "not a pyro-vae run", ()),
    ("evaluate-corrupt-config-json", evaluate(run_with_config("{not json")),
     "not a valid run configuration", ()),
    ("evaluate-config-json-list", evaluate(run_with_config("[1, 2]")),
     "not a valid run configuration", ()),
    ("evaluate-config-unknown-model-key",
     evaluate(run_with_config('{"model": {"bogus": 1}, "data": {"name": "digits"}}')),
     "not a valid run configuration", ()),
    ("evaluate-config-model-null", evaluate(run_with_config('{"model": null}')),
     "not a valid run configuration", ()),
    ("evaluate-corrupt-weights", evaluate(run_with_file("weights.pt", b"junk")), "cannot be loaded", ()),
    ("evaluate-particles-0", evaluate(run_dir, "--particles", "0"), "positive integer", ()),
    ("evaluate-split-bogus", evaluate(run_dir, "--split", "bogus"), "invalid choice", ()),
    ("evaluate-device-tpu", evaluate(run_dir, "--device", "tpu"), "tpu", ()),
    ("evaluate-data-wrong-dimension",
     evaluate(run_dir, "--data", lambda c: c.npy("x5.npy", UNIT[:, :3])), "dimensions", ()),
    ("evaluate-data-outside-support",
     evaluate(run_dir, "--data", lambda c: c.npy("x64.npy", np.full((10, 64), 2.0, np.float32))),
     "[0, 1]", ()),
    # -- sample ---------------------------------------------------------------------------------
    ("sample-missing-run-dir", sample(lambda c: str(c.tmp / "no-such-run")), "not found", ()),
    ("sample-out-txt", sample(run_dir, "samples.txt"), ".png", ()),
    ("sample-n-0", sample(run_dir, "samples.png", "--n", "0"), "positive integer", ()),
    ("sample-out-in-missing-dir", sample(run_dir, "nowhere/samples.png"), "does not exist", ()),
    ("sample-out-is-a-directory",
     sample(run_dir, "grid.png", make_out=lambda p: p.mkdir()), "directory", ()),
    ("sample-config-unknown-model-key",
     sample(run_with_config('{"model": {"bogus": 1}}')), "not a valid run configuration", ()),
    # -- sizes, seeds and options refused by the schema -----------------------------------------
    ("train-seed-negative", train("--seed", "-1"), "from 0 to 2**32 - 1", ()),
    ("train-seed-too-large", train("--seed", "4294967296"), "from 0 to 2**32 - 1", ()),
    ("train-latent-dim-huge", train("--latent-dim", "100000000"), "parameters (about", ()),
    ("train-hidden-huge", train("--hidden", "100000000"), "parameters (about", ()),
    ("train-config-hidden-huge", config_file(FAST_TOML.replace("hidden = '16'",
                                                               "hidden = [100000000, 4]")),
     "parameters (about", ()),
    ("sample-n-huge", sample(run_dir, "s.npy", "--n", "1000000000"), "1,000,000,000 samples", ()),
    ("train-log-every-0", train("--log-every", "0"), "positive integer", ()),
    ("train-val-particles-0", train("--val-particles", "0"), "positive integer", ()),
    ("train-eval-particles-negative", train("--eval-particles", "-1"), "non-negative", ()),
    ("train-alpha-nan", train("--alpha", "nan"), "finite number", ()),
    ("train-free-bits-negative", train("--free-bits", "-0.5"), "non-negative", ()),
    ("train-dreg-anneal", train(*TINY, "--objective", "dreg", "--anneal-steps", "5"),
     "cannot anneal", ()),
    ("train-groups-0", train("--objective", "miwae", "--groups", "0"), "positive integer", ()),
    ("train-elbo-weight-above-1", train("--objective", "ciwae", "--elbo-weight", "1.5"),
     "a number from 0 to 1", ()),
    ("train-groups-with-elbo", train(*TINY, "--objective", "elbo", "--groups", "2"),
     "groups applies to objectives 'miwae' and 'piwae' only, not 'elbo'", ()),
    ("train-elbo-weight-with-piwae", train(*TINY, "--objective", "piwae", "--elbo-weight", "0.5"),
     "elbo_weight applies to objective 'ciwae' only, not 'piwae'", ()),
    ("train-piwae-free-bits", train(*TINY, "--objective", "piwae", "--free-bits", "0.5"),
     "does not support free bits", ()),
    ("train-config-groups-float", config_file(FAST_TOML + "objective = 'miwae'\ngroups = 2.0\n"),
     "'groups' expects a positive integer, got 2.0", ()),
    ("train-config-seed-too-large", config_file(FAST_TOML + "seed = 4294967296\n"),
     "'seed' expects an integer from 0 to 2**32 - 1", ()),
    ("train-config-log-every-float", config_file(FAST_TOML + "log_every = 2.0\n"),
     "'log_every' expects a positive integer, got 2.0", ()),
    ("train-config-guide-name-unknown", config_file(FAST_TOML + "[guide]\nname = 'nope'\n"),
     "'[guide] name' expects one of", ()),
    ("train-config-tensorboard-number", config_file(FAST_TOML + "tensorboard = 3\n"),
     "'tensorboard' expects a string", ()),
    ("train-config-objective-unknown", config_file(FAST_TOML + "objective = 'elbow'\n"),
     "'objective' expects one of elbo", ()),
    # -- names the file system refuses, and files that are not data -----------------------------
    ("train-out-name-too-long", command("train", *TINY, "--out", long_name(), *FAST), "too long",
     ()),
    ("train-config-name-too-long", command("train", "--config", long_name(".toml")),
     "too long", ()),
    ("train-data-name-too-long", train(*data(long_name(".npy"))), "too long", ()),
    ("train-data-fifo", train(*data(fifo)), "named pipe", ()),
    ("train-data-npz-renamed-npy", train(*data(npz_as_npy)), "zip archive", ()),
    ("train-data-pickle-renamed-npy", train(*data(pickle_as_npy)), "pickle", ()),
    ("train-data-truncated-npy", train(*data(truncated_npy)), "truncated", ()),
    ("train-data-random-bytes-npy", train(*data(lambda c: c.text("noise.npy", bytes(range(256))))),
     "NumPy header", ()),
    ("train-csv-field-over-128k", train(*data(lambda c: c.text("wide.csv", "1" * 140_000 + ",0\n"))),
     "longer than", ()),
    ("train-csv-overflow", train(*data(lambda c: c.text("big.csv", "1e400,0\n0,1\n1,1\n0,0\n"))),
     "NaN or infinite", ()),
    ("train-csv-first-line-mixed", train(*data(lambda c: c.text("mixed.csv",
                                                                "0.1,0.2x\n0,1\n1,0\n1,1\n"))),
     "mixes numbers and text", ()),
    ("train-csv-empty-cell", train(*data(lambda c: c.text("gap.csv", "0,1\n0,\n1,0\n1,1\n"))),
     "empty cell", ()),
    ("train-tensorboard-is-a-file", train(*TINY, "--tensorboard", a_file), "not a directory", ()),
    # -- train --resume -------------------------------------------------------------------------
    ("resume-missing-run", command("train", "--resume", lambda c: str(c.tmp / "none")),
     "not found", ()),
    ("resume-not-a-run", command("train", "--resume", empty_dir), "not a pyro-vae run", ()),
    ("resume-changes-the-prior", command("train", "--resume", run_dir, "--prior", "mog"),
     "cannot change a resumed run", ()),
    ("resume-no-more-epochs", command("train", "--resume", run_dir, "--epochs", "1"),
     "already trained 1 epochs", ()),
    ("resume-dry-run", command("train", "--resume", run_dir, "--dry-run"),
     "does not apply to --resume", ()),
    ("resume-checkpoint-epoch-string",
     command("train", "--resume", run_with_checkpoint(with_entry("epoch", "2")), "--epochs", "3"),
     "not a usable pyro-vae checkpoint", ()),
    ("resume-checkpoint-without-rng",
     command("train", "--resume", run_with_checkpoint(lambda c: {k: v for k, v in c.items()
                                                                  if k != "rng"}),
             "--epochs", "3"), "checkpoint", ()),
    ("resume-checkpoint-order-too-short",
     command("train", "--resume", run_with_checkpoint(with_entry("order", torch.arange(10))),
             "--epochs", "3"), "orders 10 training datapoints", ()),
    ("resume-another-runs-checkpoint",
     command("train", "--resume", other_runs_state("checkpoint.pt"), "--epochs", "3"),
     "is not this run's checkpoint", ()),
    ("resume-raw-pickle-checkpoint",
     command("train", "--resume", raw_pickle("checkpoint.pt"), "--epochs", "3"),
     "cannot be loaded safely", ()),
    ("resume-garbled-metrics",
     command("train", "--resume", run_with_file("metrics.jsonl", "{oops\n{}\n"), "--epochs", "3"),
     "is not valid JSON", ()),
    ("resume-config-training-epochs-string",
     command("train", "--resume", run_with_json("config.json", edit("training", "epochs", "3")),
             "--epochs", "3"), "training.epochs should be", ()),
    ("resume-data-edited", command("train", "--resume", run_with_moved_data("edited"),
                                   "--epochs", "3"), "contents differ", ()),
    ("resume-data-moved", command("train", "--resume", run_with_moved_data("moved"),
                                  "--epochs", "3"), "is not there", ()),
    ("resume-run-in-use", command("train", "--resume", held_lock, "--epochs", "3"),
     "in use by another pyro-vae process", ()),
    # -- evaluate: damaged runs, data that changed ----------------------------------------------
    ("evaluate-seed-negative", evaluate(run_dir, "--seed", "-1"), "from 0 to 2**32 - 1", ()),
    ("evaluate-batch-size-0", evaluate(run_dir, "--batch-size", "0"), "positive integer", ()),
    ("evaluate-metrics-garbled", evaluate(run_with_file("metrics.jsonl", "{oops\n{}\n")),
     "is not valid JSON", ()),
    ("evaluate-metrics-not-rows", evaluate(run_with_file("metrics.jsonl", "[1, 2]\n")),
     "is not a metrics row", ()),
    ("evaluate-config-latent-dim-string",
     evaluate(run_with_json("config.json", edit("model", "latent_dim", "2"))),
     "model.latent_dim should be a positive integer", ()),
    ("evaluate-config-without-training", evaluate(run_with_json("config.json", without("training"))),
     "no 'training' section", ()),
    ("evaluate-weights-of-another-run", evaluate(other_runs_state("weights.pt")),
     "does not match the model", ()),
    ("evaluate-weights-raw-pickle", evaluate(raw_pickle("weights.pt")), "cannot be loaded safely", ()),
    ("evaluate-data-fifo", evaluate(run_dir, "--data", fifo), "named pipe", ()),
    ("evaluate-run-data-edited", evaluate(run_with_moved_data("edited")), "contents differ", ()),
    ("evaluate-run-data-moved", evaluate(run_with_moved_data("moved")), "is not there", ()),
    ("evaluate-run-name-too-long", evaluate(long_name()), "too long", ()),
    ("evaluate-device-cuda-absent", evaluate(run_dir, "--device", "cuda"), "CUDA is not available",
     (pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),)),
    # -- sample ---------------------------------------------------------------------------------
    ("sample-seed-too-large", sample(run_dir, "s.png", "--seed", "4294967296"),
     "from 0 to 2**32 - 1", ()),
    ("sample-label-unconditional", sample(run_dir, "s.png", "--label", "1"), "conditional", ()),
    ("sample-out-replaces-a-run-file",
     command("sample", copied_run, "--out", lambda c: str(c.tmp / "copied-run" / "samples.png")),
     "--overwrite", ()),
    ("sample-out-name-too-long", command("sample", run_dir, "--out", long_name(".png")),
     "too long", ()),
    ("sample-out-npz", sample(run_dir, "s.npz"), "must end in", ()),
    # a folder nobody may write in, whoever runs the tests: /proc
    ("sample-out-unwritable-folder", command("sample", run_dir, "--out", "/proc/samples.png"),
     "/proc", (NEEDS_PROC,)),
    ("explore-out-unwritable-folder", command("explore", run_dir, "--out", "/proc/explore"),
     "/proc", (NEEDS_PROC,)),
    ("compare-estimators-plot-unwritable-folder",
     command("compare-estimators", run_dir, "--repeats", "2", "--particles", "1",
             "--plot", "/proc/plot.png"), "/proc", (NEEDS_PROC,)),
    ("train-out-unwritable-folder", command("train", *TINY, "--out", "/proc/run", *FAST),
     "/proc", (NEEDS_PROC,)),
    # -- explore, diagnose, compare, compare-estimators, plot -----------------------------------
    ("explore-out-is-the-run", command("explore", copied_run, "--out",
                                       lambda c: str(c.tmp / "copied-run")), "--overwrite", ()),
    ("explore-top-0", command("explore", run_dir, "--top", "0"), "positive integer", ()),
    ("explore-out-is-a-file", command("explore", run_dir, "--out", a_file), "not a directory", ()),
    ("explore-missing-run", command("explore", lambda c: str(c.tmp / "none")), "not found", ()),
    ("explore-particles-0", command("explore", run_dir, "--particles", "0"), "positive integer", ()),
    ("diagnose-particles-0", command("diagnose", run_dir, "--particles", "0"), "positive integer", ()),
    ("diagnose-missing-run", command("diagnose", lambda c: str(c.tmp / "none")), "not found", ()),
    ("diagnose-split-bogus", command("diagnose", run_dir, "--split", "bogus"), "invalid choice", ()),
    ("diagnose-config-damaged", command("diagnose", run_with_config("{")),
     "not a valid run configuration", ()),
    ("compare-missing-run-b", command("compare", run_dir, lambda c: str(c.tmp / "none")),
     "not found", ()),
    ("compare-data-of-another-dimension",
     command("compare", run_dir, run_dir, "--data", lambda c: c.npy("x3.npy", UNIT[:, :3])),
     "dimensions", ()),
    ("compare-estimators-unknown-objective",
     command("compare-estimators", run_dir, "--objectives", "elbow"), "elbow", ()),
    ("compare-estimators-particles-0",
     command("compare-estimators", run_dir, "--particles", "0"), "positive", ()),
    ("compare-estimators-plot-txt",
     command("compare-estimators", run_dir, "--plot", lambda c: str(c.tmp / "p.txt")), ".png", ()),
    ("compare-estimators-plot-replaces-a-run-file",
     command("compare-estimators", copied_run, "--plot",
             lambda c: str(c.tmp / "copied-run" / "loss.png")), "--overwrite", ()),
    ("compare-estimators-run-and-model-flags",
     command("compare-estimators", run_dir, "--prior", "mog"), "describes a fresh model", ()),
    ("compare-estimators-repeats-0",
     command("compare-estimators", run_dir, "--repeats", "0"), "positive integer", ()),
    ("plot-missing-run", command("plot", lambda c: str(c.tmp / "none")), "not found", ()),
    ("plot-not-a-run", command("plot", empty_dir), "not a pyro-vae run", ()),
    ("plot-metrics-garbled", command("plot", run_with_file("metrics.jsonl", "{oops\n{}\n")),
     "is not valid JSON", ()),
    # -- models, plug-ins, semi-supervised data -------------------------------------------------
    ("train-model-unknown", train("--model", "nope"), "invalid choice", ()),
    ("train-model-option-no-value", train("--model", "mixture", "--model-option", "clusters"),
     "--model-option expects KEY=VALUE", ()),
    ("train-model-option-for-the-vae", train(*TINY, "--model-option", "clusters=3"),
     "--model-option 'clusters': the vae takes its options", ()),
    ("train-model-option-unknown", train("--model", "mixture", "--model-option", "bogus=1"),
     "bad options for model 'mixture'", ()),
    ("train-latent-dims-zero", train("--latent-dim", "4,0"),
     "positive integer, or one per stochastic layer", ()),
    ("train-latent-dims-mixture", train("--model", "mixture", "--latent-dim", "4,2"),
     "--model mixture takes one size", ()),
    ("train-hierarchical-with-prior", train("--latent-dim", "4,2", "--prior", "mog"),
     "--prior applies to the model vae, not hierarchical", ()),
    ("train-semi-supervised-mixture", train("--semi-supervised", "--model", "mixture"),
     "--semi-supervised is the model m2", ()),
    ("train-labels-per-class-alone", train(*TINY, "--labels-per-class", "10"),
     "use it with --semi-supervised", ()),
    ("train-labels-per-class-0", train("--semi-supervised", "--labels-per-class", "0"),
     "positive integer", ()),
    ("train-labels-per-class-too-many", train("--semi-supervised", "--labels-per-class", "500"),
     "fewer than --labels-per-class 500", ()),
    ("train-semi-supervised-unlabelled-data",
     train("--semi-supervised", *data(lambda c: c.npy("u.npy", UNIT))), "needs labelled data", ()),
    ("train-conditional-prior-alone", train(*TINY, "--conditional-prior"),
     "applies to a conditional VAE", ()),
    ("train-import-missing", train("--import", "no_such_plugin_module"),
     "cannot import the plug-in 'no_such_plugin_module'", ()),
    ("train-import-broken", train("--import", lambda c: c.text("broken.py", "raise OSError('x')\n")),
     "failed to import: OSError: x", ()),
    ("train-import-not-a-name", train("--import", "not a module"), "is not a module name", ()),
    ("evaluate-proposal-unknown", evaluate(run_dir, "--proposal", "posterior"),
     "invalid choice", ()),
    ("evaluate-refine-steps-negative", evaluate(run_dir, "--refine-steps", "-1"),
     "non-negative", ()),
    ("evaluate-refine-with-prior-proposal",
     evaluate(run_dir, "--proposal", "prior", "--refine-steps", "3"),
     "does not apply to proposal='prior'", ()),
    ("evaluate-plugin-missing",
     evaluate(run_with_json("config.json", lambda c: {**c, "plugins": ["gone_plugin_module"]})),
     "this run needs the plug-in 'gone_plugin_module'", ()),
    ("evaluate-model-class-missing",
     evaluate(run_with_json("config.json", lambda c: {**c, "model": {
         "class": "gone_module:Model", "options": {}, "rebuildable": True}})),
     "cannot import 'gone_module'", ()),
    ("evaluate-model-not-rebuildable",
     evaluate(run_with_json("config.json", lambda c: {**c, "model": {
         "class": "somewhere:Model", "rebuildable": False}})),
     "load_run(run_dir, model=...)", ()),
]


PARAMS = [pytest.param(build, expected, marks=list(marks), id=case_id)
          for case_id, build, expected, marks in CASES]


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory) -> Path:
    """A tiny run trained on an array file."""
    folder = tmp_path_factory.mktemp("npy")
    np.save(folder / "data.npy", np.random.default_rng(1).random((40, 4)).astype(np.float32))
    path = folder / "run"
    assert main(["train", "--data", str(folder / "data.npy"), "--epochs", "1", "--hidden", "8",
                 "--latent-dim", "2", "--quiet", "--eval-particles", "0", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run on the bundled digits, for the evaluate/sample cases."""
    path = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet",
                 "--eval-particles", "0", "--out", str(path)])
    assert code == 0
    return path


@pytest.mark.parametrize("build, expected", PARAMS)
def test_bad_input_is_one_line_error(build, expected, tmp_path, request, capsys, monkeypatch):
    ctx = Ctx(tmp_path, request)
    argv, out = build(ctx)
    monkeypatch.chdir(tmp_path)  # a run that wrongly starts without --out lands in tmp_path/runs
    capsys.readouterr()  # forget the output of building the inputs (the trained_run fixture)
    before = snapshot(out) if out is not None else None
    run_before = snapshot(ctx.run) if ctx.used_run else None

    result = invoke(argv, capsys)

    lines = result.stderr.strip().splitlines()
    assert result.code != 0, f"exit status 0 for bad input; stdout: {result.stdout!r}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert expected in lines[0], lines[0]
    command = argv[0]
    assert (lines[0].startswith(f"pyro-vae {command}: error: ")
            or lines[0].startswith("pyro-vae: error: ")), lines[0]
    assert not result.warnings, f"warnings the CLI would print on stderr: {result.warnings}"
    if out is not None:
        assert snapshot(out) == before, f"--out {out} was created or changed"
    assert not (tmp_path / "runs").exists(), "a default run directory was created"
    if run_before is not None:
        assert snapshot(ctx.run) == run_before, "the trained run was modified"


# -- positive control -----------------------------------------------------------------------------

def test_valid_tiny_train_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    result = invoke(["train", *TINY, "--out", str(out), *FAST], capsys)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    for name in ("config.json", "weights.pt", "metrics.jsonl", "reconstructions.png",
                 "samples.png", "loss.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["latent_dim"] == 2 and config["model"]["hidden"] == [16]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == [1]
    state = torch.load(out / "weights.pt", weights_only=True)
    assert state and all(torch.is_tensor(v) for v in state.values())


# -- properties -----------------------------------------------------------------------------------

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(3, 40), st.integers(1, 6)), elements=finite_float32))
def test_from_array_splits_are_a_permutation_of_the_rows(array):
    dataset = from_array(array)
    parts = [dataset.train, dataset.val, dataset.test]
    assert all(len(p) >= 1 for p in parts)
    assert sum(len(p) for p in parts) == len(array)
    assert dataset.data_shape == (array.shape[1],)

    def sorted_rows(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a.T[::-1])]

    joined = torch.cat(parts).numpy()
    assert joined.dtype == np.float32
    np.testing.assert_array_equal(sorted_rows(joined), sorted_rows(array))


unit_float32 = st.floats(0.0, 1.0, width=32)
shapes = st.tuples(st.integers(1, 20), st.integers(1, 6))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, shapes, elements=unit_float32))
def test_bernoulli_support_accepts_the_unit_interval(array):
    Bernoulli().check_support(torch.from_numpy(array))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, shapes, elements=unit_float32), st.data(),
       st.floats(width=32, allow_nan=False).filter(lambda v: not 0.0 <= v <= 1.0))
def test_bernoulli_support_refuses_any_value_outside_the_unit_interval(array, draw, bad):
    row = draw.draw(st.integers(0, array.shape[0] - 1), label="row")
    col = draw.draw(st.integers(0, array.shape[1] - 1), label="col")
    array = array.copy()
    array[row, col] = bad
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Bernoulli().check_support(torch.from_numpy(array))


def test_bernoulli_support_refuses_nan():
    x = torch.full((4, 3), 0.5)
    x[2, 1] = float("nan")
    with pytest.raises(DataError):
        Bernoulli().check_support(x)
