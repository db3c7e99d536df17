"""The GPU path. These tests run where CUDA is available and skip cleanly elsewhere (CI)."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import VAE, evaluate, fit, load_data
from pyro_vae.cli import main
from pyro_vae.distributed import LossModule
from pyro_vae.objectives import make_objective

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
    pyro.set_rng_seed(0)
    vae = VAE(data.data_shape, 4, hidden=(64,))
    untrained = evaluate(vae, data, particles=100).summary
    fit(vae, data, "elbo", epochs=5, progress=False, device="cuda")
    assert vae.device.type == "cuda" and all(p.is_cuda for p in vae.parameters())
    trained = evaluate(vae, data, particles=100).summary
    # training on the GPU improves the held-out bound by more than 3 standard errors (the SEs
    # over test datapoints, combined as if independent: conservative for the same test set)
    gain_se = (trained["log_likelihood_se"] ** 2 + untrained["log_likelihood_se"] ** 2) ** 0.5
    assert trained["log_likelihood"] - untrained["log_likelihood"] > 3 * gain_se
    # the same weights scored on both devices: two independent Monte Carlo estimates of the same
    # IWAE-1000 log-likelihood, so they differ by their Monte Carlo error alone
    on_gpu = evaluate(vae, data, particles=1000).summary
    on_cpu = evaluate(vae.to("cpu"), data, particles=1000).summary
    se = (on_gpu["log_likelihood_mc_se"] ** 2 + on_cpu["log_likelihood_mc_se"] ** 2) ** 0.5
    # (+ 1e-4: float32 rounding of ~25-nat sums, which the two devices order differently)
    assert abs(on_gpu["log_likelihood"] - on_cpu["log_likelihood"]) < 3 * se + 1e-4


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


STEP_CASES = [("normal", "normal", "elbo"), ("normal", "normal", "meanfield"),
              ("normal", "normal", "iwae"), ("normal", "normal", "renyi"),
              ("normal", "full-rank", "dreg"), ("vamp", "flow", "stl"), ("studentt", "flow", "dreg"),
              ("mog", "normal", "iwae"), ("flow", "normal", "elbo")]


@pytest.mark.parametrize("prior,guide,objective", STEP_CASES)
def test_training_steps_never_synchronise_the_device(prior, guide, objective):
    """torch's sync debug mode turns every host synchronisation (a value read back, a
    synchronous copy) into an error: the steps after the first run without one."""
    data = load_data("digits", device="cuda")
    pyro.set_rng_seed(0)
    vae = VAE(data.data_shape, 4, hidden=(64,), prior=prior, guide=guide).to("cuda")
    loss_module = LossModule(vae, make_objective(objective, 5 if objective in ("iwae", "renyi", "dreg") else 1))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    num_data = data.train.shape[0]

    def step(i: int) -> torch.Tensor:
        loss = loss_module(data.train[i * 64:(i + 1) * 64], num_data=num_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    with pyro.validation_enabled(False):
        step(0)  # first step: lazy initialisation (cuBLAS handles, Adam's state)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [step(i) for i in range(1, 6)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


def test_memory_mapped_rows_are_indexed_on_the_host_and_train_like_in_memory(tmp_path, monkeypatch):
    """Streamed rows are read on the host: the minibatch order stays there (pinned), so no
    index is copied back from the device; the rows go up asynchronously. Training matches
    in-memory training on the same device."""
    from pyro_vae.data import LazyRows, from_array

    values = np.random.default_rng(1).random((300, 12)).astype(np.float32)
    np.save(tmp_path / "rows.npy", values)
    keys = []
    read = LazyRows.__getitem__

    def recording(self, key):
        keys.append(key)
        return read(self, key)

    monkeypatch.setattr(LazyRows, "__getitem__", recording)
    results = []
    for dataset in (load_data(str(tmp_path / "rows.npy")), from_array(values)):
        pyro.set_rng_seed(0)
        vae = VAE(12, 2, hidden=(16,))
        fit(vae, dataset, "iwae", particles=2, epochs=2, batch_size=32, progress=False,
            device="cuda")
        results.append([p.detach().cpu() for p in vae.parameters()])
    tensor_keys = [key for key in keys if torch.is_tensor(key)]
    assert tensor_keys and all(key.device.type == "cpu" for key in tensor_keys)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
