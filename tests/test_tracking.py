"""Experiment tracking callbacks (pyro_vae.tracking): TensorBoard event files and MLflow runs,
read back with the packages' own readers; the callbacks never change training.

Two drivers: a small hand-driven trainer (``drive``: the hooks of pyro_vae.callbacks in their
documented order around real optimizer steps), which also checks that no hook touches the
global random-number state or a module's train/eval mode, and the real ``fit``/``resume``.
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import time
import types
from dataclasses import asdict

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import VAE, distributed, evaluate, fit, make_objective, resume
from pyro_vae.callbacks import Callback
from pyro_vae.errors import ConfigError
from pyro_vae.training import TrainConfig

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from pyro_vae.tracking import (EPOCH_SCALARS, LOSS_TAG, TensorBoardCallback,  # noqa: E402
                               flatten_config, tracked_images)

EPOCHS, BATCH_SIZE, LOG_EVERY = 2, 256, 5
EPOCH_TAGS = sorted(EPOCH_SCALARS)


def logged_steps(num_train: int, epochs: int = EPOCHS, first_epoch: int = 1) -> list[int]:
    """The steps whose loss the trainer reads: the first, then every LOG_EVERY."""
    per_epoch = math.ceil(num_train / BATCH_SIZE)
    steps = range((first_epoch - 1) * per_epoch + 1, (first_epoch - 1 + epochs) * per_epoch + 1)
    return [s for s in steps if s == 1 or s % LOG_EVERY == 0]


def small_vae(digits, seed: int = 0) -> VAE:
    pyro.set_rng_seed(seed)
    return VAE(digits.data_shape, latent_dim=2, hidden=(16,))


def read_events(log_dir) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                     event_accumulator.TENSORS: 0})
    return accumulator.Reload()


def scalars(accumulator, tag) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def assert_series(actual, expected, rel=1e-6, abs=1e-6):
    """(step, value) pairs: the same steps, values equal to float32 precision."""
    assert [step for step, _ in actual] == [step for step, _ in expected]
    assert [value for _, value in actual] == pytest.approx([value for _, value in expected],
                                                           rel=rel, abs=abs)


def config_text(accumulator) -> str:
    (event,) = accumulator.Tensors("config/text_summary")
    return event.tensor_proto.string_val[0].decode()


class Recorder(Callback):
    """Records the losses the trainer hands to the callbacks."""

    def __init__(self):
        self.losses: list[tuple[int, float]] = []

    def on_loss(self, trainer, step, value):
        self.losses.append((step, value))


# -- a hand-driven trainer -----------------------------------------------------------------------

def _global_state(vae):
    return (torch.get_rng_state(), random.getstate(), np.random.get_state(),
            [module.training for module in vae.modules()])


def _assert_same_state(before, after, hook):
    assert torch.equal(before[0], after[0]), f"{hook} changed torch's random-number state"
    assert before[1] == after[1], f"{hook} changed Python's random-number state"
    assert all(np.array_equal(a, b) for a, b in zip(before[2], after[2])), \
        f"{hook} changed NumPy's random-number state"
    assert before[3] == after[3], f"{hook} changed a module's train/eval mode"


def drive(callbacks, vae, dataset, epochs=EPOCHS, start=None, rank=0, seed=0):
    """Train as the Trainer does, calling the hooks in the documented order; every hook is
    checked to leave the random-number states and the modules' modes as it found them.
    ``start`` = (epoch, step, history) continues a run (a resume)."""
    config = TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, log_every=LOG_EVERY, seed=seed,
                         device="cpu")
    objective = make_objective("elbo", 1)
    epoch, step, history = start or (1, 0, [])
    trainer = types.SimpleNamespace(
        vae=vae, dataset=dataset, config=config, objective=objective, history=list(history),
        run_config={"model": vae.config, "training": asdict(config),
                    "data": {"name": dataset.name, "num_train": len(dataset.train)}},
        run_dir=None, context=distributed.Context(rank=rank, world_size=max(1, rank + 1),
                                                  device=torch.device("cpu")),
        state=types.SimpleNamespace(epoch=epoch, step=step, position=0),
        optimizer=torch.optim.Adam(vae.parameters(), lr=config.lr))

    def call(hook, *args):
        for callback in callbacks:
            before = _global_state(vae)
            getattr(callback, hook)(trainer, *args)
            _assert_same_state(before, _global_state(vae), hook)

    torch.manual_seed(seed + step)
    vae.train()
    vae.encoder.eval()  # a mixed set of modes, to be left exactly as it is
    loss_module = distributed.wrap(vae, objective, distributed.SINGLE)
    train, num_data = dataset.train, len(dataset.train)
    error = None
    try:
        call("on_fit_start")
        while trainer.state.epoch <= epochs:
            started, loss_sum = time.perf_counter(), 0.0
            order = torch.randperm(num_data)
            for position in range(0, num_data, BATCH_SIZE):
                x = train[order[position:position + BATCH_SIZE]]
                loss = loss_module(x, None, num_data=num_data)
                if (trainer.state.step + 1) % LOG_EVERY == 0 or trainer.state.step == 0:
                    call("on_loss", trainer.state.step + 1, float(loss.detach()) / num_data)
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
                loss_sum += float(loss.detach()) * x.shape[0] / num_data
                trainer.state.step += 1
                call("on_step_end")
            val = evaluate(vae, dataset, split="val", particles=1, seed=trainer.state.epoch)
            row = {"epoch": trainer.state.epoch, "step": trainer.state.step,
                   "train_loss": loss_sum / num_data, "beta": 1.0,
                   "val_elbo": val.summary["elbo"], "val_elbo_se": val.summary["elbo_se"],
                   "epoch_time_s": time.perf_counter() - started, "elapsed_s": 0.0}
            trainer.history.append(row)
            trainer.state.epoch += 1
            call("on_epoch_end", row)
    except BaseException as exc:
        error = exc
        raise
    finally:
        call("on_fit_end", error)
    return trainer


# -- construction --------------------------------------------------------------------------------

def test_missing_tensorboard_is_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard → ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError) as info:
        TensorBoardCallback(tmp_path / "tb")
    message = str(info.value)
    assert "\n" not in message and 'pip install "pyro-vae[tensorboard]"' in message


def test_log_dir_that_cannot_be_written_is_one_line_config_error(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for log_dir in (a_file, a_file / "below"):
        with pytest.raises(ConfigError, match="is not a directory") as info:
            TensorBoardCallback(log_dir)
        assert "\n" not in str(info.value)
    TensorBoardCallback(tmp_path / "new" / "deeper")  # creatable: accepted, nothing created yet
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="permission bits do not bind root")
def test_read_only_log_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        TensorBoardCallback(locked / "tb")


# -- with the hand-driven trainer ----------------------------------------------------------------

def test_event_file_holds_config_losses_epoch_scalars_and_images(digits, tmp_path):
    vae, recorder = small_vae(digits), Recorder()
    trainer = drive([TensorBoardCallback(tmp_path / "tb"), recorder], vae, digits)
    events = read_events(tmp_path / "tb")

    expected_steps = logged_steps(len(digits.train))
    assert expected_steps == [1, 5, 10]  # 6 steps per epoch, 12 in all
    assert set(events.Tags()["scalars"]) == {LOSS_TAG, *EPOCH_TAGS}
    assert_series(scalars(events, LOSS_TAG), recorder.losses)
    assert [step for step, _ in recorder.losses] == expected_steps
    for tag, key in EPOCH_SCALARS.items():
        assert_series(scalars(events, tag), [(row["epoch"], row[key]) for row in trainer.history])
    assert sorted(events.Tags()["images"]) == ["reconstructions", "samples"]
    for tag in ("reconstructions", "samples"):
        assert [image.step for image in events.Images(tag)] == [1, 2]
    assert json.loads(config_text(events).removeprefix("```json\n").removesuffix("\n```")) \
        == json.loads(json.dumps(trainer.run_config))


def test_config_is_also_written_as_hparams(digits, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    trainer = drive([TensorBoardCallback(tmp_path / "tb", images=False)], small_vae(digits),
                    digits, epochs=1)
    events = read_events(tmp_path / "tb")
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    flat = flatten_config(trainer.run_config)
    assert hparams["training.lr"].number_value == pytest.approx(trainer.config.lr)
    assert hparams["training.objective"].string_value == "elbo"
    assert hparams["model.hidden"].string_value == flat["model.hidden"] == "[16]"
    assert not events.Tags()["images"]  # images=False


def test_a_resumed_run_continues_the_curves_in_the_same_directory(digits, tmp_path):
    vae = small_vae(digits)
    first = drive([TensorBoardCallback(tmp_path / "tb")], vae, digits, epochs=2)
    drive([TensorBoardCallback(tmp_path / "tb")], vae, digits, epochs=4,
          start=(first.state.epoch, first.state.step, first.history))
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    events = read_events(tmp_path / "tb")
    steps = [step for step, _ in scalars(events, LOSS_TAG)]
    assert steps == logged_steps(len(digits.train), epochs=4) == [1, 5, 10, 15, 20]
    for tag in EPOCH_TAGS:
        assert [step for step, _ in scalars(events, tag)] == [1, 2, 3, 4]
    assert [image.step for image in events.Images("samples")] == [1, 2, 3, 4]


def test_only_the_main_process_writes(digits, tmp_path):
    drive([TensorBoardCallback(tmp_path / "tb")], small_vae(digits), digits, epochs=1, rank=1)
    assert not (tmp_path / "tb").exists()


def test_images_are_those_of_the_run_figures_whatever_the_global_state(digits):
    trainer = types.SimpleNamespace(vae=small_vae(digits), dataset=digits)
    torch.manual_seed(1)
    first = tracked_images(trainer)
    torch.manual_seed(2)
    second = tracked_images(trainer)
    for name in ("reconstructions", "samples"):
        assert first[name].shape[0] == 3 and 0 <= first[name].min() <= first[name].max() <= 1
        assert torch.equal(first[name], second[name])


# -- with the real trainer -----------------------------------------------------------------------

def _fit(digits, out, callbacks=None, epochs=EPOCHS):
    vae = small_vae(digits, seed=3)
    kwargs = {} if callbacks is None else {"callbacks": callbacks}
    result = fit(vae, digits, "elbo", epochs=epochs, batch_size=BATCH_SIZE, log_every=LOG_EVERY,
                 seed=3, device="cpu", out=out, progress=False, **kwargs)
    return vae, result


def test_fit_with_tensorboard_matches_metrics_and_leaves_training_bit_identical(digits, tmp_path):
    from PIL import Image

    plain, _ = _fit(digits, tmp_path / "plain")
    recorder = Recorder()
    tracked, result = _fit(digits, tmp_path / "tracked",
                           [TensorBoardCallback(tmp_path / "tb"), recorder])
    for name, value in plain.state_dict().items():
        assert torch.equal(value, tracked.state_dict()[name]), name

    events = read_events(tmp_path / "tb")
    rows = [json.loads(line) for line in
            (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in recorder.losses] == logged_steps(len(digits.train))
    assert_series(scalars(events, LOSS_TAG), recorder.losses)
    for tag, key in EPOCH_SCALARS.items():
        assert_series(scalars(events, tag), [(row["epoch"], row[key]) for row in rows])
    for tag in ("reconstructions", "samples"):
        images = events.Images(tag)
        assert [image.step for image in images] == list(range(1, EPOCHS + 1))
        # the last epoch's image is the run's figure (up to PNG rounding: 1 grey level)
        logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)), dtype=int)
        figure = np.asarray(Image.open(result.run_dir / f"{tag}.png"), dtype=int)
        assert logged.shape == figure.shape and np.abs(logged - figure).max() <= 1
    assert json.loads(config_text(events).removeprefix("```json\n").removesuffix("\n```")) \
        == json.loads((result.run_dir / "config.json").read_text())


def test_resume_continues_the_curves(digits, tmp_path):
    _fit(digits, tmp_path / "run", [TensorBoardCallback(tmp_path / "tb")], epochs=1)
    resume(tmp_path / "run", epochs=3, device="cpu", progress=False,
           callbacks=[TensorBoardCallback(tmp_path / "tb")])
    events = read_events(tmp_path / "tb")
    assert ([step for step, _ in scalars(events, LOSS_TAG)]
            == logged_steps(len(digits.train), epochs=3))
    for tag in EPOCH_TAGS:
        assert [step for step, _ in scalars(events, tag)] == [1, 2, 3]
    assert len(events.Tensors("config/text_summary")) == 2  # one per fit, at its start step


# -- MLflow --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds): (URI, artifact folder)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts"


@pytest.fixture
def mlflow_uri(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever MLflow writes relative to the working directory
    return mlflow_store[0]


def test_mlflow_run_holds_params_metrics_and_images(digits, tmp_path, mlflow_uri, mlflow_store):
    from mlflow.tracking import MlflowClient

    from pyro_vae.tracking import MLflowCallback

    callback = MLflowCallback(mlflow_uri, experiment="tests", run_name="r1",
                              artifact_location=mlflow_store[1])
    recorder = Recorder()
    vae, result = _fit(digits, tmp_path / "run", [callback, recorder])
    client = MlflowClient(mlflow_uri)
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    flat = flatten_config(result.config)
    assert run.data.params == {key: str(value) for key, value in flat.items()}
    history = [(m.step, m.value) for m in client.get_metric_history(callback.run_id, LOSS_TAG)]
    assert_series(sorted(history), recorder.losses)
    for tag, key in EPOCH_SCALARS.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(callback.run_id, tag))
        assert_series(history, [(row["epoch"], row[key]) for row in result.history])
    artifacts = sorted(a.path for a in client.list_artifacts(callback.run_id, "images"))
    assert artifacts == ["images/reconstructions.png", "images/samples.png"]
    for name in ("reconstructions.png", "samples.png"):  # the run's own figures, byte for byte
        stored = next(mlflow_store[1].glob(f"*/artifacts/images/{name}"))
        assert stored.read_bytes() == (result.run_dir / name).read_bytes()


def test_mlflow_with_the_hand_driven_trainer_and_a_failing_store(digits, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pyro_vae.tracking import MLflowCallback

    callback = MLflowCallback(mlflow_uri, images=False)
    drive([callback], small_vae(digits), digits, epochs=1)
    run = MlflowClient(mlflow_uri).get_run(callback.run_id)
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {LOSS_TAG, *EPOCH_TAGS}

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    broken = MLflowCallback(f"sqlite:///{a_file}/mlflow.db")
    with pytest.raises(ConfigError) as info:
        drive([broken], small_vae(digits), digits, epochs=1)
    assert "\n" not in str(info.value) and str(info.value).startswith("MLflow tracking at")
