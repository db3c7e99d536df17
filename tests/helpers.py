"""Test helpers shared by several modules: a linear-Gaussian VAE with a closed-form evidence and
posterior, a guide set to (a shift of) that posterior, and running the command line in-process
(``invoke``) with a snapshot of the files it must leave alone."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from pyro_vae import VAE
from pyro_vae.cli import main


@dataclass
class LinearGaussian:
    """x = μ + W z + σ ε with z ~ N(0, I): log p(x) = log N(x; μ, WWᵀ + σ²I) and
    p(z|x) = N(M⁻¹Wᵀ(x − μ), σ² M⁻¹) with M = WᵀW + σ²I."""

    vae: VAE
    W: torch.Tensor
    mu: torch.Tensor
    sigma: float
    x: torch.Tensor

    def exact_log_likelihood(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        W, mu = self.W.double(), self.mu.double()
        cov = W @ W.T + self.sigma**2 * torch.eye(W.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(mu, cov).log_prob(x.double())

    def exact_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b, cov) of the exact posterior mean A x + b and its covariance."""
        W, mu = self.W.double(), self.mu.double()
        M = W.T @ W + self.sigma**2 * torch.eye(W.shape[1], dtype=torch.float64)
        A = torch.linalg.solve(M, W.T)
        return A, -A @ mu, self.sigma**2 * torch.linalg.inv(M)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def set_diagonal_guide(problem: LinearGaussian, loc_shift: float = 0.0, scale_factor: float = 1.0):
    """Point the linear encoder at the exact posterior (diagonal when WᵀW is), optionally
    shifted and widened to make an imperfect guide."""
    A, b, cov = problem.exact_posterior()
    d = A.shape[0]
    std = cov.diagonal().sqrt() * scale_factor
    min_scale = problem.vae.guide_family.min_scale
    linear = problem.vae.encoder.linear
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:d] = A.float()
        linear.bias[:d] = (b + loc_shift).float()
        linear.bias[d:] = _inverse_softplus(std - min_scale).float()


def make_linear_gaussian(data_dim: int = 6, latent_dim: int = 2, sigma: float = 0.5,
                         num_data: int = 400, seed: int = 0) -> LinearGaussian:
    generator = torch.Generator().manual_seed(seed)
    # Orthogonal columns make WᵀW, hence the exact posterior covariance, diagonal.
    Q, _ = torch.linalg.qr(torch.randn(data_dim, data_dim, generator=generator))
    W = Q[:, :latent_dim] * torch.linspace(2.0, 1.0, latent_dim)
    mu = torch.randn(data_dim, generator=generator)
    z = torch.randn(num_data, latent_dim, generator=generator)
    x = mu + z @ W.T + sigma * torch.randn(num_data, data_dim, generator=generator)
    vae = VAE(data_dim, latent_dim, likelihood="normal", likelihood_options={"scale": sigma},
              encoder="linear", decoder="linear")
    with torch.no_grad():
        vae.decoder.linear.weight.copy_(W)
        vae.decoder.linear.bias.copy_(mu)
    problem = LinearGaussian(vae, W, mu, sigma, x)
    set_diagonal_guide(problem)
    return problem


# -- the command line in this process ------------------------------------------------------

class Outcome(NamedTuple):
    code: int
    stdout: str
    stderr: str
    warnings: list[str]


def invoke(argv: list[str], capsys) -> Outcome:
    """``main(argv)`` with its exit code, output and the warnings the real CLI would print."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message") prints the message, exits 1
        code = 1
    out, err = capsys.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return Outcome(code, out, err, shown)


def snapshot(path: Path) -> dict[str, bytes] | None:
    """The files under ``path`` with their contents; None when ``path`` does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(path.rglob("*"))}


def train_tiny_run(path: Path, *flags: str) -> Path:
    """A one-epoch run on the bundled digits with a tiny network (``flags`` override)."""
    assert main(["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--quiet",
                 "--eval-particles", "0", "--batch-size", "512", "--out", str(path),
                 *flags]) == 0
    return path
