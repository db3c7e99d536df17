"""Peak memory and time per epoch against data size: memory-mapped .npy vs. in memory.

    python benchmarks/memory_streaming.py [--sizes-mb 100,400,1600] [--dir /tmp/pyro-vae-bench]

For each size, a float32 .npy file of 784-d rows (uniform in [0, 1]) is written, then one epoch of
`pyro-vae train` (784-64-4 MLP, Bernoulli, batch 1024, no final evaluation) runs in a fresh
process, which samples its own resident anonymous memory (RssAnon: the heap, tensors; pages of
the memory-mapped file are page cache the kernel can drop, not allocations) every 5 ms and reports
the peak. "in memory" loads the same file with np.load (no mmap) and trains on tensors, for
comparison. Single-threaded torch (OMP_NUM_THREADS=1) so that timings are not at the mercy of
other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import numpy as np

peak = {"anon_kb": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()

import pyro
from pyro_vae import VAE, fit
from pyro_vae.data import from_array, _read_array

path, mode, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
array = _read_array(path) if mode == "mmap" else np.load(path)
dataset = from_array(array, name=str(path))
pyro.set_rng_seed(0)
vae = VAE(dataset.data_shape, 4, hidden=(64,))
started = time.perf_counter()
result = fit(vae, dataset, "elbo", epochs=1, batch_size=1024, progress=False, device="cpu")
seconds = time.perf_counter() - started
time.sleep(0.02)
print(json.dumps({"streamed": dataset.streamed, "epoch_seconds": seconds,
                  "peak_anon_mb": peak["anon_kb"] / 1024,
                  "train_loss": result.history[-1]["train_loss"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="100,400,1600")
    parser.add_argument("--dir", default=None, help="where the .npy files go (default: a temp dir)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="pyro-vae-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for size_mb in (int(s) for s in args.sizes_mb.split(",")):
        n = size_mb * 2**20 // (784 * 4)
        path = directory / f"rows-{size_mb}mb.npy"
        if not path.exists():
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 784))
            rng = np.random.default_rng(0)
            for start in range(0, n, 65536):
                array[start:start + 65536] = rng.random((min(65536, n - start), 784), np.float32)
            array.flush()
            del array
        for mode in ("mmap", "memory"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(directory)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(done.stderr)
            row = {"size_mb": size_mb, "rows": n, "mode": mode, **json.loads(done.stdout.splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| file | rows | memory-mapped: peak RssAnon | epoch | in memory: peak RssAnon | epoch |")
    print("|---|---|---|---|---|---|")
    for size_mb in dict.fromkeys(r["size_mb"] for r in rows):
        m = next(r for r in rows if r["size_mb"] == size_mb and r["mode"] == "mmap")
        i = next(r for r in rows if r["size_mb"] == size_mb and r["mode"] == "memory")
        print(f"| {size_mb} MB | {m['rows']:,} | {m['peak_anon_mb']:.0f} MB | "
              f"{m['epoch_seconds']:.1f} s | {i['peak_anon_mb']:.0f} MB | {i['epoch_seconds']:.1f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
