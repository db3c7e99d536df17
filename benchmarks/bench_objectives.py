"""Per-training-step cost of each pyro-vae objective against a plain-PyTorch reference.

For every configuration and objective, two VAEs are built from the same seed (so they start
with equal parameters). One is trained by pyro-vae exactly as ``pyro_vae.training._train``
does (``loss_module = objective(vae.model, vae.guide)``, ``loss_module(x, num_data=N)``,
``zero_grad / backward / step`` under ``pyro.validation_enabled(False)``); the other by the
code a person would write by hand without Pyro: it calls the same ``vae.encoder`` /
``vae.decoder`` modules and builds the densities with ``torch.distributions`` (Normal,
Bernoulli with logits, ``validate_args=False``). Each side has its own ``torch.optim.Adam``.

Before timing, the two losses *and all parameter gradients* are checked to agree on the same
batch under the same torch seed (the pyro-vae core draws z with ``rsample`` of an expanded
``[K, B]`` batch, which consumes the RNG exactly as ``q.rsample((K,))`` does); a mismatch
aborts the run.

Timing interleaves the two sides in blocks (a block = ``steps`` consecutive training steps
of one side; the side that goes first alternates from block to block), after warm-up blocks,
so machine noise hits both; the per-step time of a block is its wall time / ``steps``, and the
table reports the median over blocks and the ratio pyro-vae / reference. On Linux, the CPU
time other processes use during each pair of blocks is read from ``/proc``; pairs during which
they used more than a quarter of a core are set aside and replaced (within a time limit), and
the table says how many pairs were used. If too few quiet pairs come, all are used.

Evaluation throughput: ``pyro_vae.evaluate(vae, x, particles=5000)`` against a chunked
IWAE-5000 log-likelihood loop in plain torch with the same chunk sizes (its log-likelihoods
are checked against pyro-vae's too).

    python benchmarks/bench_objectives.py [--quick] [--json out.json]
    python benchmarks/bench_objectives.py --profile

``--quick`` skips the batch-1024 configuration and shortens the evaluation timing;
``--profile`` prints, instead of the table, a profile of the digits configuration: Python
calls, ATen ops and matmuls per step on both sides, interleaved forward / backward / Adam
timings, the Pyro and pyro-vae entries of a cProfile of each pyro-vae step, and
microbenchmarks of the pieces the pyro-vae forward adds. ``--threads N`` sets
``torch.set_num_threads`` (default: torch's default, here the number of cores); ``--only``
restricts the objectives.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import pyro
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import pyro_vae
from pyro_vae import VAE, evaluate, make_objective
from pyro_vae.training import resolve_device

LR = 1e-3
#: where the VAEs, the data and the reference run (``--device``)
DEVICE = torch.device("cpu")
REL_TOL = 1e-5
GRAD_TOL = 1e-4  # max |g_pyro - g_ref| / max |g_ref|, per parameter tensor


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    data: str            # "digits" or "synthetic784"
    hidden: tuple
    latent: int
    batch: int
    blocks: int          # timed blocks per side
    steps: int           # steps per block
    warmup_blocks: int = 2
    quick: bool = True   # included with --quick


CONFIGS = [
    Config("digits 64-256-256-8, B=128", "digits", (256, 256), 8, 128, blocks=30, steps=10),
    Config("mlp 784-400-20, B=128", "synthetic784", (400,), 20, 128, blocks=30, steps=10),
    Config("mlp 784-400-20, B=1024", "synthetic784", (400,), 20, 1024, blocks=20, steps=4,
           quick=False),
]

#: (name, K, extra options for make_objective)
OBJECTIVES = [
    ("elbo", 1, {}),
    ("meanfield", 1, {}),
    ("iwae", 5, {}),
    ("renyi", 5, {"alpha": 0.5}),
    ("dreg", 5, {}),
    ("stl", 1, {}),
]


def load_train(config: Config, rows: int = 10_000) -> tuple[torch.Tensor, tuple]:
    """The configuration's training data, on ``DEVICE``."""
    if config.data == "digits":
        dataset = pyro_vae.load_data("digits")
        return dataset.train.to(DEVICE), dataset.data_shape
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(rows, 784, generator=generator).to(DEVICE), (784,)


def build_vae(config: Config, data_shape, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(data_shape, latent_dim=config.latent, hidden=config.hidden,
               likelihood="bernoulli", guide="normal", prior="normal").to(DEVICE)


def synchronize() -> None:
    """Wait for queued GPU work, so that a timed block includes its kernels."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ---------------------------------------------------------------------------------------------
# the plain-PyTorch reference
# ---------------------------------------------------------------------------------------------
class Reference:
    """The same bounds written by hand with torch.distributions; calls ``vae.encoder`` and
    ``vae.decoder`` directly. Every loss is −(N/B)·Σ_batch bound."""

    def __init__(self, vae: VAE, name: str, particles: int, alpha: float = 0.5):
        self.vae, self.name, self.K, self.alpha = vae, name, particles, alpha
        self.min_scale = vae.guide_family.min_scale
        self.prior = Normal(torch.zeros(vae.latent_dim, device=vae.device),
                            torch.ones(vae.latent_dim, device=vae.device), validate_args=False)

    def loss(self, x: torch.Tensor, num_data: int) -> torch.Tensor:
        vae, K, name = self.vae, self.K, self.name
        loc, raw_scale = vae.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + self.min_scale
        q = Normal(loc, scale, validate_args=False)
        z = q.rsample((K,))                                                   # [K, B, D]
        log_px = Bernoulli(logits=vae.decoder(z), validate_args=False).log_prob(x).sum(-1)
        if name == "meanfield":
            kl = kl_divergence(q, self.prior).sum(-1)                         # [B]
            bound = log_px.mean(0) - kl
        else:
            log_pz = self.prior.log_prob(z).sum(-1)
            if name in ("stl", "dreg"):
                q_stopped = Normal(loc.detach(), scale.detach(), validate_args=False)
                log_q = q_stopped.log_prob(z).sum(-1)
            else:
                log_q = q.log_prob(z).sum(-1)
            log_w = log_px + log_pz - log_q                                   # [K, B]
            if name == "elbo" or (name == "stl" and K == 1):
                bound = log_w.mean(0)
            elif name in ("iwae", "stl"):
                bound = torch.logsumexp(log_w, 0) - math.log(K)
            elif name == "renyi":
                power = 1.0 - self.alpha
                bound = (torch.logsumexp(power * log_w, 0) - math.log(K)) / power
            elif name == "dreg":
                if torch.is_grad_enabled():
                    w_tilde = torch.softmax(log_w.detach(), 0).unsqueeze(-1)  # [K, B, 1]
                    z.register_hook(lambda grad: grad * w_tilde)
                bound = torch.logsumexp(log_w, 0) - math.log(K)
            else:
                raise ValueError(name)
        return -(num_data / x.shape[0]) * bound.sum()


@torch.no_grad()
def reference_log_likelihood(vae: VAE, x_all: torch.Tensor, particles: int,
                             batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """IWAE-K log-likelihood per datapoint, chunked over particles like ``evaluate``."""
    torch.manual_seed(seed)
    prior = Normal(torch.zeros(vae.latent_dim, device=x_all.device),
                   torch.ones(vae.latent_dim, device=x_all.device), validate_args=False)
    min_scale = vae.guide_family.min_scale
    width = max(vae.data_dim * 2, *vae.hidden, vae.latent_dim)
    out = []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size]
        chunk = max(1, min(particles, 2**26 // (x.shape[0] * width)))  # evaluate's chunking
        loc, raw_scale = vae.encoder(x).chunk(2, dim=-1)
        q = Normal(loc, F.softplus(raw_scale) + min_scale, validate_args=False)
        lse = torch.full((x.shape[0],), -math.inf, device=x.device)
        done = 0
        while done < particles:
            k = min(chunk, particles - done)
            z = q.rsample((k,))
            log_w = (Bernoulli(logits=vae.decoder(z), validate_args=False).log_prob(x).sum(-1)
                     + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
            done += k
        out.append(lse - math.log(particles))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# one training step per side
# ---------------------------------------------------------------------------------------------
def pyro_step_fn(vae: VAE, name: str, K: int, options: dict, num_data: int):
    objective = make_objective(name, K, **options)
    loss_module = objective(vae.model, vae.guide)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LR)

    def step(x):
        loss = loss_module(x, num_data=num_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, loss_module


def reference_step_fn(vae: VAE, name: str, K: int, options: dict, num_data: int):
    reference = Reference(vae, name, K, **options)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LR)

    def step(x):
        loss = reference.loss(x, num_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, reference


class CheckFailed(AssertionError):
    pass


def check_agreement(config: Config, label: str, vae_p: VAE, vae_r: VAE, loss_module,
                    reference: Reference, x: torch.Tensor, num_data: int) -> dict:
    """Same seed, same batch: losses agree to REL_TOL and every gradient to GRAD_TOL."""
    for (n_p, p), (n_r, r) in zip(vae_p.named_parameters(), vae_r.named_parameters()):
        if n_p != n_r or not torch.equal(p, r):
            raise CheckFailed(f"{label}: the two VAEs do not start equal ({n_p})")
    vae_p.zero_grad(set_to_none=True)
    vae_r.zero_grad(set_to_none=True)
    torch.manual_seed(2024)
    loss_p = loss_module(x, num_data=num_data)
    loss_p.backward()
    torch.manual_seed(2024)
    loss_r = reference.loss(x, num_data)
    loss_r.backward()
    lp, lr = float(loss_p.detach()), float(loss_r.detach())
    rel = abs(lp - lr) / max(abs(lr), 1e-30)
    if not rel <= REL_TOL:
        raise CheckFailed(f"{config.name} / {label}: loss mismatch pyro-vae {lp!r} vs "
                          f"reference {lr!r} (rel {rel:.2e} > {REL_TOL})")
    worst = 0.0
    for (name, p), r in zip(vae_p.named_parameters(), vae_r.parameters()):
        if p.grad is None or r.grad is None:
            if p.grad is None and r.grad is None:
                continue
            raise CheckFailed(f"{config.name} / {label}: gradient of {name} missing on one side")
        err = float((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-30))
        worst = max(worst, err)
        if not err <= GRAD_TOL:
            raise CheckFailed(f"{config.name} / {label}: gradient mismatch for {name} "
                              f"(rel {err:.2e} > {GRAD_TOL})")
    vae_p.zero_grad(set_to_none=True)
    vae_r.zero_grad(set_to_none=True)
    return {"loss_pyro_vae": lp, "loss_reference": lr, "loss_rel_diff": rel,
            "grad_max_rel_diff": worst}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class CpuMonitor:
    """CPU time used by *other* processes (Linux ``/proc``), to tell quiet blocks from
    contended ones on a shared machine; a no-op elsewhere."""

    TICK = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)

    def __init__(self):
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def _read(self):
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = user + nice + system + irq + softirq + steal
        with open("/proc/self/stat") as handle:
            text = handle.read()
        rest = text[text.rindex(")") + 2:].split()
        own = int(rest[11]) + int(rest[12])  # utime + stime of this process (all threads)
        return busy, own

    def start(self):
        return (self._read(), time.perf_counter()) if self.available else None

    def others_share(self, token) -> float:
        """Cores' worth of CPU used by other processes since ``start`` (0 when unknown)."""
        if token is None:
            return 0.0
        (busy0, own0), t0 = token
        busy1, own1 = self._read()
        wall = max(time.perf_counter() - t0, 1e-9)
        return max(0, (busy1 - busy0) - (own1 - own0)) * self.TICK / wall


MONITOR = CpuMonitor()
#: a block pair is "quiet" when other processes used at most this many cores' worth of CPU
MAX_OTHERS_SHARE = 0.25
#: give up waiting for quiet block pairs after this many times the asked-for number of pairs,
#: or after this many extra seconds per measurement, whichever comes first
MAX_BLOCK_FACTOR = 3
MAX_EXTRA_SECONDS = 10.0


def time_interleaved(step_a, step_b, batches, blocks: int, steps: int, warmup_blocks: int):
    """Per-step seconds of a and b, one value per timed block, over interleaved blocks (the
    side that goes first alternates). Block pairs during which other processes used more than
    ``MAX_OTHERS_SHARE`` cores are set aside and more pairs run, up to ``MAX_BLOCK_FACTOR`` ×
    ``blocks`` pairs and ``MAX_EXTRA_SECONDS`` beyond the first ``blocks`` pairs; if too few
    quiet pairs come, every pair is used and the result is flagged."""
    quiet = {"a": [], "b": []}
    every = {"a": [], "b": []}
    shares = []
    sides = {"a": step_a, "b": step_b}
    cursor = 0
    block = 0
    extra_since = None
    while True:
        order = ("a", "b") if block % 2 == 0 else ("b", "a")
        token = MONITOR.start()
        pair = {}
        for side in order:
            fn = sides[side]
            chosen = [batches[(cursor + i) % len(batches)] for i in range(steps)]
            synchronize()
            start = time.perf_counter()
            for x in chosen:
                fn(x)
            synchronize()
            pair[side] = (time.perf_counter() - start) / steps
        share = MONITOR.others_share(token)
        cursor += steps
        if block >= warmup_blocks:
            shares.append(share)
            for side in "ab":
                every[side].append(pair[side])
                if share <= MAX_OTHERS_SHARE:
                    quiet[side].append(pair[side])
        block += 1
        timed = block - warmup_blocks
        if timed == blocks:
            extra_since = time.perf_counter()
        if len(quiet["a"]) >= blocks or timed >= MAX_BLOCK_FACTOR * blocks or (
                extra_since is not None
                and time.perf_counter() - extra_since > MAX_EXTRA_SECONDS):
            break
    enough = len(quiet["a"]) >= max(min(5, blocks), blocks // 2)
    use = quiet if enough else every
    info = {"pairs_run": len(every["a"]), "pairs_quiet": len(quiet["a"]),
            "used": "quiet pairs" if enough else "all pairs (machine busy)",
            "others_cores_mean": statistics.mean(shares) if shares else 0.0}
    return use["a"], use["b"], info


def summarize(samples):
    q = statistics.quantiles(samples, n=4)
    return {"median_ms": 1e3 * statistics.median(samples), "p25_ms": 1e3 * q[0],
            "p75_ms": 1e3 * q[2], "n_blocks": len(samples)}


def bench_config(config: Config, verbose: bool = True) -> list[dict]:
    train, data_shape = load_train(config)
    num_data = train.shape[0]
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(num_data, generator=generator).to(DEVICE)
    n_batches = max(1, min(16, num_data // config.batch))
    batches = [train[order[i * config.batch:(i + 1) * config.batch]].contiguous()
               for i in range(n_batches)]
    rows = []
    for name, K, options in OBJECTIVES:
        pyro.clear_param_store()
        vae_p = build_vae(config, data_shape)
        vae_r = build_vae(config, data_shape)
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            step_p, loss_module = pyro_step_fn(vae_p, name, K, options, num_data)
            step_r, reference = reference_step_fn(vae_r, name, K, options, num_data)
            check = check_agreement(config, name, vae_p, vae_r, loss_module, reference,
                                    batches[0], num_data)
            t_p, t_r, timing = time_interleaved(step_p, step_r, batches, config.blocks,
                                                config.steps, config.warmup_blocks)
        sp, sr = summarize(t_p), summarize(t_r)
        row = {"configuration": config.name, "objective": name, "K": K,
               "batch": config.batch, "pyro_vae_ms": sp["median_ms"],
               "reference_ms": sr["median_ms"], "ratio": sp["median_ms"] / sr["median_ms"],
               "pyro_vae_ms_p25_p75": [sp["p25_ms"], sp["p75_ms"]],
               "reference_ms_p25_p75": [sr["p25_ms"], sr["p75_ms"]],
               "steps_per_block": config.steps, "timing": timing, "check": check}
        rows.append(row)
        if verbose:
            print(f"  {config.name:26s} {name:9s} K={K}  pyro-vae {sp['median_ms']:8.3f} ms  "
                  f"reference {sr['median_ms']:8.3f} ms  ratio {row['ratio']:.2f}  "
                  f"[{timing['pairs_quiet']}/{timing['pairs_run']} quiet block pairs, others "
                  f"{timing['others_cores_mean']:.2f} cores]  (check: loss rel {check['loss_rel_diff']:.1e}, "
                  f"grad rel {check['grad_max_rel_diff']:.1e})", flush=True)
    return rows


def bench_evaluation(repeats: int, particles: int = 5000, n_points: int = 200,
                     verbose: bool = True) -> dict:
    config = CONFIGS[0]
    train, data_shape = load_train(config)
    x = train[:n_points].contiguous()
    pyro.clear_param_store()
    vae = build_vae(config, data_shape)
    # Check: same seed and chunking give the same log-likelihoods.
    ll_p = evaluate(vae, x, particles=particles, seed=0).log_likelihood
    vae.eval()
    ll_r = reference_log_likelihood(vae, x, particles, seed=0)
    vae.train()
    rel = float((ll_p - ll_r).abs().max() / ll_r.abs().max())
    if not rel <= REL_TOL:
        raise CheckFailed(f"evaluation: log-likelihood mismatch (max rel {rel:.2e})")
    def run_pyro_vae(points):
        evaluate(vae, points, particles=particles, seed=0)

    def run_reference(points):
        vae.eval()
        try:
            reference_log_likelihood(vae, points, particles, seed=0)
        finally:
            vae.train()

    t_p, t_r, timing = time_interleaved(run_pyro_vae, run_reference, [x], blocks=repeats,
                                        steps=1, warmup_blocks=0)
    mp, mr = statistics.median(t_p), statistics.median(t_r)
    row = {"configuration": f"{config.name} (evaluate, {n_points} points)",
           "objective": "evaluate (IWAE log p(x))", "K": particles,
           "pyro_vae_ms": 1e3 * mp, "reference_ms": 1e3 * mr, "ratio": mp / mr,
           "pyro_vae_datapoints_per_s": n_points / mp,
           "reference_datapoints_per_s": n_points / mr, "repeats": repeats, "timing": timing,
           "check": {"log_likelihood_max_rel_diff": rel,
                     "mean_log_likelihood": float(ll_p.mean())}}
    if verbose:
        print(f"  evaluate K={particles} on {n_points} digits: pyro-vae {mp:.3f} s  "
              f"reference {mr:.3f} s  ratio {mp / mr:.2f}  [{timing['pairs_quiet']}/"
              f"{timing['pairs_run']} quiet pairs]  (check: rel {rel:.1e})", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# one epoch (--epoch)
# ---------------------------------------------------------------------------------------------
EPOCH_CONFIG = Config("mlp 784-400-20, B=128, 60,000 rows", "synthetic784", (400,), 20, 128,
                      blocks=0, steps=0)


def _kernel_seconds(run) -> float | None:
    """Seconds the GPU spent in kernels and copies while ``run()`` ran (``None`` off CUDA)."""
    if DEVICE.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        synchronize()
    return sum(event.time_range.elapsed_us() for event in prof.events()
               if event.device_type == DeviceType.CUDA) / 1e6


def bench_epoch(epochs: int = 5, verbose: bool = True) -> list[dict]:
    """One MNIST-size epoch of training steps on each side: the minibatch order drawn on the
    device, rows gathered from the resident data, and the loss read back every 10 steps (as
    ``pyro_vae.fit`` does). The two sides alternate epoch by epoch (the one that goes first
    switches); wall time is the median over ``epochs`` epochs. On CUDA one more, profiled epoch
    per side gives the GPU's kernel time, and busy = kernel time / wall time: near 1, an epoch
    is bounded by kernels; well below 1, by the Python that launches them."""
    config = EPOCH_CONFIG
    train, data_shape = load_train(config, rows=60_000)
    num_data = train.shape[0]
    sides = {}
    for side in ("pyro-vae", "reference"):
        pyro.clear_param_store()
        vae = build_vae(config, data_shape)
        make = pyro_step_fn if side == "pyro-vae" else reference_step_fn
        sides[side] = make(vae, "elbo", 1, {}, num_data)[0]
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def epoch(side: str) -> None:
        step = sides[side]
        order = torch.randperm(num_data, generator=generator, device=DEVICE)
        for i, batch in enumerate(order.split(config.batch)):
            loss = step(train[batch])
            if (i + 1) % 10 == 0:
                float(loss.detach())

    walls: dict[str, list[float]] = {side: [] for side in sides}
    kernels: dict[str, float | None] = {}
    with pyro.validation_enabled(False):
        for side in sides:
            epoch(side)  # warm-up
        for e in range(epochs):
            for side in (("pyro-vae", "reference") if e % 2 == 0 else ("reference", "pyro-vae")):
                synchronize()
                start = time.perf_counter()
                epoch(side)
                synchronize()
                walls[side].append(time.perf_counter() - start)
        for side in sides:
            kernels[side] = _kernel_seconds(lambda: epoch(side))
    rows = []
    for side in sides:
        wall = statistics.median(walls[side])
        rows.append({"side": side, "configuration": config.name, "objective": "elbo",
                     "steps": math.ceil(num_data / config.batch), "epoch_s": wall,
                     "epoch_s_all": walls[side], "kernel_s": kernels[side],
                     "busy": None if kernels[side] is None else kernels[side] / wall})
        if verbose:
            busy = ("" if kernels[side] is None
                    else f", GPU kernels {kernels[side]:.3f} s (busy {rows[-1]['busy']:.0%})")
            print(f"  {side:9s} epoch {wall:.3f} s{busy}", flush=True)
    rows[0]["ratio"] = rows[0]["epoch_s"] / rows[1]["epoch_s"]
    return rows


def epoch_table(rows: list[dict]) -> str:
    lines = [f"\n{rows[0]['configuration']}, elbo, {rows[0]['steps']} steps\n",
             "| side | epoch s | GPU kernel s | GPU busy |", "|---|---:|---:|---:|"]
    for row in rows:
        kernels = "" if row["kernel_s"] is None else f"{row['kernel_s']:.3f}"
        busy = "" if row["busy"] is None else f"{row['busy']:.0%}"
        lines.append(f"| {row['side']} | {row['epoch_s']:.3f} | {kernels} | {busy} |")
    lines.append(f"\nratio pyro-vae / reference: {rows[0]['ratio']:.2f}×")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# profiling (--profile)
# ---------------------------------------------------------------------------------------------
def _phase_step(step_parts):
    """A training step that returns the wall time of (forward, backward, optimizer step)."""
    loss_fn, optimizer = step_parts

    def step(x):
        t0 = time.perf_counter()
        loss = loss_fn(x)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step


def _count_python_calls(fn, x, n):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        fn(x)
    profiler.disable()
    stats = pstats.Stats(profiler)
    return stats.total_calls / n, stats


def _count_aten_ops(fn, x, n):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn(x)
    ops = matmuls = 0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ops += event.count
            if event.key in ("aten::addmm", "aten::mm", "aten::bmm"):
                matmuls += event.count
    return ops / n, matmuls / n


def profile_steps(n_steps: int = 200, blocks: int = 20, top: int = 25) -> str:
    """Where pyro-vae's extra time goes (digits configuration), with evidence that does not
    depend on machine noise (Python calls and ATen ops per step) and interleaved phase timings
    (forward = loss, backward = zero_grad + backward, step = Adam)."""
    config = CONFIGS[0]
    train, data_shape = load_train(config)
    num_data = train.shape[0]
    x = train[:config.batch].contiguous()
    out = io.StringIO()
    out.write(f"\n## Profile: {config.name}\n\n")
    out.write("Forward / backward / Adam: medians over interleaved blocks of 10 steps (quiet block "
              "pairs preferred, as in the timing table).\n\n")
    out.write("| objective | K | Python calls/step pyro-vae / ref | ATen ops/step pyro-vae / ref "
              "| matmuls/step pyro-vae / ref | forward ms pyro-vae / ref | backward ms "
              "pyro-vae / ref | Adam ms pyro-vae / ref |\n|---|---:|---|---|---|---|---|---|\n")
    details = []
    for name, K, options in OBJECTIVES:
        pyro.clear_param_store()
        vae_p = build_vae(config, data_shape)
        vae_r = build_vae(config, data_shape)
        with pyro.validation_enabled(False):
            objective = make_objective(name, K, **options)
            loss_module = objective(vae_p.model, vae_p.guide)
            reference = Reference(vae_r, name, K, **options)
            parts_p = (lambda x: loss_module(x, num_data=num_data),
                       torch.optim.Adam(vae_p.parameters(), lr=LR))
            parts_r = (lambda x: reference.loss(x, num_data),
                       torch.optim.Adam(vae_r.parameters(), lr=LR))
            step_p, step_r = _phase_step(parts_p), _phase_step(parts_r)
            for _ in range(20):
                step_p(x), step_r(x)
            calls_p, stats_p = _count_python_calls(step_p, x, n_steps)
            calls_r, _ = _count_python_calls(step_r, x, n_steps)
            ops_p, mm_p = _count_aten_ops(step_p, x, 20)
            ops_r, mm_r = _count_aten_ops(step_r, x, 20)
            phases = {"p": [], "r": []}
            block = 0
            while len(phases["p"]) < blocks and block < MAX_BLOCK_FACTOR * blocks:
                token = MONITOR.start()
                pair = {}
                for side in (("p", "r") if block % 2 == 0 else ("r", "p")):
                    fn = step_p if side == "p" else step_r
                    pair[side] = [fn(x) for _ in range(10)]
                if MONITOR.others_share(token) <= MAX_OTHERS_SHARE or \
                        block >= MAX_BLOCK_FACTOR * blocks - (blocks - len(phases["p"])):
                    for side in pair:
                        phases[side].append(pair[side])
                block += 1
        med = {side: [1e3 * statistics.median(statistics.mean(s[i] for s in block)
                                                for block in phases[side]) for i in range(3)]
               for side in phases}
        out.write(f"| {name} | {K} | {calls_p:.0f} / {calls_r:.0f} | {ops_p:.0f} / {ops_r:.0f} "
                  f"| {mm_p:.0f} / {mm_r:.0f} | {med['p'][0]:.3f} / {med['r'][0]:.3f} "
                  f"| {med['p'][1]:.3f} / {med['r'][1]:.3f} | {med['p'][2]:.3f} / "
                  f"{med['r'][2]:.3f} |\n")
        text = io.StringIO()
        stats_p.stream = text
        text.write(f"\n### cProfile, pyro-vae {name} (K={K}), {n_steps} steps (forward, backward "
                   "and Adam), Pyro and pyro-vae functions by cumulative time\n")
        stats_p.sort_stats("cumulative").print_stats(r"pyro/|pyro_vae/|models/|guides/", top)
        details.append(text.getvalue())
    out.write(pyro_pieces(config, data_shape, x, num_data))
    return out.getvalue() + "".join(details)


def pyro_pieces(config: Config, data_shape, x: torch.Tensor, num_data: int) -> str:
    """Microbenchmarks (wall time, best of 5 runs) of the pieces a pyro-vae forward
    adds to the hand-written one, and of one encoder forward (the second guide pass of
    stl/dreg)."""
    import pyro.poutine as poutine

    pyro.clear_param_store()
    vae = build_vae(config, data_shape)
    prefix = vae._pyro_name
    z_dist = vae.prior.distribution()

    def best_us(fn, n=1000):
        for _ in range(50):
            fn()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - start) / n * 1e6)
        return min(runs)

    def modules():
        for part in ("decoder", "prior", "likelihood", "encoder", "guide_family"):
            pyro.module(f"{prefix}.{part}", getattr(vae, part))

    def plates():
        with pyro.plate("particles", 1, dim=-2), vae._data_plate(x, num_data):
            pass

    def one_site():
        with pyro.plate("particles", 1, dim=-2), vae._data_plate(x, num_data):
            pyro.sample("z", z_dist)

    rows = []
    with pyro.validation_enabled(False):
        rows.append(("the 5 pyro.module registrations of model + guide, under poutine.trace",
                     best_us(lambda: poutine.trace(modules).get_trace()),
                     "1 (stl/dreg: + 2 more registrations)"))
        rows.append(("enter/exit particles plate + subsampled data plate",
                     best_us(plates), "2 (3 for stl/dreg)"))
        rows.append(("one sample site in both plates, traced (incl. plates)",
                     best_us(lambda: poutine.trace(one_site).get_trace()),
                     "3 (4 for stl/dreg)"))
        with torch.no_grad():
            rows.append(("encoder forward (what the 2nd guide pass of stl/dreg recomputes)",
                         best_us(lambda: vae.encoder(x)), "0 (1 for stl/dreg)"))
    text = ["\n### Pieces of the pyro-vae forward (µs of wall time, best of 5 runs; "
            f"{torch.get_num_threads()} threads)\n",
            "| piece | µs | times per pyro-vae step |", "|---|---:|---|"]
    text += [f"| {label} | {us:.0f} | {times} |" for label, us, times in rows]
    return "\n".join(text) + "\n"


# ---------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    lines = ["| configuration | objective | K | pyro-vae ms/step | reference ms/step | ratio "
             "| block pairs used |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        timing = row.get("timing", {})
        if not timing:
            quiet = ""
        elif timing["used"] == "quiet pairs":
            quiet = f"{timing['pairs_quiet']} of {timing['pairs_run']}"
        else:
            quiet = f"all {timing['pairs_run']} (only {timing['pairs_quiet']} quiet: busy)"
        lines.append(f"| {row['configuration']} | {row['objective']} | {row['K']} | "
                     f"{row['pyro_vae_ms']:.3f} | {row['reference_ms']:.3f} | "
                     f"{row['ratio']:.2f}× | {quiet} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip the batch-1024 configuration; fewer evaluation repeats")
    parser.add_argument("--json", metavar="FILE", help="write the rows to FILE as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the timing table, profile the digits configuration "
                             "(Python calls, ATen ops, phase timings, cProfile, pieces)")
    parser.add_argument("--only", nargs="*", metavar="OBJECTIVE",
                        help="benchmark only these objectives")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda[:i]",
                        help="where both sides run (default cpu); on CUDA each timed block "
                             "ends with a synchronisation, so it includes its kernels")
    parser.add_argument("--epoch", action="store_true",
                        help="instead of the table: one MNIST-size epoch (60,000 rows, "
                             "784-400-20, B=128, elbo) of each side, its wall time and, on "
                             "CUDA, the share of it the GPU spent running kernels")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    try:
        DEVICE = resolve_device(args.device)
    except pyro_vae.PyroVAEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    global OBJECTIVES
    if args.only:
        OBJECTIVES = [o for o in OBJECTIVES if o[0] in args.only]
    environment = {"torch": torch.__version__, "pyro": pyro.__version__,
                   "python": platform.python_version(), "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "processor": platform.processor(),
                   "device": str(DEVICE)}
    if DEVICE.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(DEVICE)
    print(f"torch {environment['torch']}, pyro {environment['pyro']}, "
          f"{environment['threads']} torch threads, device {DEVICE}"
          + (f" ({environment['gpu']})" if "gpu" in environment else ""), flush=True)
    if args.profile:
        print(profile_steps())
        return 0
    if args.epoch:
        rows = bench_epoch()
        print(epoch_table(rows))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"environment": environment, "epoch": rows}, handle, indent=2)
        return 0
    environment["loadavg_start"] = os.getloadavg()
    started = time.perf_counter()
    rows = []
    try:
        for config in CONFIGS:
            if args.quick and not config.quick:
                continue
            rows.extend(bench_config(config))
        rows.append(bench_evaluation(repeats=3 if args.quick else 5))
    except CheckFailed as exc:
        print(f"CORRECTNESS CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    environment["loadavg_end"] = os.getloadavg()
    print()
    print(markdown_table(rows))
    print(f"\n(total {elapsed:.0f} s; 1-minute load average {environment['loadavg_start'][0]:.2f} "
          f"at the start, {environment['loadavg_end'][0]:.2f} at the end, on "
          f"{os.cpu_count()} CPUs: a load above ~1 means other processes shared the cores)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "quick": args.quick,
                       "elapsed_s": elapsed, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
