"""One MNIST training epoch of each reproduction model: pyro-vae's own training loop against a
hand-written plain-PyTorch loop doing the same work.

The models and settings are those of the reproduction scripts (dynamically binarized MNIST,
54,000 training images):

- ``1L-elbo``, ``1L-iwae50``, ``1L-dreg50``: ``VAE`` 784-200-200-z50, tanh, batch 20; elbo
  (k = 1), iwae and dreg (k = 50) (``burda2016_iwae.py``, ``tucker2019_dreg.py``);
- ``2L-iwae5``: ``HierarchicalVAE`` z (100, 50), hidden (200, 200) / (100, 100), tanh, batch
  20, iwae k = 5 (``burda2016_iwae.py``);
- ``vamp``: ``VAE`` z40 300-300 relu with the VampPrior of 500 pseudo-inputs, batch 100, elbo
  (``tomczak2018_vampprior.py``);
- ``m2``: ``SemiSupervisedVAE`` z50, hidden (500,), classifier (500,), α = 50, softplus, batch
  100, elbo, 100 labels (``keep_labels(dataset, 10, seed=0)``; ``kingma2014_m2.py``)

(learning rates as in the scripts, held constant; no KL warm-up for ``vamp``: β = 1.)

**pyro-vae side**: one call of :func:`pyro_vae.fit` per model (``out=None``,
``progress=False``), running 1 + ``--epochs`` epochs: a warm-up epoch (cut short after
``--warmup-steps`` steps), then the timed ones. A
callback (:class:`Interleaver`) times each epoch from the moment the previous epoch's
``on_epoch_end`` hooks have returned to the end of the last timed step (``on_step_end``, after a
device synchronisation on CUDA). That region is exactly fit's own epoch: the learning-rate
schedule, the shuffled order (``randperm`` from the trainer's generator, moved to the device),
gathering the rows, the dynamic Bernoulli binarization of each minibatch, the labels (``-1``
where hidden) for M2, the loss, the loss read back every ``log_every`` = 10 steps (with the
divergence check), ``zero_grad`` / ``backward`` / Adam ``step``, the running loss sum and the
trainer's per-step hooks. Not in it: the end-of-epoch read of the loss sum, **the validation
pass** (fit runs it after every epoch, outside the timed region) and the epoch's metrics row.
With ``--fraction F`` < 1 the callback ends each epoch after its first ⌈F·steps⌉ steps by
moving the trainer's epoch position to the end (the rest of the epoch is skipped, not run).

**plain-PyTorch side**: the loop a person would write without Pyro, on its own copy of the
model (built from the same seed, so both start with the same parameters) whose encoder /
decoder / classifier ``nn.Module``\\ s it calls directly; densities from ``torch.distributions``
with ``validate_args=False``; its own ``torch.optim.Adam``. Per epoch: ``randperm`` from its own
CPU generator moved to the device, row gathering, ``torch.bernoulli`` of each minibatch, the
labels for M2, the loss, the loss read back every 10 steps (with a finiteness check),
``zero_grad`` / ``backward`` / ``step``, a running loss sum on the device. No validation. The
losses (every one −(N/B)·Σ_batch bound):

- ``elbo``: log p(x|z) + log p(z) − log q(z|x) at one z (Monte Carlo KL);
- ``iwae``: logsumexp over the k log-weights − log k;
- ``dreg``: the IWAE value with log q scored at the detached encoder output and a gradient hook
  multiplying ∂/∂z by the normalized weight w̃ (so the encoder gets Σ w̃² ∂log w/∂z ∂z/∂φ);
- two layers: z1 ~ q(z1|x), z2 ~ q(z2|z1); log w = log p(x|z1) + log p(z1|z2) + log p(z2)
  − log q(z1|x) − log q(z2|z1), IWAE over k = 5;
- VampPrior: log p(z) = logsumexp_k log q(z|u_k) − log 500, the encoder run on the 500
  pseudo-inputs every step;
- M2: the 10 classes enumerated in one pass (encoder and decoder on 10·B rows, one z per class):
  unlabelled rows Σ_c q(c|x)[log p(x|c,z_c) + log p(c) + log p(z_c) − log q(z_c|x,c)] + H(q(·|x));
  labelled rows the same terms at their own class (z drawn from q(z|x,y)) + α log q(y|x).
  (The pyro-vae program, a model and a guide, also runs the encoder on the B rows for its
  labelled-row site and the classifier twice; that work is part of what the ratio measures.)

The two sides alternate epoch by epoch, and the one that goes first alternates from pair to
pair (warm-up: ``--warmup-steps`` steps of each). The table gives the median over ``--epochs``
epochs of each side and the ratio pyro-vae / plain. On Linux the CPU time other processes used
during each epoch is read from ``/proc`` and reported (this machine may be shared).

Before timing, each model is checked once: both sides score the same minibatch with the same
parameters. Where the noise can be shared (both sides draw z in the same order from the same
seed) the losses must agree to 1e-5 and every parameter's gradient to 1e-4 (relative): every
model, and M2 on a minibatch of unlabelled rows (its pyro-vae program first draws z for the
labelled-row site, masked off there; the plain side skips as many random numbers). With
labelled rows M2's plain loss reuses the enumerated z at the row's label where the pyro-vae
program draws its own (the same distribution, not the same numbers), so there the mean losses
over ``--check-repeats`` draws per side, on a minibatch with 20 labelled and 80 unlabelled
rows, must agree within 4 Monte Carlo standard errors. A failed check stops the run: a
benchmark whose two sides differ is worthless.

    python benchmarks/reproduce/epoch_speed.py                           # all six, 3 epochs each
    python benchmarks/reproduce/epoch_speed.py --epochs 1 --fraction 0.02   # a quick check
    python benchmarks/reproduce/epoch_speed.py --models 1L-elbo m2 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import math
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
from burda2016_iwae import ARCHITECTURES  # noqa: E402
from kingma2014_m2 import OPTIONS as M2_OPTIONS, PER_CLASS  # noqa: E402

LOSS_TOL = 1e-5   # relative, shared noise
GRAD_TOL = 1e-4   # max |g_pyro − g_plain| / max |g_plain|, per parameter tensor
MC_SIGMAS = 4.0   # M2: |mean difference| within this many standard errors
CHECK_SEED = 2024
#: other processes' mean CPU use (in cores) beyond the cores this run's threads leave free,
#: above which the output says the figures are not reliable
BUSY_CORES = 0.25


@dataclass
class Bench:
    name: str
    model: str                    # "vae", "hierarchical" or "m2" (common.build)
    options: dict
    objective: str
    particles: int
    batch: int
    lr: float
    labels_per_class: int | None = None


VAMP_OPTIONS = {"latent_dim": 40, "hidden": (300, 300), "likelihood": "bernoulli",
                "prior": "vamp", "prior_options": {"components": 500}}  # tomczak2018_vampprior.py

BENCHES = {b.name: b for b in [
    Bench("1L-elbo", *ARCHITECTURES["1L"], "elbo", 1, 20, 1e-3),
    Bench("1L-iwae50", *ARCHITECTURES["1L"], "iwae", 50, 20, 1e-3),
    Bench("1L-dreg50", *ARCHITECTURES["1L"], "dreg", 50, 20, 1e-3),
    Bench("2L-iwae5", *ARCHITECTURES["2L"], "iwae", 5, 20, 1e-3),
    Bench("vamp", "vae", VAMP_OPTIONS, "elbo", 1, 100, 5e-4),
    Bench("m2", "m2", M2_OPTIONS, "elbo", 1, 100, 1e-3, labels_per_class=PER_CLASS),
]}


class CheckFailed(AssertionError):
    pass


# -- the plain-PyTorch losses ----------------------------------------------------------------------
def _gaussian(output, min_scale):
    import torch.nn.functional as F
    from torch.distributions import Normal

    loc, raw_scale = output.chunk(2, dim=-1)
    return Normal(loc, F.softplus(raw_scale) + min_scale, validate_args=False)


class PlainVAE:
    """One stochastic layer (standard normal or VampPrior): elbo, iwae, dreg."""

    def __init__(self, vae, objective: str, particles: int):
        import torch
        from torch.distributions import Normal

        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.objective, self.K = objective, particles
        self.min_scale = vae.guide_family.min_scale
        self.pseudo_inputs = getattr(vae.prior, "pseudo_inputs", None)
        d = vae.latent_dim
        self.standard = Normal(torch.zeros(d, device=vae.device), torch.ones(d, device=vae.device),
                               validate_args=False)

    def log_prior(self, z):
        import torch

        if self.pseudo_inputs is None:
            return self.standard.log_prob(z).sum(-1)
        components = _gaussian(self.encoder(self.pseudo_inputs), self.min_scale)  # [M, d]
        log_q = components.log_prob(z.unsqueeze(-2)).sum(-1)                       # [K, B, M]
        return torch.logsumexp(log_q, -1) - math.log(self.pseudo_inputs.shape[0])

    def loss(self, x, y, num_data: int):
        import torch
        from torch.distributions import Bernoulli, Normal

        q = _gaussian(self.encoder(x), self.min_scale)
        z = q.rsample((self.K,))                                                   # [K, B, d]
        log_px = Bernoulli(logits=self.decoder(z), validate_args=False).log_prob(x).sum(-1)
        if self.objective == "dreg":
            stopped = Normal(q.loc.detach(), q.scale.detach(), validate_args=False)
            log_q = stopped.log_prob(z).sum(-1)
        else:
            log_q = q.log_prob(z).sum(-1)
        log_w = log_px + self.log_prior(z) - log_q                                 # [K, B]
        if self.objective == "elbo":
            bound = log_w.mean(0)
        else:
            if self.objective == "dreg" and torch.is_grad_enabled():
                w_tilde = torch.softmax(log_w.detach(), 0).unsqueeze(-1)            # [K, B, 1]
                z.register_hook(lambda grad: grad * w_tilde)
            bound = torch.logsumexp(log_w, 0) - math.log(self.K)
        return -(num_data / x.shape[0]) * bound.sum()


class PlainHierarchical:
    """Two stochastic layers (Burda et al.), IWAE."""

    def __init__(self, model, objective: str, particles: int):
        import torch
        from torch.distributions import Normal

        from pyro_vae.catalogue import MIN_SCALE

        if objective != "iwae" or model.layers != 2:
            raise ValueError("the plain two-layer loss is IWAE with two layers")
        self.encoders, self.decoders, self.K, self.min_scale = (model.encoders, model.decoders,
                                                                particles, MIN_SCALE)
        top = model.latent_dims[-1]
        self.top = Normal(torch.zeros(top, device=model.top_loc.device),
                          torch.ones(top, device=model.top_loc.device), validate_args=False)

    def loss(self, x, y, num_data: int):
        import torch
        from torch.distributions import Bernoulli

        q1 = _gaussian(self.encoders[0](x), self.min_scale)
        z1 = q1.rsample((self.K,))                                                 # [K, B, 100]
        q2 = _gaussian(self.encoders[1](z1), self.min_scale)
        z2 = q2.rsample()                                                          # [K, B, 50]
        log_p = (self.top.log_prob(z2).sum(-1)
                 + _gaussian(self.decoders[1](z2), self.min_scale).log_prob(z1).sum(-1)
                 + Bernoulli(logits=self.decoders[0](z1), validate_args=False).log_prob(x).sum(-1))
        log_w = log_p - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1)
        bound = torch.logsumexp(log_w, 0) - math.log(self.K)
        return -(num_data / x.shape[0]) * bound.sum()


class PlainM2:
    """M2 (Kingma et al. 2014), ELBO with the classes enumerated."""

    def __init__(self, model, objective: str, particles: int):
        import torch
        from torch.distributions import Normal

        from pyro_vae.catalogue import MIN_SCALE

        if objective != "elbo" or particles != 1:
            raise ValueError("the plain M2 loss is the ELBO with one particle")
        self.classifier, self.encoder, self.decoder = model.classifier, model.encoder, model.decoder
        self.C, self.alpha, self.min_scale = model.num_classes, model.alpha, MIN_SCALE
        device = model.prior_loc.device
        self.eye = torch.eye(self.C, device=device)
        d = model.latent_dim
        self.prior = Normal(torch.zeros(d, device=device), torch.ones(d, device=device),
                            validate_args=False)

    def loss(self, x, y, num_data: int):
        import torch
        from torch.distributions import Bernoulli

        C, (B, D) = self.C, x.shape
        labelled = y >= 0
        label = y.clamp(min=0)
        log_qy = torch.log_softmax(self.classifier(x), -1)                          # [B, C]
        classes = self.eye.unsqueeze(1).expand(C, B, C)                              # [C, B, C]
        q = _gaussian(self.encoder(torch.cat([x.expand(C, B, D), classes], -1)), self.min_scale)
        z = q.rsample()                                                              # [C, B, d]
        logits = self.decoder(torch.cat([z, classes], -1))
        log_px = Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)   # [C, B]
        inner = (log_px + self.prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
                 - math.log(C))                                                      # [C, B]
        log_qy_t = log_qy.t()
        unlabelled = (log_qy_t.exp() * (inner - log_qy_t)).sum(0)
        at_label = inner.gather(0, label.unsqueeze(0)).squeeze(0)
        labelled_bound = at_label + self.alpha * log_qy.gather(1, label.unsqueeze(1)).squeeze(1)
        bound = torch.where(labelled, labelled_bound, unlabelled)
        return -(num_data / B) * bound.sum()


def plain_loss(bench: Bench, model):
    cls = {"vae": PlainVAE, "hierarchical": PlainHierarchical, "m2": PlainM2}[bench.model]
    return cls(model, bench.objective, bench.particles)


# -- the check ------------------------------------------------------------------------------------
def check_batch(bench: Bench, dataset, device, seed: int, labelled: int = 0):
    """A fixed minibatch (binarized with a fixed generator) and, for M2, its labels: the first
    ``labelled`` rows labelled, the others not."""
    import torch

    generator = torch.Generator().manual_seed(seed + 7)
    order = torch.randperm(dataset.train.shape[0], generator=generator)
    labels = dataset.split_labels("train")
    if bench.labels_per_class is not None:
        known = labels[order] >= 0
        index = torch.cat([order[known][:labelled], order[~known][:bench.batch - labelled]])
    else:
        index = order[:bench.batch]
    x = torch.bernoulli(dataset.train[index].cpu(), generator=generator).to(device)
    y = labels[index].to(device) if bench.labels_per_class is not None else None
    return x, y


def check_same_noise(name: str, model_p, model_r, loss_module, plain, x, y, num_data: int,
                     skip=None) -> dict:
    """Both sides on the same minibatch, parameters and random numbers: losses to LOSS_TOL and
    every parameter's gradient to GRAD_TOL (relative). ``skip()`` draws, on the plain side,
    the random numbers that the pyro-vae program draws first for a site that the plain loss
    does not have."""
    import torch

    model_p.zero_grad(set_to_none=True)
    model_r.zero_grad(set_to_none=True)
    torch.manual_seed(CHECK_SEED)
    loss_p = loss_module(x, y, num_data=num_data)
    loss_p.backward()
    torch.manual_seed(CHECK_SEED)
    if skip is not None:
        skip()
    loss_r = plain.loss(x, y, num_data)
    loss_r.backward()
    lp, lr = float(loss_p.detach()), float(loss_r.detach())
    rel = abs(lp - lr) / max(abs(lr), 1e-30)
    if not rel <= LOSS_TOL:
        raise CheckFailed(f"{name}: loss pyro-vae {lp / num_data!r} vs plain {lr / num_data!r} "
                          f"per datapoint (rel {rel:.2e} > {LOSS_TOL})")
    worst, worst_name, compared = 0.0, "", 0
    for (param_name, p), r in zip(model_p.named_parameters(), model_r.parameters()):
        if p.grad is None and r.grad is None:
            continue
        if p.grad is None or r.grad is None:
            raise CheckFailed(f"{name}: the gradient of {param_name} is missing on one side")
        err = float((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-30))
        compared += 1
        if err > worst:
            worst, worst_name = err, param_name
        if not err <= GRAD_TOL:
            raise CheckFailed(f"{name}: gradient of {param_name} differs (rel {err:.2e} > "
                              f"{GRAD_TOL})")
    model_p.zero_grad(set_to_none=True)
    model_r.zero_grad(set_to_none=True)
    line = (f"same noise: loss pyro-vae {lp / num_data:.6f}, plain {lr / num_data:.6f} per "
            f"datapoint (rel diff {rel:.1e}); {compared} gradients, max rel diff {worst:.1e}"
            + (f" ({worst_name})" if worst_name else ""))
    return {"kind": "shared noise", "loss_pyro_vae": lp, "loss_plain": lr, "loss_rel_diff": rel,
            "gradients_compared": compared, "grad_max_rel_diff": worst, "ok": True,
            "line": line}


def check_monte_carlo(name: str, loss_module, plain, x, y, num_data: int, repeats: int) -> dict:
    """Mean losses over ``repeats`` independent draws per side, within MC_SIGMAS standard
    errors of their difference."""
    import torch

    with torch.no_grad():
        torch.manual_seed(CHECK_SEED)
        a = [float(loss_module(x, y, num_data=num_data)) / num_data for _ in range(repeats)]
        torch.manual_seed(CHECK_SEED + 1)
        b = [float(plain.loss(x, y, num_data)) / num_data for _ in range(repeats)]
    diff = statistics.mean(a) - statistics.mean(b)
    se = math.sqrt(statistics.variance(a) / repeats + statistics.variance(b) / repeats)
    ok = abs(diff) <= MC_SIGMAS * se + LOSS_TOL * abs(statistics.mean(b))
    line = (f"Monte Carlo: mean loss per datapoint pyro-vae {statistics.mean(a):.4f}, plain "
            f"{statistics.mean(b):.4f}, difference {diff:+.4f} ± {se:.4f} "
            f"(z = {diff / se if se > 0 else 0.0:+.2f}; {repeats} draws each)")
    if not ok:
        raise CheckFailed(f"{name}: {line}: more than {MC_SIGMAS:g} SE apart")
    return {"kind": f"Monte Carlo, {repeats} draws per side", "loss_pyro_vae":
            statistics.mean(a), "loss_plain": statistics.mean(b), "difference": diff, "se": se,
            "z": diff / se if se > 0 else 0.0, "ok": True, "line": line}


def check_agreement(bench: Bench, model_p, model_r, loss_module, plain, dataset, device,
                    seed: int, repeats: int) -> list[dict]:
    """The checks of one model (see the module docstring); raises CheckFailed."""
    import torch

    for (n_p, p), (n_r, r) in zip(model_p.named_parameters(), model_r.named_parameters()):
        if n_p != n_r or not torch.equal(p, r):
            raise CheckFailed(f"{bench.name}: the two sides do not start equal ({n_p})")
    num_data = dataset.train.shape[0]
    if bench.model != "m2":
        x, y = check_batch(bench, dataset, device, seed)
        return [check_same_noise(bench.name, model_p, model_r, loss_module, plain, x, y,
                                 num_data)]
    # M2's program draws z for the labelled-row site ([1, B, d], masked off where unlabelled)
    # before the enumerated z ([C, 1, B, d]): on an unlabelled minibatch the plain side skips
    # those numbers and then draws the same z, so losses and gradients can be compared exactly.
    x, y = check_batch(bench, dataset, device, seed, labelled=0)
    skip = lambda: torch.empty(1, x.shape[0], model_p.latent_dim, device=device).normal_()  # noqa: E731
    exact = check_same_noise(f"{bench.name} (unlabelled rows)", model_p, model_r, loss_module,
                             plain, x, y, num_data, skip=skip)
    exact["line"] = "unlabelled minibatch, " + exact["line"]
    # With labelled rows the plain loss reuses the enumerated z at the row's label, where the
    # pyro-vae program draws its own: the same distribution, not the same numbers.
    x, y = check_batch(bench, dataset, device, seed, labelled=20)
    mc = check_monte_carlo(bench.name, loss_module, plain, x, y, num_data, repeats)
    mc["line"] = "20 labelled + 80 unlabelled rows, " + mc["line"]
    return [exact, mc]


# -- timing ---------------------------------------------------------------------------------------
def make_interleaver(plain_epoch, steps: int, warmup_steps: int, epochs: int, sync, monitor):
    """The callback that times fit's epochs and runs the plain side's between them: after the
    warm-up epoch of both sides, pair i of timed epochs runs pyro-vae first when i is even and
    the plain side first when i is odd (the plain epoch of an odd pair runs in the
    ``on_epoch_end`` of the pyro-vae epoch before it)."""
    from pyro_vae.callbacks import Callback

    class Interleaver(Callback):
        def __init__(self):
            self.times = {"pyro-vae": [], "plain": []}
            self.others = {"pyro-vae": [], "plain": []}
            self.index = -1   # the pyro-vae epoch under way; -1: the warm-up epoch
            self.count = 0    # its steps so far
            self.target = warmup_steps

        def _begin(self):
            self.token = monitor.start()
            self.start = time.perf_counter()

        def _plain(self):
            token = monitor.start()
            self.times["plain"].append(plain_epoch(steps))
            self.others["plain"].append(monitor.others_share(token))

        def on_fit_start(self, trainer):
            self._begin()

        def on_step_end(self, trainer):
            self.count += 1
            if self.count == self.target:
                sync()
                elapsed = time.perf_counter() - self.start
                if self.index >= 0:
                    self.times["pyro-vae"].append(elapsed)
                    self.others["pyro-vae"].append(monitor.others_share(self.token))
                if self.target < trainer.steps_per_epoch:  # --fraction: skip the rest
                    trainer.state.position = trainer.num_data

        def on_epoch_end(self, trainer, row):
            i = self.index
            if i < 0:
                plain_epoch(warmup_steps)
            elif i % 2 == 0:      # pair i: pyro-vae went first, the plain epoch follows
                self._plain()
            if i + 1 < epochs and (i + 1) % 2 == 1:  # pair i + 1: the plain epoch goes first
                self._plain()
            self.index += 1
            self.count = 0
            self.target = steps
            self._begin()   # the last thing before fit's next epoch begins

    return Interleaver()


def make_plain_epoch(plain, model_r, dataset, bench: Bench, device, seed: int, sync,
                     log_every: int = 10):
    """One epoch of the hand-written loop, returning its wall time (the first ``steps`` steps)."""
    import torch

    optimizer = torch.optim.Adam(model_r.parameters(), lr=bench.lr)
    train = dataset.train
    labels = dataset.split_labels("train") if bench.labels_per_class is not None else None
    num_data, batch = train.shape[0], bench.batch
    generator = torch.Generator().manual_seed(seed)
    state = {"step": 0}

    def run(steps: int) -> float:
        sync()
        start = time.perf_counter()
        order = torch.randperm(num_data, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            x = torch.bernoulli(train[index])
            y = None if labels is None else labels[index]
            loss = plain.loss(x, y, num_data)
            if (state["step"] + 1) % log_every == 0 or state["step"] == 0:
                value = float(loss.detach()) / num_data
                if not math.isfinite(value):
                    raise RuntimeError(f"plain {bench.name}: the loss became {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * (x.shape[0] / num_data)
            state["step"] += 1
        sync()
        seconds = time.perf_counter() - start
        float(loss_sum)  # the epoch's loss, read after the clock (as fit reads it)
        return seconds

    return run


def run_bench(bench: Bench, dataset, args, device, monitor) -> dict:
    import pyro
    import torch

    import pyro_vae
    from pyro_vae.distributed import LossModule
    from pyro_vae.objectives import make_objective

    if bench.labels_per_class is not None:
        from pyro_vae.data import keep_labels
        dataset = keep_labels(dataset, bench.labels_per_class, seed=0)
    spec = common.Spec(bench.name, bench.model, bench.options, bench.objective, bench.particles,
                       1, batch_size=bench.batch, lr=bench.lr, seed=args.seed)
    torch.manual_seed(args.seed)
    model_p = common.build(spec, dataset).to(device)
    torch.manual_seed(args.seed)
    model_r = common.build(spec, dataset).to(device)
    num_data = dataset.train.shape[0]
    steps_per_epoch = math.ceil(num_data / bench.batch)
    steps = min(steps_per_epoch, max(1, math.ceil(args.fraction * steps_per_epoch)))
    warmup = min(steps_per_epoch, args.warmup_steps)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain = plain_loss(bench, model_r)
    objective = make_objective(bench.objective, bench.particles)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        checks = check_agreement(bench, model_p, model_r, LossModule(model_p, objective), plain,
                                 dataset, device, args.seed, args.check_repeats)
    for check in checks:
        print(f"  check {bench.name}: {check['line']}", flush=True)

    on_device = dataset.to(device)
    plain_epoch = make_plain_epoch(plain, model_r, on_device, bench, device, args.seed + 1, sync)
    interleaver = make_interleaver(plain_epoch, steps, warmup, args.epochs, sync, monitor)
    started = time.perf_counter()
    pyro_vae.fit(model_p, dataset, bench.objective, epochs=1 + args.epochs, out=None,
                 progress=False, callbacks=[interleaver], particles=bench.particles,
                 batch_size=bench.batch, lr=bench.lr, lr_schedule="constant", seed=args.seed,
                 val_particles=1, device=str(device))
    wall = time.perf_counter() - started
    times, others = interleaver.times, interleaver.others
    if len(times["pyro-vae"]) != args.epochs or len(times["plain"]) != args.epochs:
        raise RuntimeError(f"{bench.name}: timed {len(times['pyro-vae'])} pyro-vae and "
                           f"{len(times['plain'])} plain epochs, not {args.epochs}")
    for i in range(args.epochs):
        first = "plain first" if i % 2 else "pyro-vae first"
        print(f"    epoch {i + 1} ({first}): pyro-vae {times['pyro-vae'][i]:.3f} s, plain "
              f"{times['plain'][i]:.3f} s; other processes used {others['pyro-vae'][i]:.2f} / "
              f"{others['plain'][i]:.2f} cores", flush=True)
    p, r = statistics.median(times["pyro-vae"]), statistics.median(times["plain"])
    row = {"model": bench.name, "objective": bench.objective, "particles": bench.particles,
           "batch": bench.batch, "steps_per_epoch": steps_per_epoch, "steps_timed": steps,
           "pyro_vae_s": p, "plain_s": r, "ratio": p / r,
           "pyro_vae_s_all": times["pyro-vae"], "plain_s_all": times["plain"],
           "others_cores_pyro_vae": others["pyro-vae"], "others_cores_plain": others["plain"],
           "checks": checks, "wall_s": wall}
    print(f"  {bench.name}: pyro-vae {p:.3f} s, plain {r:.3f} s per epoch ({steps} of "
          f"{steps_per_epoch} steps): ratio {p / r:.3f}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | steps | pyro-vae s/epoch | plain s/epoch | ratio |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        steps = (f"{row['steps_timed']}" if row["steps_timed"] == row["steps_per_epoch"]
                 else f"{row['steps_timed']} of {row['steps_per_epoch']}")
        lines.append(f"| {row['model']} ({row['objective']}, k = {row['particles']}, "
                     f"B = {row['batch']}) | {steps} | {row['pyro_vae_s']:.3f} | "
                     f"{row['plain_s']:.3f} | {row['ratio']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BENCHES), choices=list(BENCHES),
                        metavar="MODEL", help=f"a subset of: {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed epochs per side (default 3); the median is reported")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="time the first F of each epoch's steps (default 1.0: whole epochs)")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="untimed steps of each side before the timed epochs (default 20)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda[:i]")
    parser.add_argument("--data-dir", default=str(common.ROOT.parent / "shared" / "data"),
                        help="the folder holding MNIST/raw/ (default: ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-repeats", type=int, default=100,
                        help="draws per side of the Monte Carlo check of M2 (default 100)")
    parser.add_argument("--json", metavar="PATH", help="write everything to PATH as JSON")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1")
    if args.check_repeats < 2:
        parser.error("--check-repeats must be at least 2")
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.error(f"no MNIST/raw/ under {args.data_dir}; pass --data-dir")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import pyro
    import pyro_vae
    from pyro_vae.training import resolve_device
    from bench_objectives import CpuMonitor

    device = resolve_device(args.device)
    monitor = CpuMonitor()
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(sys.argv[0], common.ROOT)] + sys.argv[1:])
    machine = {**common.machine(), "platform": platform.platform(),
               "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    commit = common.commit()
    print(f"{machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, pyro "
          f"{pyro.__version__}, {machine['threads']} torch threads, device {device}"
          + (f" ({machine['gpu']})" if "gpu" in machine else "") + f", commit {commit}",
          flush=True)
    dataset = pyro_vae.load_data("mnist", data_dir=args.data_dir, binarize_mode="dynamic")
    load_average = [os.getloadavg()]
    started = time.perf_counter()
    rows = []
    try:
        for name in args.models:
            print(f"{name}:", flush=True)
            rows.append(run_bench(BENCHES[name], dataset, args, device, monitor))
    except CheckFailed as exc:
        print(f"CORRECTNESS CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    load_average.append(os.getloadavg())
    fraction = ("whole epochs" if args.fraction == 1 else
                f"the first {args.fraction:g} of each epoch's steps")
    notes = [
        "",
        f"`{command}`: commit {commit}; {machine['platform']}, {machine['cpus']} CPUs, torch "
        f"{machine['torch']}, {machine['threads']} torch threads, device {device}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "") + ".",
        f"Median over {args.epochs} epoch{'s' if args.epochs > 1 else ''} per side "
        f"({fraction}), sides alternating epoch by epoch after {args.warmup_steps} warm-up "
        "steps each. Timed on both sides: the shuffled order, gathering the minibatch rows, "
        "their dynamic binarization, the labels (M2), the loss, the loss read every 10 steps, "
        "backward and the Adam step. Not timed: the validation pass (pyro-vae's fit runs it "
        "after every epoch, outside the timed region; the plain loop has none).",
        f"1-minute load average {load_average[0][0]:.2f} at the start, "
        f"{load_average[1][0]:.2f} at the end; total {elapsed:.0f} s.",
    ]
    shares = [v for row in rows for v in row["others_cores_pyro_vae"] + row["others_cores_plain"]]
    # the cores this run's torch threads did not need, plus a little: beyond it, other
    # processes took time from this run's threads
    spare = max(0, (machine["cpus"] or 1) - machine["threads"]) + BUSY_CORES
    busy = bool(shares) and statistics.mean(shares) > spare
    if busy:
        notes.append(f"**Other processes used {statistics.mean(shares):.2f} cores on average "
                     f"during the timed epochs, more than the {machine['cpus']} CPUs leave beside "
                     f"{machine['threads']} torch thread(s): these figures are not reliable; "
                     "rerun on a quiet machine, or with fewer --threads.**")
    print()
    print(table(rows))
    print("\n".join(notes))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "commit": commit, "machine": machine,
                       "pyro": pyro.__version__, "epochs": args.epochs,
                       "fraction": args.fraction, "warmup_steps": args.warmup_steps,
                       "validation_timed": False, "load_average": load_average,
                       "machine_busy": busy,
                       "elapsed_s": elapsed, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
