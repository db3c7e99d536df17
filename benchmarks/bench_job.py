"""The whole job, as processes: ``pyro-vae train`` against a plain-PyTorch script that does the
same work (``plain_job.py``), start to exit.

Two jobs:

- **digits**: the default ``pyro-vae train --out DIR`` (every default: the bundled digits, a
  64-256-256-8 MLP VAE, ``elbo``, 200 epochs of batches of 128, then the K = 1000 test
  log-likelihood) against ``plain_job.py`` with the same networks, objective, minibatches,
  epochs and K;
- **mnist**: a 784-400-20 MLP VAE for 10 epochs, then K = 1000 on the test split:
  ``pyro-vae train --data mnist --data-dir DIR --hidden 400 --latent-dim 20 --epochs 10``
  where the MNIST files are present (``--mnist-source auto``: ``../shared/data``), else
  (``synthetic``) a seeded 60,000 × 784 ``.npy`` of uniform grey levels.

Before any timing the data are loaded once with ``pyro_vae.load_data`` and their splits written
to an ``.npz`` that the plain script reads (so it trains and scores exactly pyro-vae's
splits, and pays nothing for data formats); the import caches are warmed. Then, per job,
``--pairs`` interleaved pairs (default 3): each pair runs both commands one after the other,
and which goes first alternates. Each run is timed from spawn to exit
(``time.perf_counter``); the CPU time that other processes used meanwhile is read from
``/proc/stat`` (all CPUs' busy time minus the child's own), and a run during which they used
more than ``--noisy`` cores (default 0.25) is marked. The table gives the median wall time of
each side, their ratio, the median of the pairs' ratios, and both test log-likelihoods with their
standard errors (they must agree within 4 combined standard errors: the same model trained
on the same batches, different random draws).

``--baseline TREE`` adds a third side: pyro-vae run from another source tree (``PYTHONPATH=TREE
python -m pyro_vae.cli``; e.g. ``git archive COMMIT pyro_vae models guides | tar -x -C TREE``
and the links ``TREE/pyro_vae/models -> ../models``, ``TREE/pyro_vae/guides -> ../guides``),
to time the same job before a change. ``--ablate`` times, instead of the plain script,
pyro-vae with each change of the whole-job work reverted in turn (:data:`ABLATIONS`), in the
same rotation.

``--profile`` shows where pyro-vae's time goes instead, on the digits job (``--profile-job
mnist`` for the other): the top imports (``python -X importtime``), the job's wall time by
phase (functions of pyro-vae wrapped with timers in the child process; each phase's imports
shown apart), beside the plain script's phases, and a cProfile of the same job grouped by
phase with its top functions.

    python benchmarks/bench_job.py [--jobs digits,mnist] [--pairs 3] [--json out.json]
    python benchmarks/bench_job.py --jobs digits --baseline /tmp/before   # + the old tree
    python benchmarks/bench_job.py --jobs digits --ablate          # each change reverted
    python benchmarks/bench_job.py --profile [--profile-job digits|mnist]
    python benchmarks/bench_job.py --smoke        # tiny settings: checks the machinery only
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLAIN = HERE / "plain_job.py"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"


# -- the jobs -------------------------------------------------------------------------------------

@dataclass
class Job:
    name: str
    pyro_args: list[str]          # after ``pyro-vae train``, before ``--out DIR``
    plain_args: list[str]         # after ``plain_job.py --data FILE``
    data_note: str
    npz: Path | None = None


def _pyro_vae_command() -> list[str]:
    """The installed ``pyro-vae`` script of this interpreter (as a virtual environment runs it;
    not a version manager's shim, which costs ~0.07 s a call to find the interpreter that the
    plain side is given directly), else the one on PATH, else ``python -m pyro_vae.cli``."""
    beside = Path(sys.executable).parent / "pyro-vae"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("pyro-vae")
    return [found] if found else [sys.executable, "-m", "pyro_vae.cli"]


def make_jobs(names: list[str], work: Path, args) -> list[Job]:
    import numpy as np

    from pyro_vae import load_data

    jobs = []
    tiny = args.smoke
    for name in names:
        if name == "digits":
            epochs, particles = (2, 50) if tiny else (None, None)
            pyro = [] if not tiny else ["--epochs", str(epochs), "--eval-particles", str(particles)]
            plain = ["--hidden", "256,256", "--latent-dim", "8", "--epochs", str(epochs or 200),
                     "--batch-size", "128", "--eval-particles", str(particles or 1000)]
            dataset = load_data("digits")
            job = Job("digits", pyro, plain, "the bundled digits (1,437 train, 180 test)")
        elif name == "mnist":
            epochs, particles = (1, 20) if tiny else (10, 1000)
            source = args.mnist_source
            data_dir = Path(args.data_dir).expanduser()
            if source == "auto":
                source = "real" if (data_dir / "MNIST" / "raw").is_dir() else "synthetic"
            if source == "real":
                spec = ["--data", "mnist", "--data-dir", str(data_dir)]
                dataset = load_data("mnist", data_dir=data_dir)
                note = f"MNIST from {data_dir} (54,000 train, 10,000 test; grey levels)"
            else:
                import torch

                path = work / "synthetic-60000x784.npy"
                generator = torch.Generator().manual_seed(0)
                np.save(path, torch.rand(60000, 784, generator=generator).numpy())
                spec = ["--data", str(path)]
                dataset = load_data(str(path))
                note = "synthetic 60,000 × 784 uniform grey levels (.npy)"
            pyro = [*spec, "--hidden", "400", "--latent-dim", "20", "--epochs", str(epochs),
                    "--eval-particles", str(particles)]
            plain = ["--hidden", "400", "--latent-dim", "20", "--epochs", str(epochs),
                     "--batch-size", "128", "--eval-particles", str(particles)]
            job = Job("mnist", pyro, plain, note)
        else:
            raise SystemExit(f"unknown job {name!r}; the jobs are digits and mnist")
        if args.threads:
            job.pyro_args += ["--threads", str(args.threads)]
            job.plain_args += ["--threads", str(args.threads)]
        job.npz = work / f"{name}-splits.npz"
        np.savez(job.npz, train=dataset.train.numpy(), test=dataset.test.numpy())
        jobs.append(job)
    return jobs


# -- timing one run -------------------------------------------------------------------------------

def _busy_seconds() -> float | None:
    """All CPUs' non-idle time so far (seconds), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as stream:
            values = [int(v) for v in stream.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    side: str
    wall_s: float
    other_cores: float | None
    result: dict = field(default_factory=dict)


def timed(command: list[str], side: str, out: Path | None, env: dict | None = None) -> Run:
    busy, cpu = _busy_seconds(), _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - started
    busy_after, cpu_after = _busy_seconds(), _children_cpu()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    other = None
    if busy is not None and busy_after is not None:
        other = max(0.0, (busy_after - busy) - (cpu_after - cpu)) / wall
    if out is None:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        result = json.loads((out / "evaluation.json").read_text())
        metrics = out / "metrics.jsonl"  # absent where an ablation removes it
        result["epoch_time_s"] = [json.loads(line)["epoch_time_s"] for line in
                                  (metrics.read_text().splitlines() if metrics.exists() else [])]
    return Run(side, wall, other, result)


#: The changes that ``--ablate`` reverts one at a time (in the child, before ``cli.main``)
ABLATIONS = {
    "all changes": "nothing reverted",
    "digits through sklearn": "the digits read by importing scikit-learn",
    "figures in the foreground": "the figures drawn before the final evaluation",
    "checkpoint every epoch": "checkpoint_every = 0",
    "validation through evaluate": "the validation ELBO from evaluate (all its statistics)",
    "default Adam": "torch.optim.Adam's default implementation",
}
# What each remaining feature of the job costs: the job with that feature removed
# (``--ablate --without``; these are measurements, not options of pyro-vae).
REMOVALS = {
    "without figures": "no reconstructions.png, samples.png, loss.png",
    "without per-epoch files": "no metrics.jsonl row after each epoch",
    "without validation": "no validation ELBO after each epoch",
    "without progress bar": "--quiet",
}


def child_ablate(name: str, argv: list[str]) -> int:
    """``pyro-vae train argv`` in this process with the change ``name`` reverted."""
    from pyro_vae import cli, data, training

    if name == "digits through sklearn":
        data._digits_file = lambda: None
    elif name == "figures in the foreground":
        write = training.write_figures
        training.write_figures = lambda *a, **k: write(*a, **{**k, "background": False})
    elif name == "checkpoint every epoch":
        argv = [*argv, "--checkpoint-every", "0"]
    elif name == "validation through evaluate":
        from pyro_vae.evaluation import evaluate

        def elbo_per_datapoint(vae, x_all, labels, particles=1, *, seed=0, **_):
            return evaluate(vae, x_all, particles, labels=labels, seed=seed).elbo
        training.elbo_per_datapoint = elbo_per_datapoint
    elif name == "default Adam":
        import torch

        training.make_optimizer = lambda parameters, lr: torch.optim.Adam(list(parameters), lr=lr)
    elif name == "without figures":
        training.write_figures = lambda *a, **k: None
    elif name == "without per-epoch files":
        from pyro_vae import callbacks

        callbacks.MetricsWriter.on_epoch_end = lambda self, trainer, row: None
    elif name == "without validation":
        training._validation_elbo = lambda *a, **k: (0.0, 0.0)
    elif name == "without progress bar":
        argv = [*argv, "--quiet"]
    elif name != "all changes":
        raise SystemExit(f"unknown ablation {name!r}")
    return cli.main(argv)


def side_command(job: Job, side: str, out: Path, args) -> tuple[list[str], Path | None, dict | None]:
    """The command of one side, the run directory it writes (None: it prints JSON), its
    environment."""
    pyro = ["train", *job.pyro_args, "--out", str(out)]
    if side in ("plain", "plain, quick exit"):
        quick = ["--quick-exit"] if side == "plain, quick exit" else []
        return ([sys.executable, str(PLAIN), "--data", str(job.npz), *job.plain_args, *quick],
                None, None)
    if side == "pyro-vae":
        return [*_pyro_vae_command(), *pyro], out, None
    if side == "before":
        return ([sys.executable, "-m", "pyro_vae.cli", *pyro], out,
                {"PYTHONPATH": str(Path(args.baseline).resolve())})
    return ([sys.executable, str(Path(__file__).resolve()), "--child-ablate", side, "--",
             *pyro], out, None)


def run_pair(job: Job, index: int, work: Path, sides: list[str], args) -> dict[str, Run]:
    """One run of each side, in an order that rotates with ``index`` (two sides: alternates)."""
    runs = {}
    shift = index % len(sides)
    for side in sides[shift:] + sides[:shift]:
        out = work / f"{job.name}-run-{index}"
        shutil.rmtree(out, ignore_errors=True)
        command, directory, env = side_command(job, side, out, args)
        runs[side] = timed(command, side, directory, env)
        shutil.rmtree(out, ignore_errors=True)
    return runs


def warm_caches() -> None:
    """Read the modules both sides import once, so the first timed run does not pay the disk."""
    subprocess.run([sys.executable, "-c", "import torch, pyro, numpy, pyro_vae.cli, "
                    "pyro_vae.training, pyro_vae.plots, matplotlib.figure, torchvision.utils"],
                   capture_output=True)


# -- reporting ------------------------------------------------------------------------------------

def machine() -> dict:
    import pyro
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except OSError:
        commit = "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "pyro": pyro.__version__,
            "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def summarise(job: Job, pairs: list[dict[str, Run]], noisy: float) -> dict:
    sides = list(pairs[0])
    walls = {side: [p[side].wall_s for p in pairs] for side in sides}
    medians = {side: statistics.median(w) for side, w in walls.items()}
    quiet = [p for p in pairs if all(r.other_cores is None or r.other_cores <= noisy
                                     for r in p.values())]
    row = {"job": job.name, "data": job.data_note, "medians_s": medians, "pairs": len(pairs),
           "quiet_pairs": len(quiet),
           "runs": [{side: {"wall_s": r.wall_s, "other_cores": r.other_cores}
                     for side, r in p.items()} for p in pairs]}
    estimates = {side: (pairs[-1][side].result["log_likelihood"],
                        pairs[-1][side].result["log_likelihood_se"]) for side in sides}
    row["log_likelihood"] = estimates
    if "plain" in sides:
        row["ratio"] = {side: medians[side] / medians["plain"] for side in sides
                        if side != "plain"}
        row["pair_ratio"] = {side: statistics.median(p[side].wall_s / p["plain"].wall_s
                                                     for p in pairs)
                             for side in sides if side != "plain"}
        (a, a_se), (b, b_se) = estimates["pyro-vae"], estimates["plain"]
        row["ll_agree"] = abs(a - b) <= 4 * (a_se ** 2 + b_se ** 2) ** 0.5
        row["plain_phases_s"] = pairs[-1]["plain"].result.get("phases_s")
    row["median_epoch_s"] = {side: statistics.median(pairs[-1][side].result["epoch_time_s"])
                             for side in sides
                             if pairs[-1][side].result.get("epoch_time_s")}
    return row


def print_table(rows: list[dict]) -> None:
    for r in rows:
        sides = list(r["medians_s"])
        if "plain" in sides:
            print(f"\n| job | side | median wall (s) | ratio to plain | median pair ratio | "
                  f"test log-likelihood |\n|---|---|---:|---:|---:|---:|")
            for side in sides:
                ll, se = r["log_likelihood"][side]
                ratio = (f"{r['ratio'][side]:.3f}× | {r['pair_ratio'][side]:.3f}×"
                         if side != "plain" else "1 | 1")
                print(f"| {r['job']} | {side} | {r['medians_s'][side]:.2f} | {ratio} | "
                      f"{ll:.2f} ± {se:.2f} |")
            print(f"\npairs: {r['pairs']} ({r['quiet_pairs']} quiet); the test log-likelihoods "
                  f"{'agree' if r['ll_agree'] else 'DO NOT AGREE'} (within 4 standard errors)")
        else:
            reference = r["medians_s"]["all changes"]
            print(f"\n| job | variant | median wall (s) | vs all changes (s) | median epoch (s) |"
                  f"\n|---|---|---:|---:|---:|")
            for side in sides:
                epoch = r["median_epoch_s"].get(side)
                print(f"| {r['job']} | {side} ({ {**ABLATIONS, **REMOVALS}[side]}) | "
                      f"{r['medians_s'][side]:.2f} | {r['medians_s'][side] - reference:+.2f} | "
                      + ("—" if epoch is None else f"{epoch:.4f}") + " |")
            print(f"\nrepeats: {r['pairs']} ({r['quiet_pairs']} quiet)")
        runs = "; ".join(", ".join(f"{side} {v['wall_s']:.2f} s"
                                   + (f" (others {v['other_cores']:.2f} cores)"
                                      if v["other_cores"] is not None else "")
                                   for side, v in p.items()) for p in r["runs"])
        print(f"\n{r['job']} ({r['data']}), runs in order: {runs}")


# -- the profile ----------------------------------------------------------------------------------

def import_times(command: list[str], top: int = 12) -> list[tuple[str, float, float]]:
    """(module, self s, cumulative s) of the top-level imports of ``command`` (run with
    ``python -X importtime``), largest first, and the total as the last row."""
    done = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True,
                          text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|", 2)
        if name.startswith(" ") and not name.startswith("  "):  # one space: top level
            rows.append((name.strip(), int(own) / 1e6, int(cumulative) / 1e6))
    total = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    return rows[:top] + [("(all top-level imports)", float("nan"), total)]


#: pyro-vae's phases: (label, module, attribute); a method is "Class.method"
PHASES = [
    ("data (load_data)", "pyro_vae.data", "load_data"),
    ("model (build_model)", "pyro_vae.lvm", "build_model"),
    ("checks (options, data, dry run)", "pyro_vae.training", "_prepare"),
    ("trainer set-up (optimizer, random state)", "pyro_vae.training", "Trainer.__init__"),
    ("training epochs (steps)", "pyro_vae.training", "Trainer._epochs"),
    ("validation pass", "pyro_vae.training", "_validation_elbo"),
    ("checkpoints", "pyro_vae.training", "Trainer.save_checkpoint"),
    ("metrics.jsonl + weights.pt", "pyro_vae.callbacks", "MetricsWriter.on_epoch_end"),
    ("figures: model outputs, drawing started", "pyro_vae.training", "write_figures"),
    ("final evaluation (test log-likelihood)", "pyro_vae.cli", "_final_evaluation"),
    ("waiting for the figures", "pyro_vae.training", "FitResult.wait_for_figures"),
]


def child_phases(argv: list[str]) -> None:
    """Run ``pyro-vae train argv`` in this process with every phase timed (wall clock,
    exclusive of the phases nested in it) and every import timed apart; print JSON."""
    started = time.perf_counter()
    local = threading.local()
    stack: list[str] = ["start-up (imports of pyro-vae, torch, Pyro)"]
    own: dict[str, float] = {}
    imports: dict[str, float] = {}
    background = {"figures drawn (background thread)": 0.0}
    real_import = builtins.__import__

    def timed_import(*args, **kwargs):
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        begin = time.perf_counter()
        try:
            return real_import(*args, **kwargs)
        finally:
            local.depth = depth
            if depth == 0:
                label = (stack[-1] if threading.current_thread() is threading.main_thread()
                         else "figures drawn (background thread)")
                imports[label] = imports.get(label, 0.0) + time.perf_counter() - begin

    builtins.__import__ = timed_import
    clock = {"mark": started}

    def switch(label: str | None) -> None:
        now = time.perf_counter()
        own[stack[-1]] = own.get(stack[-1], 0.0) + now - clock["mark"]
        clock["mark"] = now
        if label is None:
            stack.pop()
        else:
            stack.append(label)

    def wrap(label, function):
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return function(*args, **kwargs)
            switch(label)
            try:
                return function(*args, **kwargs)
            finally:
                switch(None)
        return wrapper

    import importlib

    import pyro_vae.cli as cli

    for label, module_name, attribute in PHASES:
        module = importlib.import_module(module_name)
        owner, name = module, attribute
        if "." in attribute:
            owner_name, name = attribute.split(".")
            owner = getattr(module, owner_name)
        setattr(owner, name, wrap(label, getattr(owner, name)))
    from pyro_vae import plots

    def in_background(function):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if threading.current_thread() is not threading.main_thread():
                    background["figures drawn (background thread)"] += (time.perf_counter()
                                                                        - begin)
        return wrapper

    plots.save_grid, plots.save_loss = in_background(plots.save_grid), in_background(
        plots.save_loss)
    switch("other (arguments, run directory, reports)")
    code = cli.main(argv)
    switch(None)
    print(json.dumps({"code": code, "total_s": time.perf_counter() - started, "phases_s": own,
                      "imports_s": imports, "background_s": background}))


def profile(job: Job, work: Path) -> None:
    out = work / "profile-run"
    argv = ["train", *job.pyro_args, "--out", str(out), "--quiet"]
    print(f"## Profile of `pyro-vae {' '.join(argv[:-3] + ['--out', 'DIR'])}` ({job.data_note})")

    print("\n### Top-level imports (python -X importtime; cumulative seconds)\n")
    shutil.rmtree(out, ignore_errors=True)
    print("| module | cumulative (s) |\n|---|---:|")
    for name, _, cumulative in import_times(["-m", "pyro_vae.cli", *argv]):
        print(f"| {name} | {cumulative:.3f} |")
    shutil.rmtree(out, ignore_errors=True)
    plain_imports = import_times([str(PLAIN), "--data", str(job.npz), *job.plain_args,
                                  "--epochs", "1", "--eval-particles", "1"])
    print(f"\nplain_job.py's top-level imports: "
          + ", ".join(f"{n} {c:.3f} s" for n, _, c in plain_imports[:4])
          + f"; all {plain_imports[-1][2]:.3f} s")

    print("\n### Wall time by phase (one run each; timers in the child process)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-phases", "--",
                           *argv], capture_output=True, text=True)
    outside = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    plain = timed([sys.executable, str(PLAIN), "--data", str(job.npz), *job.plain_args],
                  "plain", None)
    print("| phase | pyro-vae (s) | of which imports (s) |\n|---|---:|---:|")
    interpreter = outside - phases["total_s"]
    for label, seconds in sorted(phases["phases_s"].items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.3f} | {phases['imports_s'].get(label, 0.0):.3f} |")
    print(f"| interpreter start and exit (outside the timers) | {interpreter:.3f} | |")
    print(f"| **whole process** | **{outside:.3f}** | |")
    for label, seconds in phases["background_s"].items():
        print(f"| {label}: overlaps the final evaluation | ({seconds:.3f}) | "
              f"({phases['imports_s'].get(label, 0.0):.3f}) |")
    print(f"\nplain_job.py, whole process {plain.wall_s:.3f} s: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in plain.result["phases_s"].items()))

    print("\n### cProfile of the same job, grouped by phase (cumulative s; the profiler slows "
          "Python-heavy code)\n")
    shutil.rmtree(out, ignore_errors=True)
    stats_file = work / "job.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats_file), "-m", "pyro_vae.cli",
                    *argv], capture_output=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    stats = pstats.Stats(str(stats_file))
    table = stats.stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    total = max(ct for (_, _, _, ct, _) in table.values())

    def cumulative(module_file: str, function: str) -> float:
        return sum(ct for (path, _, name), (_, _, _, ct, _) in table.items()
                   if path.endswith(module_file) and name == function)

    groups = [("imports (all, wherever they happen)", "<frozen importlib._bootstrap>",
               "_find_and_load")]
    groups += [(label, module.replace("pyro_vae.", "pyro_vae/") + ".py",
                attribute.split(".")[-1]) for label, module, attribute in PHASES]
    print("| phase | cumulative (s) |\n|---|---:|")
    print(f"| whole job | {total:.3f} |")
    for label, module_file, function in groups:
        print(f"| {label} | {cumulative(module_file, function):.3f} |")
    print("\nTop functions by own time:\n")
    stream = __import__("io").StringIO()
    pstats.Stats(str(stats_file), stream=stream).sort_stats("tottime").print_stats(12)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print("```\n" + "\n".join(lines[start:]) + "\n```")


# -- the pieces, per epoch ------------------------------------------------------------------------

_FRESH_DIGITS = """
import sys, time, numpy, torch
from pyro_vae import data
if sys.argv[1] == "sklearn":
    data._digits_file = lambda: None
started = time.perf_counter()
data.load_digits()
print(time.perf_counter() - started)
"""

_FRESH_FIGURES = """
import sys, time, torch
from pyro_vae import load_data, VAE
from pyro_vae.training import write_figures
from pathlib import Path
d = load_data("digits")
torch.manual_seed(0)
vae = VAE(d.data_shape, 8)
history = [{"epoch": e, "train_loss": 30.0 - e, "val_elbo": e - 30.0} for e in range(1, 201)]
started = time.perf_counter()
write_figures(vae, d, history, Path(sys.argv[1]))
print(time.perf_counter() - started)
"""


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pieces(work: Path, args) -> None:
    """Per-epoch costs of the parts of a run that are not training steps, and of the Adam step,
    before and after the changes, in this process (interleaved repeats, medians)."""
    import pyro
    import torch

    from pyro_vae import VAE, distributed, load_data, runs
    from pyro_vae.checkpoints import LoopState, state_dict
    from pyro_vae.evaluation import evaluate
    from pyro_vae.objectives import make_objective
    from pyro_vae.training import _validation_elbo, make_optimizer

    print("\n### Fresh-process costs (median of 3)\n")
    print("| piece | before (s) | after (s) |\n|---|---:|---:|")
    fresh = {}
    for mode in ("sklearn", "file") * 3:
        done = subprocess.run([sys.executable, "-c", _FRESH_DIGITS, mode], capture_output=True,
                              text=True, check=True)
        fresh.setdefault(mode, []).append(float(done.stdout))
    print(f"| reading the digits (load_digits, torch already imported) | "
          f"{statistics.median(fresh['sklearn']):.3f} | {statistics.median(fresh['file']):.3f} |")
    figures = []
    for i in range(3):
        folder = work / f"figures-{i}"
        folder.mkdir()
        done = subprocess.run([sys.executable, "-c", _FRESH_FIGURES, str(folder)],
                              capture_output=True, text=True, check=True)
        figures.append(float(done.stdout))
    print(f"| drawing the three figures in a fresh process (imports included) | "
          f"{statistics.median(figures):.3f} | (in a background thread) |")

    data_sets = {"digits": load_data("digits")}
    generator = torch.Generator().manual_seed(0)
    from pyro_vae.data import from_array
    data_sets["MNIST-size"] = from_array(torch.rand(60000, 784, generator=generator).numpy(),
                                         name="synthetic")
    shapes = {"digits": dict(latent_dim=8), "MNIST-size": dict(latent_dim=20, hidden=(400,))}
    print("\n### Per epoch, in one process (median of interleaved repeats)\n")
    print("| piece | model | before (ms) | after (ms) |\n|---|---|---:|---:|")
    for name, dataset in data_sets.items():
        pyro.set_rng_seed(0)
        vae = VAE(dataset.data_shape, **shapes[name])
        repeats = 21 if name == "digits" else 5

        def old_validation():
            val = evaluate(vae, dataset, split="val", particles=1, seed=3)
            return val.summary["elbo"], val.summary["elbo_se"]

        def new_validation():
            return _validation_elbo(vae, dataset, 1, 3, distributed.SINGLE)

        assert old_validation() == new_validation()
        times = {"old": [], "new": []}
        for _ in range(repeats):
            for key, function in (("old", old_validation), ("new", new_validation)):
                started = time.perf_counter()
                function()
                times[key].append(time.perf_counter() - started)
        print(f"| validation pass ({len(dataset.val)} datapoints) | {name} | "
              f"{1e3 * statistics.median(times['old']):.2f} | "
              f"{1e3 * statistics.median(times['new']):.2f} |")

        optimizer = make_optimizer(vae.parameters(), 1e-3)
        loss_fn = make_objective("elbo", 1)
        x = dataset.train[:128]
        with pyro.validation_enabled(False):
            loss_fn.differentiable_loss(vae.model, vae.guide, x, num_data=len(dataset.train)
                                        ).backward()
        optimizer.step()  # the moments exist: a checkpoint of their size
        run_dir = work / f"pieces-{name}"
        run_dir.mkdir()
        order_generator = torch.Generator().manual_seed(0)
        row = {"epoch": 1, "step": 12, "train_loss": 30.0, "beta": 1.0, "val_elbo": -30.0,
               "val_elbo_se": 0.2, "epoch_time_s": 0.08, "elapsed_s": 8.0}
        order_generator = torch.Generator().manual_seed(0)

        def state():
            return state_dict(vae, optimizer, LoopState(), order_generator)

        def synchronous(with_checkpoint):  # what every epoch's end did before
            runs.append_metrics(run_dir, row)
            runs.save_weights(run_dir, vae)
            if with_checkpoint:
                runs.save_checkpoint(run_dir, state())

        writer = runs.BackgroundWriter()

        def background(with_checkpoint):  # the training thread's share now: snapshots, queue
            weights = runs.serialized({k: v.detach().cpu() for k, v in vae.state_dict().items()})
            writer.submit(lambda: runs.append_metrics(run_dir, row))
            writer.submit(lambda: runs.write_bytes(run_dir / runs.WEIGHTS_FILE, weights))
            if with_checkpoint:
                data = runs.serialized(state())
                writer.submit(lambda: runs.write_bytes(run_dir / runs.CHECKPOINT_FILE, data))

        files = {}
        for key, function in (("before", synchronous), ("after", background)) * repeats:
            for with_checkpoint in (True, False):
                started = time.perf_counter()
                function(with_checkpoint)
                files.setdefault((key, with_checkpoint), []).append(time.perf_counter() - started)
                writer.wait()  # the writes of one epoch end before the next (an epoch apart)
        writer.close()
        ms = {k: 1e3 * statistics.median(v) for k, v in files.items()}
        size = (run_dir / "checkpoint.pt").stat().st_size / 2**20
        print(f"| an epoch's files on the training thread: metrics.jsonl, weights.pt, "
              f"checkpoint.pt ({size:.1f} MiB) | {name} | {ms['before', True]:.2f} | "
              f"{ms['after', True]:.2f} when due, else {ms['after', False]:.2f} |")
        steps = -(-len(dataset.train) // 128)
        steps_time = {}
        for kind in ("default", "fused", "default", "fused") * 3:
            adam = (torch.optim.Adam(vae.parameters(), lr=1e-3) if kind == "default"
                    else make_optimizer(vae.parameters(), 1e-3))
            adam.step()  # its state exists
            steps_time.setdefault(kind, []).append(_median_time(adam.step, 20))
        before, after = (statistics.median(steps_time[k]) for k in ("default", "fused"))
        print(f"| Adam step × {steps} steps | {name} | {1e3 * before * steps:.2f} | "
              f"{1e3 * after * steps:.2f} |")


# -- main -----------------------------------------------------------------------------------------

def main() -> None:
    if "--child-phases" in sys.argv:
        child_phases(sys.argv[sys.argv.index("--") + 1:])
        return
    if "--child-ablate" in sys.argv:
        name = sys.argv[sys.argv.index("--child-ablate") + 1]
        sys.exit(child_ablate(name, sys.argv[sys.argv.index("--") + 1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="digits,mnist")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--mnist-source", choices=("auto", "real", "synthetic"), default="auto")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help="where the MNIST files are (default ../shared/data)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of both sides (pyro-vae --threads N); default: "
                             "torch's choice, one per core")
    parser.add_argument("--noisy", type=float, default=0.25,
                        help="mark a run during which other processes used more cores")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also time pyro-vae from this source tree (PYTHONPATH=TREE), "
                             "e.g. an earlier commit's pyro_vae/, models/ and guides/")
    parser.add_argument("--ablate", action="store_true",
                        help="instead of the plain script, time pyro-vae with each change of "
                             "the whole-job work reverted in turn (see ABLATIONS)")
    parser.add_argument("--without", action="store_true",
                        help="with --ablate: the job with each remaining feature removed "
                             "instead of each change reverted")
    parser.add_argument("--plain-quick-exit", action="store_true",
                        help="a third side: the plain script ending as pyro-vae does "
                             "(os._exit after its output, no interpreter teardown)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--pieces", action="store_true",
                        help="per-epoch costs of validation, checkpoints, metrics and the Adam "
                             "step, and the fresh-process costs of the digits and figures")
    parser.add_argument("--profile-job", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings (2 epochs, K = 50; MNIST 1 epoch, K = 20), 1 pair")
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} "
          f"({info['torch_threads']} threads), pyro {info['pyro']}, Python {info['python']}; "
          f"commit {info['commit']}; {info['date']}")
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        work = Path(tmp)
        if args.pieces:
            pieces(work, args)
            return
        if args.profile:
            job = make_jobs([args.profile_job], work, args)[0]
            warm_caches()
            profile(job, work)
            return
        jobs = make_jobs([j.strip() for j in args.jobs.split(",") if j.strip()], work, args)
        warm_caches()
        if args.ablate:
            sides = ["all changes", *REMOVALS] if args.without else list(ABLATIONS)
        else:
            sides = ["pyro-vae", "plain", *(["before"] if args.baseline else []),
                     *(["plain, quick exit"] if args.plain_quick_exit else [])]
        rows = []
        for job in jobs:
            pairs = [run_pair(job, i, work, sides, args)
                     for i in range(1 if args.smoke else args.pairs)]
            rows.append(summarise(job, pairs, args.noisy))
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
