"""The files of a run directory: atomic writes and their modes, damaged files refused in one
line, stray temporary files, the run's lock, and a directory left by a start that never
reached a checkpoint."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyro
import pytest
import torch

from helpers import invoke
from pyro_vae import VAE, fit, load_run, plots, runs
from pyro_vae.checkpoints import load_state, validate_checkpoint
from pyro_vae.runs import RunError
from pyro_vae.training import resume

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(latent_dim=2, hidden=(16,))
ROW = {"epoch": 1, "step": 12, "train_loss": 44.2, "beta": 1.0, "val_elbo": -43.5}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """A tiny run of two epochs (never modified: tests work on copies)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pyro.set_rng_seed(0)
    fit(VAE(digits.data_shape, **TINY), digits, epochs=2, out=out, progress=False, device="cpu")
    return out


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _full_disk(monkeypatch):
    """fsync fails with ENOSPC: a disk that filled up during the write."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# -- 1. atomic writes --------------------------------------------------------------------------

def test_append_metrics_on_a_full_disk_leaves_the_file_whole(run_dir, monkeypatch):
    before = _files(run_dir)
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        runs.append_metrics(run_dir, {**ROW, "epoch": 3})
    monkeypatch.undo()
    assert _files(run_dir) == before  # no torn line, no temporary file
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2]
    runs.append_metrics(run_dir, {**ROW, "epoch": 3})
    assert [row["epoch"] for row in runs.read_metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")


def test_append_metrics_drops_a_line_torn_by_an_older_version(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROW) + '\n{"epoch": 2, "st')
    runs.append_metrics(tmp_path, {**ROW, "epoch": 2})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("save", ["grid", "loss"])
def test_a_figure_on_a_full_disk_keeps_the_previous_one_and_leaves_no_empty_file(
        tmp_path, monkeypatch, save):
    def write(path):
        if save == "grid":
            return plots.save_grid(torch.rand(4, 64), (1, 8, 8), path, nrow=2)
        return plots.save_loss([ROW, {**ROW, "epoch": 2}], path)

    old, new = tmp_path / "old.png", tmp_path / "new.png"
    write(old)
    assert old.read_bytes().startswith(PNG)
    previous = old.read_bytes()
    _full_disk(monkeypatch)
    for path in (old, new):
        with pytest.raises(OSError, match="No space left"):
            write(path)
    monkeypatch.undo()
    assert old.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]  # no new.png, no temp files


def test_figures_keep_their_format(tmp_path):
    plots.save_grid(torch.rand(4, 64), (1, 8, 8), tmp_path / "grid.png", nrow=2)
    plots.save_grid(torch.rand(4, 64), (1, 8, 8), tmp_path / "grid.jpg", nrow=2)
    plots.save_loss([ROW], tmp_path / "loss.png")
    plots.save_loss([ROW], tmp_path / "loss.pdf")
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG)
    assert (tmp_path / "grid.jpg").read_bytes().startswith(b"\xff\xd8")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG)
    assert (tmp_path / "loss.pdf").read_bytes().startswith(b"%PDF")


def test_a_kill_mid_write_keeps_the_previous_file_and_load_run_removes_the_temporary(run_dir):
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    script = ("import os, sys\nfrom pathlib import Path\nfrom pyro_vae import runs\n"
              "def write(stream):\n    stream.write(b'half a checkpoint'); stream.flush()\n"
              "    os._exit(9)\n"
              "runs.atomic_write(Path(sys.argv[1]) / 'checkpoint.pt', write)\n")
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert done.returncode == 9, done.stderr
    stray = [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert len(stray) == 1
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint
    load_run(run_dir)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".checkpoint.pt.")]
    runs.load_checkpoint(run_dir)


def test_the_background_writer_runs_jobs_in_order_and_stops_at_the_first_failure(tmp_path):
    writer = runs.BackgroundWriter()
    done = []

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    for job in (lambda: done.append(1), lambda: done.append(2), fail, lambda: done.append(3)):
        writer.submit(job)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert done == [1, 2]  # nothing written after the failure
    writer.submit(lambda: done.append(4))  # the error was raised once; later jobs are dropped
    writer.wait()
    writer.close()
    assert done == [1, 2]


@pytest.mark.parametrize("every, expected", [(30.0, 2), (0.0, 4)])
def test_weights_are_written_with_each_checkpoint_and_hold_its_state(
        digits, tmp_path, monkeypatch, every, expected):
    """weights.pt goes with checkpoint.pt (after the first epoch, on the interval, at the end),
    not after every epoch; metrics.jsonl gets every epoch's row."""
    written = []
    real = runs.atomic_write

    def counting(path, write):
        written.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(runs, "atomic_write", counting)
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, **TINY)
    fit(vae, digits, epochs=4, batch_size=500, out=tmp_path / "run", progress=False,
        device="cpu", checkpoint_every=every)
    assert written.count("checkpoint.pt") == written.count("weights.pt") == expected
    assert written.count("metrics.jsonl") == 4
    weights = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    checkpoint = runs.load_checkpoint(tmp_path / "run")["model"]
    assert weights.keys() == checkpoint.keys()
    assert all(torch.equal(weights[k], checkpoint[k]) for k in weights)
    assert all(torch.equal(weights[k], v) for k, v in vae.state_dict().items())


def test_a_callback_sees_each_epochs_files_on_disk_and_weights_keep_their_format(
        digits, tmp_path):
    from pyro_vae.callbacks import Callback

    seen = []

    class Look(Callback):
        def on_epoch_end(self, trainer, row):
            lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
            weights = torch.load(trainer.run_dir / "weights.pt", weights_only=True)
            seen.append((json.loads(lines[-1])["epoch"], len(lines), all(
                torch.equal(weights[k], v) for k, v in trainer.vae.state_dict().items())))

    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, **TINY)
    fit(vae, digits, epochs=3, batch_size=500, out=tmp_path / "run", progress=False,
        device="cpu", callbacks=[Look()])
    assert seen == [(1, 1, True), (2, 2, True), (3, 3, True)]
    runs.save_weights(tmp_path, vae)  # the synchronous writer of the same state
    assert (tmp_path / "weights.pt").read_bytes() == (tmp_path / "run" / "weights.pt").read_bytes()


# -- 2. file modes ---------------------------------------------------------------------------

def test_run_files_get_the_mode_that_open_would_give(tmp_path, digits):
    previous = os.umask(0o027)
    try:
        vae = VAE(digits.data_shape, **TINY)
        runs.write_config(tmp_path, {"model": vae.config})
        runs.save_weights(tmp_path, vae)
        runs.save_checkpoint(tmp_path, {"epoch": 1})
        runs.append_metrics(tmp_path, ROW)
        runs.write_json(tmp_path / "evaluation.json", {"elbo": -1.0})
        plots.save_samples(vae, tmp_path / "samples.png", n=4)
        plots.save_loss([ROW], tmp_path / "loss.png")
        with open(tmp_path / "plain.txt", "w"):
            pass
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {name: 0o640 for name in modes}, modes
        assert len(modes) == 8
        # a file that is replaced keeps its own mode, as open(path, "w") keeps it
        os.chmod(tmp_path / "config.json", 0o600)
        runs.write_config(tmp_path, {"model": vae.config})
        assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


# -- 3. damaged files: one line that names the file ---------------------------------------------

GOOD = json.dumps(ROW)


@pytest.mark.parametrize("text, expected", [
    (f"{GOOD}\n{GOOD[:20]}\n{GOOD}\n", "line 2 is not valid JSON"),
    (f"{GOOD}\n{GOOD[:20]}\n", "line 2 is not valid JSON"),  # torn, but terminated
    ("[1, 2]\n", "line 1 is not a metrics row"),
    (f'{GOOD}\n{{"epoch": 2, "step": 3}}\n', "line 2 is not a metrics row"),
    (GOOD.replace('"epoch": 1', '"epoch": "1"') + "\n", "line 1 is not a metrics row"),
    (GOOD.replace('44.2', '"44.2"') + "\n", "line 1 is not a metrics row"),
    (GOOD.replace('"epoch": 1', '"epoch": true') + "\n", "line 1 is not a metrics row"),
])
def test_damaged_metrics_are_refused_with_the_file_and_line(tmp_path, text, expected):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(RunError, match=expected) as caught:
        runs.read_metrics(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "metrics.jsonl") in message and "fix or delete that line" in message
    assert "\n" not in message


def test_non_utf8_metrics_are_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(RunError, match="line 2 is not valid JSON"):
        runs.read_metrics(tmp_path)


@pytest.mark.parametrize("tail, epochs", [(GOOD[:25], [1]), ("\xff".encode("latin-1"), [1]),
                                          (GOOD.replace('"epoch": 1', '"epoch": 2'), [1, 2])])
def test_an_unterminated_last_line_is_dropped_only_when_torn(tmp_path, tail, epochs):
    tail = tail if isinstance(tail, bytes) else tail.encode()
    (tmp_path / "metrics.jsonl").write_bytes(GOOD.encode() + b"\n\n" + tail)
    assert [row["epoch"] for row in runs.read_metrics(tmp_path)] == epochs


def test_the_cli_reports_damaged_metrics_in_one_line(run_dir, capsys):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n{garbled\n" + lines[1] + "\n")
    for argv in (["evaluate", str(run_dir), "--particles", "1"],
                 ["sample", str(run_dir), "--out", str(run_dir.parent / "s.png")],
                 ["train", "--resume", str(run_dir), "--epochs", "3", "--quiet"]):
        result = invoke(argv, capsys)
        assert result.code == 2, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "metrics.jsonl line 2 is not valid JSON" in result.stderr
        assert result.stderr.startswith(f"pyro-vae {argv[0]}: error: ")


def _edit(key_path: str, value):
    def edit(config):
        *parents, last = key_path.split(".")
        node = config
        for part in parents:
            node = node[part]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_edit("model.latent_dim", "8"), "model.latent_dim should be a positive integer, not '8'"),
    (_edit("model.latent_dim", True), "model.latent_dim should be a positive integer"),
    (_edit("model.hidden", "16"), "model.hidden should be a list of positive integers"),
    (_edit("model.data_shape", "1,8,8"), "model.data_shape should be a list"),
    (_edit("model.guide_options", "x"), "model.guide_options should be a table of options"),
    (_edit("model.conditional", "yes"), "model.conditional should be true or false"),
    (_edit("model.prior", 3), "model.prior should be a string"),
    (_edit("model.latent_dim", KeyError), "its 'model' section has no 'latent_dim'"),
    (_edit("model", [1]), "its 'model' section is not a table of options"),
    (_edit("training", [1]), "its 'training' section is not a table of options"),
    (_edit("training", KeyError), "it has no 'training' section"),
    (_edit("training.epochs", "3"), "training.epochs should be a positive integer, not '3'"),
    (_edit("training.lr", "0.1"), "training.lr should be a positive number"),
    (_edit("data", "digits"), "its 'data' section is not a table of options"),
    (_edit("data.name", 3), "data.name should be a string"),
    (_edit("data.num_train", "1437"), "data.num_train should be a non-negative integer"),
    (_edit("model.prior", "bogus"), "cannot rebuild the model: unknown prior 'bogus'"),
    (_edit("model.guide_options", {"min_scale": "0.1"}), "cannot rebuild the model"),
    (_edit("model.latent_dim", 3), "weights.pt does not match the model in config.json: "),
    (_edit("model.hidden", [8]), "weights.pt does not match the model in config.json: "),
])
def test_a_hand_edited_config_is_refused_in_one_line(run_dir, edit, expected):
    config = json.loads((run_dir / "config.json").read_text())
    edit(config)
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError) as caught:
        load_run(run_dir)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert str(run_dir) in message


def test_an_unreadable_config_is_refused_in_one_line(run_dir):
    (run_dir / "config.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(RunError, match="is not a valid run configuration .it is not UTF-8"):
        load_run(run_dir)


def _checkpoint_edit(edit):
    def apply(run_dir):
        path = run_dir / "checkpoint.pt"
        checkpoint = torch.load(path, weights_only=True)
        edit(checkpoint)
        torch.save(checkpoint, path)
    return apply


def _set(key, value):
    return _checkpoint_edit(lambda c: c.__setitem__(key, value))


@pytest.mark.parametrize("damage, expected", [
    (_set("epoch", "3"), "epoch should be an integer ≥ 1, not '3'"),
    (_set("step", 2.5), "step should be an integer ≥ 0, not 2.5"),
    (_set("position", -1), "position should be an integer ≥ 0"),
    (_set("loss_sum", "0"), "loss_sum should be a number"),
    (_checkpoint_edit(lambda c: c.pop("rng")), "it has no rng"),
    (_checkpoint_edit(lambda c: c["rng"].pop("order")), "its rng has no 'order'"),
    (_checkpoint_edit(lambda c: c["rng"].pop("torch")), "its rng has no 'torch'"),
    (_checkpoint_edit(lambda c: c["rng"].__setitem__("torch", torch.zeros(5, dtype=torch.uint8))),
     "its rng state 'torch' is damaged"),
    (_set("rng", [1]), "random-number states are not a table"),
    (_set("order", torch.randperm(100)), "orders 100 training datapoints, and the training data "
                                         "have 1437"),
    (_set("order", torch.zeros(1437, dtype=torch.long)), "the epoch's order is not a permutation"),
    (_set("order", torch.rand(1437)), "the epoch's order is not a vector of indices"),
    (_set("optimizer", {"state": 1}), "its optimizer state is not an optimizer's state_dict"),
    (_set("model", [1]), "its model state is not a table"),
    (_set("position", 5), None),  # at the end of an epoch the loop starts a new order anyway
])
def test_a_damaged_checkpoint_is_refused_in_one_line(run_dir, damage, expected):
    damage(run_dir)
    if expected is None:
        runs.load_checkpoint(run_dir)
        return
    with pytest.raises(RunError) as caught:
        runs.load_checkpoint(run_dir)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert str(run_dir / "checkpoint.pt") in message


def test_another_runs_checkpoint_is_refused(run_dir, digits, tmp_path):
    pyro.set_rng_seed(0)
    other = tmp_path / "other"
    fit(VAE(digits.data_shape, latent_dim=3, hidden=(16,)), digits, epochs=1, out=other,
        progress=False, device="cpu")
    shutil.copy(other / "checkpoint.pt", run_dir / "checkpoint.pt")
    run = load_run(run_dir)
    runs.load_checkpoint(run_dir)  # its structure is sound ...
    with pytest.raises(RunError, match="is not this run's checkpoint .its model state does not "
                                       "fit the run's model: .* has shape"):
        runs.load_checkpoint(run_dir, vae=run.vae)  # ... and it is not this run's
    before = _files(run_dir)
    with pytest.raises(RunError, match="is not this run's checkpoint"):
        resume(run_dir, epochs=3, device="cpu", progress=False)
    assert _files(run_dir) == before


def test_load_state_refuses_before_it_restores_anything(run_dir):
    run = load_run(run_dir)
    checkpoint = runs.load_checkpoint(run_dir)
    optimizer = torch.optim.Adam(run.vae.parameters())
    generator = torch.Generator()
    bad = {**checkpoint, "order": torch.randperm(1437)}
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in run.vae.state_dict().items()}
    with pytest.raises(RunError, match="orders 1437 training datapoints, and the training data "
                                       "have 1000"):
        load_state(bad, run.vae, optimizer, generator, num_train=1000, where="here")
    checkpoint["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(RunError, match="^here is not this run's checkpoint .its optimizer's "
                                       "exp_avg of parameter 0 has shape .3."):
        load_state(checkpoint, run.vae, optimizer, generator, where="here")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in run.vae.state_dict().items())
    checkpoint = runs.load_checkpoint(run_dir)
    checkpoint["optimizer"]["param_groups"][0]["lr"] = "0.1"
    with pytest.raises(RunError, match="does not fit this training's optimizer .its 'lr' is"):
        load_state(checkpoint, run.vae, optimizer, generator)
    validate_checkpoint(runs.load_checkpoint(run_dir), run.vae, 1437)


def test_a_pickled_checkpoint_is_refused_quietly(run_dir, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, write in (("pickle", lambda f: pickle.dump({"model": Payload()}, f)),
                        ("torch", lambda f: torch.save({"model": Payload()}, f)),
                        ("junk", lambda f: f.write(b"junk"))):
        with open(run_dir / "checkpoint.pt", "wb") as handle:
            write(handle)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RunError) as error:
                runs.load_checkpoint(run_dir)
        assert not caught, [str(w.message) for w in caught]
        assert not marker.exists()
        message = str(error.value)
        assert "\n" not in message and "weights_only" not in message, message
        assert "cannot be loaded" in message
        if name == "torch":
            assert "cannot be loaded safely" in message and "io.open" in message


# -- 4. stray temporary files ------------------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_clean_temporary_files_removes_only_the_temporary_files(run_dir):
    stray = [".checkpoint.pt.abcd1234", ".weights.pt.x_y9k2mq", ".config.json.00000000",
             ".metrics.jsonl.zzzzzzzz", ".probe-a1b2c3d4", ".loss.png.oldoldol"]
    kept = [".checkpoint.pt.bak", ".notes.txt.abcd1234", "checkpoint.pt.abcd1234",
            ".checkpoint.pt.ABCD1234", ".samples.png.freshfre", ".probe-x"]
    for name in stray + kept:
        (run_dir / name).write_bytes(b"x")
    _age(run_dir / ".loss.png.oldoldol", 2 * runs.STALE_AFTER_S)
    (run_dir / ".weights.pt.dirdirdi").mkdir()  # not a file: left alone
    removed = runs.clean_temporary_files(run_dir)
    assert sorted(p.name for p in removed) == sorted(stray)
    names = {p.name for p in run_dir.iterdir()}
    assert not names & set(stray) and set(kept) <= names and ".weights.pt.dirdirdi" in names
    assert runs.clean_temporary_files(run_dir) == []


def test_load_run_cleans_up_and_leaves_a_locked_run_alone(run_dir):
    (run_dir / ".checkpoint.pt.abcd1234").write_bytes(b"x")
    with _held_by_another_process(run_dir):
        load_run(run_dir)  # a process is training it: its temporary file may be in use
        assert (run_dir / ".checkpoint.pt.abcd1234").exists()
    with runs.lock_run(run_dir):  # this process holds the lock (resume): it cleans
        assert [p.name for p in runs.clean_temporary_files(run_dir)] == [".checkpoint.pt.abcd1234"]
    (run_dir / ".weights.pt.abcd1234").write_bytes(b"x")
    load_run(run_dir)
    assert not (run_dir / ".weights.pt.abcd1234").exists()


# -- 5. the lock -------------------------------------------------------------------------------

class _held_by_another_process:
    """A second process that holds ``lock_run(path)`` until the block ends (then is killed)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        script = ("import sys, time\nfrom pyro_vae import runs\n"
                  "with runs.lock_run(sys.argv[1]):\n    print('locked', flush=True)\n"
                  "    time.sleep(120)\n")
        self.process = subprocess.Popen([sys.executable, "-c", script, str(self.path)], cwd=ROOT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.strip() == "locked", self.process.stderr.read()
        return self.process

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait(timeout=30)
        self.process.stdout.close()
        self.process.stderr.close()


def test_a_run_in_use_is_refused_and_the_lock_goes_with_its_process(tmp_path):
    with _held_by_another_process(tmp_path):
        with pytest.raises(RunError) as caught:
            with runs.lock_run(tmp_path):
                pass
        assert str(caught.value) == (
            f"{tmp_path} is in use by another pyro-vae process (training or resuming it); wait "
            "for it to finish or stop it")
    # the holder was killed: the kernel released its lock
    with runs.lock_run(tmp_path) as held:
        assert held == tmp_path
        with pytest.raises(RunError, match="in use by another pyro-vae process"):
            with runs.lock_run(tmp_path):  # not re-entrant
                pass
    with runs.lock_run(tmp_path):  # released at the end of the block
        pass
    assert (tmp_path / ".lock").is_file()


def test_lock_run_in_a_directory_that_does_not_exist(tmp_path):
    with pytest.raises(RunError, match="cannot lock .*missing"):
        with runs.lock_run(tmp_path / "missing"):
            pass


# -- 6. a start that never reached a checkpoint ----------------------------------------------------

def _never_checkpointed(path: Path, digits) -> Path:
    path.mkdir()
    runs.write_config(path, {"model": VAE(digits.data_shape, **TINY).config, "training": {},
                             "data": {"name": "digits"}})
    (path / ".lock").touch()
    (path / ".checkpoint.pt.abcd1234").write_bytes(b"half")
    (path / ".probe-abcd1234").touch()
    return path


def test_prepare_run_dir_takes_over_a_start_that_never_checkpointed(tmp_path, digits):
    out = _never_checkpointed(tmp_path / "out", digits)
    (out / "metrics.jsonl").write_text("\n")  # no rows
    assert runs.prepare_run_dir(out) == out
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize("extra", [
    {"weights.pt": b"w"}, {"checkpoint.pt": b"c"}, {"metrics.jsonl": GOOD.encode() + b"\n"},
    {"notes.txt": b"mine"}, {".checkpoint.pt.bak": b"mine"}, {"config.json": b'{"name": "x"}'},
    {"config.json": b"not json"}, {"sub": None},
])
def test_prepare_run_dir_still_refuses_anything_else(tmp_path, digits, extra):
    out = _never_checkpointed(tmp_path / "out", digits)
    for name, content in extra.items():
        (out / name).mkdir() if content is None else (out / name).write_bytes(content)
    before = _files(out)
    with pytest.raises(RunError, match="already holds files; choose a new directory"):
        runs.prepare_run_dir(out)
    assert _files(out) == before


def test_prepare_run_dir_refuses_a_start_in_progress(tmp_path, digits):
    out = _never_checkpointed(tmp_path / "out", digits)
    before = _files(out)
    with _held_by_another_process(out):
        with pytest.raises(RunError, match="is in use by another pyro-vae process"):
            runs.prepare_run_dir(out)
    assert _files(out) == before


def test_train_again_into_a_start_that_never_checkpointed(tmp_path, digits, capsys):
    out = _never_checkpointed(tmp_path / "out", digits)
    result = invoke(["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet",
                     "--eval-particles", "0", "--out", str(out)], capsys)
    assert result.code == 0, result.stderr
    assert {"config.json", "weights.pt", "checkpoint.pt", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith((".checkpoint", ".probe"))]
    assert len(runs.read_metrics(out)) == 1
