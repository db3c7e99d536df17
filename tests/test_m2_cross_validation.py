"""The cross-validated M2 comparison (``benchmarks/catalogue_acceptance.py --part m2-cv``).

Its claim is a test accuracy over all 1,797 digits, so every digit must be scored exactly once,
by models that never saw it, and the overall numbers must be the folds' numbers pooled. Run with
one epoch and small networks: what is checked is the bookkeeping, not the accuracy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "catalogue_acceptance.py"
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("catalogue_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def small_args(folds: int) -> SimpleNamespace:
    return SimpleNamespace(binarize=None, folds=folds, labels_per_class=10, m2_objective="elbo",
                           particles=1, m2_epochs=1, lr=1e-3, batch_size=200, m2_latent=2,
                           m2_hidden=[16], m2_classifier_hidden=[], alpha=50.0)


def test_keep_labels_keeps_the_asked_number_of_each_class(script):
    labels = torch.arange(10).repeat_interleave(30)
    kept = script.keep_labels(labels, 7, seed=3)
    assert torch.equal((kept >= 0).sum().reshape(1), torch.tensor([70]))
    for c in range(10):
        assert int((kept == c).sum()) == 7
    assert bool((kept[kept >= 0] == labels[kept >= 0]).all())
    assert torch.equal(kept, script.keep_labels(labels, 7, seed=3))
    assert not torch.equal(kept, script.keep_labels(labels, 7, seed=4))


def test_every_digit_is_a_test_digit_once_and_never_a_training_digit(script, monkeypatch):
    seen = []
    original = script.m2_scores

    def recording(args, seed, data_shape, x_train, labels, x_test, y_test):
        seen.append((x_train, x_test))
        return original(args, seed, data_shape, x_train, labels, x_test, y_test)

    monkeypatch.setattr(script, "m2_scores", recording)
    row = script.m2_cross_validated(small_args(folds=3), seed=0)
    assert row["num_test"] == 1797 and len(row["per_fold"]) == 3
    assert sum(f["num_test"] for f in row["per_fold"]) == 1797
    assert all(f["num_train"] + f["num_test"] == 1797 for f in row["per_fold"])
    # the folds' test rows are all the digits, each once (as a multiset of rows), and no test
    # row of a fold is among that fold's training rows
    from collections import Counter

    from pyro_vae import load_data

    rows = lambda x: Counter(tuple(r.tolist()) for r in x)  # noqa: E731
    assert rows(torch.cat([x_test for _, x_test in seen])) == rows(load_data("digits").split("all"))
    for x_train, x_test in seen:
        assert not set(rows(x_test)) & set(rows(x_train))
    # pooled accuracy = the folds' accuracies weighted by their sizes
    for name in ("m2", "logistic_regression", "supervised_network"):
        pooled = sum(f[f"{name}_accuracy"] * f["num_test"] for f in row["per_fold"]) / 1797
        assert row[f"{name}_accuracy"] == pytest.approx(pooled, abs=1e-12)


def test_gain_is_the_paired_difference_with_its_standard_error(script):
    m2 = torch.tensor([True, True, True, False, True, False])
    other = torch.tensor([True, False, False, False, True, True])
    g = script.gain({"m2": m2, "other": other}, "other")
    difference = torch.tensor([0., 1., 1., 0., 0., -1.])
    assert g["points"] == pytest.approx(100 * difference.mean().item())
    assert g["se_points"] == pytest.approx(100 * difference.std().item() / 6 ** 0.5)
    assert (g["only_m2_right"], g["only_baseline_right"]) == (2, 1)
