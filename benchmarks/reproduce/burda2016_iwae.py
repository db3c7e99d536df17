"""Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", Table 1.

Dynamically binarized MNIST. One stochastic layer: 784-200-200-z50 (tanh); two: 784-200-200-
z100-100-100-z50. Batch 20, Adam, lr 1e-3·10^(−i/7) for 3^i epochs (i = 0…7: 3,280 epochs with
``--full``). VAE (the ELBO averaged over k draws) and IWAE at k = 1, 5, 50 (k = 1 is one model:
both objectives are the ELBO). Test NLL with k = 5000 and active units (Cov_x E_q[z_u|x] > 0.01).

    python benchmarks/reproduce/burda2016_iwae.py                # reduced budget, ~45 min on 2 CPUs
    python benchmarks/reproduce/burda2016_iwae.py --full --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAPER = {  # Table 1 of the paper: test NLL
    ("1L", "vae", 1): 86.76, ("1L", "vae", 5): 86.47, ("1L", "vae", 50): 86.35,
    ("1L", "iwae", 1): 86.76, ("1L", "iwae", 5): 85.54, ("1L", "iwae", 50): 84.78,
    ("2L", "vae", 1): 85.33, ("2L", "vae", 5): 85.01, ("2L", "vae", 50): 84.78,
    ("2L", "iwae", 1): 85.33, ("2L", "iwae", 5): 83.89, ("2L", "iwae", 50): 82.90,
}
PAPER_ACTIVE = {  # active units, Table 1 (layer 1 + layer 2 for two layers)
    ("1L", "vae", 1): 19, ("1L", "vae", 5): 20, ("1L", "vae", 50): 20,
    ("1L", "iwae", 1): 19, ("1L", "iwae", 5): 22, ("1L", "iwae", 50): 25,
    ("2L", "vae", 1): "16+5", ("2L", "vae", 5): "17+5", ("2L", "vae", 50): "17+5",
    ("2L", "iwae", 1): "16+5", ("2L", "iwae", 5): "21+5", ("2L", "iwae", 50): "26+7",
}
ARCHITECTURES = {
    "1L": ("vae", {"latent_dim": 50, "hidden": (200, 200), "activation": "tanh",
                   "likelihood": "bernoulli"}),
    "2L": ("hierarchical", {"latent_dims": (100, 50), "hidden": [(200, 200), (100, 100)],
                            "activation": "tanh"}),
}
KS = (1, 5, 50)


def name(layers: str, objective: str, k: int) -> str:
    return f"{layers}-{'vae' if k == 1 else objective}-k{k}"


def specs(args) -> list[common.Spec]:
    out = []
    for layers, (model, options) in ARCHITECTURES.items():
        for objective in ("vae", "iwae"):
            for k in KS:
                if k == 1 and objective == "iwae":
                    continue  # the same model as the VAE at k = 1
                out.append(common.Spec(name(layers, objective, k), model, options,
                                       "elbo" if objective == "vae" else "iwae", k, args.epochs,
                                       seed=args.seed, data_options=common.data_options(args)))
    # the slowest first, so that two jobs finish together
    return sorted(out, key=lambda s: (-s.particles, s.model != "hierarchical"))


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0], budget=4, full_budget=3280)
    started = time.perf_counter()
    rows = common.run_specs(specs(args), args)
    wall = time.perf_counter() - started

    lines = ["| layers | objective | k | paper NLL | NLL (this package) | paper active units | "
             "active units |", "|---|---|---:|---:|---:|---:|---:|"]
    for layers in ARCHITECTURES:
        for objective in ("vae", "iwae"):
            for k in KS:
                row = rows[name(layers, objective, k)]
                units = "+".join(str(v) for v in row["active_units"].values())
                lines.append(f"| {layers[0]} | {objective.upper()} | {k} | "
                             f"{PAPER[(layers, objective, k)]:.2f} | {common.fmt(row)} | "
                             f"{PAPER_ACTIVE[(layers, objective, k)]} | {units} |")
    claims = []
    for layers in ARCHITECTURES:
        gain = common.paired(rows, name(layers, "iwae", 50), name(layers, "vae", 50))
        claims.append(common.claim(
            f"{layers}: IWAE₅₀ better than VAE₅₀ by more than 3 paired SE", gain["z"] > 3,
            f"{gain['gain_nats']:+.2f} ± {gain['se']:.2f} nats (z = {gain['z']:.1f})"))
        for objective in ("vae", "iwae"):
            nll = [rows[name(layers, objective, k)]["nll"] for k in KS]
            steps = [common.paired(rows, name(layers, objective, b), name(layers, objective, a))
                     for a, b in zip(KS, KS[1:])]
            claims.append(common.claim(
                f"{layers} {objective.upper()}: the bound rises with k (NLL falls from k = 1 "
                "to 5 to 50)", all(s["gain_nats"] > 0 for s in steps),
                ", ".join(f"{v:.2f}" for v in nll) + " (gains "
                + ", ".join(f"{s['gain_nats']:+.2f} ± {s['se']:.2f}" for s in steps) + ")"))
        vae_units = common.total_active(rows[name(layers, "vae", 50)])
        iwae_units = common.total_active(rows[name(layers, "iwae", 50)])
        claims.append(common.claim(f"{layers}: more active units under IWAE₅₀ than VAE₅₀",
                                   iwae_units > vae_units, f"{iwae_units} vs {vae_units}"))
    for objective in ("vae", "iwae"):
        gain = common.paired(rows, name("2L", objective, 50), name("1L", objective, 50))
        claims.append(common.claim(
            f"two layers better than one ({objective.upper()}₅₀, more than 3 paired SE)",
            gain["z"] > 3, f"{gain['gain_nats']:+.2f} ± {gain['se']:.2f} nats "
                           f"(z = {gain['z']:.1f})"))
    path = common.write("burda2016_iwae", args, title="Burda et al. 2016 (IWAE), Table 1",
                        table="\n".join(lines), claims=claims, rows=rows, wall_seconds=wall)
    print(path.read_text())


if __name__ == "__main__":
    main()
