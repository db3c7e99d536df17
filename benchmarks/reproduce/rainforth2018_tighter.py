"""Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), "Tighter Variational Bounds are
Not Necessarily Better": MIWAE(8, 8), PIWAE(8, 8) and CIWAE (β = 0.05, K = 64) against IWAE
with the same 64 draws per datapoint.

The setting of Burda et al. (2016), one stochastic layer (784-200-200-z50 tanh, dynamically
binarized MNIST, batch 20, Adam with lr 1e-3·10^(−i/7) for 3^i epochs). Beside the test NLL,
the gradient signal-to-noise ratio of the encoder and the decoder under IWAE₆₄, MIWAE(8, 8) and
PIWAE(8, 8) at the trained IWAE₆₄ model: the paper's point is that IWAE's encoder SNR falls
like 1/√K, and that PIWAE keeps IWAE₆₄'s decoder gradient while its encoder has MIWAE's SNR.

    python benchmarks/reproduce/rainforth2018_tighter.py
    python benchmarks/reproduce/rainforth2018_tighter.py --full --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from burda2016_iwae import ARCHITECTURES  # noqa: E402

#: Rainforth et al. (2018), and pythae's reproduction of them: test NLL
PAPER = {"miwae": 84.97, "piwae": 84.46, "ciwae": 84.57, "iwae": None}
PAPER_SE = {"miwae": 0.10, "piwae": 0.06, "ciwae": 0.09}
PYTHAE = {"miwae": 85.09, "piwae": 84.58, "ciwae": 84.74, "iwae": None}
LABELS = {"iwae": "IWAE, K = 64", "miwae": "MIWAE(8, 8)", "piwae": "PIWAE(8, 8)",
          "ciwae": "CIWAE, β = 0.05, K = 64"}


def specs(args) -> list[common.Spec]:
    model, options = ARCHITECTURES["1L"]
    data = common.data_options(args)
    make = lambda name, objective, k, extra: common.Spec(  # noqa: E731
        name, model, options, objective, k, args.epochs, seed=args.seed,
        objective_options=extra, data_options=data)
    return [make("1L-iwae-k64", "iwae", 64, {}),
            make("1L-miwae-8x8", "miwae", 8, {"groups": 8}),
            make("1L-piwae-8x8", "piwae", 8, {"groups": 8}),
            make("1L-ciwae-k64", "ciwae", 64, {"elbo_weight": 0.05})]


NAMES = {"iwae": "1L-iwae-k64", "miwae": "1L-miwae-8x8", "piwae": "1L-piwae-8x8",
         "ciwae": "1L-ciwae-k64"}


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0], budget=2, full_budget=3280)
    started = time.perf_counter()
    probe = {"estimators": [[["iwae"], [64], {}], [["miwae", "piwae"], [8], {"groups": 8}]],
             "batch": 20, "repeats": 100}
    rows = common.run_specs(specs(args), args, probes={"1L-iwae-k64": probe})
    wall = time.perf_counter() - started

    lines = ["| objective | paper NLL | pythae | NLL (this package) | active units |",
             "|---|---:|---:|---:|---:|"]
    for key, name in NAMES.items():
        paper = "—" if PAPER[key] is None else f"{PAPER[key]:.2f} ± {PAPER_SE[key]:.2f}"
        pythae = "—" if PYTHAE[key] is None else f"{PYTHAE[key]:.2f}"
        units = "—" if "failed" in rows[name] else common.total_active(rows[name])
        lines.append(f"| {LABELS[key]} | {paper} | {pythae} | {common.fmt(rows[name])} | "
                     f"{units} |")
    snr = {r["objective"]: r for r in rows["1L-iwae-k64"]["probe"]["rows"]}
    lines += ["", "Gradient signal-to-noise ratio at the trained IWAE₆₄ model (20 test images, "
              "100 draws; the mean over parameters of |mean| / standard deviation):", "",
              "| estimator | encoder SNR | decoder SNR |", "|---|---:|---:|"]
    for key in ("iwae", "miwae", "piwae"):
        lines.append(f"| {LABELS[key]} | {snr[key]['encoder_snr']:.3f} | "
                     f"{snr[key]['decoder_snr']:.3f} |")
    claims = [
        common.claim("PIWAE ≥ IWAE on the encoder's SNR",
                     snr["piwae"]["encoder_snr"] > snr["iwae"]["encoder_snr"],
                     f"{snr['piwae']['encoder_snr']:.3f} vs {snr['iwae']['encoder_snr']:.3f}"),
    ]
    for key in ("piwae", "ciwae", "miwae"):
        error = common.failed(rows, NAMES[key], NAMES["iwae"])
        if error is not None:
            claims.append(common.claim(f"{LABELS[key]} test NLL against IWAE₆₄ (the paper: "
                                       "better)", False, error))
            continue
        gain = common.paired(rows, NAMES[key], NAMES["iwae"])
        claims.append(common.claim(
            f"{LABELS[key]} test NLL against IWAE₆₄ (the paper: better)", gain["gain_nats"] > 0,
            f"{gain['gain_nats']:+.2f} ± {gain['se']:.2f} nats (z = {gain['z']:.1f})"))
    path = common.write("rainforth2018_tighter", args,
                        title="Rainforth et al. 2018 (MIWAE, PIWAE, CIWAE)",
                        table="\n".join(lines), claims=claims, rows=rows, wall_seconds=wall)
    print(path.read_text())


if __name__ == "__main__":
    main()
