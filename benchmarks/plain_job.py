"""The whole ``pyro-vae train`` job written by hand in plain PyTorch: the reference of
``bench_job.py``.

It trains the networks that ``pyro-vae train`` builds (an MLP encoder D → hidden → 2·latent
giving the mean and softplus(·) + 1e-4 scale of a diagonal Normal q(z|x), an MLP decoder
latent → hidden → D giving Bernoulli logits, ReLU between layers, a standard Normal prior), with
the objective of ``--objective elbo`` (one reparameterized z per datapoint, the Monte Carlo
ELBO log p(x|z) + log p(z) − log q(z|x), the minibatch loss −(N/B)·Σ ELBO), on the same
minibatches (the seeded permutation ``torch.randperm(N, generator=manual_seed(seed))`` per
epoch, batches of ``--batch-size``), with Adam (lr 1e-3) for the same number of epochs; then the
K = ``--eval-particles`` importance-sampled test log-likelihood log (1/K) Σ_k p(x, z_k)/q(z_k|x),
its mean over the test split and standard error. Nothing else: no validation pass, no
checkpoint, no figure, no run directory.

The data come from an ``.npz`` with float32 arrays ``train`` and ``test`` (``[N, D]``, values
in [0, 1]), which ``bench_job.py`` writes from ``pyro_vae.load_data`` (the same splits) before
any timing, so the reference pays nothing for data-set formats.

    python benchmarks/plain_job.py --data splits.npz [--hidden 256,256] [--latent-dim 8]
        [--epochs 200] [--batch-size 128] [--lr 1e-3] [--seed 0] [--eval-particles 1000]
        [--adam default|fused] [--threads N] [--quick-exit]

It prints one JSON object with the test log-likelihood, its standard error and the wall time of
each phase (imports, data, training, evaluation).
"""

from __future__ import annotations

import time

_started = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributions import Bernoulli, Normal  # noqa: E402

_imported = time.perf_counter()

MIN_SCALE = 1e-4


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def log_weights(encoder, decoder, x: torch.Tensor, particles: int | None) -> torch.Tensor:
    """log p(x, z) − log q(z|x) per particle and datapoint (``[K, B]``, or ``[B]`` for None)."""
    loc, raw = encoder(x).chunk(2, dim=-1)
    q = Normal(loc, F.softplus(raw) + MIN_SCALE, validate_args=False)
    z = q.rsample() if particles is None else q.rsample((particles,))
    log_px = Bernoulli(logits=decoder(z), validate_args=False).log_prob(x).sum(-1)
    log_pz = Normal(0.0, 1.0, validate_args=False).log_prob(z).sum(-1)
    return log_px + log_pz - q.log_prob(z).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-particles", type=int, default=1000)
    parser.add_argument("--chunk-rows", type=int, default=1 << 16,
                        help="particles × datapoints per evaluation pass")
    parser.add_argument("--adam", choices=("default", "fused"), default="default")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (as pyro-vae's)")
    parser.add_argument("--quick-exit", action="store_true",
                        help="end with os._exit after the output, as the pyro-vae program "
                             "does (no interpreter teardown: ~0.6 s with torch loaded)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = [int(h) for h in args.hidden.split(",")]

    arrays = np.load(args.data)
    train, test = torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["test"])
    loaded = time.perf_counter()

    torch.manual_seed(args.seed)
    dim, latent = train.shape[1], args.latent_dim
    decoder = mlp([latent, *hidden, dim])
    encoder = mlp([dim, *hidden, 2 * latent])
    parameters = [*decoder.parameters(), *encoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=args.lr,
                                 **({"fused": True} if args.adam == "fused" else {}))
    n = train.shape[0]
    order_generator = torch.Generator().manual_seed(args.seed)
    first_step = None
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=order_generator)
        for start in range(0, n, args.batch_size):
            x = train[order[start:start + args.batch_size]]
            loss = -(n / x.shape[0]) * log_weights(encoder, decoder, x, None).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if first_step is None:  # torch's optimizers import torch._dynamo on the first step
                first_step = time.perf_counter()
    trained = time.perf_counter()

    k = args.eval_particles
    torch.manual_seed(0)
    with torch.no_grad():
        batch = max(1, min(test.shape[0], args.chunk_rows // k))
        chunk = max(1, min(k, args.chunk_rows // batch))
        estimates = []
        for start in range(0, test.shape[0], batch):
            x = test[start:start + batch]
            total = torch.full((x.shape[0],), -math.inf)
            for done in range(0, k, chunk):
                log_w = log_weights(encoder, decoder, x, min(chunk, k - done))
                total = torch.logaddexp(total, torch.logsumexp(log_w, 0))
            estimates.append(total - math.log(k))
        log_likelihood = torch.cat(estimates).double()
    evaluated = time.perf_counter()
    m = log_likelihood.shape[0]
    print(json.dumps({
        "log_likelihood": float(log_likelihood.mean()),
        "log_likelihood_se": float(log_likelihood.std() / math.sqrt(m)),
        "particles": k, "num_datapoints": m,
        "phases_s": {"imports": _imported - _started, "data": loaded - _imported,
                     "first step": first_step - loaded, "training": trained - first_step,
                     "evaluation": evaluated - trained},
    }))
    if args.quick_exit:
        _quick_exit()


def _quick_exit() -> None:
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
