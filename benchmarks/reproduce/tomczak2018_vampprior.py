"""Tomczak & Welling (2018), "VAE with a VampPrior": the VampPrior (500 pseudo-inputs) against
the standard normal prior, one stochastic layer.

Dynamically binarized MNIST; z of 40 dimensions, 300-300 hidden units (ReLU MLPs in place of
the paper's gated layers), batch 100, Adam 5e-4, the ELBO with KL warm-up over the first quarter
of the epochs (the paper: 100 of up to 2,000 epochs, with early stopping). Test NLL with
K = 5000.

    python benchmarks/reproduce/tomczak2018_vampprior.py
    python benchmarks/reproduce/tomczak2018_vampprior.py --full --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAPER = {"standard": 88.56, "vamp": 85.57}  # Table 2, VAE (L = 1)
STEPS_PER_EPOCH = 540  # 54,000 training images, batch 100


def specs(args) -> list[common.Spec]:
    base = {"latent_dim": 40, "hidden": (300, 300), "likelihood": "bernoulli"}
    data = common.data_options(args)
    steps = STEPS_PER_EPOCH if args.train_points is None else -(-args.train_points // 100)
    warm_up = max(1, args.epochs // 4 if not args.full else 100) * steps
    make = lambda name, options: common.Spec(  # noqa: E731
        name, "vae", {**base, **options}, "elbo", 1, args.epochs, batch_size=100, lr=5e-4,
        lr_schedule="constant", seed=args.seed, data_options=data, anneal_steps=warm_up)
    return [make("vamp-500", {"prior": "vamp", "prior_options": {"components": 500}}),
            make("standard", {"prior": "normal"})]


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0], budget=5, full_budget=2000)
    started = time.perf_counter()
    rows = common.run_specs(specs(args), args)
    wall = time.perf_counter() - started
    lines = ["| prior | paper NLL | NLL (this package) | active units |", "|---|---:|---:|---:|",
             f"| standard normal | {PAPER['standard']:.2f} | {common.fmt(rows['standard'])} | "
             f"{common.total_active(rows['standard'])} |",
             f"| VampPrior, 500 pseudo-inputs | {PAPER['vamp']:.2f} | "
             f"{common.fmt(rows['vamp-500'])} | {common.total_active(rows['vamp-500'])} |"]
    gain = common.paired(rows, "vamp-500", "standard")
    claims = [common.claim("VampPrior ≥ standard prior (test NLL, more than 3 paired SE)",
                           gain["z"] > 3, f"{gain['gain_nats']:+.2f} ± {gain['se']:.2f} nats "
                                          f"(z = {gain['z']:.1f})")]
    path = common.write("tomczak2018_vampprior", args, title="Tomczak & Welling 2018 (VampPrior)",
                        table="\n".join(lines), claims=claims, rows=rows, wall_seconds=wall)
    print(path.read_text())


if __name__ == "__main__":
    main()
