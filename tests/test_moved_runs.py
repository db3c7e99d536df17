"""A run directory is portable, and a resume changes nothing it should not: a run moved to another
folder evaluates and resumes from there (its data found by --data when they moved too),
``--resume --eval-particles K`` rewrites evaluation.json, and a resume that fails leaves the run
as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.runs import load_run

TINY = ["--hidden", "8", "--latent-dim", "2", "--quiet", "--batch-size", "16", "--device", "cpu"]


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture
def npy_run(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "place-a" / "data.npy"
    data.parent.mkdir()
    np.save(data, np.random.default_rng(3).random((60, 5)).astype(np.float32))
    run = tmp_path / "place-a" / "run"
    assert main(["train", "--data", str(data), "--epochs", "1", "--eval-particles", "0",
                 "--out", str(run), *TINY]) == 0
    return run, data


def test_a_moved_run_and_its_moved_data_evaluate_and_resume_exactly(npy_run, tmp_path, capsys):
    run, data = npy_run
    # the same run, never moved: the reference for the resumed weights
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    assert main(["train", "--resume", str(reference), "--epochs", "2", "--eval-particles", "0",
                 "--quiet"]) == 0
    # move the run and the data to another place, as to another machine
    elsewhere = tmp_path / "place-b"
    elsewhere.mkdir()
    moved_run = Path(shutil.move(str(run), elsewhere / "run"))
    moved_data = Path(shutil.move(str(data), elsewhere / "data.npy"))
    capsys.readouterr()
    assert main(["evaluate", str(moved_run), "--json"]) == 2  # the data are not where recorded
    assert "is not there; if it moved, pass it with --data" in capsys.readouterr().err
    assert main(["evaluate", str(moved_run), "--data", str(moved_data), "--particles", "5",
                 "--json"]) == 0
    assert main(["train", "--resume", str(moved_run), "--data", str(moved_data), "--epochs", "2",
                 "--eval-particles", "0", "--quiet"]) == 0
    resumed, expected = load_run(moved_run).vae.state_dict(), load_run(reference).vae.state_dict()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_resume_with_other_data_at_the_recorded_path_is_refused_and_changes_nothing(
        npy_run, capsys):
    run, data = npy_run
    np.save(data, np.random.default_rng(4).random((60, 5)).astype(np.float32))  # another file
    before = _files(run)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 2
    assert "contents differ from the data this run was trained on" in capsys.readouterr().err
    assert _files(run) == before


def test_resume_eval_particles_rewrites_the_evaluation_of_the_resumed_epoch(npy_run):
    run, _ = npy_run
    assert main(["train", "--resume", str(run), "--epochs", "2", "--eval-particles", "7",
                 "--quiet"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["particles"] == 7
    assert main(["train", "--resume", str(run), "--epochs", "3", "--eval-particles", "0",
                 "--quiet"]) == 0
    assert not (run / "evaluation.json").exists()  # no evaluation of an older epoch is left


def test_a_resume_refused_for_a_damaged_checkpoint_rewrites_nothing(npy_run, capsys):
    run, _ = npy_run
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["step"] = "many"
    torch.save(checkpoint, run / "checkpoint.pt")
    before = _files(run)
    assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 2
    assert "not a usable pyro-vae checkpoint" in capsys.readouterr().err
    assert _files(run) == before
