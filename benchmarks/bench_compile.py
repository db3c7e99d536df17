"""``torch.compile`` of the training step's loss on the CPU, against eager: is a ``--compile``
worth having here?

For each model (the default digits VAE, 64-256-256-8, and an MNIST-size one, 784-400-20;
batch 128; ``elbo`` and ``iwae`` K = 5) the package's loss module (what ``fit`` calls every
step: the objective's loss of the VAE's model and guide on the untraced fast path) runs eager
and compiled (``torch.compile``, default mode, ``dynamic=False``, with
``torch._inductor.config.fallback_random``: the compiled graph draws torch's own random numbers,
as eager does, which exact resume needs), each followed by backward and Adam. The compiled
loss is first checked against eager on the same draws (within float32 rounding); then the sides alternate in blocks of ``--steps`` steps, ``--rounds`` times, and
the table gives the median milliseconds per step, the ratio, and the compile time (the first
compiled step, minus an eager step).

    python benchmarks/bench_compile.py [--threads 2] [--steps 100] [--rounds 5]
        [--json results-cpu-compile.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE
from pyro_vae.distributed import LossModule
from pyro_vae.objectives import make_objective
from pyro_vae.training import make_optimizer

MODELS = {
    "digits 64-256-256-8": dict(data_dim=64, hidden=(256, 256), latent_dim=8, rows=1437),
    "MNIST-size 784-400-20": dict(data_dim=784, hidden=(400,), latent_dim=20, rows=60000),
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(name: str, spec: dict, objective: str, args) -> dict:
    torch.manual_seed(0)
    data = torch.rand(4096, spec["data_dim"])
    batches = [data[torch.randint(0, len(data), (args.batch,))] for _ in range(args.steps)]
    sides = {}
    for side in ("eager", "compiled"):
        pyro.set_rng_seed(0)
        vae = VAE(spec["data_dim"], spec["latent_dim"], hidden=spec["hidden"])
        particles = 5 if objective == "iwae" else 1
        module = LossModule(vae, make_objective(objective, particles))
        loss = module if side == "eager" else torch.compile(module, dynamic=False)
        sides[side] = (vae, loss, make_optimizer(vae.parameters(), 1e-3))

    def step(side, x):
        vae, loss_fn, optimizer = sides[side]
        loss = loss_fn(x, None, num_data=spec["rows"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    with pyro.validation_enabled(False):
        # the same draws on both sides: the compiled loss is the eager one
        torch.manual_seed(1)
        eager_value = step("eager", batches[0])
        started = time.perf_counter()
        torch.manual_seed(1)
        compiled_value = step("compiled", batches[0])
        first = time.perf_counter() - started
        agree = bool(torch.allclose(eager_value, compiled_value, rtol=1e-4))
        for side in sides:  # warm both
            for x in batches[:10]:
                step(side, x)
        times = {side: [] for side in sides}
        for round_ in range(args.rounds):
            order = ("eager", "compiled") if round_ % 2 == 0 else ("compiled", "eager")
            for side in order:
                started = time.perf_counter()
                for x in batches:
                    step(side, x)
                times[side].append((time.perf_counter() - started) / len(batches) * 1e3)
    eager, compiled = (statistics.median(times[s]) for s in ("eager", "compiled"))
    return {"model": name, "objective": objective, "batch": args.batch,
            "eager_ms": eager, "compiled_ms": compiled, "ratio": compiled / eager,
            "compile_s": first - eager / 1e3, "first_loss_agrees": agree,
            "eager_runs_ms": times["eager"], "compiled_runs_ms": times["compiled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch._inductor import config as inductor

    inductor.fallback_random = True
    rows = [measure(name, spec, objective, args) for name, spec in MODELS.items()
            for objective in ("elbo", "iwae")]
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
          f"torch {torch.__version__}; commit {_commit()}\n")
    print("| model | objective | eager ms/step | compiled ms/step | compiled / eager | "
          "compile time | same loss |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['model']} | {row['objective']} | {row['eager_ms']:.2f} | "
              f"{row['compiled_ms']:.2f} | {row['ratio']:.2f}× | {row['compile_s']:.1f} s | "
              f"{'yes' if row['first_loss_agrees'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": _commit(), "threads": args.threads,
                                               "torch": torch.__version__, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
