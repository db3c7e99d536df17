"""Plug-ins: user code that registers priors, likelihoods, guides, networks or whole models.

A plug-in is a Python module that calls :func:`pyro_vae.register` when imported::

    # my_plugin.py
    import pyro_vae

    @pyro_vae.register("prior", "logistic")
    class LogisticPrior(torch.nn.Module): ...

    @pyro_vae.register("model", "my-vae")
    class MyVAE(torch.nn.Module):          # a latent-variable model (pyro_vae.lvm)
        def model(self, x, y=None, num_data=None): ...
        def guide(self, x, y=None, num_data=None): ...

Every command imports it with ``--import MODULE`` (a module on ``sys.path``, or a ``.py`` file),
repeatable: ``pyro-vae train --import my_plugin --prior logistic``. An installed package can
instead declare an entry point in the group :data:`ENTRY_POINT_GROUP`, which every command
loads::

    [project.entry-points."pyro_vae.plugins"]
    my_plugin = "my_plugin"

A run records the plug-ins it was trained with in ``config.json`` (``"plugins"``: the modules
given with ``--import``, and the modules of any user class the model is built from);
``load_run``, and so ``evaluate``, ``resume`` and every command on a run directory, imports
them again first. A plug-in that cannot be imported is one line that names it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "import_plugins", "load_entry_points", "imported",
           "plugins_of", "import_recorded"]

#: The entry-point group whose modules every command imports.
ENTRY_POINT_GROUP = "pyro_vae.plugins"

#: Plug-ins imported in this process (module names, or absolute paths of ``.py`` files), in order
_IMPORTED: list[str] = []
_ENTRY_POINTS_LOADED = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _import_file(path: Path) -> str:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"plug-in file not found: {resolved}")
    name = resolved.stem
    if not name.isidentifier():
        raise ConfigError(f"plug-in file {resolved}: {name!r} is not a valid module name")
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "__file__", None) == str(resolved):
        return str(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import the plug-in file {resolved}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # classes defined there are found by their module's name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"plug-in {resolved} failed to import: {_first_line(exc)}") from None
    return str(resolved)


def _import_one(spec: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--import needs a module name or a .py file, not {spec!r}")
    spec = spec.strip()
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return _import_file(Path(spec))
    if not all(part.isidentifier() for part in spec.split(".")):
        raise ConfigError(f"--import {spec!r} is not a module name (or a .py file)")
    try:
        importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigError(f"cannot import the plug-in {spec!r}: {_first_line(exc)}; install it "
                          "or put it on PYTHONPATH") from None
    except Exception as exc:
        raise ConfigError(f"plug-in {spec!r} failed to import: {_first_line(exc)}") from None
    return spec


def import_plugins(specs: Iterable[str], *, remember: bool = True) -> list[str]:
    """Import each plug-in (a module name or a ``.py`` file) once, in order; with
    ``remember`` the run directories this process writes record it. Returns what was imported
    (files as absolute paths)."""
    done = []
    for spec in specs:
        name = _import_one(spec)
        if remember and name not in _IMPORTED:
            _IMPORTED.append(name)
        done.append(name)
    return done


@contextmanager
def command_scope() -> Iterator[None]:
    """The plug-ins imported inside are the ones the run directories written inside record
    (one command of the command line, called in a process that may run several)."""
    saved = list(_IMPORTED)
    _IMPORTED.clear()
    try:
        yield
    finally:
        _IMPORTED[:] = saved


def load_entry_points() -> list[str]:
    """Import the modules of the installed entry points of :data:`ENTRY_POINT_GROUP` (once per
    process). One that fails is a warning (a broken package must not stop every command)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED = True
    loaded = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as exc:
            warnings.warn(f"the pyro-vae plug-in {entry_point.name!r} ({entry_point.value}) "
                          f"failed to load: {_first_line(exc)}", stacklevel=2)
            continue
        loaded.append(entry_point.value.split(":")[0])
    return loaded


def imported() -> list[str]:
    """The plug-ins imported in this process with ``--import`` / :func:`import_plugins`."""
    return list(_IMPORTED)


def _user_module(obj: Any) -> str | None:
    module = getattr(type(obj), "__module__", "") or ""
    if module.startswith("pyro_vae") or module in ("__main__", "builtins") or \
            module.split(".")[0] in ("torch", "pyro"):
        return None
    return module


def plugins_of(model: Any) -> list[str]:
    """What a run of ``model`` records under ``"plugins"``: the plug-ins imported in this
    process, then the modules of the user classes the model is made of (its own class, its
    components and networks), each once."""
    names = imported()
    modules = getattr(model, "modules", None)
    for part in (modules() if callable(modules) else [model]):
        module = _user_module(part)
        if module is not None and module not in names and \
                not any(Path(n).stem == module for n in names if n.endswith(".py")):
            names.append(module)
    return names


def import_recorded(names: Any, where: str) -> None:
    """Import the plug-ins a run recorded (``where``: its config file, for the message)."""
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: 'plugins' should be a list of module names")
    for name in names:
        try:
            import_plugins([name], remember=False)  # a later run records only what it uses
        except ConfigError as exc:
            raise ConfigError(f"this run needs the plug-in {name!r} ({where}): {exc}") from None
