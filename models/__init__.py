"""The generative side of a VAE: priors p(z) and likelihoods p_θ(x|z) with their decoders.

``priors`` and ``likelihoods`` hold the building blocks; each module's docstring states the
small protocol a user-written component must follow to plug into :class:`pyro_vae.VAE`.
"""

from . import likelihoods, priors

__all__ = ["priors", "likelihoods"]
