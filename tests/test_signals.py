"""SIGTERM and SIGINT behave the same everywhere, not only in the training loop: one line on
stderr, exit status 130, nothing half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import train_tiny_run

from pyro_vae.cli import main


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("signals") / "run")


def _interrupt(argv: list[str], signum: int, cwd: Path, after: float = 4.0):
    process = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *argv], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    assert process.poll() is None, "the command ended before the signal was sent"
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_long_evaluation_is_one_line_and_exit_130(small_run, tmp_path, signum):
    code, _, err = _interrupt(["evaluate", str(small_run), "--particles", "100000", "--json"],
                              signum, tmp_path)
    lines = err.strip().splitlines()
    assert code == 130, err
    assert lines == [f"pyro-vae evaluate: interrupted by {signal.Signals(signum).name}"], err


def test_sigterm_during_the_final_evaluation_keeps_the_run_and_writes_no_evaluation(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--quiet",
            "--batch-size", "512", "--eval-particles", "200000", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *argv], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "samples.png").exists() and time.time() < deadline:  # training has ended
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["pyro-vae train: interrupted by SIGTERM"], err
    assert not (out / "evaluation.json").exists()
    assert not list(out.glob(".*evaluation*"))  # no temporary file either
    assert main(["evaluate", str(out), "--particles", "5", "--json"]) == 0  # the run is whole
