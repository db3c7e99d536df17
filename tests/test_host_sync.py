"""No host synchronisation per training step.

On a GPU, reading a device value back to the host (``.item()``, ``bool(t)``, indexing with a
0-d tensor, ``nonzero``, boolean masks) stalls the Python thread until every queued kernel has
run, and so does making a device tensor from Python data (``torch.tensor(0.5, device=...)``, a
synchronous copy): a step becomes bound by Python rather than kernel time. These tests find
such transfers on CPU, where CI runs: a dispatch mode sees every ATen operation, and the
operations that move a value between host and device are counted.
"""

from __future__ import annotations

import collections

import numpy as np
import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_vae import VAE, evaluate, fit
from pyro_vae.data import Dataset, LazyRows
from pyro_vae.distributed import LossModule
from pyro_vae.models.likelihoods import LIKELIHOODS
from pyro_vae.models.priors import PRIORS
from pyro_vae.objectives import OBJECTIVES, make_objective

#: ATen operations that, on a CUDA tensor, wait for the device and copy a value to the host, and
#: ``lift_fresh``: a tensor made from Python data, copied up synchronously.
HOST_READS = {"lift_fresh", "_local_scalar_dense", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "equal",
              "repeat_interleave", "masked_scatter", "masked_scatter_"}


class HostReads(TorchDispatchMode):
    """Counts host reads by ATen operation name; ``paused`` stops the counting."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and (name in HOST_READS or _boolean_index(name, args)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _boolean_index(name: str, args) -> bool:
    """Indexing with a boolean mask (``x[mask]``, ``x[mask] = v``): the kernel counts the mask's
    true elements on the host to size its result (an internal ``nonzero`` no mode sees)."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_") or len(args) < 2:
        return False
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)


def test_the_probe_sees_the_reads_it_is_meant_to_catch():
    x = torch.randn(5)
    with HostReads() as probe:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0]
        torch.arange(3)[torch.arange(3)[1]]
        torch.distributions.Normal(x, 1.0, validate_args=False)
    assert probe.counts == {"_local_scalar_dense": 3, "index": 1, "lift_fresh": 1}
    with HostReads() as probe:
        y = torch.where(x > 0, x, 0.0).exp().sum()
    assert not probe.counts and y > 0


def _step_reads(vae: VAE, objective: str, x: torch.Tensor, y=None) -> dict:
    particles = 3 if objective in ("iwae", "renyi", "dreg") else 1
    loss_module = LossModule(vae, make_objective(objective, particles))
    with pyro.validation_enabled(False):
        loss_module(x, y, num_data=1000).backward()   # first call: lazy set-up may read
        with HostReads() as probe:
            loss_module(x, y, num_data=1000).backward()
    return dict(probe.counts)


DISCRETE = ("categorical", "relaxed-categorical")
COMBINATIONS = [(prior, guide, objective) for prior in PRIORS if prior not in DISCRETE
                for guide in ("normal", "full-rank", "flow")
                for objective in OBJECTIVES
                if not (objective == "meanfield" and (guide == "flow" or prior not in
                                                      ("normal", "learned-normal")))]
# the discrete latent spaces (traced path): score-function gradients, and the relaxation
COMBINATIONS += [("categorical", "categorical", objective)
                 for objective in ("elbo", "iwae", "renyi", "vimco")]
COMBINATIONS += [("relaxed-categorical", "relaxed-categorical", objective)
                 for objective in ("elbo", "iwae", "renyi", "dreg", "stl", "vimco")]


@pytest.mark.parametrize("prior,guide,objective", COMBINATIONS)
def test_a_training_step_reads_nothing_back_to_the_host(digits, prior, guide, objective):
    """Forward and backward of every objective, for every prior and guide family. (The flow
    guide's inverse, run when a point is scored rather than sampled, read Pyro's permutation
    tensor element by element before: 2·d reads per layer and step.)"""
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 3, hidden=(16,), prior=prior, guide=guide)
    assert _step_reads(vae, objective, digits.train[:32]) == {}


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_likelihood_steps_without_host_reads(digits, likelihood):
    pyro.set_rng_seed(0)
    x = digits.train[:32]  # grey levels k/16
    if likelihood in ("poisson", "negative-binomial"):
        x = (x * 16).round()
    options = {"levels": 17} if likelihood == "categorical" else None
    vae = VAE(digits.data_shape, 3, hidden=(16,), likelihood=likelihood,
              likelihood_options=options)
    assert _step_reads(vae, "elbo", x) == {}


def test_a_conditional_step_reads_nothing_back(digits):
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 3, hidden=(16,), conditional=True, num_classes=10, guide="flow", prior="mog")
    assert _step_reads(vae, "dreg", digits.train[:32], digits.labels["train"][:32]) == {}


def _subset(dataset: Dataset, rows: int, streamed: np.ndarray | None) -> Dataset:
    train = (dataset.train[:rows] if streamed is None
             else LazyRows(streamed, np.arange(rows)))
    return Dataset(dataset.name, dataset.data_shape, train, dataset.val, dataset.test,
                   {"train": dataset.labels["train"][:rows], "val": dataset.labels["val"],
                    "test": dataset.labels["test"]})


@pytest.mark.parametrize("case", ["in memory", "memory-mapped", "conditional flow dreg"])
def test_host_reads_of_an_epoch_do_not_grow_with_its_steps(digits, tmp_path, monkeypatch, case):
    """One epoch of 4 steps and one of 16 make exactly the same number of host transfers: those
    of the first (validated) step, the loss read at step 0, the epoch's mean loss and the
    validation pass, none per step (beyond reading memory-mapped rows). Adam's own reads of its step counter are not counted: it
    keeps that counter on the host unless asked to capture graphs."""
    streamed = None
    if case == "memory-mapped":
        np.save(tmp_path / "train.npy", digits.train.numpy())
        streamed = np.load(tmp_path / "train.npy", mmap_mode="r")
    probe = HostReads()
    adam_step = torch.optim.Adam.step

    def uncounted_step(self, *args, **kwargs):
        probe.paused = True
        try:
            return adam_step(self, *args, **kwargs)
        finally:
            probe.paused = False

    monkeypatch.setattr(torch.optim.Adam, "step", uncounted_step)
    counts = []
    for steps in (4, 16):
        pyro.set_rng_seed(0)
        if case == "conditional flow dreg":
            vae, objective = VAE(digits.data_shape, 3, hidden=(16,), conditional=True, num_classes=10,
                                 guide="flow", prior="mog"), "dreg"
        else:
            vae, objective = VAE(digits.data_shape, 3, hidden=(16,)), "iwae"
        data = _subset(digits, 32 * steps, streamed)
        probe.counts.clear()
        with probe:
            result = fit(vae, data, objective, epochs=1, batch_size=32, log_every=1000,
                         progress=False, device="cpu")
        assert result.history[-1]["step"] == steps
        counts.append(dict(probe.counts))
    if case == "memory-mapped":
        # the one transfer a step must make: its rows, read from the file into a new tensor
        # (on a GPU staged through pinned memory and copied asynchronously)
        assert counts[1].pop("lift_fresh") - counts[0].pop("lift_fresh") == 16 - 4
    assert counts[0] == counts[1]


def test_evaluation_reads_back_once_not_per_batch(digits):
    """``evaluate`` accumulates every batch on the device and copies the results back at the
    end: 2 batches and 8 batches make the same host transfers."""
    vae = VAE(digits.data_shape, 3, hidden=(16,))
    counts = []
    for rows in (64, 256):
        with HostReads() as probe:
            evaluate(vae, digits.test[:rows], particles=20, batch_size=32)
        counts.append(dict(probe.counts))
    assert counts[0] == counts[1]
