"""Two-process DDP training on CPU (gloo) through torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pyro
import pytest
import torch

from pyro_vae import VAE, evaluate, load_data
from pyro_vae.objectives import make_objective

WORLD, EPOCHS, BATCH, SEED = 2, 2, 64, 3

WORKER = textwrap.dedent("""
    import json, os, sys, pyro, torch
    from pyro_vae import VAE, fit, load_data
    out = sys.argv[1]
    torch.set_num_threads(1)
    data = load_data("digits")
    pyro.set_rng_seed(0)
    vae = VAE(data.data_shape, 2, hidden=(16,))
    result = fit(vae, data, "iwae", particles=2, epochs={epochs}, batch_size={batch}, seed={seed},
                 device="cpu", progress=False, out=os.path.join(out, "run"))
    rank = os.environ["RANK"]
    torch.save({{k: v.detach() for k, v in vae.state_dict().items()}},
               os.path.join(out, f"rank{{rank}}.pt"))
    with open(os.path.join(out, f"history{{rank}}.json"), "w") as handle:
        json.dump(result.history, handle)
""").format(epochs=EPOCHS, batch=BATCH, seed=SEED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
            f"--master_port={_free_port()}", *argv]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=WORLD argv...``, one thread per process."""
    return subprocess.run(_torchrun_command(*argv), capture_output=True, text=True,
                          env=TORCHRUN_ENV, timeout=600)


def _reference_state() -> dict:
    """One process, the same minibatches and random draws: each shard's loss is computed with
    that rank's random stream (seed + rank), the gradients averaged as DDP averages them."""
    data = load_data("digits")
    pyro.set_rng_seed(0)
    vae = VAE(data.data_shape, 2, hidden=(16,))
    objective = make_objective("iwae", 2)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    streams = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        streams.append(torch.get_rng_state())
    order_generator = torch.Generator().manual_seed(SEED)
    n = len(data.train)
    with pyro.validation_enabled(False):
        for _ in range(EPOCHS):
            order = torch.randperm(n, generator=order_generator)
            for start in range(0, n, BATCH):
                shards = order[start:start + BATCH].tensor_split(WORLD)
                optimizer.zero_grad()
                grads = [torch.zeros_like(p) for p in vae.parameters()]
                for rank, shard in enumerate(shards):
                    torch.set_rng_state(streams[rank])
                    loss = objective.differentiable_loss(vae.model, vae.guide, data.train[shard],
                                                         None, num_data=n)
                    streams[rank] = torch.get_rng_state()
                    for g, p in zip(grads, torch.autograd.grad(loss, list(vae.parameters()))):
                        g += p / WORLD
                for p, g in zip(vae.parameters(), grads):
                    p.grad = g
                optimizer.step()
    return {k: v.detach() for k, v in vae.state_dict().items()}


def test_two_process_ddp_matches_single_process_training_on_the_combined_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = _torchrun(str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # identical on every rank: DDP applies the same averaged gradient everywhere
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # equal to one process doing the same updates (summation order differs: float tolerance)
    reference = _reference_state()
    for k in reference:
        assert torch.allclose(ranks[0][k], reference[k], rtol=1e-4, atol=1e-5), k
    # only rank 0 wrote the run directory, and it holds the full epochs
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS
    # validation: each rank scored its half of the split, the sums were all-reduced, so both
    # ranks report the same ELBO and SE, those of the two halves scored together
    histories = [json.loads((tmp_path / f"history{r}.json").read_text()) for r in range(WORLD)]
    last = [history[-1] for history in histories]
    assert last[0]["val_elbo"] == last[1]["val_elbo"]
    assert last[0]["val_elbo_se"] == last[1]["val_elbo_se"]
    assert json.loads(lines[-1])["val_elbo"] == last[0]["val_elbo"]
    data = load_data("digits")
    vae = VAE(data.data_shape, 2, hidden=(16,))
    vae.load_state_dict(ranks[0])
    halves = torch.arange(len(data.val)).tensor_split(WORLD)
    elbo = torch.cat([evaluate(vae, data.val[part], particles=1, seed=EPOCHS * WORLD + r).elbo
                      for r, part in enumerate(halves)]).double()
    assert last[0]["val_elbo"] == pytest.approx(float(elbo.mean()), rel=1e-6)
    se = float(elbo.std() / math.sqrt(len(elbo)))
    assert last[0]["val_elbo_se"] == pytest.approx(se, rel=1e-5)
    assert not any(p.name.startswith("run") and p.name != "run" for p in tmp_path.iterdir())


def test_torchrun_cli_trains_and_rank_zero_reports(tmp_path):
    done = _torchrun("-m", "pyro_vae.cli", "train", "--epochs", "1", "--hidden", "16",
                     "--latent-dim", "2", "--quiet", "--eval-particles", "5",
                     "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1
    assert (tmp_path / "run" / "evaluation.json").exists()


TRAIN_FLAGS = ["--hidden", "16", "--latent-dim", "2", "--quiet", "--eval-particles", "0",
               "--threads", "1"]
SIGNAL_WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from pyro_vae.cli import main
    out = Path(sys.argv[1])
    (out / f"pid{{os.environ['RANK']}}").write_text(str(os.getpid()))
    sys.exit(main(["train", "--epochs", "100000", *{flags!r}, "--out", str(out / "run")]))
""").format(flags=TRAIN_FLAGS)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path):
    """A scheduler's SIGTERM to rank 1 alone: the ranks agree on the stop at the next logging
    step, so rank 0 is not left waiting in an all-reduce; it saves the checkpoint at that step
    with both ranks' random-number streams. Resumed under torchrun, the run ends exactly where
    an uninterrupted one does; one process can resume it too."""
    script = tmp_path / "worker.py"
    script.write_text(SIGNAL_WORKER)
    process = subprocess.Popen(_torchrun_command(str(script), str(tmp_path)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=TORCHRUN_ENV)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    stops = re.findall(r"interrupted by SIGTERM at epoch (\d+), step (\d+)(.*)", stderr)
    assert len(stops) == WORLD, stderr[-3000:]
    assert len({(epoch, step) for epoch, step, _ in stops}) == 1  # the same step on every rank
    epoch, step = int(stops[0][0]), int(stops[0][1])
    assert step % 10 == 0  # a logging step
    assert sum("checkpoint saved" in rest for *_, rest in stops) == 1
    assert sum("rank 1; rank 0 saves the checkpoint" in rest for *_, rest in stops) == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (int(checkpoint["epoch"]), int(checkpoint["step"])) == (epoch, step)
    assert len(checkpoint["rng"]["ranks"]) == WORLD
    # one process resumes a copy, with rank 0's stream
    from pyro_vae.cli import main

    shutil.copytree(tmp_path / "run", tmp_path / "single")
    assert main(["train", "--resume", str(tmp_path / "single"), "--epochs", str(epoch),
                 "--quiet"]) == 0
    assert len((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()) == epoch
    # torchrun resumes the run itself, and ends where an uninterrupted run ends
    done = _torchrun("-m", "pyro_vae.cli", "train", "--resume", str(tmp_path / "run"),
                     "--epochs", str(epoch), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(metrics.read_text().splitlines()) == epoch
    done = _torchrun("-m", "pyro_vae.cli", "train", "--epochs", str(epoch), *TRAIN_FLAGS,
                     "--out", str(tmp_path / "straight"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    straight_rows = [json.loads(line) for line in
                     (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_elbo"] for r in rows] == [r["val_elbo"] for r in straight_rows]
    assert rows[-1]["train_loss"] == pytest.approx(straight_rows[-1]["train_loss"], rel=1e-6)
    # the single-process checkpoint of the copy is not resumed by two processes
    done = _torchrun("-m", "pyro_vae.cli", "train", "--resume", str(tmp_path / "single"),
                     "--epochs", str(epoch + 1), "--quiet")
    assert done.returncode != 0
    assert "checkpointed by 1 process(es); resume it without torchrun" in done.stderr
