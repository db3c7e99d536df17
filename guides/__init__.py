"""The inference side of a VAE: posterior families q_φ(z|x) and their encoders.

``posteriors`` holds the families; its docstring states the protocol a user-written guide
family must follow to plug into :class:`pyro_vae.VAE`.
"""

from . import posteriors

__all__ = ["posteriors"]
