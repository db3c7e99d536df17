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
table reports the median over blocks and the ratio pyro-vae / reference.

Evaluation throughput: ``pyro_vae.evaluate(vae, x, particles=5000)`` against a chunked
IWAE-5000 log-likelihood loop in plain torch with the same chunk sizes (its log-likelihoods
are checked against pyro-vae's too).

    python benchmarks/bench_objectives.py [--quick] [--json out.json] [--profile]

``--quick`` skips the batch-1024 configuration and shortens the evaluation timing;
``--profile`` adds cProfile summaries of pyro-vae training steps (digits configuration).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
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

LR = 1e-3
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
    Config("mlp 784-400-20, B=1024", "synthetic784", (400,), 20, 1024, blocks=12, steps=5,
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


def load_train(config: Config) -> tuple[torch.Tensor, tuple]:
    if config.data == "digits":
        dataset = pyro_vae.load_data("digits")
        return dataset.train, dataset.data_shape
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(10_000, 784, generator=generator), (784,)


def build_vae(config: Config, data_shape, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(data_shape, latent_dim=config.latent, hidden=config.hidden,
               likelihood="bernoulli", guide="normal", prior="normal")


# ---------------------------------------------------------------------------------------------
# the plain-PyTorch reference
# ---------------------------------------------------------------------------------------------
class Reference:
    """The same bounds written by hand with torch.distributions; calls ``vae.encoder`` and
    ``vae.decoder`` directly. Every loss is −(N/B)·Σ_batch bound."""

    def __init__(self, vae: VAE, name: str, particles: int, alpha: float = 0.5):
        self.vae, self.name, self.K, self.alpha = vae, name, particles, alpha
        self.min_scale = vae.guide_family.min_scale
        self.prior = Normal(torch.zeros(vae.latent_dim), torch.ones(vae.latent_dim),
                            validate_args=False)

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
    prior = Normal(torch.zeros(vae.latent_dim), torch.ones(vae.latent_dim), validate_args=False)
    min_scale = vae.guide_family.min_scale
    width = max(vae.data_dim * 2, *vae.hidden, vae.latent_dim)
    out = []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size]
        chunk = max(1, min(particles, 2**26 // (x.shape[0] * width)))  # evaluate's chunking
        loc, raw_scale = vae.encoder(x).chunk(2, dim=-1)
        q = Normal(loc, F.softplus(raw_scale) + min_scale, validate_args=False)
        lse = torch.full((x.shape[0],), -math.inf)
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
    lp, lr = float(loss_p), float(loss_r)
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
def time_interleaved(step_a, step_b, batches, blocks: int, steps: int, warmup_blocks: int):
    """Median per-step seconds of a and b over interleaved blocks (order alternates)."""
    times = {"a": [], "b": []}
    sides = {"a": step_a, "b": step_b}
    cursor = 0
    for block in range(warmup_blocks + blocks):
        order = ("a", "b") if block % 2 == 0 else ("b", "a")
        for side in order:
            fn = sides[side]
            chosen = [batches[(cursor + i) % len(batches)] for i in range(steps)]
            start = time.perf_counter()
            for x in chosen:
                fn(x)
            elapsed = time.perf_counter() - start
            if block >= warmup_blocks:
                times[side].append(elapsed / steps)
        cursor += steps
    return times["a"], times["b"]


def summarize(samples):
    q = statistics.quantiles(samples, n=4)
    return {"median_ms": 1e3 * statistics.median(samples), "p25_ms": 1e3 * q[0],
            "p75_ms": 1e3 * q[2], "n_blocks": len(samples)}


def bench_config(config: Config, verbose: bool = True) -> list[dict]:
    train, data_shape = load_train(config)
    num_data = train.shape[0]
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(num_data, generator=generator)
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
            t_p, t_r = time_interleaved(step_p, step_r, batches, config.blocks, config.steps,
                                        config.warmup_blocks)
        sp, sr = summarize(t_p), summarize(t_r)
        row = {"configuration": config.name, "objective": name, "K": K,
               "batch": config.batch, "pyro_vae_ms": sp["median_ms"],
               "reference_ms": sr["median_ms"], "ratio": sp["median_ms"] / sr["median_ms"],
               "pyro_vae_ms_p25_p75": [sp["p25_ms"], sp["p75_ms"]],
               "reference_ms_p25_p75": [sr["p25_ms"], sr["p75_ms"]],
               "blocks": config.blocks, "steps_per_block": config.steps,
               "check": check}
        rows.append(row)
        if verbose:
            print(f"  {config.name:26s} {name:9s} K={K}  pyro-vae {sp['median_ms']:8.3f} ms  "
                  f"reference {sr['median_ms']:8.3f} ms  ratio {row['ratio']:.2f}  "
                  f"(check: loss rel {check['loss_rel_diff']:.1e}, "
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
    t_p, t_r = [], []
    for i in range(repeats):
        for side in (("p", "r") if i % 2 == 0 else ("r", "p")):
            start = time.perf_counter()
            if side == "p":
                evaluate(vae, x, particles=particles, seed=0)
                t_p.append(time.perf_counter() - start)
            else:
                vae.eval()
                reference_log_likelihood(vae, x, particles, seed=0)
                vae.train()
                t_r.append(time.perf_counter() - start)
    mp, mr = statistics.median(t_p), statistics.median(t_r)
    row = {"configuration": f"{config.name} (evaluate, {n_points} points)",
           "objective": "evaluate (IWAE log p(x))", "K": particles,
           "pyro_vae_ms": 1e3 * mp, "reference_ms": 1e3 * mr, "ratio": mp / mr,
           "pyro_vae_datapoints_per_s": n_points / mp,
           "reference_datapoints_per_s": n_points / mr, "repeats": repeats,
           "check": {"log_likelihood_max_rel_diff": rel,
                     "mean_log_likelihood": float(ll_p.mean())}}
    if verbose:
        print(f"  evaluate K={particles} on {n_points} digits: pyro-vae {mp:.3f} s  "
              f"reference {mr:.3f} s  ratio {mp / mr:.2f}  (check: rel {rel:.1e})", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# profiling (--profile)
# ---------------------------------------------------------------------------------------------
def profile_steps(n_steps: int = 300, top: int = 25) -> str:
    config = CONFIGS[0]
    train, data_shape = load_train(config)
    num_data = train.shape[0]
    x = train[:config.batch].contiguous()
    report = io.StringIO()
    for name, K, options in OBJECTIVES:
        pyro.clear_param_store()
        vae = build_vae(config, data_shape)
        with pyro.validation_enabled(False):
            step, _ = pyro_step_fn(vae, name, K, options, num_data)
            for _ in range(20):
                step(x)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(n_steps):
                step(x)
            profiler.disable()
        stats = pstats.Stats(profiler, stream=report)
        report.write(f"\n===== pyro-vae {name} (K={K}), {config.name}, {n_steps} steps =====\n")
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
    return report.getvalue()


# ---------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    lines = ["| configuration | objective | K | pyro-vae ms/step | reference ms/step | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['configuration']} | {row['objective']} | {row['K']} | "
                     f"{row['pyro_vae_ms']:.3f} | {row['reference_ms']:.3f} | "
                     f"{row['ratio']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip the batch-1024 configuration; fewer evaluation repeats")
    parser.add_argument("--json", metavar="FILE", help="write the rows to FILE as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfile summaries of pyro-vae steps (digits)")
    parser.add_argument("--only", nargs="*", metavar="OBJECTIVE",
                        help="benchmark only these objectives")
    args = parser.parse_args(argv)

    global OBJECTIVES
    if args.only:
        OBJECTIVES = [o for o in OBJECTIVES if o[0] in args.only]
    environment = {"torch": torch.__version__, "pyro": pyro.__version__,
                   "python": platform.python_version(), "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "processor": platform.processor()}
    print(f"torch {environment['torch']}, pyro {environment['pyro']}, "
          f"{environment['threads']} torch threads", flush=True)
    started = time.perf_counter()
    rows = []
    try:
        for config in CONFIGS:
            if args.quick and not config.quick:
                continue
            rows.extend(bench_config(config))
        rows.append(bench_evaluation(repeats=2 if args.quick else 3))
    except CheckFailed as exc:
        print(f"CORRECTNESS CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print()
    print(markdown_table(rows))
    print(f"\n(total {elapsed:.0f} s)")
    if args.profile:
        print(profile_steps())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "quick": args.quick,
                       "elapsed_s": elapsed, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
