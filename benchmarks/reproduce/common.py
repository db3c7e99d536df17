"""What every reproduction script shares: the command line, training and scoring one model on
MNIST with pyro-vae's public API, paired differences, and the JSON and markdown it writes.

A script describes its models as :class:`Spec` rows; :func:`run_specs` trains each one with
:func:`pyro_vae.fit` (into ``--work``/<name>, reused when the same spec at the same budget has
already finished there) and scores it on the first ``--test-points`` test images with the
K = ``--eval-particles`` importance-weighted estimate of log p(x). Specs are independent, so
``--jobs 2`` trains two at a time (one thread each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass
class Spec:
    """One model to train and score."""

    name: str                       # a unique key within the script, e.g. "1L-iwae-k50"
    model: str                      # "vae", "hierarchical" or "m2" (see build)
    model_options: dict
    objective: str
    particles: int
    epochs: int
    batch_size: int = 20
    lr: float = 1e-3
    lr_schedule: str = "burda"
    seed: int = 0
    objective_options: dict = field(default_factory=dict)
    #: data options: ``labels_per_class`` for the semi-supervised model
    data_options: dict = field(default_factory=dict)
    anneal_steps: int = 0
    #: labelled rows per minibatch (stratified semi-supervised minibatches), or None: uniform
    labelled_batch: int | None = None

    def key(self) -> str:
        fields = asdict(self)
        if fields["labelled_batch"] is None:  # the keys of the runs made before it existed
            del fields["labelled_batch"]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:10]}"


def arguments(description: str, budget: int, full_budget: int, *, jobs: int = 2,
              eval_particles: int = 5000) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                        help="the folder holding MNIST/raw/ (default: ../shared/data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"training epochs per model (default {budget}; sized for about 45 "
                             "minutes on a 2-core CPU)")
    parser.add_argument("--full", action="store_true",
                        help=f"the paper's own schedule ({full_budget} epochs) and the whole "
                             "test set: for a GPU")
    parser.add_argument("--test-points", type=int, default=None,
                        help="test images scored (default 1000; all 10,000 with --full)")
    parser.add_argument("--eval-particles", type=int, default=eval_particles,
                        help=f"K of the log-likelihood estimate (default {eval_particles})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-points", type=int, default=None,
                        help="train on the first N training images only (a quick check of the "
                             "script; the table then reproduces nothing)")
    parser.add_argument("--jobs", type=int, default=jobs,
                        help=f"models trained at a time, one thread each (default {jobs})")
    parser.add_argument("--work", default=str(HERE / "runs"),
                        help="run directories; a finished spec found there is reused")
    parser.add_argument("--results", default=str(HERE / "results"),
                        help="where the JSON and markdown tables go")
    args = parser.parse_args()
    if args.budget is not None and args.full:
        parser.error("--budget and --full exclude each other")
    args.epochs = full_budget if args.full else (budget if args.budget is None else args.budget)
    if args.epochs < 1:
        parser.error("--budget must be a positive number of epochs")
    if args.test_points is None:
        args.test_points = 10_000 if args.full else 1000
    if not (ROOT.exists() and (Path(args.data_dir) / "MNIST" / "raw").is_dir()):
        parser.error(f"no MNIST/raw/ under {args.data_dir}; pass --data-dir (pyro-vae train "
                     "--data mnist --download fetches it where the internet is reachable)")
    args.command = "python " + " ".join(shlex.quote(a) for a in
                                        [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return args


def data_options(args, **more) -> dict:
    """The data options every spec of a script shares."""
    options = dict(more)
    if args.train_points is not None:
        options["train_points"] = args.train_points
    return options


# -- one model ---------------------------------------------------------------------------------
def build(spec: Spec, dataset):
    import pyro_vae
    from pyro_vae.catalogue import HierarchicalVAE, SemiSupervisedVAE

    options = dict(spec.model_options)
    if spec.model == "vae":
        return pyro_vae.VAE(dataset.data_shape, **options)
    if spec.model == "hierarchical":
        return HierarchicalVAE(dataset.data_shape, **options)
    if spec.model == "m2":
        return SemiSupervisedVAE(dataset.data_shape, num_classes=10, **options)
    raise ValueError(f"unknown model {spec.model!r}")


def load_mnist(data_dir: str, device: str, spec: Spec):
    from pyro_vae.data import keep_labels, load_data

    dataset = load_data("mnist", device, data_dir=data_dir, binarize_mode="dynamic")
    train_points = spec.data_options.get("train_points")
    if train_points is not None:  # a quick check of the script, not a reproduction
        import dataclasses
        labels = dict(dataset.labels)
        if labels.get("train") is not None:
            labels["train"] = labels["train"][:train_points]
        dataset = dataclasses.replace(dataset, train=dataset.train[:train_points], labels=labels)
    per_class = spec.data_options.get("labels_per_class")
    if per_class is not None:
        dataset = keep_labels(dataset, per_class, seed=spec.seed)
    return dataset


def train_and_score(spec: Spec, settings: dict) -> dict:
    """Train ``spec`` (or reuse its finished run) and score it; a JSON-able row."""
    import torch

    torch.set_num_threads(settings["threads"])
    import pyro_vae
    from pyro_vae.evaluation import active_units

    run_dir = Path(settings["work"]) / spec.key()
    scored = run_dir / "reproduction.json"
    probe = settings.get("probes", {}).get(spec.name)
    if scored.exists():
        row = json.loads(scored.read_text())
        if row.get("test_points") == settings["test_points"] and \
                row.get("eval_particles") == settings["eval_particles"]:
            if probe is not None and row.get("probe", {}).get("request") != probe:
                dataset = load_mnist(settings["data_dir"], settings["device"], spec)
                model = pyro_vae.load_run(run_dir, settings["device"],
                                          model=build(spec, dataset)).vae
                row["probe"] = probe_estimators(model, dataset, probe, spec.seed)
                scored.write_text(json.dumps(row))
            row["reused"] = True
            return row
    dataset = load_mnist(settings["data_dir"], settings["device"], spec)
    torch.manual_seed(spec.seed)
    model = build(spec, dataset)
    options = dict(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                   lr_schedule=spec.lr_schedule, seed=spec.seed, device=settings["device"],
                   particles=spec.particles, val_particles=1,
                   anneal_steps=spec.anneal_steps, labelled_batch=spec.labelled_batch,
                   **spec.objective_options)
    started = time.perf_counter()
    if run_dir.exists() and (run_dir / "weights.pt").exists() and \
            (run_dir / "metrics.jsonl").exists() and _finished(run_dir, spec.epochs):
        model = pyro_vae.load_run(run_dir, settings["device"], model=model).vae
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elif (run_dir / "checkpoint.pt").exists():  # an interrupted run of this spec: go on
        result = pyro_vae.resume(run_dir, epochs=spec.epochs, device=settings["device"],
                                 progress=False, model=model)
        model, history = result.vae, result.history
    else:
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        result = pyro_vae.fit(model, dataset, spec.objective, out=run_dir, progress=False,
                              **options)
        model, history = result.vae, result.history
    train_seconds = time.perf_counter() - started
    model.eval()
    test = dataset.split("test")[:settings["test_points"]]
    labels = dataset.split_labels("test")[:settings["test_points"]]
    started = time.perf_counter()
    evaluation = pyro_vae.evaluate(model, test, particles=settings["eval_particles"],
                                   labels=labels if getattr(model, "conditional", False) else None,
                                   seed=spec.seed)
    eval_seconds = time.perf_counter() - started
    row = {
        "name": spec.name, "spec": asdict(spec), "run_dir": str(run_dir),
        "test_points": settings["test_points"], "eval_particles": settings["eval_particles"],
        "nll": -evaluation.summary["log_likelihood"],
        "nll_se": evaluation.summary["log_likelihood_se"],
        "nll_mc_se": evaluation.summary["log_likelihood_mc_se"],
        "elbo": evaluation.summary["elbo"],
        "log_likelihood": evaluation.log_likelihood.double().cpu().tolist(),
        "active_units": {site: active_units(means.double())
                         for site, means in evaluation.site_posterior_means.items()},
        "final_train_loss": history[-1].get("train_loss") if history else None,
        "final_val_elbo": history[-1].get("val_elbo") if history else None,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
    }
    if hasattr(model, "classify"):
        with torch.no_grad():
            full_test = dataset.split("test")
            predicted = torch.cat([model.classify(chunk).argmax(-1)
                                   for chunk in full_test.split(1000)])
            row["test_accuracy"] = float((predicted.cpu() == dataset.split_labels("test").cpu())
                                         .double().mean())
    if probe is not None:
        row["probe"] = probe_estimators(model, dataset, probe, spec.seed)
    scored.write_text(json.dumps(row))
    row["reused"] = False
    return row


def probe_estimators(model, dataset, request: dict, seed: int) -> dict:
    """:func:`pyro_vae.estimators.compare_estimators` at the trained parameters, on the first
    ``batch`` test images: each estimator's bound and the SNR and variance of its encoder's and
    decoder's gradients over ``repeats`` draws."""
    from pyro_vae.estimators import compare_estimators

    x = dataset.split("test")[:request.get("batch", 20)]
    rows = []
    for objectives, particles, options in request["estimators"]:
        rows += compare_estimators(model, x, objectives=objectives, particles=particles,
                                   repeats=request.get("repeats", 100), timing_repeats=2,
                                   seed=seed, **options)
    return {"request": request, "rows": rows}


def _finished(run_dir: Path, epochs: int) -> bool:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return len(lines) >= epochs and json.loads(lines[-1]).get("epoch") == epochs


def run_specs(specs: list[Spec], args, *, progress: Callable[[str], None] = print,
              probes: dict | None = None) -> dict:
    """Train and score every spec, ``args.jobs`` at a time; rows by name. ``probes`` maps a
    spec's name to a request of :func:`probe_estimators` run on the trained model."""
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs)) if args.device == "cpu" else 1
    settings = {"data_dir": args.data_dir, "device": args.device, "work": args.work,
                "test_points": args.test_points, "eval_particles": args.eval_particles,
                "threads": threads, "probes": probes or {}}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    if args.jobs <= 1:
        for spec in specs:
            rows[spec.name] = train_and_score(spec, settings)
            progress(_line(rows[spec.name], started))
        return rows
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(train_and_score, spec, settings): spec for spec in specs}
        for future in concurrent.futures.as_completed(futures):
            try:
                row = future.result()
            except Exception as exc:  # a model that fails is reported, not the whole table lost
                spec = futures[future]
                row = {"name": spec.name, "spec": asdict(spec), "failed": f"{exc}"}
                progress(f"{spec.name}: FAILED: {exc}")
                rows[row["name"]] = row
                continue
            rows[row["name"]] = row
            progress(_line(row, started))
    return {spec.name: rows[spec.name] for spec in specs}


def _line(row: dict, started: float) -> str:
    extra = f", accuracy {row['test_accuracy']:.4f}" if "test_accuracy" in row else ""
    return (f"[{(time.perf_counter() - started) / 60:5.1f} min] {row['name']}: NLL "
            f"{row['nll']:.2f} ± {row['nll_se']:.2f}, active units {row['active_units']}{extra}"
            f"{' (reused)' if row.get('reused') else ''}")


# -- statistics --------------------------------------------------------------------------------
def paired(rows: dict, better: str, worse: str) -> dict:
    """The mean per-image NLL improvement of ``better`` over ``worse`` and its paired SE."""
    a = np.asarray(rows[better]["log_likelihood"])
    b = np.asarray(rows[worse]["log_likelihood"])
    diff = a - b  # log-likelihood gain of `better`
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return {"better": better, "worse": worse, "gain_nats": mean, "se": se,
            "z": mean / se if se > 0 else float("inf")}


def claim(text: str, holds: bool, evidence: str) -> dict:
    return {"claim": text, "holds": bool(holds), "evidence": evidence}


def total_active(row: dict) -> int:
    return int(sum(row["active_units"].values()))


# -- output ------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        import pyro
        info["pyro"] = pyro.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "pyro_vae", "benchmarks/reproduce/*.py"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(name: str, args, *, title: str, table: str, claims: list[dict], rows: dict,
          wall_seconds: float, notes: str = "") -> Path:
    """``results/<name>.json`` (everything, per-image log-likelihoods dropped) and
    ``results/<name>.md`` (the table, the shape claims, and how it was made)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    device_name = args.device
    if args.device.startswith("cuda"):
        import torch
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    summary = {
        "title": title, "command": args.command, "commit": commit(), "machine": machine(),
        "device": device_name, "epochs": args.epochs, "full": bool(args.full),
        "test_points": args.test_points, "eval_particles": args.eval_particles,
        "wall_seconds": wall_seconds, "claims": claims,
        "rows": {key: {k: v for k, v in row.items() if k != "log_likelihood"}
                 for key, row in rows.items()},
    }
    (results / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    held = sum(c["holds"] for c in claims)
    lines = [f"## {title}", "",
             f"`{args.command}` — commit {summary['commit']}, {summary['machine']['processor']} "
             f"({summary['machine']['cpus']} CPUs, device {device_name}), torch "
             f"{summary['machine']['torch']}, wall time {wall_seconds / 60:.1f} min. "
             f"Budget: {args.epochs} epoch{'s' if args.epochs != 1 else ''} per model "
             f"({'the paper schedule' if args.full else 'reduced'}); test NLL in nats with "
             f"K = {args.eval_particles} on the first {args.test_points} test images "
             "(± one standard error over images).", "", table, "",
             f"Shape claims at this budget: {held} of {len(claims)} hold.", ""]
    for c in claims:
        lines.append(f"- {'✔' if c['holds'] else '✘'} {c['claim']} — {c['evidence']}")
    if notes:
        lines += ["", notes]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    return results / f"{name}.md"


def fmt(row: dict | None) -> str:
    if row is not None and "failed" in row:
        return "failed (see the claims)"
    return "—" if row is None else f"{row['nll']:.2f} ± {row['nll_se']:.2f}"


def failed(rows: dict, *names: str) -> str | None:
    """The error of the first of ``names`` whose training failed, else ``None``."""
    for name in names:
        if "failed" in rows[name]:
            return f"{name} failed: {rows[name]['failed']}"
    return None
