"""pyro-vae: variational autoencoders as Pyro model/guide pairs.

>>> from pyro_vae import VAE, fit, evaluate, load_run, load_data
>>> data = load_data("digits")
>>> vae = VAE(data.data_shape, latent_dim=8, prior="normal", likelihood="bernoulli")
>>> result = fit(vae, data, objective="iwae", particles=5, epochs=20)     # doctest: +SKIP
>>> evaluate(vae, data, particles=1000).summary["log_likelihood"]        # doctest: +SKIP
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), not with the package: most of them need
# torch and Pyro, and ``import pyro_vae.cli`` / ``pyro_vae.config`` must not (``pyro-vae
# --help`` answers at once). ``from pyro_vae import VAE`` and ``pyro_vae.fit`` work as ever.

#: Each name the package exports, and the submodule that defines it.
_EXPORTS = {
    "Dataset": "data", "load_data": "data",
    "PyroVAEError": "errors",
    "Evaluation": "evaluation", "evaluate": "evaluation",
    "LogWeights": "log_weights", "log_weights": "log_weights",
    "LatentVariableModel": "lvm", "program": "lvm",
    "OBJECTIVES": "objectives", "make_objective": "objectives",
    "register": "registry", "unregister": "registry",
    "Run": "runs", "load_run": "runs",
    "FitResult": "training", "fit": "training", "resume": "training",
    "VAE": "vae",
}


def __getattr__(name: str):
    """An exported name, or a submodule (``pyro_vae.lvm``, ``pyro_vae.training``, …),
    imported on first use."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif not name.startswith("_"):
        try:
            value = _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say what
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """The package's module type: ``pyro_vae.log_weights`` stays the function ``log_weights``
    (as when the package imported it eagerly) once the submodule of the same name is imported,
    which would otherwise set the package's attribute to the submodule."""

    def __setattr__(self, name: str, value) -> None:
        if (name in _EXPORTS and isinstance(value, _types.ModuleType)
                and value.__name__ == f"{__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "VAE", "fit", "resume", "evaluate", "load_run", "load_data", "log_weights", "make_objective",
    "program", "LatentVariableModel", "lvm",
    "register", "unregister", "Dataset", "Evaluation", "FitResult", "LogWeights", "Run", "PyroVAEError", "OBJECTIVES",
]
