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
