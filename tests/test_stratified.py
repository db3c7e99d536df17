"""Stratified minibatches for semi-supervised training (``labelled_batch``): every step takes
``labelled_batch`` labelled rows and ``batch_size − labelled_batch`` unlabelled ones, each part
scored with its own count as ``num_data`` (each part's sum an unbiased estimate of its total);
an epoch is one pass over the unlabelled rows; the labelled rows are cycled evenly; a run
interrupted in mid-epoch resumes bit for bit; bad values are one line."""

from __future__ import annotations

import json

import pyro
import pytest
import torch

from pyro_vae import VAE, fit
from pyro_vae.callbacks import Callback
from pyro_vae.catalogue import SemiSupervisedVAE
from pyro_vae.cli import main
from pyro_vae.data import UNLABELLED, keep_labels
from pyro_vae.errors import ConfigError, TrainingInterrupted
from pyro_vae.training import resume

SMALL = dict(num_classes=10, latent_dim=2, hidden=(16,), classifier_hidden=())


@pytest.fixture
def partly_labelled(digits):
    return keep_labels(digits, 3, seed=0)  # 30 labelled training digits, the rest hidden


def _m2(data):
    pyro.set_rng_seed(0)
    return SemiSupervisedVAE(data.data_shape, **SMALL)


class Recorder:
    """Wraps a trainer's loss module: records (row indices, labels, num_data) of each call."""

    def __init__(self, module, train):
        self.module, self.train, self.calls = module, train.reshape(len(train), -1), []

    def __call__(self, x, y, num_data):
        flat = x.reshape(len(x), -1)
        rows = [int(torch.nonzero((self.train == row).all(-1)).flatten()[0]) for row in flat]
        self.calls.append((rows, y.tolist(), num_data))
        return self.module(x, y, num_data=num_data)


class Record(Callback):
    def on_fit_start(self, trainer):
        trainer.loss_module = self.recorder = Recorder(trainer.loss_module, trainer.dataset.train)


def test_each_step_scores_its_labelled_and_unlabelled_parts_each_with_its_own_count(
        partly_labelled):
    data = partly_labelled
    labels = data.split_labels("train")
    labelled = set(torch.nonzero(labels >= 0).flatten().tolist())
    unlabelled = set(torch.nonzero(labels == UNLABELLED).flatten().tolist())
    n_l, n_u, batch, part = len(labelled), len(unlabelled), 64, 8
    record = Record()
    result = fit(_m2(data), data, "elbo", epochs=2, batch_size=batch, labelled_batch=part,
                 progress=False, callbacks=[record])
    calls = record.recorder.calls
    steps = -(-n_u // (batch - part))  # ceil: an epoch is a pass over the unlabelled rows
    assert result.history[0]["step"] == steps and result.history[1]["step"] == 2 * steps
    assert len(calls) == 2 * 2 * steps  # two calls per step
    for epoch in range(2):
        epoch_calls = calls[2 * steps * epoch:2 * steps * (epoch + 1)]
        seen_u, seen_l = [], []
        for (u_rows, u_y, u_n), (l_rows, l_y, l_n) in zip(epoch_calls[::2], epoch_calls[1::2]):
            assert u_n == n_u and l_n == n_l  # each part weighted by its own count
            assert set(u_y) == {UNLABELLED} and min(l_y) >= 0
            assert len(l_rows) == part
            assert [labels[r].item() for r in l_rows] == l_y  # the rows' own labels
            seen_u += u_rows
            seen_l += l_rows
        assert sorted(seen_u) == sorted(unlabelled)  # every unlabelled row once per epoch
        assert set(seen_l) == labelled
        counts = torch.bincount(torch.tensor(seen_l))[sorted(labelled)]
        assert int(counts.max() - counts.min()) <= 1  # the labelled rows cycled evenly


class StopAt(Callback):
    """Checkpoints and stops after step ``step``, as a signal does."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.save_checkpoint(mid_epoch=True)
            raise TrainingInterrupted("stopped by the test")


def _weights(run_dir):
    return torch.load(run_dir / "weights.pt", weights_only=True)


def test_a_run_stopped_in_mid_epoch_resumes_bit_for_bit(partly_labelled, tmp_path):
    data = partly_labelled
    options = dict(epochs=3, batch_size=64, labelled_batch=8, progress=False, device="cpu",
                   checkpoint_every=0)
    fit(_m2(data), data, "elbo", out=tmp_path / "straight", **options)
    with pytest.raises(TrainingInterrupted):
        fit(_m2(data), data, "elbo", out=tmp_path / "stopped", callbacks=[StopAt(30)], **options)
    resume(tmp_path / "stopped", device="cpu", progress=False)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "stopped")
    assert set(straight) == set(resumed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = [json.loads(line) for line in
            (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    unlabelled = int((data.split_labels("train") < 0).sum())
    steps = -(-unlabelled // 56)  # 64 − 8 unlabelled rows per step
    assert [row["step"] for row in rows] == [steps, 2 * steps, 3 * steps]
    assert steps < 30 < 2 * steps  # the stop fell inside the second epoch
    config = json.loads((tmp_path / "stopped" / "config.json").read_text())
    assert config["training"]["labelled_batch"] == 8


def test_stratified_minibatches_change_the_batches_not_the_uniform_default(partly_labelled):
    data = partly_labelled
    a = fit(_m2(data), data, "elbo", epochs=1, batch_size=64, progress=False)
    b = fit(_m2(data), data, "elbo", epochs=1, batch_size=64, labelled_batch=8, progress=False)
    assert a.history[0]["step"] == -(-len(data.train) // 64)
    assert b.history[0]["step"] != a.history[0]["step"]


@pytest.mark.parametrize("make,options,match", [
    (lambda d: VAE(d.data_shape, latent_dim=2, hidden=(8,)), {"labelled_batch": 4},
     "applies to a semi-supervised model"),
    (lambda d: _m2(d), {"labelled_batch": 64, "batch_size": 64}, "must be smaller than"),
    (lambda d: _m2(d), {"labelled_batch": 31, "batch_size": 64}, "exceeds the 30 labelled"),
    (lambda d: _m2(d), {"labelled_batch": 0}, "labelled_batch"),
    (lambda d: _m2(d), {"labelled_batch": 2.5}, "labelled_batch"),
])
def test_bad_values_are_refused_in_one_line(partly_labelled, tmp_path, make, options, match):
    with pytest.raises(ConfigError, match=match) as error:
        fit(make(partly_labelled), partly_labelled, "elbo", epochs=1, progress=False,
            out=tmp_path / "run", **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_fully_labelled_data_is_refused(digits):
    with pytest.raises(ConfigError, match="both labelled and unlabelled rows"):
        fit(_m2(digits), digits, "elbo", epochs=1, labelled_batch=4, progress=False)


def test_the_command_line_trains_with_stratified_minibatches(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--semi-supervised", "--labels-per-class", "3", "--labelled-batch",
                 "8", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
                 "--eval-particles", "0", "--quiet", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["labelled_batch"] == 8
    code = main(["train", "--labelled-batch", "8", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "bad")])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()


def test_torchrun_is_refused_in_one_line(partly_labelled):
    from pyro_vae.config import TrainConfig
    from pyro_vae.training import check_labelled_batch

    config = TrainConfig(labelled_batch=8, batch_size=64).validate()
    check_labelled_batch(_m2(partly_labelled), partly_labelled, config)  # one process: fine
    with pytest.raises(ConfigError, match="not supported under torchrun"):
        check_labelled_batch(_m2(partly_labelled), partly_labelled, config, distributed_run=True)


def test_a_model_with_terms_outside_the_data_plate_is_refused(partly_labelled, tmp_path):
    """Each step scores its labelled and unlabelled parts in two calls: a global term (here a
    weight penalty outside plate "data") would enter the loss twice, so it is refused."""
    from lvm_models import HandM2

    class PenalizedM2(HandM2):
        def model(self, x, y=None, num_data=None):
            super().model(x, y, num_data)
            penalty = sum(p.pow(2).sum() for p in self.decoder.parameters())
            pyro.factor("weight_decay", -1e-3 * penalty)

    from pyro_vae.config import TrainConfig
    from pyro_vae.training import check_labelled_batch

    pyro.set_rng_seed(0)
    model = PenalizedM2(x_dim=64, classes=10, z_dim=2, hidden=16)
    config = TrainConfig(labelled_batch=8, batch_size=64).validate()
    with pytest.raises(ConfigError, match="outside plate \"data\".*counted twice") as error:
        check_labelled_batch(model, partly_labelled, config)
    assert "\n" not in str(error.value)
    # fit refuses such a model in any case, before training (its validation ELBO per datapoint)
    with pytest.raises(ConfigError, match="^fit scores a validation ELBO per datapoint"):
        fit(model, partly_labelled, "elbo", epochs=1, batch_size=64, labelled_batch=8,
            progress=False, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run").exists()
