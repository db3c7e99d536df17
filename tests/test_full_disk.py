"""A disk that fills up during a run: one clear line, nothing torn, and once space is freed the
run resumes to exactly the weights of a run that was never interrupted.

The full disk is injected (``ENOSPC`` while a run file is being written, after part of it was)
for each kind of file, and, where this machine lets the tests mount one, made real with a small
tmpfs that a callback fills up between two epochs.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from pyro_vae import VAE, fit, resume, runs
from pyro_vae.callbacks import Callback
from pyro_vae.cli import main
from pyro_vae.errors import TrainingError

# checkpoint_every=0: every epoch writes each kind of file (the default interval, 30 s, would
# checkpoint after the first epoch and the last only), so "epoch 2's write" exists for each
OPTIONS = dict(epochs=3, batch_size=500, device="cpu", progress=False, seed=4,
               checkpoint_every=0.0)


def _vae(digits):
    torch.manual_seed(0)
    return VAE(digits.data_shape, 2, hidden=(16,))


@pytest.fixture(scope="module")
def reference(digits):
    """The weights of the same run, never interrupted."""
    vae = _vae(digits)
    fit(vae, digits, **OPTIONS)
    return {k: v.clone() for k, v in vae.state_dict().items()}


def _same(state, reference) -> bool:
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k])
                                                     for k in reference)


class _FullDiskAt:
    """``runs.atomic_write`` that runs out of space while writing ``name`` the ``nth`` time,
    after part of the file was written."""

    def __init__(self, name: str, nth: int):
        self.name, self.nth, self.calls, self.real = name, nth, 0, runs.atomic_write

    def __call__(self, path, write):
        path = Path(path)
        if path.name == self.name:
            self.calls += 1
            if self.calls == self.nth:
                def partial(stream):
                    stream.write(b"the first bytes")
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return self.real(path, partial)
        return self.real(path, write)


@pytest.mark.parametrize("name", ["metrics.jsonl", "weights.pt", "checkpoint.pt"])
def test_a_full_disk_during_training_stops_cleanly_and_the_run_resumes_exactly(
        name, digits, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(runs, "atomic_write", _FullDiskAt(name, nth=2))  # epoch 2's write
    with pytest.raises(TrainingError, match="the disk is full") as info:
        fit(_vae(digits), digits, out=out, **OPTIONS)
    assert "\n" not in str(info.value)
    assert not [p.name for p in out.iterdir() if p.name.startswith(f".{name}.")]  # no temp left
    monkeypatch.undo()  # space is free again
    history = runs.read_metrics(out)  # every remaining line whole
    assert [row["epoch"] for row in history] in ([1], [1, 2])
    assert runs.load_checkpoint(out)["epoch"] == 2  # the last complete checkpoint: epoch 1's
    result = resume(out, device="cpu", progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert _same(result.vae.state_dict(), reference)
    assert [row["epoch"] for row in runs.read_metrics(out)] == [1, 2, 3]


def test_a_full_disk_at_the_final_checkpoint_keeps_the_first_and_the_run_resumes_exactly(
        digits, reference, tmp_path, monkeypatch):
    """Under the default interval the run writes two checkpoints, after the first epoch and at
    the end; the end's fails: epoch 1's is kept, and the resumed run replays epochs 2 and 3."""
    out = tmp_path / "run"
    monkeypatch.setattr(runs, "atomic_write", _FullDiskAt("checkpoint.pt", nth=2))
    with pytest.raises(TrainingError, match="the disk is full"):
        fit(_vae(digits), digits, out=out, **{**OPTIONS, "checkpoint_every": 30.0})
    monkeypatch.undo()
    assert [row["epoch"] for row in runs.read_metrics(out)] == [1, 2, 3]
    assert runs.load_checkpoint(out)["epoch"] == 2
    result = resume(out, device="cpu", progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert _same(result.vae.state_dict(), reference)


def test_a_full_disk_while_writing_the_figures_is_one_line_and_plot_writes_them_again(
        digits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(runs, "atomic_write", _FullDiskAt("samples.png", nth=1))
    code = main(["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--quiet",
                 "--eval-particles", "0", "--batch-size", "512", "--device", "cpu",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"pyro-vae train: error: {out / 'samples.png'}: No space left on device"]
    assert not (out / "samples.png").exists()  # never a 0-byte or torn image
    monkeypatch.undo()
    assert main(["plot", str(out)]) == 0
    assert (out / "samples.png").stat().st_size > 0


# -- a real full disk: a small tmpfs ------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("this machine does not let the tests mount a tmpfs (the injected full "
                    "disks above still run)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


class _FillTheDisk(Callback):
    """After epoch 1, fill the disk but for a few KiB: epoch 2's files cannot be written."""

    def __init__(self, filler: Path):
        self.filler = filler

    def on_epoch_end(self, trainer, row):
        if row["epoch"] == 1:
            free = shutil.disk_usage(self.filler.parent).free
            with self.filler.open("wb") as stream:
                try:
                    stream.write(b"\0" * max(free - 4096, 0))
                except OSError:
                    pass


def test_a_real_full_disk_stops_cleanly_and_the_run_resumes_exactly(digits, reference,
                                                                    small_disk):
    out = small_disk / f"run-{uuid.uuid4().hex[:6]}"
    filler = small_disk / "filler"
    with pytest.raises(TrainingError, match="the disk is full") as info:
        fit(_vae(digits), digits, out=out, callbacks=[_FillTheDisk(filler)], **OPTIONS)
    assert "\n" not in str(info.value)
    filler.unlink()  # space is freed
    assert [row["epoch"] for row in runs.read_metrics(out)] in ([1], [1, 2])
    result = resume(out, device="cpu", progress=False)
    assert _same(result.vae.state_dict(), reference)
    assert [row["epoch"] for row in runs.read_metrics(out)] == [1, 2, 3]
