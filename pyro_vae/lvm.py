r"""The protocol every tool of pyro-vae accepts: a latent-variable model as a Pyro model/guide
pair on an ``nn.Module``.

A **latent-variable model** is any ``torch.nn.Module`` with two methods, both ordinary Pyro
programs over a batch ``x`` of shape ``[batch, data_dim]``:

- ``model(x, y=None, num_data=None)``: the generative model; every site of one datapoint sits in
  ``pyro.plate("data", ...)`` (:func:`data_plate` makes it, with the minibatch scale
  ``num_data / batch`` when ``num_data`` is given); sites outside the plate are global;
- ``guide(x, y=None, num_data=None)``: the guide, with the same plate.

Latent sites may have any names and any number (a hierarchy z₂ → z₁ → x, a discrete cluster
enumerated with ``infer={"enumerate": "parallel"}``, a global latent), and the networks are
registered with ``pyro.module`` as Pyro users do. :func:`pyro_vae.fit`, :func:`~pyro_vae.resume`,
:func:`~pyro_vae.evaluate`, :func:`~pyro_vae.load_run`, :func:`pyro_vae.diagnostics.diagnose`,
:func:`pyro_vae.comparison.compare_runs` and :func:`pyro_vae.estimators.compare_estimators`
need nothing more. :class:`pyro_vae.VAE` is one implementation; :func:`program` wraps two plain
functions.

**Optional capabilities**, discovered by attribute; a tool that needs a missing one says so in
one line (:func:`require`):

- ``data_dim``: the dimension of one datapoint (data of another width are refused);
- ``data_shape``: the shape of one datapoint (image grids in figures);
- ``conditional``: ``True`` sends labels ``y`` (integers ``[batch]``) to every call, and
  ``num_classes`` says how many;
- ``semi_supervised``: ``True`` makes training pass the labels with ``-1`` where a datapoint is
  unlabelled, and evaluation pass ``y=None`` (every label latent);
- ``config`` (a property): JSON-serializable keyword arguments that rebuild the model as
  ``type(model)(**config)``, so that a run directory restores it;
- ``sample(n, y=None)``: ``[n, data_dim]`` decoder means of draws from the model;
- ``reconstruct(x, y=None)``: ``[batch, data_dim]`` reconstructions;
- ``posterior_mean(x, y=None)``: ``[batch, d]``, a point in latent space per datapoint (plots,
  probes);
- ``decode(z, y=None)``: the distribution of :math:`x` given a latent point (interpolations,
  traversals);
- ``classify(x)``: ``[batch, num_classes]`` class probabilities (semi-supervised models);
- ``check_support(x)``: raises ``ValueError`` for data outside the likelihood's support;
- ``exact_log_likelihood(x, y=None)``: ``[batch]``, :math:`\log p(x)` in closed form;
- ``exact_posterior(x, y=None)``: the exact :math:`p(z \mid x)` (a distribution).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
from typing import Any, Callable, Iterable

import pyro
import torch
from torch import nn

from pyro.poutine.messenger import Messenger

from .errors import ConfigError

__all__ = ["LatentVariableModel", "Program", "program", "data_plate", "device_of", "require",
           "has", "is_conditional", "is_semi_supervised", "class_path", "model_config",
           "rebuild", "CAPABILITIES"]

#: What each optional capability is, for the one-line refusals of :func:`require`.
CAPABILITIES = {
    "data_dim": "the dimension of one datapoint",
    "config": "a config that rebuilds it",
    "sample": "a sample(n) method",
    "reconstruct": "a reconstruct(x) method",
    "posterior_mean": "a posterior_mean(x) method (a point in latent space per datapoint)",
    "classify": "a classify(x) method",
    "exact_log_likelihood": "an exact_log_likelihood(x) method",
    "exact_posterior": "an exact_posterior(x) method",
    "encoder": "an encoder network whose output parameterizes the guide",
    "decode": "a decode(z) method (the distribution of x given a latent point)",
}

_program_ids = itertools.count()


def data_plate(x: torch.Tensor, num_data: int | None = None, name: str = "data") -> pyro.plate:
    """The datapoint plate of a batch ``x``: ``pyro.plate("data", batch)``, or, when ``num_data``
    is larger than the batch, a subsampled plate whose sites Pyro scales by ``num_data / batch``
    (so the loss estimates the whole data set's)."""
    batch = x.shape[0]
    # the device given, so the plate does not make a tensor to find it (an upload per step)
    if num_data is None or num_data == batch:
        return pyro.plate(name, batch, dim=-1, device=x.device)
    if num_data < batch:
        raise ConfigError(f"num_data ({num_data}) is smaller than the batch ({batch})")
    return pyro.plate(name, num_data, subsample=torch.arange(batch, device=x.device), dim=-1,
                      device=x.device)


class LatentVariableModel(nn.Module):
    """An optional base class: an ``nn.Module`` whose :meth:`model` and :meth:`guide` a
    subclass writes. Nothing in pyro-vae requires it (any module with the two methods will do);
    it documents the signatures and gives :attr:`device`."""

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None,
              num_data: int | None = None):
        raise NotImplementedError

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None,
              num_data: int | None = None):
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return device_of(self)


class Program(LatentVariableModel):
    """Two plain Pyro functions as a latent-variable model (see :func:`program`)."""

    def __init__(self, model: Callable, guide: Callable, modules: dict[str, nn.Module] | None = None,
                 **capabilities: Any):
        super().__init__()
        for name, fn in (("model", model), ("guide", guide)):
            if not callable(fn):
                raise ConfigError(f"program: {name} must be a function, not {type(fn).__name__}")
        # each function called with what it takes (y, num_data), decided once, not every call
        self._programs = tuple(fn if all(_accepts(fn)) else _adapted(fn, *_accepts(fn))
                               for fn in (model, guide))
        self.networks = nn.ModuleDict(dict(modules or {}))
        for name, value in capabilities.items():
            if name not in CAPABILITIES and name not in ("data_shape", "conditional",
                                                         "num_classes", "semi_supervised",
                                                         "check_support"):
                raise ConfigError(f"program: unknown capability {name!r}")
            setattr(self, name, value)
        self._pyro_name = f"program{next(_program_ids)}"

    def _register(self) -> None:
        for name, module in self.networks.items():
            pyro.module(f"{self._pyro_name}.{name}", module)

    def model(self, x, y=None, num_data=None):
        self._register()
        return self._programs[0](x, y, num_data)

    def guide(self, x, y=None, num_data=None):
        self._register()
        return self._programs[1](x, y, num_data)


def program(model: Callable, guide: Callable, modules: dict[str, nn.Module] | None = None,
            **capabilities: Any) -> Program:
    """Wrap two plain Pyro functions ``model(x[, y][, num_data])`` and ``guide(...)`` as a
    latent-variable model. ``modules`` names the networks they use (their parameters are the
    model's: trained, checkpointed and restored); ``capabilities`` set optional attributes
    (``data_dim=64``, ``sample=fn``, …; see the module's table)::

        encoder, decoder = Encoder(), Decoder()

        def model(x, num_data=None):
            with pyro_vae.lvm.data_plate(x, num_data):
                z = pyro.sample("z", dist.Normal(0, 1).expand([8]).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

        def guide(x, num_data=None):
            with pyro_vae.lvm.data_plate(x, num_data):
                loc, scale = encoder(x)
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        lvm = pyro_vae.program(model, guide, modules={"encoder": encoder, "decoder": decoder})
    """
    return Program(model, guide, modules, **capabilities)


class _DataPlateScale(Messenger):
    """Rescale the datapoint plate of a program that does not take ``num_data`` (a model in the
    style of Pyro's examples, ``pyro.plate("data", x.shape[0])``) to a minibatch of
    ``num_data``: every site in plate ``"data"`` is scaled by ``num_data / batch`` and the
    plate's frame records ``full_size = num_data``, exactly as a subsampled plate would."""

    def __init__(self, num_data: int):
        super().__init__()
        self.num_data = num_data

    def _process_message(self, msg) -> None:
        stack = msg.get("cond_indep_stack") or ()
        for i, frame in enumerate(stack):
            if (frame.name == DATA_PLATE and frame.full_size in (None, frame.size)
                    and frame.size < self.num_data):
                msg["cond_indep_stack"] = (stack[:i] + (frame._replace(full_size=self.num_data),)
                                           + stack[i + 1:])
                msg["scale"] = msg["scale"] * (self.num_data / frame.size)
                break


DATA_PLATE = "data"


def _accepts(fn: Callable) -> tuple[bool, bool]:
    """Whether ``fn`` takes ``y`` and ``num_data`` (or ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True, True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True, True
    return "y" in parameters, "num_data" in parameters


def _adapted(fn: Callable, takes_y: bool, takes_num_data: bool) -> Callable:
    def program(x, y=None, num_data=None):
        if y is not None and not takes_y:
            raise ConfigError(f"labels were given, but {getattr(fn, '__qualname__', fn)} takes "
                              "no y")
        kwargs = {"y": y} if takes_y else {}
        if takes_num_data:
            return fn(x, num_data=num_data, **kwargs)
        if num_data is None or num_data == x.shape[0]:
            return fn(x, **kwargs)
        with _DataPlateScale(num_data):
            return fn(x, **kwargs)

    program.__wrapped__ = fn
    return program


def programs(model: Any) -> tuple[Callable, Callable]:
    """``(model_fn, guide_fn)`` of a latent-variable model, each callable as
    ``fn(x, y=None, num_data=None)``: the model's own methods when they take those arguments;
    for methods that take only ``x`` (Pyro's examples write ``model(self, x)`` with
    ``pyro.plate("data", x.shape[0])``), wrappers that scale plate ``"data"`` to ``num_data``
    as a subsampled plate would (:class:`_DataPlateScale`)."""
    out = []
    for name in ("model", "guide"):
        fn = getattr(model, name)
        takes_y, takes_num_data = _accepts(fn)
        out.append(fn if takes_y and takes_num_data else _adapted(fn, takes_y, takes_num_data))
    return out[0], out[1]


def parameter_roles(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
                    ) -> tuple[list[nn.Parameter], list[nn.Parameter], list[str]]:
    r"""``(guide, model_only, foreign)``: the model's parameters that :math:`\log q` depends on
    (:math:`\phi`, with any the model shares with the guide), those only :math:`\log p`
    depends on (:math:`\theta`), and the names of Pyro parameters the programs use that are
    not parameters of the module (which pyro-vae, training the module's parameters, would leave
    untrained). Found by differentiating one trace of the guide, and of the model replayed at
    the guide's (detached) draws, on ``x``: registering a whole module with ``pyro.module`` in
    both programs does not make its decoder part of the guide."""
    import pyro.poutine as poutine

    model_fn, guide_fn = programs(model)
    owned = [p for p in model.parameters() if p.requires_grad]
    owned_ids = {id(p) for p in owned}
    foreign: list[str] = []
    # a fresh parameter store: a name another instance registered earlier (Pyro's examples name
    # their modules "encoder" and "decoder") would otherwise return that instance's tensor
    with pyro.validation_enabled(False), pyro.get_param_store().scope(), torch.enable_grad():
        guide_trace = poutine.trace(guide_fn).get_trace(x, y)
        detached = guide_trace.copy()
        for site in detached.nodes.values():
            if site["type"] == "sample" and torch.is_tensor(site["value"]):
                site["value"] = site["value"].detach()
        model_trace = poutine.trace(poutine.replay(model_fn, trace=detached)).get_trace(x, y)
        for trace in (guide_trace, model_trace):
            for name, site in trace.nodes.items():
                if site["type"] != "param":
                    continue
                value = site["value"]
                unconstrained = getattr(value, "unconstrained", None)
                candidates = [value] + ([unconstrained()] if callable(unconstrained) else [])
                if not any(id(c) in owned_ids for c in candidates) and name not in foreign:
                    foreign.append(name)

        def dependent(trace) -> set[int]:
            total = sum(site["fn"].log_prob(site["value"]).sum()
                        for site in trace.nodes.values()
                        if site["type"] == "sample" and not site.get("infer", {}).get(
                            "_do_not_trace"))
            if not torch.is_tensor(total) or not total.requires_grad:
                return set()
            grads = torch.autograd.grad(total, owned, allow_unused=True)
            return {id(p) for p, g in zip(owned, grads) if g is not None}

        try:
            guide_ids = dependent(guide_trace)
            model_ids = dependent(model_trace)
        except (RuntimeError, ValueError, NotImplementedError):  # a program that cannot be scored
            guide_ids, model_ids = set(), {id(p) for p in owned}
    guide = [p for p in owned if id(p) in guide_ids]
    model_only = [p for p in owned if id(p) in model_ids and id(p) not in guide_ids]
    return guide, model_only, foreign


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (or buffers); the CPU for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def has(model: Any, capability: str) -> bool:
    """Whether ``model`` offers ``capability`` (an attribute that is not ``None``)."""
    try:
        return getattr(model, capability, None) is not None
    except Exception:  # a property that cannot be computed is a missing capability
        return False


def require(model: Any, capability: str, tool: str) -> Any:
    """The attribute ``capability`` of ``model``, or one line saying that ``tool`` needs it."""
    if not has(model, capability):
        what = CAPABILITIES.get(capability, capability)
        raise ConfigError(f"{tool} needs {what}; {type(model).__name__} has no {capability!r}")
    return getattr(model, capability)


def check_protocol(model: Any, tool: str = "pyro-vae") -> None:
    """Refuse, in one line, an object that is not a latent-variable model."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{tool} takes a latent-variable model (an nn.Module with model and "
                          f"guide methods), not {type(model).__name__}")
    for method in ("model", "guide"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"{type(model).__name__} has no {method}(x, y=None, num_data=None) "
                              f"method; {tool} takes a model/guide pair")


def check_protocol_class(cls: Any) -> None:
    """Refuse, in one line, a class that cannot be a latent-variable model."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"a model must be an nn.Module class, not {cls!r}")
    for method in ("model", "guide"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"model class {cls.__name__} has no {method}(x, y=None, "
                              "num_data=None) method")


def is_conditional(model: Any) -> bool:
    return bool(getattr(model, "conditional", False))


def is_semi_supervised(model: Any) -> bool:
    return bool(getattr(model, "semi_supervised", False))


def class_path(cls: type) -> str:
    """``module:QualifiedName`` of a class, the way a run directory records it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def model_config(model: nn.Module) -> dict[str, Any]:
    """The ``"model"`` section of a run's ``config.json``.

    A :class:`~pyro_vae.VAE` records its own configuration (as it always has); any other model
    records its class as ``"class": "module:QualifiedName"`` and its ``config`` (the keyword
    arguments that rebuild it) as ``"options"``, or ``"rebuildable": false`` when it has no
    ``config`` or its class cannot be imported by name (defined in a script's ``__main__`` or a
    notebook): such a run is restored with ``load_run(run_dir, model=...)``."""
    from .vae import VAE

    if isinstance(model, VAE):
        return model.config
    cls = type(model)
    entry: dict[str, Any] = {"class": class_path(cls)}
    options = getattr(model, "config", None) if has(model, "config") else \
        getattr(model, "_pyro_vae_options", None)
    importable = cls.__module__ not in ("__main__", "builtins") and "<locals>" not in cls.__qualname__
    if isinstance(options, dict) and importable and not isinstance(model, Program):
        entry["options"] = options
        entry["rebuildable"] = True
    else:
        entry["rebuildable"] = False
    for key in ("data_shape", "data_dim", "conditional", "num_classes", "semi_supervised"):
        value = getattr(model, key, None)
        if value is not None and not callable(value):
            entry[key] = list(value) if isinstance(value, tuple) else value
    return entry


def find_class(path: str, what: str = "model class") -> type:
    """The class a run recorded as ``module:QualifiedName`` (importing the module), or one
    line; ``what`` names it in the messages."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise ConfigError(f"the {what} {path!r} is not of the form module:Class")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for the {what} {qualname}: "
                          f"{exc}; install it or pass --import") from None
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"module {module_name!r} has no {what} {qualname!r}")
    if not isinstance(target, type):
        raise ConfigError(f"{path} is not a class (the {what})")
    return target


def rebuild(entry: dict[str, Any]) -> nn.Module:
    """The model a ``"model"`` section describes, with fresh parameters."""
    from .vae import VAE

    if "class" not in entry:
        return VAE.from_config(entry)
    if not entry.get("rebuildable", False):
        raise ConfigError(f"the model {entry['class']} has no config that rebuilds it (or is "
                          "defined in a script or notebook); load the run with "
                          "load_run(run_dir, model=...)")
    cls = find_class(entry["class"])
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError("the model's options are not a table")
    model = cls(**options)
    check_protocol(model, "load_run")
    return model


def latent_site_names(trace: Iterable) -> list[str]:
    """The latent sample sites of a guide trace, in order."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("_do_not_trace")]


# -- the models the command line builds by name ---------------------------------------------------

def _build_vae(dataset, options: dict[str, Any]) -> nn.Module:
    from .vae import VAE

    model_options = dict(options.get("model_options") or {})
    if model_options:
        raise ConfigError(f"--model-option {next(iter(model_options))!r}: the vae takes its "
                          "options from --prior/--likelihood/--guide and their -option flags")
    conditional = bool(options.get("conditional"))
    if conditional and dataset.num_classes is None:
        raise ConfigError(f"--conditional needs labelled data; {dataset.name!r} has no labels")
    extra = {"conditional_prior": True} if options.get("conditional_prior") else {}
    if extra and not conditional:
        raise ConfigError("--conditional-prior applies to a conditional VAE (--conditional)")
    return VAE(dataset.data_shape, int(options["latent_dim"]), prior=options["prior"],
               likelihood=options["likelihood"], guide=options["guide"],
               encoder=options["encoder"], decoder=options["decoder"], hidden=options["hidden"],
               activation=options["activation"],
               prior_options=options.get("prior_options") or None,
               guide_options=options.get("guide_options") or None,
               likelihood_options=options.get("likelihood_options_resolved")
               or options.get("likelihood_options") or None,
               conditional=conditional,
               num_classes=dataset.num_classes if conditional else None, **extra)


def _changed(options: dict[str, Any], *names: str) -> dict[str, Any]:
    """The options among ``names`` set to something other than the schema's default."""
    from .config import DEFAULTS

    return {name: options[name] for name in names
            if name in options and options[name] != DEFAULTS.get(name)}


def _build_hierarchical(dataset, options: dict[str, Any]) -> nn.Module:
    from .catalogue import HierarchicalVAE

    dims = options["latent_dim"]
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    kwargs = {**_changed(options, "hidden", "activation", "likelihood"),
              **(options.get("model_options") or {})}
    if "hidden" in kwargs and not isinstance(kwargs["hidden"], (list, tuple)):
        raise ConfigError("hidden of the hierarchical VAE must be a list of widths")
    return HierarchicalVAE(dataset.data_shape, latent_dims=dims, **kwargs)


def _build_mixture(dataset, options: dict[str, Any]) -> nn.Module:
    from .catalogue import MixtureVAE

    if not isinstance(options["latent_dim"], int):
        raise ConfigError("the mixture VAE has one stochastic layer: --latent-dim takes one size")
    kwargs = {**_changed(options, "hidden", "likelihood"), **(options.get("model_options") or {})}
    return MixtureVAE(dataset.data_shape, latent_dim=options["latent_dim"], **kwargs)


def _build_m2(dataset, options: dict[str, Any]) -> nn.Module:
    from .catalogue import SemiSupervisedVAE

    if not isinstance(options["latent_dim"], int):
        raise ConfigError("M2 has one stochastic layer: --latent-dim takes one size")
    if dataset.num_classes is None:
        raise ConfigError(f"the semi-supervised model needs labelled data; {dataset.name!r} "
                          "has no labels")
    kwargs = {**_changed(options, "hidden", "likelihood"), **(options.get("model_options") or {})}
    return SemiSupervisedVAE(dataset.data_shape, num_classes=dataset.num_classes,
                             latent_dim=options["latent_dim"], **kwargs)


#: The models ``pyro-vae train --model NAME`` builds: a function ``(dataset, options) ->
#: model`` of the data set and the resolved options (see :func:`pyro_vae.register` with kind
#: ``"model"`` for one of your own).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vae": _build_vae, "hierarchical": _build_hierarchical, "mixture": _build_mixture,
    "m2": _build_m2,
}


def model_name(options: dict[str, Any]) -> str:
    """The model ``options`` ask for: ``--model``, or what ``--latent-dim 100,50`` (a
    hierarchy) and ``--semi-supervised`` (M2) imply for the default ``vae``."""
    name = options.get("model", "vae")
    hierarchical = not isinstance(options.get("latent_dim", 1), int)
    if options.get("semi_supervised"):
        if name not in ("vae", "m2"):
            raise ConfigError(f"--semi-supervised is the model m2; it cannot be combined with "
                              f"--model {name}")
        if hierarchical:
            raise ConfigError("--semi-supervised takes one --latent-dim size")
        return "m2"
    if hierarchical:
        if name not in ("vae", "hierarchical"):
            raise ConfigError(f"--latent-dim with several sizes is the hierarchical VAE; "
                              f"--model {name} takes one size")
        return "hierarchical"
    return name


def build_model(dataset, options: dict[str, Any]) -> nn.Module:
    """The model the resolved ``options`` describe, for ``dataset`` (fresh parameters)."""
    name = model_name(options)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if name != "vae":
        used = [flag for flag, value in (("prior", "normal"), ("guide", "normal"),
                                         ("encoder", "mlp"), ("decoder", "mlp"))
                if options.get(flag, value) != value]
        if options.get("conditional"):
            used.append("conditional")
        if used:
            raise ConfigError(f"--{used[0]} applies to the model vae, not {name}")
    try:
        model = MODELS[name](dataset, options)
    except TypeError as exc:
        raise ConfigError(f"bad options for model {name!r}: {exc}") from None
    check_protocol(model, f"model {name!r}")
    return model


def registered_model(name: str, cls: type) -> Callable[..., nn.Module]:
    """The builder of a class registered as model ``name``: ``cls.from_options(dataset,
    options)`` when it has one, else ``cls(dataset.data_shape, **model_options)``."""
    def build(dataset, options: dict[str, Any]) -> nn.Module:
        if hasattr(cls, "from_options"):
            return cls.from_options(dataset, options)
        kwargs = dict(options.get("model_options") or {})
        try:
            parameters = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            parameters = {}
        if "data_shape" in parameters and "data_shape" not in kwargs:
            kwargs["data_shape"] = list(dataset.data_shape)
        elif "data_dim" in parameters and "data_dim" not in kwargs:
            kwargs["data_dim"] = int(math.prod(dataset.data_shape))
        try:
            model = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad options for model {name!r}: {exc}") from None
        if not has(model, "config"):  # the keyword arguments it was built with rebuild it
            model._pyro_vae_options = kwargs
        return model

    build.model_class = cls
    return build
