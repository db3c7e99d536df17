"""The ``pyro-vae`` command line: ``train``, ``evaluate``, ``sample``, ``compare-estimators``,
``diagnose``, ``compare``, ``explore`` and ``plot``.

Every error a user can cause ends with one line on stderr (``pyro-vae: error: …``) and exit
status 2; no traceback, and no run directory is left behind by a run that could not start.

Building the parser and parsing the arguments import neither torch nor Pyro (nor ArviZ or
matplotlib): ``--help`` and usage errors answer at once, and each command imports what its
work needs. Only a plug-in (``--import``, or an installed entry point) may bring torch in
earlier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import config
from .errors import ConfigError, PyroVAEError, TrainingInterrupted

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


_flag = config.flag_type
_integer = _flag(config.SEED)
_positive_int = _flag(config.POSITIVE_INT)
_non_negative_int = _flag(config.NON_NEGATIVE_INT)
_finite_float = _flag(config.FINITE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro "
                     "model/guide pairs: train, evaluate and sample.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_scoring_arguments(command: argparse.ArgumentParser, data_help: str) -> None:
        """The flags of the commands that score a trained run on a split with K particles."""
        command.add_argument("--data", metavar="NAME|PATH", help=data_help)
        command.add_argument("--split", choices=config.SPLITS, default="test")
        command.add_argument("--particles", type=_positive_int, default=1000, metavar="K")
        command.add_argument("--seed", type=_integer, default=0, metavar="S")
        command.add_argument("--json", action="store_true", help="print one JSON object")

    def add_model_arguments(command: argparse.ArgumentParser) -> None:
        """The flags that describe a fresh model and its data, from the schema; None means
        "not given": the TOML file, then the schema's default supply the value."""
        command.add_argument("--config", metavar="FILE.toml",
                             help="options as a TOML table; flags win")
        config.add_arguments(command, ("data", "model"), include=("seed", "device"))
        for kind in config.COMPONENT_SECTIONS:
            command.add_argument(f"--{kind}-option", action="append", metavar="KEY=VALUE",
                                 help=f"an option of the {kind} (repeatable; VALUE as in TOML, "
                                      f"e.g. components=3)")

    train = commands.add_parser("train", help="train a VAE (default: the bundled digits)",
                                description="Train a VAE with SVI and write a run directory.")
    add_model_arguments(train)
    config.add_arguments(train, ("training", "run"), exclude=("seed", "device", "out"))
    train.add_argument("--out", metavar="DIR", help=config.BY_NAME["out"].help)
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its checkpoint (with --epochs: up to that many)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--dry-run", action="store_true",
                       help="check the configuration, the data and that the objective scores "
                            "the model; train nothing, write nothing")

    evaluate = commands.add_parser("evaluate", help="bounds and log-likelihood of a trained run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    add_scoring_arguments(evaluate, "default: the run's data")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, metavar="B")
    evaluate.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:i]")
    evaluate.add_argument("--proposal", choices=("guide", "prior"), default="guide",
                          help="draw the K particles from the guide q(z|x) (importance "
                               "sampling, default) or from the prior p(z) (the naive Monte "
                               "Carlo estimate)")
    evaluate.add_argument("--refine-steps", type=_non_negative_int, default=0, metavar="S",
                          help="optimize a per-datapoint guide from the encoder's output for S "
                               "steps and report the approximation and amortization gaps")

    compare = commands.add_parser(
        "compare-estimators", help="bound, gradient SNR/variance and speed of ELBO estimators",
        description="Compare objectives × particles on one model state: a trained RUN_DIR, "
                    "or a fresh model built from the same flags as train.")
    compare.add_argument("run_dir", metavar="RUN_DIR", nargs="?")
    add_model_arguments(compare)
    compare.add_argument("--objectives", default="elbo,iwae,dreg", metavar="O1,O2",
                         help="comma-separated estimators, objective[:gradient] with gradient "
                              "pathwise (default), score, enum or relaxed, e.g. "
                              "elbo,elbo:score,vimco (default elbo,iwae,dreg)")
    compare.add_argument("--temperature", type=_finite_float, default=0.5, metavar="T",
                         help="temperature of the :relaxed estimators (default 0.5)")
    compare.add_argument("--particles", default="1,5,50", metavar="K1,K2",
                         help="comma-separated K values (default 1,5,50)")
    compare.add_argument("--alpha", type=_finite_float, metavar="A", help="Rényi α (renyi)")
    compare.add_argument("--groups", type=_positive_int, metavar="M",
                         help="groups of K particles (miwae, piwae; default 1)")
    compare.add_argument("--elbo-weight", type=_flag(config.UNIT_INTERVAL), metavar="W",
                         help="the ELBO's weight (ciwae; default 0.5)")
    compare.add_argument("--repeats", type=_positive_int, default=100, metavar="R",
                         help="gradient draws per objective × K (default 100)")
    compare.add_argument("--batch-size", type=_positive_int, default=64, metavar="B",
                         help="datapoints in the fixed comparison batch (default 64)")
    compare.add_argument("--split", choices=config.SPLITS, default="val")
    compare.add_argument("--pretrain-epochs", type=_non_negative_int, default=0, metavar="E",
                         help="train a fresh model with elbo for E epochs first (default 0)")
    compare.add_argument("--json", action="store_true", help="print a JSON list of rows")
    compare.add_argument("--plot", metavar="FILE.png", help="write bound and SNR against K")

    diagnose = commands.add_parser(
        "diagnose", help="PSIS k̂, active units, KL per dimension; writes diagnostics.nc",
        description="Diagnose a trained run: Pareto k̂ of the importance weights per datapoint "
                    "(Yao et al. 2018), active units, KL per latent dimension and posterior "
                    "collapse; the ArviZ InferenceData goes to RUN_DIR/diagnostics.nc.")
    diagnose.add_argument("run_dir", metavar="RUN_DIR")
    add_scoring_arguments(diagnose, "default: the run's data")

    compare_runs = commands.add_parser(
        "compare", help="held-out comparison of two runs with a standard error",
        description="Paired per-datapoint log-likelihood estimates of two runs on the same "
                    "datapoints: the difference, its standard error and an elpd-style table.")
    compare_runs.add_argument("run_a", metavar="RUN_A")
    compare_runs.add_argument("run_b", metavar="RUN_B")
    add_scoring_arguments(compare_runs, "default: RUN_A's data")

    explore = commands.add_parser(
        "explore", help="interpolation, traversals, anomalies, latent scatter and a probe",
        description="Write the figures of the VAE applications for a trained run and print "
                    "the probe accuracy and the most anomalous datapoints.")
    explore.add_argument("run_dir", metavar="RUN_DIR")
    explore.add_argument("--out", metavar="DIR", help="where the figures go (default RUN_DIR/explore)")
    explore.add_argument("--data", metavar="NAME|PATH", help="default: the run's data")
    explore.add_argument("--split", choices=config.SPLITS, default="test")
    explore.add_argument("--particles", type=_positive_int, default=1000, metavar="K",
                         help="importance samples for the anomaly scores (default 1000)")
    explore.add_argument("--top", type=_positive_int, default=32, metavar="N",
                         help="anomalies to show (default 32)")
    explore.add_argument("--json", action="store_true", help="print one JSON object")

    sample = commands.add_parser("sample", help="decoder means for z drawn from the prior")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--n", type=_positive_int, default=64)
    sample.add_argument("--out", default="samples.png", metavar="FILE",
                        help="a .png image grid, or .npy / .csv for the raw values")
    sample.add_argument("--seed", type=_integer, default=0, metavar="S")
    sample.add_argument("--label", type=_non_negative_int, metavar="Y",
                        help="class to generate (conditional runs; default: cycle the classes)")
    sample.add_argument("--overwrite", action="store_true",
                        help="allow --out to replace a file of a run directory")
    explore.add_argument("--overwrite", action="store_true",
                         help="allow --out to be a run directory whose figures it replaces")
    compare.add_argument("--overwrite", action="store_true",
                         help="allow --plot to replace a file of a run directory")

    plot = commands.add_parser(
        "plot", help="write a run's figures again (reconstructions, samples, loss)",
        description="Regenerate reconstructions.png, samples.png and loss.png of a run from its "
                    "weights and metrics (after a crash or a full disk while they were written).")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--data", metavar="NAME|PATH", help="default: the run's data")

    for command in commands.choices.values():
        command.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                             help="import MODULE (or a .py file) first: a plug-in that "
                                  "registers priors, likelihoods, guides or models "
                                  "(repeatable; recorded in the run directory)")
        command.add_argument("--threads", type=_positive_int, metavar="N",
                             help="CPU threads for torch's operations (default: torch's "
                                  "choice, one per core); 1 is often fastest for small models "
                                  "on a busy machine")
    return parser


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of a run: the schema's defaults, the --config file, then the flags."""
    flags = {option.name: getattr(args, option.name, None) for option in config.OPTIONS}
    return config.resolve(flags, args.config, {kind: getattr(args, f"{kind}_option", None)
                                               for kind in config.COMPONENT_SECTIONS})


#: Likelihoods with a σ option (``--likelihood-scale``).
_SCALED_LIKELIHOODS = ("normal", "laplace")


def _likelihood_options(options: dict[str, Any]) -> dict[str, Any]:
    chosen, result = options["likelihood"], {}
    if options["likelihood_scale"] is not None:
        if chosen not in _SCALED_LIKELIHOODS:
            raise ConfigError(f"--likelihood-scale applies to --likelihood "
                              f"{' or '.join(_SCALED_LIKELIHOODS)} only")
        result["scale"] = options["likelihood_scale"]
    if options["levels"] is not None and chosen != "categorical":
        raise ConfigError("--levels applies to --likelihood categorical only")
    if chosen == "categorical":
        result["levels"] = options["levels"] or (17 if options["data"] == "digits" else 256)
    return result


def _resume(args: argparse.Namespace) -> int:
    from .training import _resume_run

    allowed = {"resume", "epochs", "device", "quiet", "eval_particles", "command", "threads",
               "tensorboard", "data", "imports"}
    given = sorted(name for name, value in vars(args).items()
                   if value is not None and name not in allowed and name not in ("quiet", "dry_run"))
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} cannot change a resumed run "
                          "(only --epochs, --device, --eval-particles, --tensorboard, --threads "
                          "and --data, where the run's own data have moved, can)")
    if args.dry_run:
        raise ConfigError("--dry-run checks a new run's configuration; it does not apply to "
                          "--resume")
    started = time.perf_counter()
    result = _resume_run(args.resume, epochs=args.epochs, device=args.device or "auto",
                         progress=not args.quiet, callbacks=_tracking(args.tensorboard),
                         data=args.data, background_figures=True)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return _finish_distributed()
    last = result.history[-1]
    print(f"resumed and trained to epoch {last['epoch']} in {time.perf_counter() - started:.1f} s; "
          f"validation ELBO {last['val_elbo']:.3f} nats per datapoint")
    particles = config.DEFAULTS["eval_particles"] if args.eval_particles is None else args.eval_particles
    _evaluate_while_drawing(result, result.dataset, particles)
    print(f"run directory: {result.run_dir}")
    return _finish_distributed()


def _build(options: dict[str, Any]):
    """The data set and a freshly initialised model (seeded) described by ``options``."""
    import pyro

    from . import lvm
    from .data import keep_labels, load_data
    from .training import resolve_device

    resolve_device(options["device"])  # before any work: CUDA asked for but absent
    name = lvm.model_name(options)  # contradictory model flags, before the data are read
    dataset = load_data(options["data"], data_dir=options["data_dir"],
                        download=bool(options["download"]), binarize_mode=options["binarize"])
    pyro.set_rng_seed(int(options["seed"]))
    if name == "vae":
        options = {**options, "likelihood_options_resolved": {
            **_likelihood_options(options), **options["likelihood_options"]}}
    elif options["likelihood_scale"] is not None or options["levels"] is not None:
        raise ConfigError(f"--likelihood-scale and --levels apply to the model vae, not {name}")
    model = lvm.build_model(dataset, options)
    if options["labels_per_class"] is not None:
        if not lvm.is_semi_supervised(model):
            raise ConfigError("--labels-per-class hides training labels for semi-supervised "
                              "training; use it with --semi-supervised (or a semi-supervised "
                              "--model)")
        dataset = keep_labels(dataset, int(options["labels_per_class"]), int(options["seed"]))
    return dataset, model


def _final_evaluation(result, dataset, particles: int) -> None:
    """The test split's summary at K = ``particles`` into ``evaluation.json`` (atomically); with
    K = 0 a stale ``evaluation.json`` (of an earlier epoch) is removed."""
    from .evaluation import evaluate
    from .runs import write_json

    path = result.run_dir / "evaluation.json"
    if not particles:
        path.unlink(missing_ok=True)
        return
    summary = evaluate(result.vae, dataset, particles=particles, split="test").summary
    accuracy = _test_accuracy(result.vae, dataset)
    if accuracy is not None:
        summary["test_accuracy"] = accuracy
        print(f"test accuracy of classify(x): {accuracy:.3f}")
    write_json(path, summary)
    print(f"test log-likelihood (K={summary['particles']}): {summary['log_likelihood']:.3f} "
          f"± {summary['log_likelihood_se']:.3f} nats per datapoint; "
          f"ELBO {summary['elbo']:.3f}; active units {summary['active_units']}"
          f"/{_latent_units(result.vae, summary)}")


def _test_accuracy(model, dataset) -> float | None:
    """The accuracy of a model's ``classify(x)`` on the labelled test split (M2), or None."""
    import torch

    from . import lvm
    from .lvm import device_of

    labels = dataset.split_labels("test")
    if not lvm.has(model, "classify") or labels is None or len(labels) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = dataset.split("test").to(device_of(model))
            predicted = model.classify(x).argmax(-1).cpu()
    finally:
        model.train(was_training)
    return float((predicted == labels.cpu()).double().mean())


def _latent_units(model, summary: dict) -> Any:
    dim = getattr(model, "latent_dim", None)
    if isinstance(dim, int):
        return dim
    by_site = summary.get("active_units_by_site")
    return "+".join(str(v) for v in by_site.values()) if by_site else "?"


def _evaluate_while_drawing(result, dataset, particles: int) -> None:
    """The final evaluation while a background thread writes the run's figures (started by
    training, :func:`pyro_vae.training.write_figures`). The figures are waited for in any case;
    an error of theirs (a full disk) is raised once the evaluation has ended, and an error of
    the evaluation (an interrupt) is the one reported when both fail."""
    try:
        _final_evaluation(result, dataset, particles)
    except BaseException:
        try:
            result.wait_for_figures()
        except Exception:  # noqa: BLE001 - the evaluation's own error is reported
            pass
        raise
    result.wait_for_figures()


def cmd_train(args: argparse.Namespace) -> int:
    from .training import _fit, check_only

    if args.resume:
        return _resume(args)
    options = _train_options(args)
    dataset, vae = _build(options)
    if args.dry_run:
        training = {option.name: options[option.name] for option in config.TRAINING}
        check_only(vae, dataset, **training)
        print(f"dry run: the configuration is valid, and {options['objective']} scores the model "
              f"on {dataset.name}; nothing was written")
        return 0
    out = options["out"] or (f"runs/{Path(dataset.name).stem}-{options['objective']}-"
                             f"{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.perf_counter()
    training = {option.name: options[option.name] for option in config.TRAINING}
    # the figures are drawn by a background thread during the final evaluation
    result = _fit(vae, dataset, out=out, progress=not args.quiet,
                  callbacks=_tracking(options["tensorboard"]), background_figures=True,
                  **training)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return _finish_distributed()
    last = result.history[-1]
    print(f"trained {options['epochs']} epochs in {time.perf_counter() - started:.1f} s; "
          f"validation ELBO {last['val_elbo']:.3f} nats per datapoint")
    _evaluate_while_drawing(result, dataset, int(options["eval_particles"]))
    print(f"run directory: {result.run_dir}")
    return _finish_distributed()


def _tracking(tensorboard: str | None) -> list:
    """The tracking callbacks asked for on the command line."""
    if tensorboard is None:
        return []
    from .tracking import TensorBoardCallback

    return [TensorBoardCallback(tensorboard)]


def _finish_distributed() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .runs import load_run
    from .training import check_compatible, resolve_device

    run = load_run(args.run_dir, device=resolve_device(args.device))
    dataset = run.data(args.data)
    check_compatible(run.vae, dataset)
    evaluation = evaluate(run.vae, dataset, particles=args.particles, split=args.split,
                          batch_size=args.batch_size, seed=args.seed,
                          progress=not args.json and sys.stderr.isatty(),
                          proposal=args.proposal, refine_steps=args.refine_steps)
    summary = {"run": str(run.path), "data": dataset.name, "split": args.split,
               **evaluation.summary}
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            if isinstance(value, dict):
                shown = ", ".join(f"{k} {v}" for k, v in value.items())
            print(f"{key:<{width}}  {shown}")
    return 0


def _names(text: str, flag: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{flag} needs at least one value")
    return names


def cmd_compare_estimators(args: argparse.Namespace) -> int:
    from .estimators import compare_estimators, comparison_figure, format_table, parse_estimator
    from .lvm import device_of
    from .runs import load_run
    from .training import check_compatible, fit, labels_for, resolve_device

    objectives = _names(args.objectives, "--objectives")
    for spec in objectives:
        try:
            parse_estimator(spec)
        except ConfigError as error:
            raise ConfigError(f"{error} (in --objectives)") from None
    try:
        particles = [int(k) for k in _names(args.particles, "--particles")]
    except ValueError:
        raise ConfigError(f"--particles must be comma-separated positive integers, "
                          f"got {args.particles!r}") from None
    if any(k < 1 for k in particles):
        raise ConfigError(f"--particles must be positive, got {args.particles!r}")
    plot = Path(args.plot).expanduser() if args.plot else None
    if plot is not None and (plot.suffix.lower() != ".png" or not plot.parent.is_dir()):
        raise ConfigError(f"--plot must be a .png file in an existing directory, not {args.plot!r}")
    if plot is not None:
        _refuse_replacing_run_files(plot.parent, [plot.name], "--plot", args.overwrite)
    if args.run_dir:
        fresh = ["config", *(f"{kind}_option" for kind in config.COMPONENT_SECTIONS),
                 *(option.name for option in config.OPTIONS
                   if option.section in ("data", "model"))]
        given = [flag for flag in fresh if getattr(args, flag) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} describes a fresh model; a "
                              "RUN_DIR brings its own")
        run = load_run(args.run_dir, device=resolve_device(args.device or "cpu"))
        vae, dataset = run.vae, run.data(args.data)
        check_compatible(vae, dataset)
        seed = 0 if args.seed is None else args.seed
    else:
        options = _train_options(args)
        dataset, vae = _build(options)
        seed = int(options["seed"])
        check_compatible(vae, dataset)
        vae.to(resolve_device(options["device"]))
        if args.pretrain_epochs:
            fit(vae, dataset, "elbo", epochs=args.pretrain_epochs, seed=seed,
                device=str(device_of(vae)), progress=not args.json)
    x = dataset.split(args.split)[: args.batch_size]
    if x.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} has fewer than 2 datapoints")
    labels = labels_for(vae, dataset, args.split)
    rows = compare_estimators(vae, x, objectives, particles, repeats=args.repeats,
                              alpha=args.alpha, groups=args.groups,
                              elbo_weight=args.elbo_weight, seed=seed,
                              temperature=args.temperature,
                              labels=None if labels is None else labels[: args.batch_size],
                              progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{len(x)} datapoints of {dataset.name} ({args.split}); {args.repeats} gradient "
              "draws each; bound in nats per datapoint")
        print(format_table(rows))
    if plot is not None:
        import matplotlib.pyplot as plt

        figure = comparison_figure(rows)
        figure.savefig(plot, dpi=100)
        plt.close(figure)
        if not args.json:
            print(f"plot: {plot}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics import diagnose
    from .runs import load_run
    from .training import check_compatible

    run = load_run(args.run_dir)
    dataset = run.data(args.data)
    check_compatible(run.vae, dataset)
    diagnosis = diagnose(run.vae, dataset, split=args.split, particles=args.particles,
                         seed=args.seed, run_dir=run.path)
    print(json.dumps(diagnosis.summary()) if args.json else diagnosis.format())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .comparison import compare_runs
    from .runs import load_run
    from .training import check_compatible

    run_a, run_b = load_run(args.run_a), load_run(args.run_b)
    dataset = run_a.data(args.data)
    for run in (run_a, run_b):
        check_compatible(run.vae, dataset)
    names = (run_a.path.name, run_b.path.name)
    if names[0] == names[1]:
        names = (str(run_a.path), str(run_b.path))
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    comparison = compare_runs(run_a.vae, run_b.vae, dataset, split=args.split,
                              particles=args.particles, seed=args.seed, names=names)
    print(json.dumps(comparison.summary()) if args.json else comparison.format())
    return 0


_EXPLORE_FIGURES = ("interpolation.png", "traversals.png", "latent_scatter.png",
                    "reconstructions.png", "anomalies.png", "probe.png")


def cmd_explore(args: argparse.Namespace) -> int:
    from . import applications
    from .runs import load_run
    from .training import check_compatible, labels_for

    run = load_run(args.run_dir)
    dataset = run.data(args.data)
    check_compatible(run.vae, dataset)
    out = Path(args.out).expanduser() if args.out else run.path / "explore"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    _refuse_replacing_run_files(out, _EXPLORE_FIGURES, "--out", args.overwrite)
    x = dataset.split(args.split)
    if x.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} has fewer than 2 datapoints")
    from . import lvm

    labels = labels_for(run.vae, dataset, args.split)
    y_pair = None if labels is None else (labels[0], labels[1])
    model = run.vae
    # each figure needs capabilities of the model (pyro_vae.lvm); the others are skipped
    latent = (lvm.has(model, "posterior_mean") and lvm.has(model, "decode")
              and isinstance(getattr(model, "latent_dim", None), int))
    figures = {}
    skipped = []
    if latent:
        figures["interpolation.png"] = applications.interpolate(model, x[0], x[1],
                                                                y=y_pair).figure
        figures["traversals.png"] = applications.traverse(
            model, x[0], y=None if labels is None else labels[0]).figure
    else:
        skipped += ["interpolation.png", "traversals.png"]
    if lvm.has(model, "posterior_mean"):
        figures["latent_scatter.png"] = applications.latent_scatter(model, dataset,
                                                                    args.split).figure
    else:
        skipped.append("latent_scatter.png")
    if lvm.has(model, "reconstruct"):
        figures["reconstructions.png"] = applications.reconstructions(model, x, labels).figure
    else:
        skipped.append("reconstructions.png")
    anomalies = applications.anomaly_scores(model, dataset, args.split,
                                            particles=args.particles, top=args.top)
    figures["anomalies.png"] = anomalies.figure
    summary: dict[str, Any] = {
        "run": str(run.path), "split": args.split,
        "most_anomalous": [{"index": int(i), "nll": float(anomalies.nll[i])}
                           for i in anomalies.ranking[: min(args.top, 10)]],
    }
    if skipped:
        summary["skipped"] = skipped
    if (lvm.has(model, "posterior_mean") and dataset.split_labels("train") is not None
            and dataset.split_labels("test") is not None):
        probe = applications.representation_probe(run.vae, dataset)
        figures["probe.png"] = probe.figure
        summary["probe_accuracy"], summary["probe_chance"] = probe.accuracy, probe.chance
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=100)
    summary["figures"] = [str(out / name) for name in figures]
    if args.json:
        print(json.dumps(summary))
    else:
        if "probe_accuracy" in summary:
            print(f"probe: logistic regression on E_q[z|x] reaches {summary['probe_accuracy']:.3f} "
                  f"test accuracy (majority class: {summary['probe_chance']:.3f})")
        print("most anomalous (index in split, −log p̂(x) in nats): " + ", ".join(
            f"{row['index']}: {row['nll']:.1f}" for row in summary["most_anomalous"]))
        print(f"figures: {out}/ ({', '.join(figures)})")
        if skipped:
            print(f"skipped (the model has no posterior_mean, decode or reconstruct for them): "
                  f"{', '.join(skipped)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import plots
    from .runs import load_run

    out = Path(args.out).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy", ".csv"):
        raise ConfigError(f"--out must end in .png, .npy or .csv, not {out.name!r}")
    if not out.parent.is_dir():
        raise ConfigError(f"directory for --out does not exist: {out.parent}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name")
    _refuse_replacing_run_files(out.parent, [out.name], "--out", args.overwrite)
    from . import lvm

    run = load_run(args.run_dir)
    lvm.require(run.vae, "sample", "pyro-vae sample")
    if args.label is not None:
        if not lvm.is_conditional(run.vae):
            raise ConfigError(f"--label needs a conditional run; {args.run_dir} is not conditional")
        if args.label >= run.vae.num_classes:
            raise ConfigError(f"--label must be below {run.vae.num_classes}, not {args.label}")
    from .resources import check_sample_size

    check_sample_size(run.vae, args.n, image=suffix == ".png")  # before anything is allocated
    torch.manual_seed(args.seed)
    samples = run.vae.sample(args.n) if args.label is None else run.vae.sample(args.n, args.label)
    if suffix == ".png":
        plots.save_grid(samples, plots._data_shape(run.vae), out,
                        nrow=max(1, int(math.sqrt(args.n))))
    elif suffix == ".npy":
        np.save(out, samples.cpu().numpy())
    else:
        np.savetxt(out, samples.cpu().numpy(), delimiter=",", fmt="%.6g")
    print(f"wrote {args.n} samples to {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .runs import load_run
    from .training import check_compatible, write_figures

    run = load_run(args.run_dir)
    dataset = run.data(args.data)
    check_compatible(run.vae, dataset)
    write_figures(run.vae, dataset, run.history, run.path)
    print(f"figures: {run.path}/ (reconstructions.png, samples.png, loss.png)")
    return 0


#: The files of a run directory, besides those of :mod:`pyro_vae.runs`, that another command's
#: output must not replace unasked.
_RUN_OUTPUTS = ("evaluation.json", "reconstructions.png", "samples.png", "loss.png",
                "diagnostics.nc")


def _refuse_replacing_run_files(folder: Path, names: Sequence[str], flag: str,
                                overwrite: bool) -> None:
    """One line instead of silently replacing a run's own file (``--overwrite`` allows it)."""
    from . import runs

    if overwrite or not (folder / runs.CONFIG_FILE).is_file():
        return
    own = (runs.CONFIG_FILE, runs.WEIGHTS_FILE, runs.CHECKPOINT_FILE, runs.METRICS_FILE,
           *_RUN_OUTPUTS)
    clash = [name for name in names if name in own and (folder / name).exists()]
    if clash:
        raise ConfigError(f"{flag} would replace {folder / clash[0]}, a file of the run in "
                          f"{folder}; choose another name, or pass --overwrite")


COMMANDS = {"plot": cmd_plot, "train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "compare-estimators": cmd_compare_estimators, "explore": cmd_explore,
            "diagnose": cmd_diagnose, "compare": cmd_compare}


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: handled as Ctrl-C is (one line, exit 130)."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _plugin_arguments(argv: Sequence[str]) -> list[str]:
    """The values of ``--import`` in ``argv``, read before the parser is built (a plug-in's
    priors, likelihoods and models must be among the choices it offers)."""
    found = []
    for i, item in enumerate(argv):
        if item == "--":
            break
        if item == "--import" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif item.startswith("--import="):
            found.append(item.split("=", 1)[1])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    from . import plugins

    with plugins.command_scope():  # the runs of this command record this command's plug-ins
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    import signal
    import threading
    import warnings

    from . import plugins

    command = next((item for item in argv if not item.startswith("-")), "pyro-vae")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.load_entry_points()
    for warning in caught:
        print(f"pyro-vae: warning: {warning.message}", file=sys.stderr)
    try:
        plugins.import_plugins(_plugin_arguments(argv))
    except PyroVAEError as exc:
        print(f"pyro-vae {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except PyroVAEError as exc:
        print(f"pyro-vae {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(f"pyro-vae {args.command}: interrupted by {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        cause = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        print(f"pyro-vae {args.command}: interrupted by {cause}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the file system refused: a long name, a read-only folder, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"pyro-vae {args.command}: error: {where}{reason}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def console() -> None:
    """The ``pyro-vae`` program: :func:`main`, then an exit that skips tearing the interpreter
    down.

    With torch loaded, Python's own exit spends about 0.6 s after the last line of the
    program (unloading modules and running the destructors of torch's native libraries) and
    does nothing a run needs. So once the command has returned, the process runs the
    ``atexit`` handlers (temporary folders, logging, experiment trackers and any a plug-in
    registered), flushes stdout and stderr and ends with the command's status
    (``os._exit``). Every file of a run is already written, closed and fsync'ed by then. The
    normal exit is kept where something may still be at work: a thread that is not a daemon
    (a plug-in's; pyro-vae's own are joined before the command returns), or the environment
    variable ``PYRO_VAE_FULL_EXIT`` set to anything but ``0``."""
    _exit(main())


def _exit(code: int) -> None:
    import atexit
    import os
    import threading

    others = [t for t in threading.enumerate()
              if t is not threading.current_thread() and t.is_alive() and not t.daemon]
    if others or os.environ.get("PYRO_VAE_FULL_EXIT", "0") not in ("", "0"):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
