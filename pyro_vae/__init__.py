"""pyro-vae: variational autoencoders as Pyro model/guide pairs.

>>> from pyro_vae import VAE, fit, evaluate, load_run, load_data
>>> data = load_data("digits")
>>> vae = VAE(data.data_shape, latent_dim=8, prior="normal", likelihood="bernoulli")
>>> result = fit(vae, data, objective="iwae", particles=5, epochs=20)     # doctest: +SKIP
>>> evaluate(vae, data, particles=1000).summary["log_likelihood"]        # doctest: +SKIP
"""

from .data import Dataset, load_data
from .errors import PyroVAEError
from .evaluation import Evaluation, evaluate
from . import lvm
from .log_weights import LogWeights, log_weights
from .lvm import LatentVariableModel, program
from .objectives import OBJECTIVES, make_objective
from .registry import register, unregister
from .runs import Run, load_run
from .training import FitResult, fit, resume
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE", "fit", "resume", "evaluate", "load_run", "load_data", "log_weights", "make_objective",
    "program", "LatentVariableModel", "lvm",
    "register", "unregister", "Dataset", "Evaluation", "FitResult", "LogWeights", "Run", "PyroVAEError", "OBJECTIVES",
]
