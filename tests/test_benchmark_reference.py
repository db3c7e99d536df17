"""The benchmark's plain-PyTorch reference is the math pyro-vae's objectives must equal.

``benchmarks/bench_objectives.py`` times pyro-vae against bounds written by hand with
``torch.distributions``; before any timing it checks that both sides give the same loss and the
same gradients. Here that check runs for every objective, so an objective that drifts from its
textbook form (or a reference that drifts from pyro-vae) fails the test suite, not only a
benchmark run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyro
import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_objectives.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_objectives", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("name,K,options", [
    ("elbo", 1, {}), ("meanfield", 1, {}), ("iwae", 5, {}), ("renyi", 5, {"alpha": 0.5}),
    ("dreg", 5, {}), ("stl", 1, {}), ("stl", 5, {})])
def test_pyro_vae_equals_the_hand_written_reference(bench, name, K, options):
    config = bench.CONFIGS[0]
    train, data_shape = bench.load_train(config)
    num_data = train.shape[0]
    vae_p, vae_r = bench.build_vae(config, data_shape), bench.build_vae(config, data_shape)
    with pyro.validation_enabled(False):
        _, loss_module = bench.pyro_step_fn(vae_p, name, K, options, num_data)
        _, reference = bench.reference_step_fn(vae_r, name, K, options, num_data)
        check = bench.check_agreement(config, name, vae_p, vae_r, loss_module, reference,
                                      train[:64], num_data)
    # the same random draws: the losses are equal up to float32 summation order
    assert check["loss_rel_diff"] <= 1e-6
    assert check["grad_max_rel_diff"] <= bench.GRAD_TOL


def test_the_check_catches_a_wrong_gradient(bench):
    """DReG's reference without its gradient hook is IWAE: the check must refuse it."""
    config = bench.CONFIGS[0]
    train, data_shape = bench.load_train(config)
    vae_p, vae_r = bench.build_vae(config, data_shape), bench.build_vae(config, data_shape)
    with pyro.validation_enabled(False):
        _, loss_module = bench.pyro_step_fn(vae_p, "dreg", 5, {}, train.shape[0])
        reference = bench.Reference(vae_r, "iwae", 5)
        with pytest.raises(bench.CheckFailed, match="gradient mismatch"):
            bench.check_agreement(config, "dreg", vae_p, vae_r, loss_module, reference,
                                  train[:64], train.shape[0])


def test_the_epoch_benchmark_runs_both_sides(bench, monkeypatch):
    monkeypatch.setattr(bench, "EPOCH_CONFIG", bench.Config("small", "digits", (32,), 4, 256,
                                                            blocks=0, steps=0))
    rows = bench.bench_epoch(epochs=1, verbose=False)
    assert [row["side"] for row in rows] == ["pyro-vae", "reference"]
    assert all(row["epoch_s"] > 0 and row["kernel_s"] is None for row in rows)
    assert rows[0]["ratio"] == pytest.approx(rows[0]["epoch_s"] / rows[1]["epoch_s"])
    assert rows[0]["steps"] == 6  # ⌈1437 digits / 256⌉


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_is_one_error_line(bench, capsys):
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
