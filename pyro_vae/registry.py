"""Name → component resolution, so ``VAE(prior="normal")`` and ``VAE(prior=StandardNormal())``
are the same thing."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError


def resolve(kind: str, registry: Mapping[str, type], spec: Any, options: Mapping[str, Any] | None,
            protocol: tuple[str, ...]):
    """Return a component instance from a registered name or an object following ``protocol``.

    ``options`` are keyword arguments for a component given by name; they cannot be combined
    with an already-built object.
    """
    options = dict(options or {})
    if isinstance(spec, str):
        if spec not in registry:
            raise ConfigError(f"unknown {kind} {spec!r}; choose one of: {', '.join(sorted(registry))}")
        try:
            return registry[spec](**options)
        except TypeError as exc:
            raise ConfigError(f"bad options for {kind} {spec!r}: {exc}") from None
    missing = [name for name in protocol if not hasattr(spec, name)]
    if missing:
        raise ConfigError(f"{kind} {type(spec).__name__} lacks {', '.join(missing)} "
                          f"(see the {kind} protocol in pyro_vae)")
    if options:
        raise ConfigError(f"{kind} options are only for a {kind} given by name")
    return spec


def describe(component) -> dict[str, Any]:
    """The config entry of a component: its registered name and its options."""
    name = getattr(component, "name", None) or type(component).__name__
    options = component.options() if hasattr(component, "options") else {}
    return {"name": name, "options": options}


def register(kind: str, name: str):
    """Class decorator: make a user-written component available by ``name``.

    ``kind`` is ``"prior"``, ``"likelihood"``, ``"guide"`` or ``"model"``. A registered
    component can be chosen by name in Python (``VAE(prior="my-prior")``) and on the command
    line once its module is imported (``pyro-vae train --import my_plugin --prior my-prior``,
    or an entry point of the group ``pyro_vae.plugins``; see :mod:`pyro_vae.plugins`); a run
    that uses it records the module, and ``load_run``, ``evaluate`` and ``resume`` import it
    again::

        @pyro_vae.register("prior", "my-laplace")
        class MyLaplace(torch.nn.Module):
            def setup(self, latent_dim): ...
            def distribution(self): ...

    A ``"model"`` is a whole latent-variable model (:mod:`pyro_vae.lvm`), built for
    ``pyro-vae train --model NAME`` as ``cls.from_options(dataset, options)`` when the class
    has that classmethod, else as ``cls(dataset.data_shape, **model_options)`` (the
    ``--model-option KEY=VALUE`` flags).
    """
    from .guides import posteriors
    from .models import likelihoods, priors

    if kind == "model":
        return _register_model(name)

    catalogues = {"prior": (priors.PRIORS, priors.PROTOCOL),
                  "likelihood": (likelihoods.LIKELIHOODS, likelihoods.PROTOCOL),
                  "guide": (posteriors.POSTERIORS, posteriors.PROTOCOL)}
    if kind not in catalogues:
        raise ConfigError(f"unknown component kind {kind!r}; use prior, likelihood, guide or model")
    catalogue, protocol = catalogues[kind]

    def decorate(cls):
        missing = [method for method in protocol if not hasattr(cls, method)]
        if missing:
            raise ConfigError(f"{kind} {cls.__name__} lacks {', '.join(missing)}")
        if name in catalogue and catalogue[name] is not cls:
            raise ConfigError(f"a {kind} named {name!r} is already registered")
        cls.name = name
        catalogue[name] = cls
        return cls

    return decorate


def _register_model(name: str):
    from . import lvm

    def decorate(cls):
        lvm.check_protocol_class(cls)
        existing = lvm.MODELS.get(name)
        if existing is not None and getattr(existing, "model_class", None) is not cls:
            raise ConfigError(f"a model named {name!r} is already registered")
        cls.name = name
        lvm.MODELS[name] = lvm.registered_model(name, cls)
        return cls

    return decorate


def unregister(kind: str, name: str) -> None:
    """Remove a user-registered component (the built-in catalogue cannot be changed)."""
    from .guides import posteriors
    from .models import likelihoods, priors

    if kind == "model":
        from . import lvm

        builder = lvm.MODELS.get(name)
        if builder is None:
            raise ConfigError(f"no model named {name!r} is registered")
        if not hasattr(builder, "model_class"):
            raise ConfigError(f"model {name!r} is built in and cannot be unregistered")
        del lvm.MODELS[name]
        return

    catalogues = {"prior": priors.PRIORS, "likelihood": likelihoods.LIKELIHOODS,
                  "guide": posteriors.POSTERIORS}
    if kind not in catalogues:
        raise ConfigError(f"unknown component kind {kind!r}; use prior, likelihood, guide or model")
    cls = catalogues[kind].get(name)
    if cls is None:
        raise ConfigError(f"no {kind} named {name!r} is registered")
    if cls.__module__.startswith("pyro_vae."):
        raise ConfigError(f"{kind} {name!r} is built in and cannot be unregistered")
    del catalogues[kind][name]
