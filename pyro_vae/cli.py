"""The ``pyro-vae`` command line: ``train``, ``evaluate``, ``sample``, ``compare-estimators``,
``diagnose``, ``compare`` and ``explore``.

Every error a user can cause ends with one line on stderr (``pyro-vae: error: …``) and exit
status 2; no traceback, and no run directory is left behind by a run that could not start.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, PyroVAEError
from .objectives import DEFAULT_PARTICLES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Defaults of ``pyro-vae train``; a ``--config`` TOML file and then explicit flags override them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "data": "digits", "prior": "normal", "likelihood": "bernoulli", "likelihood_scale": None,
    "guide": "normal", "encoder": "mlp", "decoder": "mlp", "hidden": "256,256",
    "latent_dim": 8, "objective": "elbo", "particles": None, "alpha": None, "beta": 1.0,
    "anneal_steps": 0, "free_bits": 0.0,
    "epochs": 200, "batch_size": 128, "lr": 1e-3, "device": "auto", "seed": 0, "out": None,
    "eval_particles": 1000, "conditional": False, "levels": None,
    "data_dir": None, "download": False, "binarize": None,
    "prior_options": {}, "likelihood_options": {}, "guide_options": {},
}
#: TOML tables (and --KIND-option flags) that set a component's name and options
_COMPONENT_SECTIONS = ("prior", "likelihood", "guide")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _converter(parse, accept, description: str):
    """An argparse ``type`` that parses a flag's text and refuses values outside ``accept``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return convert


_integer = _converter(int, lambda v: True, "an integer")
_positive_int = _converter(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _converter(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _converter(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_non_negative_float = _converter(float, lambda v: v >= 0 and math.isfinite(v),
                                 "a non-negative number")
_finite_float = _converter(float, math.isfinite, "a finite number")


def _hidden(text: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        parts = list(text)
    elif not isinstance(text, str):
        raise ConfigError(f"--hidden must be comma-separated positive integers, got {text!r}")
    else:
        parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated positive integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--hidden must be comma-separated positive integers, got {text!r}")
    return sizes


#: Converters for typed options, applied to values from a --config file (flags are converted
#: by argparse with the same functions).
_TRAIN_TYPES = {
    "latent_dim": _positive_int, "particles": _positive_int, "beta": _non_negative_float,
    "alpha": _finite_float, "anneal_steps": _non_negative_int, "free_bits": _non_negative_float,
    "epochs": _positive_int, "batch_size": _positive_int, "lr": _positive_float,
    "seed": _integer, "eval_particles": _non_negative_int, "levels": _positive_int,
}
_FROM_FLAGS = set(_TRAIN_TYPES)


def build_parser() -> argparse.ArgumentParser:
    from .data import SPLITS
    from .guides.posteriors import POSTERIORS
    from .models.likelihoods import LIKELIHOODS
    from .models.priors import PRIORS
    from .networks import NETWORKS
    from .objectives import OBJECTIVES

    parser = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro "
                     "model/guide pairs: train, evaluate and sample.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_scoring_arguments(command: argparse.ArgumentParser, data_help: str) -> None:
        """The flags of the commands that score a trained run on a split with K particles."""
        command.add_argument("--data", metavar="NAME|PATH", help=data_help)
        command.add_argument("--split", choices=SPLITS, default="test")
        command.add_argument("--particles", type=_positive_int, default=1000, metavar="K")
        command.add_argument("--seed", type=_integer, default=0, metavar="S")
        command.add_argument("--json", action="store_true", help="print one JSON object")

    def add_model_arguments(command: argparse.ArgumentParser) -> None:
        # None means "not given": the TOML file or TRAIN_DEFAULTS supply the value.
        command.add_argument("--config", metavar="FILE.toml",
                             help="options as a TOML table; flags win")
        command.add_argument("--data", metavar="NAME|PATH",
                             help="digits, mnist, fashion-mnist, kmnist, or a .npy/.csv file")
        command.add_argument("--data-dir", metavar="DIR",
                             help="where MNIST-family data live (default $PYRO_VAE_DATA or "
                                  "~/.cache/pyro-vae)")
        command.add_argument("--download", action="store_true", default=None,
                             help="download an MNIST-family data set that is not there yet")
        command.add_argument("--binarize", choices=("static", "dynamic"),
                             help="binary data from grey levels: sampled once, or every step")
        command.add_argument("--prior", choices=sorted(PRIORS))
        command.add_argument("--likelihood", choices=sorted(LIKELIHOODS))
        command.add_argument("--likelihood-scale", metavar="S",
                             help="normal likelihood σ: shared, per-dim, decoder, or a number")
        command.add_argument("--guide", choices=sorted(POSTERIORS))
        for kind in ("prior", "likelihood", "guide"):
            command.add_argument(f"--{kind}-option", action="append", metavar="KEY=VALUE",
                                 help=f"an option of the {kind} (repeatable; VALUE as in TOML, "
                                      f"e.g. components=3)")
        command.add_argument("--encoder", choices=NETWORKS)
        command.add_argument("--decoder", choices=NETWORKS)
        command.add_argument("--hidden", metavar="400,400", help="hidden widths of mlp networks")
        command.add_argument("--levels", type=_positive_int, metavar="L",
                             help="levels of the categorical likelihood (default: 17 for "
                                  "digits, else 256)")
        command.add_argument("--conditional", action="store_true", default=None,
                             help="a conditional VAE p(x|z,y), q(z|x,y) on the data's labels")
        command.add_argument("--latent-dim", type=_positive_int, metavar="D")
        command.add_argument("--seed", type=_integer, metavar="S")
        command.add_argument("--device", metavar="auto|cpu|cuda[:i]")

    train = commands.add_parser("train", help="train a VAE (default: the bundled digits)",
                                description="Train a VAE with SVI and write a run directory.")
    add_model_arguments(train)
    train.add_argument("--objective", choices=list(OBJECTIVES))
    train.add_argument("--particles", type=_positive_int, metavar="K",
                       help="particles per datapoint (default 1; 5 for iwae, renyi, dreg)")
    train.add_argument("--alpha", type=_finite_float, metavar="A",
                       help="Rényi α for --objective renyi (default 0.5; 0 is IWAE)")
    train.add_argument("--beta", type=_non_negative_float, metavar="B",
                       help="weight of the latent (KL) terms; 1 is the plain bound")
    train.add_argument("--anneal-steps", type=_non_negative_int, metavar="N",
                       help="raise β linearly from 0 over the first N steps (KL warm-up)")
    train.add_argument("--free-bits", type=_non_negative_float, metavar="F",
                       help="KL floor in nats per latent dimension (elbo, meanfield)")
    train.add_argument("--epochs", type=_positive_int, metavar="E")
    train.add_argument("--batch-size", type=_positive_int, metavar="B")
    train.add_argument("--lr", type=_positive_float, metavar="LR")
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<data>-<objective>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its checkpoint (with --epochs: up to that many)")
    train.add_argument("--eval-particles", type=_non_negative_int, metavar="K",
                       help="K for the final test log-likelihood (0 skips it; default 1000)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="bounds and log-likelihood of a trained run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    add_scoring_arguments(evaluate, "default: the run's data")
    evaluate.add_argument("--batch-size", type=_positive_int, default=256, metavar="B")
    evaluate.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:i]")

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
    compare.add_argument("--repeats", type=_positive_int, default=100, metavar="R",
                         help="gradient draws per objective × K (default 100)")
    compare.add_argument("--batch-size", type=_positive_int, default=64, metavar="B",
                         help="datapoints in the fixed comparison batch (default 64)")
    compare.add_argument("--split", choices=SPLITS, default="val")
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
    explore.add_argument("--split", choices=SPLITS, default="test")
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
    sample.add_argument("--seed", type=int, default=0, metavar="S")
    sample.add_argument("--label", type=_non_negative_int, metavar="Y",
                        help="class to generate (conditional runs; default: cycle the classes)")
    for command in commands.choices.values():
        command.add_argument("--threads", type=_positive_int, metavar="N",
                             help="CPU threads for torch's operations (default: torch's "
                                  "choice, one per core); 1 is often fastest for small models "
                                  "on a busy machine")
    return parser


#: TOML types of the options whose value is not a string (a string is not a boolean, 1.9 is not
#: an integer: the file says what it means, as a flag's text cannot)
_TOML_BOOLEANS = {"conditional", "download"}
_TOML_INTEGERS = {"latent_dim", "particles", "anneal_steps", "epochs", "batch_size", "seed",
                  "eval_particles", "levels"}
_TOML_NUMBERS = {"beta", "alpha", "free_bits", "lr"}


def _component_option(kind: str, item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a ``--KIND-option`` flag; VALUE is read as a TOML value (3, 0.5, true,
    "text"), a bare word as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ConfigError(f"--{kind}-option expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def _typed_toml_value(path: Path, key: str, name: str, value: Any) -> Any:
    def refuse(expected: str):
        raise ConfigError(f"{path}: option {key!r} expects {expected}, got {value!r}")

    if name in _TOML_BOOLEANS and not isinstance(value, bool):
        refuse("true or false")
    if name in _TOML_INTEGERS and (isinstance(value, bool) or not isinstance(value, int)):
        refuse("an integer")
    if name in _TOML_NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        refuse("a number")
    if name == "hidden" and not isinstance(value, str) and not (
            isinstance(value, list) and value
            and all(isinstance(h, int) and not isinstance(h, bool) for h in value)):
        refuse('a list of integers or a string like "256,256"')
    return value


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(TRAIN_DEFAULTS)
    file_names: dict[str, str] = {}
    if args.config:
        path = Path(args.config).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for key, value in table.items():
            name = key.replace("-", "_")
            if name in _COMPONENT_SECTIONS and isinstance(value, dict):
                # [prior] name = "mog"  components = 3
                section = dict(value)
                if "name" in section:
                    options[name] = file_names[name] = section.pop("name")
                options[f"{name}_options"] = section
                continue
            if name not in options or name.endswith("_options"):
                raise ConfigError(f"{path}: unknown option {key!r}")
            options[name] = _typed_toml_value(path, key, name, value)
    for name in options:
        value = getattr(args, name, None)
        if value is not None and not name.endswith("_options"):
            options[name] = value
    for kind in _COMPONENT_SECTIONS:
        if getattr(args, kind, None) is not None and getattr(args, kind) != file_names.get(kind):
            options[f"{kind}_options"] = {}  # the file's options belong to the component it named
        for item in getattr(args, f"{kind}_option", None) or ():
            key, value = _component_option(kind, item)
            options[f"{kind}_options"] = {**options[f"{kind}_options"], key: value}
    for name, convert in _TRAIN_TYPES.items():
        value = options[name]
        if value is None or (name in _FROM_FLAGS and getattr(args, name, None) is not None):
            continue
        try:
            options[name] = convert(str(value)) if not isinstance(value, bool) else convert("x")
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"option {name.replace('_', '-')}: {exc}") from None
    for name in ("data", "prior", "likelihood", "guide", "encoder", "decoder", "objective",
                 "device", "out", "data_dir", "binarize"):
        if options[name] is not None and not isinstance(options[name], str):
            raise ConfigError(f"option {name}: expected a string, got {options[name]!r}")
    if options["particles"] is None and options["objective"] in DEFAULT_PARTICLES:
        options["particles"] = DEFAULT_PARTICLES[options["objective"]]
    options["hidden"] = _hidden(options["hidden"])
    return options


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
    from .training import resume

    allowed = {"resume", "epochs", "device", "quiet", "eval_particles", "command", "threads"}
    given = sorted(name for name, value in vars(args).items()
                   if value is not None and name not in allowed and value is not False)
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} cannot change a resumed run "
                          "(only --epochs, --device and --threads can)")
    started = time.perf_counter()
    result = resume(args.resume, epochs=args.epochs, device=args.device or "auto",
                    progress=not args.quiet)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return _finish_distributed()
    last = result.history[-1]
    print(f"resumed and trained to epoch {last['epoch']} in {time.perf_counter() - started:.1f} s; "
          f"validation ELBO {last['val_elbo']:.3f} nats per datapoint")
    print(f"run directory: {result.run_dir}")
    return _finish_distributed()


def _build(options: dict[str, Any]):
    """The data set and a freshly initialised VAE (seeded) described by ``options``."""
    import pyro

    from .data import load_data
    from .training import resolve_device
    from .vae import VAE

    resolve_device(options["device"])  # before any work: CUDA asked for but absent
    dataset = load_data(options["data"], data_dir=options["data_dir"],
                        download=bool(options["download"]), binarize_mode=options["binarize"])
    conditional = bool(options["conditional"])
    if conditional and dataset.num_classes is None:
        raise ConfigError(f"--conditional needs labelled data; {dataset.name!r} has no labels")
    pyro.set_rng_seed(int(options["seed"]))
    vae = VAE(dataset.data_shape, int(options["latent_dim"]), prior=options["prior"],
              likelihood=options["likelihood"], guide=options["guide"],
              encoder=options["encoder"], decoder=options["decoder"], hidden=options["hidden"],
              prior_options=options["prior_options"] or None,
              guide_options=options["guide_options"] or None,
              likelihood_options={**_likelihood_options(options), **options["likelihood_options"]},
              conditional=conditional,
              num_classes=dataset.num_classes if conditional else None)
    return dataset, vae


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .training import fit

    if args.resume:
        return _resume(args)
    options = _train_options(args)
    dataset, vae = _build(options)
    out = options["out"] or (f"runs/{Path(dataset.name).stem}-{options['objective']}-"
                             f"{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.perf_counter()
    result = fit(vae, dataset, options["objective"], particles=int(options["particles"]),
                 beta=float(options["beta"]), alpha=options["alpha"],
                 anneal_steps=int(options["anneal_steps"]), free_bits=float(options["free_bits"]),
                 epochs=int(options["epochs"]),
                 batch_size=int(options["batch_size"]), lr=float(options["lr"]),
                 seed=int(options["seed"]), device=str(options["device"]), out=out,
                 progress=not args.quiet)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return _finish_distributed()
    last = result.history[-1]
    print(f"trained {options['epochs']} epochs in {time.perf_counter() - started:.1f} s; "
          f"validation ELBO {last['val_elbo']:.3f} nats per datapoint")
    if options["eval_particles"]:
        summary = evaluate(vae, dataset, particles=int(options["eval_particles"]),
                           split="test").summary
        (result.run_dir / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"test log-likelihood (K={summary['particles']}): {summary['log_likelihood']:.3f} "
              f"± {summary['log_likelihood_se']:.3f} nats per datapoint; "
              f"ELBO {summary['elbo']:.3f}; active units {summary['active_units']}"
              f"/{vae.latent_dim}")
    print(f"run directory: {result.run_dir}")
    return _finish_distributed()


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
                          progress=not args.json and sys.stderr.isatty())
    summary = {"run": str(run.path), "data": dataset.name, "split": args.split,
               **evaluation.summary}
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def _names(text: str, flag: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{flag} needs at least one value")
    return names


def cmd_compare_estimators(args: argparse.Namespace) -> int:
    from .estimators import compare_estimators, comparison_figure, format_table, parse_estimator
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
    if args.run_dir:
        given = [flag for flag in ("config", "prior", "likelihood", "likelihood_scale", "guide",
                                   "prior_option", "likelihood_option", "guide_option",
                                   "encoder", "decoder", "hidden", "latent_dim", "levels",
                                   "conditional", "data_dir", "download", "binarize")
                 if getattr(args, flag) is not None]
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
                device=str(vae.device), progress=not args.json)
    x = dataset.split(args.split)[: args.batch_size]
    if x.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} has fewer than 2 datapoints")
    labels = labels_for(vae, dataset, args.split)
    rows = compare_estimators(vae, x, objectives, particles, repeats=args.repeats,
                              alpha=args.alpha, seed=seed, temperature=args.temperature,
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
    x = dataset.split(args.split)
    if x.shape[0] < 2:
        raise ConfigError(f"split {args.split!r} has fewer than 2 datapoints")
    labels = labels_for(run.vae, dataset, args.split)
    y_pair = None if labels is None else (labels[0], labels[1])
    figures = {
        "interpolation.png": applications.interpolate(run.vae, x[0], x[1], y=y_pair).figure,
        "traversals.png": applications.traverse(
            run.vae, x[0], y=None if labels is None else labels[0]).figure,
        "latent_scatter.png": applications.latent_scatter(run.vae, dataset, args.split).figure,
        "reconstructions.png": applications.reconstructions(run.vae, x, labels).figure,
    }
    anomalies = applications.anomaly_scores(run.vae, dataset, args.split,
                                            particles=args.particles, top=args.top)
    figures["anomalies.png"] = anomalies.figure
    summary: dict[str, Any] = {
        "run": str(run.path), "split": args.split,
        "most_anomalous": [{"index": int(i), "nll": float(anomalies.nll[i])}
                           for i in anomalies.ranking[: min(args.top, 10)]],
    }
    if dataset.split_labels("train") is not None and dataset.split_labels("test") is not None:
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
    run = load_run(args.run_dir)
    if args.label is not None:
        if not run.vae.conditional:
            raise ConfigError(f"--label needs a conditional run; {args.run_dir} is not conditional")
        if args.label >= run.vae.num_classes:
            raise ConfigError(f"--label must be below {run.vae.num_classes}, not {args.label}")
    torch.manual_seed(args.seed)
    samples = run.vae.sample(args.n, args.label)
    if suffix == ".png":
        plots.save_grid(samples, run.vae.data_shape, out, nrow=max(1, int(math.sqrt(args.n))))
    elif suffix == ".npy":
        np.save(out, samples.cpu().numpy())
    else:
        np.savetxt(out, samples.cpu().numpy(), delimiter=",", fmt="%.6g")
    print(f"wrote {args.n} samples to {out}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "compare-estimators": cmd_compare_estimators, "explore": cmd_explore,
            "diagnose": cmd_diagnose, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    from .training import TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except PyroVAEError as exc:
        print(f"pyro-vae {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(f"pyro-vae {args.command}: interrupted by {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"pyro-vae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
