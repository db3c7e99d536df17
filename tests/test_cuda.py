"""The GPU path. These tests run where CUDA is available and skip cleanly elsewhere (CI)."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import VAE, evaluate, fit, load_data
from pyro_vae.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_cli_trains_evaluates_and_samples_on_cuda(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--epochs", "3", "--quiet", "--eval-particles",
                 "100", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--device", "cuda", "--particles", "50", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(summary["log_likelihood"])
    assert main(["sample", str(out), "--out", str(tmp_path / "s.png")]) == 0


def test_data_stay_on_the_device_and_results_match_cpu_closely():
    data = load_data("digits")
    results = {}
    for device in ("cpu", "cuda"):
        pyro.set_rng_seed(0)
        vae = VAE(data.data_shape, 4, hidden=(64,))
        fit(vae, data, "elbo", epochs=5, progress=False, device=device)
        assert vae.device.type == device
        results[device] = evaluate(vae.to("cpu"), data, particles=200).summary["log_likelihood"]
    # different random streams on the two devices: agreement within a few standard errors
    assert abs(results["cpu"] - results["cuda"]) < 1.0


def test_resume_on_cuda_is_exact(tmp_path):
    data = load_data("digits")
    for name, epochs in (("straight", 4), ("resumed", 2)):
        pyro.set_rng_seed(0)
        fit(VAE(data.data_shape, 2, hidden=(32,)), data, "iwae", epochs=epochs, device="cuda",
            progress=False, out=tmp_path / name)
    from pyro_vae.training import resume

    resume(tmp_path / "resumed", epochs=4, device="cuda", progress=False)
    a = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
