"""MNIST-family loaders (torchvision) on small IDX files written here, and binarization."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import load_data, load_run
from pyro_vae.cli import main
from pyro_vae.data import TORCHVISION_DATASETS, binarize
from pyro_vae.errors import DataError

NUM_TRAIN, NUM_TEST = 50, 20


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as handle:
        handle.write(struct.pack(">I", 0x0800 | array.ndim))       # magic: unsigned bytes, ndim
        handle.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        handle.write(array.tobytes())


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    """IDX files for all three data sets, with known pixels and labels."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    content = {}
    for cls in ("MNIST", "FashionMNIST", "KMNIST"):
        raw = root / cls / "raw"
        raw.mkdir(parents=True)
        arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (NUM_TRAIN, 28, 28)),
                  "train-labels-idx1-ubyte": rng.integers(0, 10, NUM_TRAIN),
                  "t10k-images-idx3-ubyte": rng.integers(0, 256, (NUM_TEST, 28, 28)),
                  "t10k-labels-idx1-ubyte": rng.integers(0, 10, NUM_TEST)}
        for name, array in arrays.items():
            _write_idx(raw / name, array)
        content[cls] = arrays
    return root, content


@pytest.mark.parametrize("name", list(TORCHVISION_DATASETS))
def test_loader_reads_shapes_values_labels_and_splits(idx_root, name):
    root, content = idx_root
    arrays = content[TORCHVISION_DATASETS[name]]
    data = load_data(name, data_dir=root)
    assert data.data_shape == (1, 28, 28) and data.data_dim == 784
    n_val = round(NUM_TRAIN * 0.1)
    assert (len(data.train), len(data.val), len(data.test)) == (NUM_TRAIN - n_val, n_val, NUM_TEST)
    # the official test set, in order, scaled to [0, 1]
    expected_test = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].reshape(NUM_TEST, -1) / 255.0)
    assert torch.allclose(data.test.double(), expected_test, atol=1e-7)
    assert torch.equal(data.labels["test"], torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]))
    # train + val partition the official training set, each image with its own label
    images = torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(NUM_TRAIN, -1) / 255.0)
    labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"])
    seen = []
    for split in ("train", "val"):
        for x, y in zip(data.split(split).double(), data.labels[split]):
            index = int(torch.nonzero((images - x).abs().max(1).values < 1e-7)[0])
            assert labels[index] == y
            seen.append(index)
    assert sorted(seen) == list(range(NUM_TRAIN))
    # the split is fixed: loading again gives the same train split
    assert torch.equal(load_data(name, data_dir=root).train, data.train)


def test_a_missing_data_set_names_the_path_and_download(tmp_path):
    with pytest.raises(DataError) as info:
        load_data("kmnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "KMNIST" / "raw") in message and "--download" in message
    assert "\n" not in message


def test_static_binarization_is_fixed_and_unbiased(idx_root):
    root, _ = idx_root
    grey = load_data("mnist", data_dir=root)
    binary = load_data("mnist", data_dir=root, binarize_mode="static")
    for split in ("train", "val", "test"):
        values = binary.split(split)
        assert set(values.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binary.train, load_data("mnist", data_dir=root, binarize_mode="static").train)
    # E[Bernoulli(x)] = x: the binarized mean matches the grey mean within 3 standard errors
    x, b = grey.train, binary.train
    se = math.sqrt(float((x * (1 - x)).sum())) / x.numel()
    assert abs(float(b.mean() - x.mean())) < 3 * se


def test_dynamic_binarization_keeps_grey_train_and_fixed_binary_evaluation(idx_root):
    root, _ = idx_root
    data = load_data("mnist", data_dir=root, binarize_mode="dynamic")
    assert data.dynamic_binarization
    assert not set(data.train.unique().tolist()) <= {0.0, 1.0}
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}


def test_binarization_refuses_data_outside_the_unit_interval():
    from pyro_vae.data import from_array

    with pytest.raises(DataError, match=r"\[0, 1\]"):
        binarize(from_array(np.full((10, 3), 2.0, np.float32)), "static")


def test_cli_trains_evaluates_and_resumes_on_mnist_with_its_loading_options(idx_root, tmp_path,
                                                                            capsys):
    root, _ = idx_root
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-dir", str(root), "--binarize", "static",
                 "--conditional", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
                 "--quiet", "--eval-particles", "0", "--out", str(out)]) == 0
    source = json.loads((out / "config.json").read_text())["data"]
    assert source["binarize"] == "static" and source["data_dir"] == str(root)
    run = load_run(out)
    assert set(run.data().test.unique().tolist()) <= {0.0, 1.0}
    assert main(["evaluate", str(out), "--particles", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["data"] == "mnist" and summary["num_datapoints"] == NUM_TEST
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_npy_files_are_memory_mapped_and_train_exactly_like_in_memory_data(tmp_path):
    import pyro

    from pyro_vae import VAE, evaluate, fit
    from pyro_vae.data import LazyRows, from_array

    values = np.random.default_rng(1).random((300, 12)).astype(np.float32)
    path = tmp_path / "rows.npy"
    np.save(path, values)
    streamed = load_data(str(path))
    assert streamed.streamed and isinstance(streamed.train, LazyRows)
    in_memory = from_array(values, name="same rows")
    assert not in_memory.streamed
    for split in ("train", "val", "test", "all"):
        assert torch.equal(streamed.split(split), in_memory.split(split))

    def train(dataset):
        pyro.set_rng_seed(0)
        vae = VAE(12, 2, hidden=(16,))
        history = fit(vae, dataset, "iwae", particles=2, epochs=2, batch_size=32,
                      progress=False, device="cpu").history
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history], vae

    (rows_a, vae_a), (rows_b, vae_b) = train(streamed), train(in_memory)
    assert rows_a == rows_b
    assert all(torch.equal(a, b) for a, b in zip(vae_a.parameters(), vae_b.parameters()))
    assert evaluate(vae_a, streamed, particles=5).summary == evaluate(vae_b, in_memory, particles=5).summary


def test_a_memory_mapped_file_with_nan_is_refused_with_its_row(tmp_path):
    values = np.random.default_rng(1).random((30000, 3)).astype(np.float32)
    values[20001, 1] = np.nan
    np.save(tmp_path / "nan.npy", values)
    with pytest.raises(DataError, match="row 20001"):
        load_data(str(tmp_path / "nan.npy"))


# -- the real MNIST files, where a checkout has them (benchmarks and reproductions use them) ----
REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (REAL_MNIST / "MNIST" / "raw").is_dir(),
                    reason="the real MNIST files are not here (../shared/data/MNIST/raw)")
def test_the_real_mnist_files_read_as_published():
    data = load_data("mnist", data_dir=REAL_MNIST)
    assert data.data_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (54_000, 6_000, 10_000)
    pixels = torch.cat([data.train, data.val]).double()
    # the published training statistics, given to four decimals: within half a unit of the last
    assert abs(float(pixels.mean()) - 0.1307) <= 5e-5
    assert abs(float(pixels.std()) - 0.3081) <= 5e-5
    test_counts = torch.bincount(data.labels["test"], minlength=10).tolist()
    assert test_counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = torch.bincount(torch.cat([data.labels["train"], data.labels["val"]]))
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_dynamic_binarization_draws_new_binary_images_every_epoch(idx_root):
    """Each epoch's minibatches are fresh Bernoulli(x) draws of the grey training images."""
    from pyro_vae import VAE, fit
    from pyro_vae.callbacks import Callback

    root, _ = idx_root
    data = load_data("mnist", data_dir=root, binarize_mode="dynamic")

    class Seen(Callback):
        def __init__(self):
            self.by_epoch = []

        def on_step_end(self, trainer):
            x = trainer.batch[0].detach().cpu()
            order = trainer.state.order[trainer.state.position - x.shape[0]:
                                        trainer.state.position].cpu()
            seen = torch.empty_like(x)
            seen[order.argsort()] = x  # rows back in the training split's order
            self.by_epoch.append(seen)

    seen = Seen()
    fit(VAE(784, 2, hidden=(8,)), data, "elbo", epochs=3, batch_size=len(data.train),
        progress=False, callbacks=[seen], val_particles=1)
    draws = torch.stack(seen.by_epoch)  # [epochs, N, 784]
    assert draws.shape[0] == 3 and set(draws.unique().tolist()) <= {0.0, 1.0}
    grey = data.train.double()
    for a in range(3):
        for b in range(a + 1, 3):  # independent draws: P(two epochs agree everywhere) ≈ 0
            assert not torch.equal(draws[a], draws[b])
    # E[Bernoulli(x)] = x: the draws' mean matches the grey mean within 3 standard errors
    se = math.sqrt(3 * float((grey * (1 - grey)).sum())) / (3 * grey.numel())
    assert abs(float(draws.double().mean() - grey.mean())) < 3 * se


def test_evaluation_uses_one_fixed_binarization_recorded_in_the_run(idx_root, tmp_path):
    root, _ = idx_root
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-dir", str(root), "--binarize", "dynamic",
                 "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--quiet",
                 "--eval-particles", "0", "--out", str(out)]) == 0
    source = json.loads((out / "config.json").read_text())["data"]
    assert source["binarize"] == "dynamic" and source["binarize_seed"] == 0
    first, second = load_run(out).data(), load_run(out).data()
    assert set(first.test.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first.test, second.test) and torch.equal(first.val, second.val)
    assert torch.equal(first.test, load_data("mnist", data_dir=root, binarize_mode="dynamic").test)
    # another recorded seed gives other (fixed) binary test images
    config = json.loads((out / "config.json").read_text())
    config["data"]["binarize_seed"] = 1
    (out / "config.json").write_text(json.dumps(config))
    other = load_run(out).data().test
    assert not torch.equal(other, first.test)
    assert torch.equal(other, load_run(out).data().test)


# -- the bundled digits, read without importing scikit-learn -----------------------------------

def test_the_digits_read_from_the_file_equal_scikit_learns_exactly():
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from pyro_vae import data

    assert data._digits_file() is not None  # the file that scikit-learn ships was found
    images, target = data.digits_arrays()
    bunch = sklearn_digits()
    assert images.dtype == bunch.images.dtype and target.dtype == bunch.target.dtype
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    # and reading them (the whole data set, split) does not import scikit-learn
    code = ("import sys; from pyro_vae import load_data; d = load_data('digits'); "
            "print(len(d.train) + len(d.val) + len(d.test), 'sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["1797", "False"], done.stderr


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_the_digits_come_through_scikit_learn_where_the_file_is_not_there(monkeypatch, tmp_path,
                                                                         damage):
    from sklearn.datasets import load_digits as sklearn_digits

    from pyro_vae import data

    from_file = data.load_digits().source["fingerprint"]
    if damage == "missing":
        monkeypatch.setattr(data, "_digits_file", lambda: None)
    else:
        broken = tmp_path / "digits.csv.gz"
        broken.write_bytes(b"not gzip")
        monkeypatch.setattr(data, "_digits_file", lambda: broken)
    images, target = data.digits_arrays()
    bunch = sklearn_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    assert data.load_digits().source["fingerprint"] == from_file  # the same recorded data
