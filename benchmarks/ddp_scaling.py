"""Training throughput against the number of torchrun processes (DDP, gloo on CPU).

    python benchmarks/ddp_scaling.py [--processes 1,2] [--rows 20000] [--epochs 2]

Trains a 784-400-20 MLP VAE (Bernoulli, elbo, batch 256) on synthetic 784-d data saved as a
.npy file, once per process count, each process single-threaded, and reports datapoints per
second over the last epoch (read from metrics.jsonl; the first epoch includes start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="pyro-vae-ddp-"))
    data = directory / "rows.npy"
    np.save(data, np.random.default_rng(0).random((args.rows, 784), dtype=np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for processes in (int(p) for p in args.processes.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = directory / f"run-{processes}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run",
                        f"--nproc_per_node={processes}", f"--master_port={port}",
                        "-m", "pyro_vae.cli", "train", "--data", str(data), "--hidden", "400",
                        "--latent-dim", "20", "--batch-size", "256", "--epochs", str(args.epochs),
                        "--quiet", "--eval-particles", "0", "--out", str(out)],
                       check=True, capture_output=True, env=env)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        train_rows = json.loads((out / "config.json").read_text())["data"]["num_train"]
        row = {"processes": processes, "epoch_seconds": last["epoch_time_s"],
               "datapoints_per_second": train_rows / last["epoch_time_s"],
               "val_elbo": last["val_elbo"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["datapoints_per_second"]
    print("\n| processes | epoch | datapoints / s | speed-up |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['epoch_seconds']:.2f} s | "
              f"{row['datapoints_per_second']:,.0f} | {row['datapoints_per_second'] / base:.2f}× |")


if __name__ == "__main__":
    main()
