"""The one configuration schema of a run.

Every option of ``pyro-vae train`` is declared once, in :data:`OPTIONS`, with its type, its
default and its help text. Everything else is derived from it:

- the command-line flags (``--epochs``, ``--no-conditional``, …) of ``train`` and
  ``compare-estimators`` (:func:`add_arguments`);
- the ``--config FILE.toml`` file (:func:`read_toml`): top-level keys are option names, and the
  tables ``[prior]``, ``[likelihood]``, ``[guide]`` and ``[model]`` name a component (a model:
  ``vae``, ``hierarchical``, ``mixture``, ``m2`` or a plug-in's) and set its options::

      epochs = 50
      objective = "iwae"
      [prior]
      name = "mog"
      components = 3

- :class:`TrainConfig`, the ``"training"`` part of ``config.json`` and the keyword arguments of
  :func:`pyro_vae.fit` (the options of the ``training`` section).

Types are strict wherever a value arrives typed (TOML, Python): a string is not a boolean,
``1.9`` and ``true`` are not integers. Every refusal is one line that names the option, where
the value came from and the value.
"""

from __future__ import annotations

import math
import numbers
import sys
import tomllib
from dataclasses import dataclass, field, fields, make_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import ConfigError

#: sections of the schema: where an option goes
SECTIONS = ("data", "model", "training", "run")
#: TOML tables (and ``--KIND-option`` flags) that name a component and set its options
COMPONENT_SECTIONS = ("prior", "likelihood", "guide", "model")


class OptionError(ConfigError):
    """A value that an option does not accept."""


@dataclass(frozen=True)
class Kind:
    """A value type: ``check`` takes a typed value (TOML, Python) and ``parse`` a flag's text;
    both return the value or raise ``ValueError`` with what was expected."""

    expected: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any]


def _expect(expected: str, accept: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not accept(value):
            raise ValueError(expected)
        return value

    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _from_text(convert: Callable[[str], Any], check: Callable[[Any], Any], expected: str):
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise ValueError(expected) from None
        return check(value)

    return parse


def _integer(expected: str, accept: Callable[[int], bool]) -> Kind:
    check = _expect(expected, lambda v: _is_int(v) and accept(int(v)))
    return Kind(expected, lambda v: int(check(v)), _from_text(int, check, expected))


def _number(expected: str, accept: Callable[[float], bool]) -> Kind:
    check = _expect(expected, lambda v: _is_number(v) and accept(float(v)))
    return Kind(expected, lambda v: float(check(v)), _from_text(float, check, expected))


def _string() -> Kind:
    check = _expect("a string", lambda v: isinstance(v, str))
    return Kind("a string", check, check)


def _boolean() -> Kind:
    words = {"true": True, "false": False}
    check = _expect("true or false", lambda v: isinstance(v, bool))
    return Kind("true or false", check, _from_text(lambda t: words[t.lower()], check,
                                                   "true or false"))


def _sizes(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise ValueError
    return [int(p) for p in parts]


def _positive_sizes(value: Any, expected: str) -> tuple[int, ...]:
    """A non-empty list of positive integers, or its text ``"256,256"``; ``ValueError``
    (``expected``) otherwise."""
    if isinstance(value, str):
        try:
            value = _sizes(value)
        except ValueError:
            raise ValueError(expected) from None
    if not (isinstance(value, (list, tuple)) and value
            and all(_is_int(v) and v >= 1 for v in value)):
        raise ValueError(expected)
    return tuple(int(v) for v in value)


def _hidden() -> Kind:
    expected = 'positive integers, as a list [256, 256] or a string "256,256"'

    def check(value: Any) -> tuple[int, ...]:
        return _positive_sizes(value, expected)

    return Kind(expected, check, check)


def _latent_dims() -> Kind:
    expected = ('a positive integer, or one per stochastic layer as a list [100, 50] or a '
                'string "100,50"')

    def check(value: Any) -> int | tuple[int, ...]:
        if _is_int(value) and value >= 1:
            return int(value)
        sizes = _positive_sizes(value, expected)
        return sizes[0] if len(sizes) == 1 else sizes

    return Kind(expected, check, check)


def _scale() -> Kind:
    modes = ("shared", "per-dim", "decoder")
    expected = f"{', '.join(modes)} or a positive number"

    def check(value: Any) -> Any:
        if isinstance(value, str):
            if value in modes:
                return value
            try:
                value = float(value)
            except ValueError:
                raise ValueError(expected) from None
        if not (_is_number(value) and value > 0 and math.isfinite(value)):
            raise ValueError(expected)
        return float(value)

    return Kind(expected, check, check)


INTEGER = _integer("an integer", lambda v: True)
SEED = _integer("an integer from 0 to 2**32 - 1", lambda v: 0 <= v < 2 ** 32)
POSITIVE_INT = _integer("a positive integer", lambda v: v >= 1)
NON_NEGATIVE_INT = _integer("a non-negative integer", lambda v: v >= 0)
POSITIVE = _number("a positive number", lambda v: v > 0 and math.isfinite(v))
NON_NEGATIVE = _number("a non-negative number", lambda v: v >= 0 and math.isfinite(v))
FINITE = _number("a finite number", math.isfinite)
UNIT_INTERVAL = _number("a number from 0 to 1", lambda v: 0 <= v <= 1)
STRING = _string()
BOOLEAN = _boolean()
HIDDEN = _hidden()
LATENT_DIMS = _latent_dims()
SCALE = _scale()


def flag_type(kind: Kind) -> Callable[[str], Any]:
    """An argparse ``type`` that converts a flag's text with ``kind`` (one-line usage error)."""
    import argparse

    def convert(text: str) -> Any:
        try:
            return kind.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.expected}, got {text!r}") from None

    return convert


# The built-in names of each catalogue, in the catalogue's order, kept here so that the
# schema's choices (the command line's parser, its --help and its usage errors) need neither
# torch nor Pyro: the catalogues live in modules that import them. tests/test_startup.py checks
# each tuple against its catalogue, so the two cannot drift apart.

#: The priors of :data:`pyro_vae.models.priors.PRIORS`.
BUILTIN_PRIORS = ("normal", "learned-normal", "laplace", "studentt", "mog", "vamp", "flow",
                  "categorical", "relaxed-categorical")
#: The likelihoods of :data:`pyro_vae.models.likelihoods.LIKELIHOODS`.
BUILTIN_LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "beta", "categorical", "normal",
                       "laplace", "poisson", "negative-binomial")
#: The guide families of :data:`pyro_vae.guides.posteriors.POSTERIORS`.
BUILTIN_GUIDES = ("normal", "full-rank", "flow", "categorical", "relaxed-categorical")
#: The network kinds of :data:`pyro_vae.networks.NETWORKS`.
BUILTIN_NETWORKS = ("mlp", "linear", "conv")
#: The activations of :data:`pyro_vae.networks.ACTIVATIONS`.
BUILTIN_ACTIVATIONS = ("relu", "tanh", "softplus", "elu", "gelu", "silu", "leaky-relu")
#: The objectives of :data:`pyro_vae.objectives.OBJECTIVES`.
BUILTIN_OBJECTIVES = ("elbo", "meanfield", "iwae", "renyi", "dreg", "stl", "vimco", "miwae",
                      "ciwae", "piwae")
#: The models of :data:`pyro_vae.lvm.MODELS`.
BUILTIN_MODELS = ("vae", "hierarchical", "mixture", "m2")
#: The splits of a data set (:data:`pyro_vae.data.SPLITS`).
SPLITS = ("train", "val", "test", "all")


def _catalogue(module: str, attribute: str, builtin: Sequence[str]) -> list[str]:
    """The names of the catalogue ``attribute`` of the submodule ``module``, in its order.

    Read from the catalogue itself once its module is imported: a plug-in that registers a
    name (:func:`pyro_vae.register`) imports it, so its names are among the choices. A
    catalogue whose module was never imported holds only the built-in names, which are given
    without importing it (and torch with it)."""
    loaded = sys.modules.get(f"{__package__}.{module}")
    names = getattr(loaded, attribute, None) if loaded is not None else None
    return list(builtin if names is None else names)


def _choice(names: Callable[[], Iterable[str]]) -> Callable[[], list[str]]:
    return lambda: sorted(names())


# each catalogue's names, as the schema's choices ask for them
_priors = partial(_catalogue, "models.priors", "PRIORS", BUILTIN_PRIORS)
_likelihoods = partial(_catalogue, "models.likelihoods", "LIKELIHOODS", BUILTIN_LIKELIHOODS)
_posteriors = partial(_catalogue, "guides.posteriors", "POSTERIORS", BUILTIN_GUIDES)
_networks = partial(_catalogue, "networks", "NETWORKS", BUILTIN_NETWORKS)
_activations = partial(_catalogue, "networks", "ACTIVATIONS", BUILTIN_ACTIVATIONS)
_models = partial(_catalogue, "lvm", "MODELS", BUILTIN_MODELS)
_objectives = partial(_catalogue, "objectives", "OBJECTIVES", BUILTIN_OBJECTIVES)


#: The learning-rate schedules of ``lr_schedule``.
LR_SCHEDULES = ("constant", "burda")


def scheduled_lr(lr: float, schedule: str, epoch: int) -> float:
    r"""The learning rate of ``epoch`` (1-based) under ``schedule``.

    ``burda``: Burda et al. (2016): pass :math:`i = 0, 1, \dots, 7` lasts :math:`3^i` epochs at
    :math:`\text{lr}\cdot 10^{-i/7}` (3,280 epochs in all); later epochs keep the last rate.
    """
    if schedule == "constant":
        return lr
    if schedule != "burda":
        raise ConfigError(f"unknown lr_schedule {schedule!r}; choose one of: "
                          f"{', '.join(LR_SCHEDULES)}")
    end, stage = 0, 0
    for stage in range(8):
        end += 3 ** stage
        if epoch <= end:
            break
    return lr * 10 ** (-stage / 7)


@dataclass(frozen=True)
class Option:
    """One option of a run: its name (``snake_case``; the flag is ``--kebab-case``), value
    type, default, section and help. ``optional`` options may be ``None`` (their default)."""

    name: str
    kind: Kind
    default: Any
    section: str
    help: str
    metavar: str | None = None
    choices: Callable[[], Sequence[str]] | None = None
    optional: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def expected(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices())
        return self.kind.expected

    def check(self, value: Any, where: str = "", key: str | None = None) -> Any:
        """``value`` (typed: TOML or Python) checked and normalised; one-line error otherwise."""
        if value is None and self.optional:
            return None
        try:
            value = self.kind.check(value)
            if self.choices is not None and value not in self.choices():
                raise ValueError
        except ValueError:
            place = f"{where}: " if where else ""
            raise OptionError(f"{place}option {(key or self.name)!r} expects {self.expected}, "
                              f"got {value!r}") from None
        return value

    def parse(self, text: str) -> Any:
        """A flag's text converted (argparse ``type``)."""
        return flag_type(self.kind)(text)


def _options() -> tuple[Option, ...]:
    O = Option  # noqa: N806
    return (
        # data
        O("data", STRING, "digits", "data",
          "digits, mnist, fashion-mnist, kmnist, or a .npy/.csv file", "NAME|PATH"),
        O("data_dir", STRING, None, "data", "where MNIST-family data live (default "
          "$PYRO_VAE_DATA or ~/.cache/pyro-vae)", "DIR", optional=True),
        O("download", BOOLEAN, False, "data",
          "download an MNIST-family data set that is not there yet"),
        O("binarize", STRING, None, "data", "binary data from grey levels: sampled once "
          "(static), or every step (dynamic)", choices=lambda: ["dynamic", "static"],
          optional=True),
        O("labels_per_class", POSITIVE_INT, None, "data", "keep the labels of N training "
          "datapoints per class (chosen with the seed), the rest unlabelled: semi-supervised "
          "training", "N", optional=True),
        # model
        O("model", STRING, "vae", "model", "the latent-variable model: vae (prior, likelihood "
          "and guide below), hierarchical, mixture, m2, or one a plug-in registers",
          choices=_choice(_models)),
        O("prior", STRING, "normal", "model", "the prior p(z)", choices=_choice(_priors)),
        O("likelihood", STRING, "bernoulli", "model", "the likelihood p(x|z)",
          choices=_choice(_likelihoods)),
        O("likelihood_scale", SCALE, None, "model", "σ of the normal and laplace "
          "likelihoods: shared, per-dim, decoder, or a number", "S", optional=True),
        O("guide", STRING, "normal", "model", "the guide family q(z|x)",
          choices=_choice(_posteriors)),
        O("encoder", STRING, "mlp", "model", "the encoder network", choices=_choice(_networks)),
        O("decoder", STRING, "mlp", "model", "the decoder network", choices=_choice(_networks)),
        O("hidden", HIDDEN, (256, 256), "model", "hidden widths of mlp networks", "400,400"),
        O("activation", STRING, "relu", "model", "activation of the hidden layers of mlp networks",
          choices=lambda: list(_activations())),
        O("latent_dim", LATENT_DIMS, 8, "model", "latent dimensions; one per stochastic layer "
          "(100,50) for a hierarchical VAE", "D"),
        O("conditional", BOOLEAN, False, "model",
          "a conditional VAE p(x|z,y), q(z|x,y) on the data's labels"),
        O("conditional_prior", BOOLEAN, False, "model",
          "a learned prior p(z|y) per class for the conditional VAE"),
        O("semi_supervised", BOOLEAN, False, "model", "the semi-supervised model M2 (Kingma et "
          "al. 2014) on partly labelled data (see --labels-per-class)"),
        O("levels", POSITIVE_INT, None, "model", "levels of the categorical likelihood "
          "(default: 17 for digits, else 256)", "L", optional=True),
        # training: the keyword arguments of fit, TrainConfig, config.json's "training"
        O("objective", STRING, "elbo", "training", "the objective (estimator) to optimize",
          choices=_objectives),
        O("particles", POSITIVE_INT, None, "training", "particles per datapoint, per group for "
          "miwae and piwae (default: 1; 5 for iwae, renyi, dreg, vimco, miwae, ciwae, piwae)",
          "K", optional=True),
        O("beta", NON_NEGATIVE, 1.0, "training",
          "weight of the latent (KL) terms; 1 is the plain bound", "B"),
        O("alpha", FINITE, None, "training",
          "Rényi α for objective renyi (default 0.5; 0 is IWAE)", "A", optional=True),
        O("groups", POSITIVE_INT, None, "training", "M, groups of K particles for objectives "
          "miwae and piwae: M·K draws (default 1; 1 is IWAE_K)", "M", optional=True),
        O("elbo_weight", UNIT_INTERVAL, None, "training", "weight of the ELBO in objective "
          "ciwae, the rest on IWAE_K (default 0.5; 0 is IWAE, 1 the ELBO)", "W",
          optional=True),
        O("anneal_steps", NON_NEGATIVE_INT, 0, "training",
          "raise β linearly from 0 over the first N steps (KL warm-up)", "N"),
        O("free_bits", NON_NEGATIVE, 0.0, "training",
          "KL floor in nats per latent dimension (elbo, meanfield)", "F"),
        O("epochs", POSITIVE_INT, 200, "training", "passes over the training split", "E"),
        O("batch_size", POSITIVE_INT, 128, "training", "datapoints per step", "B"),
        O("labelled_batch", POSITIVE_INT, None, "training", "semi-supervised training with "
          "stratified minibatches: every step takes N labelled rows (cycling through them) and "
          "batch_size − N unlabelled ones, each part weighted by its own count; an epoch is a "
          "pass over the unlabelled rows (default: uniform minibatches)", "N", optional=True),
        O("lr", POSITIVE, 1e-3, "training", "Adam's learning rate", "LR"),
        O("lr_schedule", STRING, "constant", "training", "the learning rate over the epochs: "
          "constant, or burda (lr·10^(−i/7) for 3^i epochs, i = 0…7; Burda et al. 2016)",
          choices=lambda: list(LR_SCHEDULES)),
        O("seed", SEED, 0, "training", "the one seed of the run (model, data order, draws)",
          "S"),
        O("device", STRING, "auto", "training", "auto (CUDA when available), cpu or cuda[:i]",
          "auto|cpu|cuda[:i]"),
        O("log_every", POSITIVE_INT, 10, "training",
          "read the loss back (progress, divergence check, tracking) every N steps", "N"),
        O("val_particles", POSITIVE_INT, 1, "training",
          "particles of the validation ELBO after every epoch", "K"),
        O("checkpoint_every", NON_NEGATIVE, 30.0, "training", "write checkpoint.pt at the end "
          "of an epoch once S seconds have passed since the last one (always after the first "
          "epoch and the last, and on SIGINT/SIGTERM); 0: after every epoch", "S"),
        # run: what the command line does around fit
        O("out", STRING, None, "run",
          "run directory (default: runs/<data>-<objective>-<time>)", "DIR", optional=True),
        O("eval_particles", NON_NEGATIVE_INT, 1000, "run",
          "K for the final test log-likelihood (0 skips it)", "K"),
        O("tensorboard", STRING, None, "run", "write TensorBoard events (scalars, image grids, "
          "the configuration) to DIR; needs pip install \"pyro-vae[tensorboard]\"", "DIR",
          optional=True),
    )


#: Every option of a run, in the order ``--help`` lists them.
OPTIONS: tuple[Option, ...] = _options()
BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
#: Each option's one default.
DEFAULTS: dict[str, Any] = {option.name: option.default for option in OPTIONS}


def section(name: str) -> tuple[Option, ...]:
    """The options of one section, in schema order."""
    if name not in SECTIONS:
        raise KeyError(name)
    return tuple(option for option in OPTIONS if option.section == name)


TRAINING = section("training")
#: the defaults of the training section (:class:`TrainConfig`, :func:`pyro_vae.fit`)
DEFAULTS_TRAINING: dict[str, Any] = {option.name: option.default for option in TRAINING}


def _python_type(option: Option) -> Any:
    base = {INTEGER: int, SEED: int, POSITIVE_INT: int, NON_NEGATIVE_INT: int, POSITIVE: float,
            NON_NEGATIVE: float, FINITE: float, UNIT_INTERVAL: float, STRING: str,
            BOOLEAN: bool}.get(option.kind, Any)
    return base | None if option.optional else base


def _validate(self) -> "TrainConfig":
    """Check every field against the schema (strict types) and resolve ``particles``; returns
    ``self``. The device is checked against what this machine has."""
    from .objectives import DEFAULT_PARTICLES
    from .training import resolve_device

    for option in TRAINING:
        setattr(self, option.name, option.check(getattr(self, option.name)))
    if self.particles is None:
        self.particles = DEFAULT_PARTICLES[self.objective]
    if self.anneal_steps and self.objective == "dreg":
        raise ConfigError("objective 'dreg' cannot anneal β (its gradient identity needs β = 1); "
                          "drop anneal_steps or use 'iwae'")
    resolve_device(self.device)
    return self


TrainConfig = make_dataclass(
    "TrainConfig",
    [(option.name, _python_type(option), field(default=option.default)) for option in TRAINING],
    namespace={"validate": _validate, "__module__": __name__,
               "__doc__": "The training section of a run's configuration, one field per option "
                          "of :data:`OPTIONS` in section ``training`` (written to "
                          "``config.json`` as ``\"training\"``); :meth:`validate` checks it."},
)


def training_config(options: dict[str, Any], where: str = "") -> "TrainConfig":
    """A validated :class:`TrainConfig` from keyword arguments; unknown names refused."""
    names = {option.name for option in TRAINING}
    for name in options:
        if name not in names:
            place = f"{where}: " if where else ""
            raise ConfigError(f"{place}unknown training option {name!r}; the options are: "
                              f"{', '.join(sorted(names))}")
    return TrainConfig(**options).validate()


def config_fields() -> list[str]:
    """The field names of :class:`TrainConfig`, in order."""
    return [f.name for f in fields(TrainConfig)]


# ------------------------------------------------------------------ command line and TOML file

def add_arguments(parser, sections: Sequence[str], *, exclude: Sequence[str] = (),
                  include: Sequence[str] = ()) -> None:
    """Add a flag for every option in ``sections`` (and those named in ``include``) to an
    argparse parser. Defaults are ``None`` (not given): :func:`resolve` fills them in from the
    TOML file, then from the schema, so a flag always wins."""
    import argparse

    for option in OPTIONS:
        if option.name in exclude or (option.section not in sections
                                      and option.name not in include):
            continue
        help_text = option.help
        if option.default is not None and "default" not in option.help:
            help_text += f" (default: {_shown(option.default)})"
        if option.kind is BOOLEAN:
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif option.choices is not None:
            parser.add_argument(option.flag, choices=option.choices(), default=None,
                                help=help_text)
        else:
            parser.add_argument(option.flag, type=option.parse, default=None,
                                metavar=option.metavar, help=help_text)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_toml(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The options of a TOML file, checked: ``(options, components)``, where ``components``
    maps ``prior``/``likelihood``/``guide``/``model`` to its table (``name`` and the
    component's options)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    options: dict[str, Any] = {}
    components: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in COMPONENT_SECTIONS and isinstance(value, dict):
            components[name] = dict(value)
            if "name" in value:
                BY_NAME[name].check(value["name"], str(path), f"[{key}] name")
            continue
        if name not in BY_NAME:
            raise ConfigError(f"{path}: unknown option {key!r}")
        options[name] = BY_NAME[name].check(value, str(path), key)
    return options, components


def component_option(kind: str, item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--KIND-option``: VALUE read as a TOML value (a bare word is a
    string)."""
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ConfigError(f"--{kind}-option expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def resolve(flags: dict[str, Any], config_file: str | Path | None = None,
            component_flags: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Every option's value: the schema's default, overridden by the TOML file, overridden by
    the flags given (``None`` = not given). Component options land in ``prior_options``,
    ``likelihood_options``, ``guide_options`` and ``model_options``."""
    options = dict(DEFAULTS)
    components: dict[str, dict[str, Any]] = {}
    if config_file is not None:
        file_options, components = read_toml(config_file)
        options.update(file_options)
        for kind, table in components.items():
            if "name" in table:
                options[kind] = table["name"]
    for name, value in flags.items():
        if value is not None and name in BY_NAME:
            options[name] = value
    for kind in COMPONENT_SECTIONS:
        table = {k.replace("-", "_"): v for k, v in components.get(kind, {}).items()
                 if k != "name"}
        if flags.get(kind) is not None and flags[kind] != components.get(kind, {}).get("name"):
            table = {}  # the file's options belong to the component it named
        for item in (component_flags or {}).get(kind, None) or ():
            key, value = component_option(kind, item)
            table[key] = value
        options[f"{kind}_options"] = table
    if options["particles"] is None:
        from .objectives import DEFAULT_PARTICLES
        options["particles"] = DEFAULT_PARTICLES[options["objective"]]
    return options
