"""The Pyro programs of the conformance suite (tests/test_conformance.py), and the exact
expectations that the Monte Carlo checks compare against.

Each program is a model/guide pair ported from Pyro's own test suite (the structure and the
expected answer; the file and test it comes from are recorded as ``source``), rewritten here.
Where Pyro's test used Bernoulli sites only to exercise a plate structure, the port uses
Normal sites with reparameterized guides, so that every objective has a reference to meet
exactly; discrete and score-function sites have their own programs.

A program is built by calling ``CASES[name].build()`` inside the test (under float64): the
builder returns a :class:`Program`. ``expected(objective, particles, alpha)``, where given,
returns the exact expected loss (−bound, nats) of that objective as a differentiable function
of the parameters in Pyro's param store, so its gradient is the exact expected gradient:

* by Gauss–Legendre quadrature against the guide's Normal density (nodes fixed, weights carry
  the density, so autograd differentiates the density: exact for score-function and pathwise
  estimators alike, including integrands with jumps, which are split at ``breaks``);
* by enumeration for discrete guide sites.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.testing import fakes
from pyro.infer import config_enumerate
from pyro.poutine.plate_messenger import block_plate
from torch.distributions import constraints

DATA = "data"


@dataclass
class Program:
    model: Callable
    guide: Callable
    args: tuple = ()
    #: exact expected loss of an objective: expected(objective, particles, alpha) -> tensor
    expected: Callable | None = None
    #: the same model with every latent summed out by model-side enumeration (empty guide):
    #: TraceEnum_ELBO of it is log p(x), the value of every importance-weighted objective when
    #: the guide's sites are all enumerated
    marginal: Callable | None = None


@dataclass
class Case:
    name: str
    source: str                      # where in Pyro's tests the program comes from
    build: Callable[[], Program]
    nesting: int = 1                 # max_plate_nesting for Pyro's estimators
    enumerated: bool = False         # Pyro's reference is TraceEnum_ELBO
    #: the datapoint plate encloses every sample site (no global sites): Pyro's RenyiELBO then
    #: reduces each datapoint separately, as the objectives do
    data_encloses_all: bool = False
    has_data: bool = False
    #: N / B of a subsampled data plate
    data_scale: float = 1.0
    valid: bool = True               # False: Pyro's own validation rejects it (error or warning)


CASES: dict[str, Case] = {}


def case(name: str, source: str, **options):
    def register(build):
        CASES[name] = Case(name, source, build, **options)
        return build
    return register


# -- exact expectations ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _legendre(nodes: int):
    t, w = np.polynomial.legendre.leggauss(nodes)
    return torch.tensor(t), torch.tensor(w)


def normal_rule(loc, scale, nodes: int = 32, breaks=(), width: float = 7.0):
    """(points, weights) with Σ weights·f(points) = E_{N(loc, scale)} f for f smooth between
    ``breaks``. The points are fixed; the weights carry the density, so they are
    differentiable in loc and scale (and autograd gives ∂/∂φ E f exactly). Gauss–Legendre
    with 32 nodes on ±7 sd reproduces the Gaussian ELBO's closed form and gradient to 1e-10;
    24 nodes on ±6 sd to 1e-8."""
    loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
    centre, spread = float(loc.detach()), float(scale.detach())
    low, high = centre - width * spread, centre + width * spread
    edges = [low] + sorted(b for b in breaks if low < b < high) + [high]
    t, w = _legendre(nodes)
    points, weights = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        points.append((b - a) / 2 * t + (a + b) / 2)
        weights.append((b - a) / 2 * w)
    points, weights = torch.cat(points), torch.cat(weights)
    return points, weights * dist.Normal(loc, scale).log_prob(points).exp()


def bernoulli_rule(probs):
    probs = torch.as_tensor(probs)
    return torch.tensor([0.0, 1.0]), torch.stack([1 - probs, probs])


def categorical_rule(probs):
    return torch.arange(probs.shape[-1]).to(probs.dtype), probs


def product_rule(rules):
    """The tensor product of one-dimensional rules: a list of point grids and one weight grid."""
    grids = torch.meshgrid(*[points for points, _ in rules], indexing="ij")
    weight = None
    for i, (_, w) in enumerate(rules):
        shape = [1] * len(rules)
        shape[i] = -1
        w = w.reshape(shape)
        weight = w if weight is None else weight * w
    return list(grids), weight


#: ciwae's weight on the ELBO in the conformance table (its default)
CIWAE_ELBO_WEIGHT = 0.5


def reduce_particles(objective: str, log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """The bound of K log-weights (last dim): mean (ELBO family), log-mean-exp (IWAE family;
    miwae and piwae with one group), the Rényi bound, or ciwae's mix of the first two."""
    particles = log_w.shape[-1]
    if objective in ("elbo", "meanfield", "stl") or particles == 1:
        return log_w.mean(-1)
    if objective in ("iwae", "dreg", "vimco", "miwae", "piwae"):
        return torch.logsumexp(log_w, -1) - math.log(particles)
    if objective == "ciwae":
        iwae = torch.logsumexp(log_w, -1) - math.log(particles)
        return CIWAE_ELBO_WEIGHT * log_w.mean(-1) + (1 - CIWAE_ELBO_WEIGHT) * iwae
    if objective == "renyi":
        power = 1.0 - alpha
        return (torch.logsumexp(power * log_w, -1) - math.log(particles)) / power
    raise ValueError(objective)


def expected_bound(objective, particles, alpha, rules, log_weight):
    """E over K independent draws, each from the product of ``rules`` (one rule per latent
    coordinate), of the bound of ``log_weight(*coordinates)``."""
    grids, weight = product_rule(list(rules) * particles)
    width = len(rules)
    log_w = torch.stack([log_weight(*grids[k * width:(k + 1) * width])
                         for k in range(particles)], -1)
    return (weight * reduce_particles(objective, log_w, alpha)).sum()


def normal_log_prob(value, loc, scale):
    return dist.Normal(loc, scale).log_prob(value)


# ================================================================================================
# test_valid_models.py
# ================================================================================================
@case("obs_only", "test_valid_models.py::test_nonempty_model_empty_guide_ok", nesting=0)
def _():
    def model():
        loc = pyro.param("model_loc", torch.tensor([0.3, -0.2]))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=torch.tensor([1.0, 0.5]))

    def guide():
        pass

    return Program(model, guide)


@case("empty_program", "test_valid_models.py::test_empty_model_empty_guide_ok", nesting=0)
def _():
    def model():
        pass

    def guide():
        pass

    return Program(model, guide)


def _clamped_model(has_rsample):
    """z ~ N(0, 1), x ~ N(clamp(100 z, 0, 1), 1) observed at 0.5: a sparse pathwise gradient."""
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal((100 * z).clamp(0, 1), 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("z", dist.Normal(loc, 1.0).has_rsample_(has_rsample))

    def expected(objective, particles, alpha):
        loc = pyro.param("loc")

        def log_weight(z):
            return (normal_log_prob(z, 0.0, 1.0)
                    + normal_log_prob(torch.tensor(0.5), (100 * z).clamp(0, 1), 1.0)
                    - normal_log_prob(z, loc, 1.0))

        rule = normal_rule(loc, 1.0, nodes=20, breaks=(0.0, 0.01))
        return -expected_bound(objective, particles, alpha, [rule], log_weight)

    return Program(model, guide, expected=expected)


@case("rsample_true", "test_valid_models.py::test_set_has_rsample_ok[True]", nesting=0)
def _():
    return _clamped_model(True)


@case("rsample_false", "test_valid_models.py::test_set_has_rsample_ok[False]", nesting=0)
def _():
    return _clamped_model(False)


@case("not_rsample_rounded", "test_valid_models.py::test_not_has_rsample_ok", nesting=0)
def _():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        p = z.round().clamp(min=0.2, max=0.8)  # discontinuous in z
        pyro.sample("x", dist.Bernoulli(p), obs=torch.tensor(0.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.3))
        pyro.sample("z", dist.Normal(loc, 1.0).has_rsample_(False))

    def expected(objective, particles, alpha):
        loc = pyro.param("loc")

        def log_weight(z):
            p = z.round().clamp(min=0.2, max=0.8)
            return (normal_log_prob(z, 0.0, 1.0) + torch.log1p(-p)
                    - normal_log_prob(z, loc, 1.0))

        rule = normal_rule(loc, 1.0, nodes=24, breaks=(0.5,))
        return -expected_bound(objective, particles, alpha, [rule], log_weight)

    return Program(model, guide, expected=expected)


def _bernoulli_sequence(sites, subsample_size=None, plate_name="plate"):
    """Independent Bernoulli(0.5) latents in a for-loop plate; the guide's are Bernoulli(p)."""
    def model():
        for i in pyro.plate(plate_name, sites, subsample_size):
            pyro.sample(f"x_{i}", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        for i in pyro.plate(plate_name, sites, subsample_size):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    def expected(objective, particles, alpha):
        p = pyro.param("p")

        def log_weight(*bits):
            return sum(math.log(0.5) - dist.Bernoulli(p).log_prob(b) for b in bits)

        rules = [bernoulli_rule(p)] * sites
        return -expected_bound(objective, particles, alpha, rules, log_weight)

    return Program(model, guide, expected=expected)


@case("sequential_plate", "test_valid_models.py::test_iplate_ok[full]", nesting=0)
def _():
    return _bernoulli_sequence(4)


@case("sequential_plate_subsample", "test_valid_models.py::test_iplate_ok[subsample]", nesting=0)
def _():
    return _bernoulli_sequence(4, 2)


def _normal_plate(name, size, subsample_size=None, dim=None):
    """z ~ N(0, 1), x ~ N(z, 1) observed, in one vectorized plate; the guide's loc is per
    element (indexed by the subsample) and its scale is shared."""
    data = torch.linspace(-1.0, 2.0, size)

    def model():
        with pyro.plate(name, size, subsample_size, dim=dim) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[ind])

    def guide():
        loc = pyro.param("loc", torch.zeros(size))
        scale = pyro.param("scale", torch.tensor(0.8), constraint=constraints.positive)
        with pyro.plate(name, size, subsample_size, dim=dim) as ind:
            pyro.sample("z", dist.Normal(loc[ind], scale))

    return Program(model, guide)


@case("plate_full", "test_valid_models.py::test_plate_ok[full]")
def _():
    return _normal_plate("plate", 10)


@case("plate_subsample", "test_valid_models.py::test_plate_ok[subsample]")
def _():
    return _normal_plate("plate", 10, 5)


@case("data_plate_subsample", "test_valid_models.py::test_plate_ok[subsample], plate named 'data'",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    return _normal_plate(DATA, 10, 5)


def _param_in_plate(name, subsample_size):
    def model():
        with pyro.plate(name, 10, subsample_size):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        with pyro.plate(name, 10, subsample_size) as ind:
            shift = pyro.param("shift", torch.tensor(0.1), event_dim=0)
            loc = pyro.param("loc", torch.linspace(-0.5, 0.5, 10), event_dim=0)
            assert shift.shape == () and len(loc) == len(ind)
            pyro.sample("z", dist.Normal(loc + shift, 1.0))

    return Program(model, guide)


@case("param_in_plate_full", "test_valid_models.py::test_plate_subsample_param_ok[full]")
def _():
    return _param_in_plate("plate", None)


@case("param_in_plate_subsample", "test_valid_models.py::test_plate_subsample_param_ok[subsample]")
def _():
    return _param_in_plate("plate", 5)


@case("param_in_data_subsample",
      "test_valid_models.py::test_plate_subsample_param_ok[subsample], plate named 'data'",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    return _param_in_plate(DATA, 5)


@case("subsample_primitive_data",
      "test_valid_models.py::test_plate_subsample_primitive_ok[subsample], plate named 'data'",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    offsets = torch.linspace(-0.5, 0.5, 10)

    def model():
        with pyro.plate(DATA, 10, 5):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate(DATA, 10, 5) as ind:
            offset = pyro.subsample(offsets, event_dim=0)
            assert len(offset) == len(ind)
            pyro.sample("z", dist.Normal(loc + offset, 1.0))

    return Program(model, guide)


@case("plate_no_size", "test_valid_models.py::test_plate_no_size_ok")
def _():
    def model():
        with pyro.plate("plate"):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand_by([10]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.full((10,), 0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("plate"):
            pyro.sample("z", dist.Normal(loc, 1.0).expand_by([10]))

    return Program(model, guide)


def _nested_sequential(swap):
    def model():
        outer, inner = pyro.plate("plate_0", 3), pyro.plate("plate_1", 3)
        for i in outer:
            for j in inner:
                z = pyro.sample(f"z_{i}_{j}", dist.Normal(0.0, 1.0))
                pyro.sample(f"x_{i}_{j}", dist.Normal(z, 1.0), obs=torch.tensor(float(i - j)))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.1))
        outer, inner = pyro.plate("plate_0", 3), pyro.plate("plate_1", 3)
        pairs = ([(i, j) for j in inner for i in outer] if swap
                 else [(i, j) for i in outer for j in inner])
        for i, j in pairs:
            pyro.sample(f"z_{i}_{j}", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("sequential_nested", "test_valid_models.py::test_iplate_iplate_ok[full]", nesting=0)
def _():
    return _nested_sequential(False)


@case("sequential_nested_swap", "test_valid_models.py::test_iplate_iplate_swap_ok[full]",
      nesting=0)
def _():
    return _nested_sequential(True)


@case("sequential_plate_model_only", "test_valid_models.py::test_iplate_in_model_not_guide_ok",
      nesting=0)
def _():
    def model():
        for _ in pyro.plate("plate", 10):
            pass
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.7))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.1))
        pyro.sample("z", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("vectorized_in_sequential", "test_valid_models.py::test_iplate_plate_ok (full)")
def _():
    def model():
        inner = pyro.plate("plate", 3)
        for i in pyro.plate("iplate", 3):
            with inner:
                z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0).expand_by([3]))
                pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=torch.full((3,), float(i)))

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        inner = pyro.plate("plate", 3)
        for i in pyro.plate("iplate", 3):
            with inner:
                pyro.sample(f"z_{i}", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("sequential_in_vectorized", "test_valid_models.py::test_plate_iplate_ok (full)")
def _():
    def model():
        with pyro.plate("plate", 3):
            for i in pyro.plate("iplate", 3):
                z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0).expand_by([3]))
                pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=torch.full((3,), float(i)))

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("plate", 3):
            for i in pyro.plate("iplate", 3):
                pyro.sample(f"z_{i}", dist.Normal(loc, 1.0))

    return Program(model, guide)


def _plate_stack(sizes, extra_plate):
    shape = tuple(sizes) + ((7,) if extra_plate else ())  # sizes of the plates around z

    def model():
        with pyro.plate_stack("plate_stack", sizes):
            if extra_plate:
                with pyro.plate("plate", 7):
                    z = pyro.sample("z", dist.Normal(0.0, 1.0))
            else:
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
        # sum over the plates only, keeping any dimension to their left (Pyro's particles)
        total = z.sum(tuple(range(-len(shape), 0)), keepdim=True)
        pyro.sample("x", dist.Normal(total, 3.0), obs=torch.tensor(1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.1))
        with pyro.plate_stack("plate_stack", sizes):
            if extra_plate:
                with pyro.plate("plate", 7):
                    pyro.sample("z", dist.Normal(loc, 1.0))
            else:
                pyro.sample("z", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("plate_stack_3", "test_valid_models.py::test_plate_stack_ok[(3,)]")
def _():
    return _plate_stack((3,), False)


@case("plate_stack_3_4", "test_valid_models.py::test_plate_stack_ok[(3, 4)]", nesting=2)
def _():
    return _plate_stack((3, 4), False)


@case("plate_stack_3_4_5", "test_valid_models.py::test_plate_stack_ok[(3, 4, 5)]", nesting=3)
def _():
    return _plate_stack((3, 4, 5), False)


@case("plate_stack_and_plate", "test_valid_models.py::test_plate_stack_and_plate_ok[(3, 4)]",
      nesting=3)
def _():
    return _plate_stack((3, 4), True)


def _nested_plates(subsample):
    outer_size, inner_size = (5, 6) if subsample else (None, None)

    def model():
        with pyro.plate("plate_outer", 10, outer_size, dim=-1):
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            with pyro.plate("plate_inner", 11, inner_size, dim=-2):
                pyro.sample("y", dist.Normal(x, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("plate_outer", 10, outer_size, dim=-1):
            x = pyro.sample("x", dist.Normal(loc, 1.0))
            with pyro.plate("plate_inner", 11, inner_size, dim=-2):
                pyro.sample("y", dist.Normal(x + loc, 1.5))

    return Program(model, guide)


@case("nested_plates", "test_valid_models.py::test_nested_plate_plate_ok (full)", nesting=2)
def _():
    return _nested_plates(False)


@case("nested_plates_subsample", "test_valid_models.py::test_nested_plate_plate_ok", nesting=2)
def _():
    return _nested_plates(True)


@case("plate_reuse", "test_valid_models.py::test_plate_reuse_ok (full)", nesting=2)
def _():
    def program():
        loc = pyro.param("loc", torch.tensor(0.2))
        outer = pyro.plate("plate_outer", 10, dim=-1)
        inner = pyro.plate("plate_inner", 11, dim=-2)
        with outer:
            pyro.sample("x", dist.Normal(loc, 1.0).expand_by([10]))
        with inner:
            pyro.sample("y", dist.Normal(loc, 1.0).expand_by([11, 1]))
        with outer, inner:
            pyro.sample("z", dist.Normal(loc, 1.0).expand_by([11, 10]))

    def model():
        outer = pyro.plate("plate_outer", 10, dim=-1)
        inner = pyro.plate("plate_inner", 11, dim=-2)
        with outer:
            x = pyro.sample("x", dist.Normal(0.0, 1.0).expand_by([10]))
        with inner:
            y = pyro.sample("y", dist.Normal(0.0, 1.0).expand_by([11, 1]))
        with outer, inner:
            pyro.sample("z", dist.Normal(x + y, 1.0))

    return Program(model, program)


def _nonnested(subsample):
    def model():
        with pyro.plate("plate_0", 10, 5 if subsample else None):
            pyro.sample("x0", dist.Normal(0.0, 1.0))
        with pyro.plate("plate_1", 11, 6 if subsample else None):
            pyro.sample("x1", dist.Normal(0.0, 2.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("plate_0", 10, 5 if subsample else None):
            pyro.sample("x0", dist.Normal(loc, 1.0))
        with pyro.plate("plate_1", 11, 6 if subsample else None):
            pyro.sample("x1", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("nonnested_plates", "test_valid_models.py::test_nonnested_plate_plate_ok (full)")
def _():
    return _nonnested(False)


@case("nonnested_plates_subsample", "test_valid_models.py::test_nonnested_plate_plate_ok")
def _():
    return _nonnested(True)


@case("plates_at_different_depths",
      "test_valid_models.py::test_three_indep_plate_at_different_depths_ok (full)")
def _():
    def program(is_guide):
        def run():
            loc = pyro.param("loc", torch.tensor(0.2)) if is_guide else torch.tensor(0.0)
            inner = pyro.plate("plate2", 10)
            for i in pyro.plate("plate0", 2):
                pyro.sample(f"x_{i}", dist.Normal(loc, 1.0))
                if i == 0:
                    for j in pyro.plate("plate1", 2):
                        with inner:
                            pyro.sample(f"y_{j}", dist.Normal(loc, 1.0).expand_by([10]))
                else:
                    with inner:
                        pyro.sample("z", dist.Normal(loc, 1.0).expand_by([10]))
        return run

    return Program(program(False), program(True))


@case("block_plate_name", "test_valid_models.py::test_block_plate_name_ok")
def _():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(a, 1.0))
            with block_plate("plate"):
                c = pyro.sample("c", dist.Normal(0.0, 1.0))
                assert c.shape[-1:] != (2,)
        pyro.sample("x", dist.Normal(b.sum(-1, keepdim=True) + c, 1.0), obs=torch.tensor(0.3))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.1))
        pyro.sample("c", dist.Normal(loc, 1.0))
        with pyro.plate("plate", 2):
            pyro.sample("b", dist.Normal(loc, 1.0))
            with block_plate("plate"):
                pyro.sample("a", dist.Normal(-loc, 1.0))

    return Program(model, guide)


# -- enumeration (test_valid_models.py) --------------------------------------------------------
def _bernoulli_marginal(probs, likelihood_locs, observed):
    """log p(x) of x ~ N(locs[c], 1) with c ~ Bernoulli(probs), summed out in the model."""
    def marginal():
        c = pyro.sample("c", dist.Bernoulli(probs()), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(likelihood_locs[c.long()], 1.0), obs=observed)
    return marginal


@case("enum_guide_single", "test_valid_models.py::test_enum_discrete_single_ok", nesting=0,
      enumerated=True)
def _():
    locs, observed = torch.tensor([-1.0, 1.0]), torch.tensor(0.4)

    def model_probs():
        return pyro.param("model_p", torch.tensor(0.6), constraint=constraints.unit_interval)

    def model():
        c = pyro.sample("c", dist.Bernoulli(model_probs()))
        pyro.sample("x", dist.Normal(locs[c.long()], 1.0), obs=observed)

    @config_enumerate
    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        pyro.sample("c", dist.Bernoulli(p))

    return Program(model, guide, marginal=_bernoulli_marginal(model_probs, locs, observed))


@case("enum_guide_two", "test_valid_models.py::test_enum_discrete_single_single_ok", nesting=0,
      enumerated=True)
def _():
    observed = torch.tensor(0.4)

    def model():
        a = pyro.sample("a", dist.Bernoulli(0.5))
        b = pyro.sample("b", dist.Bernoulli(0.3 + 0.4 * a))
        pyro.sample("x", dist.Normal(a - b, 1.0), obs=observed)

    @config_enumerate
    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        a = pyro.sample("a", dist.Bernoulli(p))
        pyro.sample("b", dist.Bernoulli(p * (1 - a) + 0.5 * a))

    def marginal():
        a = pyro.sample("a", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        b = pyro.sample("b", dist.Bernoulli(0.3 + 0.4 * a), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(a - b, 1.0), obs=observed)

    return Program(model, guide, marginal=marginal)


@case("enum_guide_onehot", "test_valid_models.py::test_enum_discrete_parallel_nested_ok",
      nesting=0, enumerated=True)
def _():
    def program(is_guide):
        def run():
            p2 = (pyro.param("p2", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
                  if is_guide else torch.ones(2) / 2)
            p3 = torch.ones(3) / 3
            x2 = pyro.sample("x2", dist.OneHotCategorical(p2))
            pyro.sample("x3", dist.OneHotCategorical(p3))
            if not is_guide:
                pyro.sample("y", dist.Normal(x2[..., 0], 1.0), obs=torch.tensor(0.2))
        return config_enumerate(run) if is_guide else run

    def marginal():
        x2 = pyro.sample("x2", dist.OneHotCategorical(torch.ones(2) / 2),
                         infer={"enumerate": "parallel"})
        pyro.sample("x3", dist.OneHotCategorical(torch.ones(3) / 3),
                    infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(x2[..., 0], 1.0), obs=torch.tensor(0.2))

    return Program(program(False), program(True), marginal=marginal)


def _enum_in_plate(name):
    data = torch.tensor([0.3, -1.2, 2.0])

    def model():
        with pyro.plate(name, 3):
            c = pyro.sample("c", dist.Bernoulli(0.4))
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data)

    @config_enumerate
    def guide():
        p = pyro.param("p", torch.full((3,), 0.5), constraint=constraints.unit_interval)
        with pyro.plate(name, 3):
            pyro.sample("c", dist.Bernoulli(p))

    def marginal():
        with pyro.plate(name, 3):
            c = pyro.sample("c", dist.Bernoulli(0.4), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data)

    return Program(model, guide, marginal=marginal)


@case("enum_guide_in_plate", "test_valid_models.py::test_plate_enum_discrete_batch_ok (full)",
      enumerated=True)
def _():
    return _enum_in_plate("plate")


@case("enum_guide_in_data", "test_valid_models.py::test_plate_enum_discrete_batch_ok, plate 'data'",
      enumerated=True, has_data=True, data_encloses_all=True)
def _():
    return _enum_in_plate(DATA)


@case("enum_nested_plates", "test_valid_models.py::test_enumerate_parallel_plate_ok[parallel]",
      nesting=2, enumerated=True)
def _():
    def program(is_guide):
        def run():
            p2 = (pyro.param("p2", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
                  if is_guide else torch.ones(2) / 2)
            pyro.sample("x2", dist.Categorical(p2))
            with pyro.plate("outer", 3):
                pyro.sample("x34", dist.Categorical(torch.ones(3, 4) / 4))
                with pyro.plate("inner", 5):
                    pyro.sample("x536", dist.Categorical(torch.ones(5, 3, 6) / 6))
        return config_enumerate(run) if is_guide else run

    # nothing is observed: log p(x) = 0, the value of every importance-weighted bound
    return Program(program(False), program(True),
                   marginal=config_enumerate(program(False), "parallel"))


@case("enum_chain_mixed", "test_valid_models.py::test_enum_in_model_ok", nesting=0,
      enumerated=True)
def _():
    infer = {"enumerate": "parallel"}

    def model():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2))
        c = pyro.sample("c", dist.Bernoulli(p + b / 2), infer=infer)
        d = pyro.sample("d", dist.Bernoulli(p + c / 2))
        e = pyro.sample("e", dist.Bernoulli(p + d / 2))
        f = pyro.sample("f", dist.Bernoulli(p + e / 2), infer=infer)
        pyro.sample("g", dist.Bernoulli(p + f / 2), obs=torch.tensor(0.0))

    def guide():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2), infer=infer)
        d = pyro.sample("d", dist.Bernoulli(p + b / 2))
        pyro.sample("e", dist.Bernoulli(p + d / 2), infer=infer)

    return Program(model, guide)


@case("enum_chain_in_data", "test_valid_models.py::test_enum_in_model_plate_ok", enumerated=True,
      has_data=True)
def _():
    infer = {"enumerate": "parallel"}

    def model():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2))
        with pyro.plate(DATA, 3):
            c = pyro.sample("c", dist.Bernoulli(p + b / 2), infer=infer)
            d = pyro.sample("d", dist.Bernoulli(p + c / 2))
            e = pyro.sample("e", dist.Bernoulli(p + d / 2))
            f = pyro.sample("f", dist.Bernoulli(p + e / 2), infer=infer)
            pyro.sample("g", dist.Bernoulli(p + f / 2), obs=torch.zeros(3))

    def guide():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2), infer=infer)
        with pyro.plate(DATA, 3):
            d = pyro.sample("d", dist.Bernoulli(p + b / 2))
            pyro.sample("e", dist.Bernoulli(p + d / 2), infer=infer)

    return Program(model, guide)


@case("enum_model_plate_reuse", "test_valid_models.py::test_enum_in_model_plate_reuse_ok",
      enumerated=True)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.tensor([0.2, 0.8]))
        a = pyro.sample("a", dist.Bernoulli(0.3)).long()
        with pyro.plate("b_axis", 2):
            pyro.sample("b", dist.Bernoulli(p[a]), obs=torch.tensor([0.0, 1.0]))
        c = pyro.sample("c", dist.Bernoulli(0.3)).long()
        with pyro.plate("c_axis", 2):
            pyro.sample("d", dist.Bernoulli(p[c]), obs=torch.tensor([0.0, 0.0]))

    def guide():
        pass

    return Program(model, guide)


@case("enum_model_parent_of_latent",
      "test_enum.py::test_elbo_normals[parallel-None-None] (model-side enumerated parent)",
      nesting=0, enumerated=True)
def _():
    def model():
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(2 * c - 1, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.4))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("z", dist.Normal(loc, 0.8))

    def expected(objective, particles, alpha):
        loc = pyro.param("loc")

        def log_weight(z):
            prior = torch.logsumexp(torch.stack([math.log(0.7) + normal_log_prob(z, -1.0, 1.0),
                                                 math.log(0.3) + normal_log_prob(z, 1.0, 1.0)]), 0)
            return (prior + normal_log_prob(torch.tensor(0.4), z, 1.0)
                    - normal_log_prob(z, loc, 0.8))

        return -expected_bound(objective, particles, alpha, [normal_rule(loc, 0.8)], log_weight)

    return Program(model, guide, expected=expected)


@case("enum_in_plate_nested_in_data", "an enumerated site in a plate nested in 'data' (brief)",
      nesting=2, enumerated=True, has_data=True, data_encloses_all=True)
def _():
    data = torch.tensor([[0.3, -0.2], [1.1, 0.8], [-0.5, 0.4]])

    def model():
        with pyro.plate(DATA, 3, dim=-2), pyro.plate("features", 2, dim=-1):
            c = pyro.sample("c", dist.Bernoulli(0.4), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=data)

    def guide():
        pass

    return Program(model, guide)


@case("enum_model_empty_guide",
      "test_enum.py::test_elbo_enumerate_2 (model-side enumeration, empty guide)", nesting=0,
      enumerated=True)
def _():
    def model():
        probs_x = pyro.param("model_probs_x", torch.tensor([0.4, 0.6]),
                             constraint=constraints.simplex)
        probs_y = pyro.param("model_probs_y", torch.tensor([[0.75, 0.25], [0.55, 0.45]]),
                             constraint=constraints.simplex)
        probs_z = pyro.param("model_probs_z", torch.tensor([[0.3, 0.7], [0.2, 0.8]]),
                             constraint=constraints.simplex)
        x = pyro.sample("x", dist.Categorical(probs_x), infer={"enumerate": "parallel"})
        y = pyro.sample("y", dist.Categorical(probs_y[x]), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Categorical(probs_z[y]), obs=torch.tensor(0))

    def guide():
        pass

    return Program(model, guide)


# -- plates and particles: vectorized particle programs -------------------------------------
@case("components_and_data", "test_valid_models.py::test_vectorized_num_particles", nesting=2,
      has_data=True)
def _():
    data = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])

    def model():
        with pyro.plate("components", 2):
            p = pyro.sample("p", dist.Beta(1.1, 1.1))
            with pyro.plate(DATA, data.shape[0], dim=-2):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    def guide():
        a = pyro.param("a", torch.tensor([1.5, 2.0]), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor([1.2, 0.9]), constraint=constraints.positive)
        with pyro.plate("components", 2):
            pyro.sample("p", dist.Beta(a, b))

    return Program(model, guide)


@case("user_plate_num_particles", "test_valid_models.py::test_plate_shape_broadcasting",
      nesting=3, has_data=True)
def _():
    data = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])

    def model():
        with pyro.plate("num_particles", 3, dim=-3):
            with pyro.plate("components", 2, dim=-1):
                p = pyro.sample("p", dist.Beta(1.1, 1.1))
            with pyro.plate(DATA, data.shape[0], dim=-2):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    def guide():
        a = pyro.param("a", torch.tensor([1.5, 2.0]), constraint=constraints.positive)
        with pyro.plate("num_particles", 3, dim=-3):
            with pyro.plate("components", 2, dim=-1):
                pyro.sample("p", dist.Beta(a, 1.3))

    return Program(model, guide)


# -- factors, mean field, reparameterized sites, masks and scales ---------------------------
@case("factor_in_model", "test_valid_models.py::test_factor_in_model_ok", nesting=0)
def _():
    def model():
        loc = pyro.param("loc", torch.tensor(0.4))
        pyro.factor("f", -0.5 * (loc - 1.0) ** 2)

    def guide():
        pass

    return Program(model, guide)


def _factor_in_guide(has_rsample):
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.1))
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        # a term of log q that depends on z and φ: pathwise when has_rsample, else scored
        pyro.factor("f", -0.1 * (z - loc) ** 2, has_rsample=has_rsample)

    return Program(model, guide)


@case("factor_in_guide_rsample", "test_valid_models.py::test_factor_in_guide_ok[True]",
      nesting=0)
def _():
    return _factor_in_guide(True)


@case("factor_in_guide_no_rsample", "test_valid_models.py::test_factor_in_guide_ok[False]",
      nesting=0)
def _():
    return _factor_in_guide(False)


@case("mean_field", "test_valid_models.py::test_mean_field_ok", nesting=0)
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.3))
        x = pyro.sample("x", dist.Normal(loc, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0))

    return Program(model, guide)


def _mean_field_mask(mask):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0).mask(mask))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.4))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.3))
        pyro.sample("x", dist.Normal(loc, 1.0).mask(mask))

    return Program(model, guide)


@case("mean_field_mask_true", "test_valid_models.py::test_mean_field_mask_ok[True]", nesting=0)
def _():
    return _mean_field_mask(True)


@case("mean_field_mask_false", "test_valid_models.py::test_mean_field_mask_ok[False]", nesting=0)
def _():
    return _mean_field_mask(False)


@case("mean_field_violated", "test_valid_models.py::test_mean_field_warn", nesting=0)
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.3))
        y = pyro.sample("y", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(y, 1.0))

    return Program(model, guide)


def _observed_mask(mask):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("x", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("reparam", "test_valid_models.py::test_reparam_ok", nesting=0)
def _():
    return _observed_mask(True)


@case("mask_observed_false", "test_valid_models.py::test_reparam_mask_ok[False]", nesting=0)
def _():
    return _observed_mask(False)


@case("mask_observed_tensor_false",
      "test_valid_models.py::test_reparam_mask_ok[tensor(False)]", nesting=0)
def _():
    return _observed_mask(torch.tensor(False))


def _dirichlet_plate(mask=None, scale=None):
    data = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])

    def model():
        c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate(DATA, len(data)):
            with poutine.mask(mask=True if mask is None else mask), \
                    poutine.scale(scale=1.0 if scale is None else scale):
                pyro.sample("obs", dist.Dirichlet(c), obs=data)

    def guide():
        loc = pyro.param("loc", torch.tensor([0.1, -0.2, 0.3]))
        scale_q = pyro.param("scale", torch.ones(3), constraint=constraints.positive)
        pyro.sample("c", dist.LogNormal(loc, scale_q).to_event(1))

    return Program(model, guide)


@case("mask_data_plate_false", "test_valid_models.py::test_reparam_mask_plate_ok[False]",
      has_data=True)
def _():
    return _dirichlet_plate(mask=False)


@case("mask_data_plate_tensor", "test_valid_models.py::test_reparam_mask_plate_ok[mask4]",
      has_data=True)
def _():
    return _dirichlet_plate(mask=torch.tensor([False, True]))


@case("scale_data_plate_scalar", "test_valid_models.py::test_reparam_scale_plate_ok[0.1]",
      has_data=True)
def _():
    return _dirichlet_plate(scale=0.1)


@case("scale_data_plate_tensor",
      "test_valid_models.py::test_reparam_scale_plate_ok[scale3]", has_data=True)
def _():
    return _dirichlet_plate(scale=torch.tensor([0.1, 0.9]))


def _obs_mask(mask, multivariate):
    if multivariate:
        data = torch.full((4, 3), 2.0)
    else:
        data = torch.tensor([1.5, 2.0, 2.5])

    def model():
        if multivariate:
            x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))
        else:
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", len(data)):
            likelihood = (dist.MultivariateNormal(x, torch.eye(3)) if multivariate
                          else dist.Normal(x, 1.0))
            pyro.sample("y", likelihood, obs=data, obs_mask=mask)

    def guide():
        if multivariate:
            loc = pyro.param("loc", torch.tensor([0.1, 0.2, 0.3]))
            cov = pyro.param("cov", torch.eye(3) * 0.5,
                             constraint=constraints.positive_definite)
            x = pyro.sample("x", dist.MultivariateNormal(loc, cov))
        else:
            loc = pyro.param("loc", torch.tensor(0.1))
            scale = pyro.param("scale", torch.tensor(0.7), constraint=constraints.positive)
            x = pyro.sample("x", dist.Normal(loc, scale))
        with pyro.plate("plate", len(data)):
            with poutine.mask(mask=~mask):
                unobserved = (dist.MultivariateNormal(x, torch.eye(3)) if multivariate
                              else dist.Normal(x, 1.0))
                pyro.sample("y_unobserved", unobserved)

    return Program(model, guide)


@case("obs_mask", "test_valid_models.py::test_obs_mask_ok[mask4]")
def _():
    return _obs_mask(torch.tensor([False, True, False]), False)


@case("obs_mask_multivariate", "test_valid_models.py::test_obs_mask_multivariate_ok[mask4]")
def _():
    return _obs_mask(torch.tensor([False, True, True, False]), True)


def _observed_scale(scale):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=scale):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("x", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("scale_observed_scalar", "test_valid_models.py::test_reparam_scale_ok[0.1]", nesting=0)
def _():
    return _observed_scale(0.1)


@case("scale_observed_tensor", "test_valid_models.py::test_reparam_scale_ok[scale2]", nesting=0)
def _():
    return _observed_scale(torch.tensor(0.5))


@case("scale_latent_scalar", "poutine.scale on a latent site (brief)", nesting=0)
def _():
    def model():
        with poutine.scale(scale=0.5):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.8))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        scale = pyro.param("scale", torch.tensor(0.9), constraint=constraints.positive)
        with poutine.scale(scale=0.5):
            pyro.sample("z", dist.Normal(loc, scale))

    return Program(model, guide)


def _local_latent_with(handler):
    data = torch.tensor([0.5, -1.0, 1.5])

    def model():
        data_plate = pyro.plate(DATA, 3)
        with data_plate, handler():
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with data_plate:
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate(DATA, 3), handler():
            pyro.sample("z", dist.Normal(loc, 0.8))

    return Program(model, guide)


@case("scale_latent_tensor_data", "poutine.scale (tensor) on a local latent site (brief)",
      has_data=True, data_encloses_all=True)
def _():
    return _local_latent_with(lambda: poutine.scale(scale=torch.tensor([0.3, 1.0, 2.0])))


@case("mask_latent_data", "poutine.mask (tensor) on a local latent site (brief)",
      has_data=True, data_encloses_all=True)
def _():
    return _local_latent_with(lambda: poutine.mask(mask=torch.tensor([True, False, True])))


# ================================================================================================
# test_gradient.py
# ================================================================================================
def _gaussian_local(loc, scale, x):
    """log w(z) of z ~ N(0, 1), x ~ N(z, 1), q = N(loc, scale)."""
    def log_weight(z):
        return (normal_log_prob(z, 0.0, 1.0) + normal_log_prob(x, z, 1.0)
                - normal_log_prob(z, loc, scale))
    return log_weight


def _particle_gradient(normal, has_rsample=None, subsample=None, scale=1.0, nuisance=False,
                       user_particles=0):
    """z_b ~ N(0, 1), x_b ~ N(z_b, 1) in plate "data" (Pyro's gradient tests); the guide's loc
    is per datapoint and its scale shared. Options: a subsample given as an argument, a
    poutine.scale on model and guide, global nuisance sites whose guide equals their prior,
    a user plate named "particles" around the local sites (dim -2)."""
    data = torch.tensor([-0.5, 2.0])

    def model(subsample_ind=None):
        plate_data = pyro.plate(DATA, 2, subsample=subsample_ind, dim=-1)
        if nuisance:
            pyro.sample("nuisance_a", normal(0.0, 1.0))
        if user_particles:
            with pyro.plate("particles", user_particles, dim=-2), plate_data as ind:
                z = pyro.sample("z", normal(0.0, 1.0))
                if nuisance:
                    pyro.sample("nuisance_b", normal(2.0, 3.0))
                pyro.sample("x", normal(z, 1.0), obs=data[ind])
        else:
            with plate_data as ind:
                z = pyro.sample("z", normal(0.0, 1.0))
            if nuisance:
                pyro.sample("nuisance_b", normal(2.0, 3.0))
            with plate_data:
                pyro.sample("x", normal(z, 1.0), obs=data[ind])
        if nuisance:
            pyro.sample("nuisance_c", normal(4.0, 5.0))

    def guide(subsample_ind=None):
        scale_q = pyro.param("scale", torch.tensor([1.0]), constraint=constraints.positive)
        if nuisance:
            pyro.sample("nuisance_c", normal(4.0, 5.0))
        plate_data = pyro.plate(DATA, 2, subsample=subsample_ind, dim=-1)
        if user_particles:
            with pyro.plate("particles", user_particles, dim=-2), plate_data:
                loc = pyro.param("loc", torch.tensor([0.3, -0.4]), event_dim=0)
                z_dist = normal(loc, scale_q)
                if has_rsample is not None:
                    z_dist.has_rsample_(has_rsample)
                pyro.sample("z", z_dist)
                if nuisance:
                    pyro.sample("nuisance_b", normal(2.0, 3.0))
        else:
            with plate_data:
                loc = pyro.param("loc", torch.tensor([0.3, -0.4]), event_dim=0)
                z_dist = normal(loc, scale_q)
                if has_rsample is not None:
                    z_dist.has_rsample_(has_rsample)
                pyro.sample("z", z_dist)
            if nuisance:
                pyro.sample("nuisance_b", normal(2.0, 3.0))
        if nuisance:
            pyro.sample("nuisance_a", normal(0.0, 1.0))

    if scale != 1.0:
        model = poutine.scale(model, scale=scale)
        guide = poutine.scale(guide, scale=scale)

    args = () if subsample is None else (torch.tensor(subsample),)
    indices = [0, 1] if subsample is None else list(subsample)

    def expected(objective, particles, alpha):
        # sites scaled by `scale` inside each weight; the datapoints independent; the
        # nuisance terms are exactly zero (guide = prior); the minibatch N/B outside
        loc, scale_q = pyro.param("loc"), pyro.param("scale")[0]
        total = 0.0
        for b in indices:
            one = _gaussian_local(loc[b], scale_q, data[b])
            rule = (normal_rule(loc[b], scale_q, nodes=24, width=6.0) if user_particles
                    else normal_rule(loc[b], scale_q))
            rules = [rule] * max(user_particles, 1)

            def log_weight(*zs, one=one):
                return scale * sum(one(z) for z in zs)

            total = total + expected_bound(objective, particles, alpha, rules, log_weight)
        return -(2 / len(indices)) * total

    return Program(model, guide, args=args, expected=expected)


@case("particle_gradient_reparam", "test_gradient.py::test_particle_gradient[reparam]",
      has_data=True, data_encloses_all=True)
def _():
    return _particle_gradient(dist.Normal)


@case("particle_gradient_rsample_false", "test_gradient.py::test_particle_gradient[reparam-False]",
      has_data=True, data_encloses_all=True)
def _():
    return _particle_gradient(dist.Normal, has_rsample=False)


@case("particle_gradient_nonreparam", "test_gradient.py::test_particle_gradient[nonreparam]",
      has_data=True, data_encloses_all=True)
def _():
    return _particle_gradient(fakes.NonreparameterizedNormal)


@case("subsample_gradient_full", "test_gradient.py::test_subsample_gradient[full-reparam]",
      has_data=True, data_encloses_all=True)
def _():
    return _particle_gradient(dist.Normal, subsample=[0, 1])


@case("subsample_gradient_one", "test_gradient.py::test_subsample_gradient[subsample-reparam]",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    return _particle_gradient(dist.Normal, subsample=[1])


@case("subsample_gradient_scaled",
      "test_gradient.py::test_subsample_gradient[subsample-reparam-scaled]",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    return _particle_gradient(dist.Normal, subsample=[0], scale=2.0)


@case("subsample_gradient_nonreparam",
      "test_gradient.py::test_subsample_gradient[subsample-nonreparam]",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    return _particle_gradient(fakes.NonreparameterizedNormal, subsample=[1])


@case("user_particles_plate", "test_gradient.py::test_plate[reparam] (a user plate 'particles')",
      nesting=2, has_data=True)
def _():
    return _particle_gradient(dist.Normal, nuisance=True, user_particles=2)


@case("user_particles_plate_nonreparam", "test_gradient.py::test_plate[nonreparam]",
      nesting=2, has_data=True)
def _():
    return _particle_gradient(fakes.NonreparameterizedNormal, nuisance=True, user_particles=2)


@case("nuisance_globals", "test_gradient.py::test_plate_elbo_vectorized_particles[reparam]",
      has_data=True)
def _():
    return _particle_gradient(dist.Normal, nuisance=True)


@case("nuisance_globals_nonreparam",
      "test_gradient.py::test_plate_elbo_vectorized_particles[nonreparam]", has_data=True)
def _():
    return _particle_gradient(fakes.NonreparameterizedNormal, nuisance=True)


@case("subsample_sequential_draws", "test_gradient.py::test_subsample_gradient_sequential",
      has_data=True, data_encloses_all=True, data_scale=2.0)
def _():
    data = torch.tensor([-0.5, 2.0])

    def model():
        with pyro.plate(DATA, 2, 1) as ind:
            x = data[ind]
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand_by(x.shape))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        loc = pyro.param("loc", torch.tensor([0.3, -0.4]))
        scale = pyro.param("scale", torch.tensor([1.0]), constraint=constraints.positive)
        with pyro.plate(DATA, 2, 1) as ind:
            pyro.sample("z", dist.Normal(loc[ind], scale))

    return Program(model, guide)


# ================================================================================================
# test_multi_sample_elbos.py, test_elbo_mapdata.py, test_inference.py
# ================================================================================================
def _two_plates(inner_first):
    data = torch.tensor([[0.3, -0.5, 1.2], [0.1, 0.8, -0.7]])
    if inner_first:   # "outer" at dim -2 of size 2, "inner" at dim -1 of size 3
        data = data.T.contiguous().T

    def model():
        if inner_first:
            with pyro.plate("outer", 2, dim=-2):
                x = pyro.sample("x", dist.Normal(0.0, 1.0))
                with pyro.plate("inner", 3, dim=-1):
                    pyro.sample("y", dist.Normal(x, 1.0), obs=data)
        else:
            with pyro.plate("outer", 3, dim=-1):
                x = pyro.sample("x", dist.Normal(0.0, 1.0))
                with pyro.plate("inner", 2, dim=-2):
                    pyro.sample("y", dist.Normal(x, 1.0), obs=data)

    def guide():
        if inner_first:
            loc = pyro.param("loc", torch.tensor([[0.5], [1.0]]))
            with pyro.plate("outer", 2, dim=-2):
                pyro.sample("x", dist.Normal(loc, 1.0))
        else:
            loc = pyro.param("loc", torch.tensor([0.5, 1.0, 0.0]))
            with pyro.plate("outer", 3, dim=-1):
                pyro.sample("x", dist.Normal(loc, 1.0))

    return Program(model, guide)


@case("inner_outer", "test_multi_sample_elbos.py::test_inner_outer", nesting=2)
def _():
    return _two_plates(False)


@case("outer_inner", "test_multi_sample_elbos.py::test_outer_inner (plate at dim -2)", nesting=2)
def _():
    return _two_plates(True)


def _mapdata(kind, batch_size, name="aaa"):
    """Normal–Normal with a 2-d global loc and 8 observations mapped by a plate, a for-loop
    plate or a Python loop (Pyro's test_elbo_mapdata)."""
    lam0, loc0, lam = torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.5]), torch.tensor([6.0, 4.0])
    data = torch.tensor([[0.1, 0.21], [0.16, 0.11], [0.06, 0.31], [-0.01, 0.07],
                         [0.23, 0.25], [0.19, 0.18], [0.09, 0.41], [-0.04, 0.17]])

    def model():
        loc = pyro.sample("loc_latent", dist.Normal(loc0, lam0.rsqrt()).to_event(1))
        if kind == "plate":
            with pyro.plate(name, len(data), batch_size) as ind:
                pyro.sample("obs", dist.Normal(loc, lam.rsqrt()).to_event(1), obs=data[ind])
        elif kind == "iplate":
            for i in pyro.plate(name, len(data), batch_size):
                pyro.sample(f"obs_{i}", dist.Normal(loc, lam.rsqrt()).to_event(1), obs=data[i])
        else:
            for i, x in enumerate(data):
                pyro.sample(f"obs_{i}", dist.Normal(loc, lam.rsqrt()).to_event(1), obs=x)

    def guide():
        loc_q = pyro.param("loc_q", torch.tensor([0.0, 0.3]))
        log_sig_q = pyro.param("log_sig_q", torch.tensor([-1.5, -1.2]))
        pyro.sample("loc_latent", dist.Normal(loc_q, log_sig_q.exp()).to_event(1))
        if kind == "plate":
            with pyro.plate(name, len(data), batch_size):
                pass
        elif kind == "iplate":
            for _ in pyro.plate(name, len(data), batch_size):
                pass

    return Program(model, guide)


@case("mapdata_plate", "test_elbo_mapdata.py::test_elbo_mapdata[plate-3]")
def _():
    return _mapdata("plate", 3)


@case("mapdata_plate_full", "test_elbo_mapdata.py::test_elbo_mapdata[plate-None]")
def _():
    return _mapdata("plate", None)


@case("mapdata_data_subsample", "test_elbo_mapdata.py::test_elbo_mapdata[plate-3], plate 'data'",
      has_data=True, data_scale=8 / 3)
def _():
    return _mapdata("plate", 3, name=DATA)


@case("mapdata_iplate", "test_elbo_mapdata.py::test_elbo_mapdata[iplate-3]", nesting=0)
def _():
    return _mapdata("iplate", 3)


@case("mapdata_iplate_full", "test_elbo_mapdata.py::test_elbo_mapdata[iplate-None]", nesting=0)
def _():
    return _mapdata("iplate", None)


@case("mapdata_range", "test_elbo_mapdata.py::test_elbo_mapdata[range]", nesting=0)
def _():
    return _mapdata("range", None)


def conjugate_program(kind: str, reparameterized: bool = True, replicas: int | None = None):
    """The conjugate pairs of Pyro's test_inference.py: a global latent and N observations in
    plate "data". With ``replicas`` the whole problem is repeated in an outer plate (R
    independent copies, each with its own guide parameters): one SVI run is then R independent
    runs (Adam is elementwise), whose spread gives the Monte Carlo error of the fit.

    Returns the program and the exact posterior's parameters by name."""
    outer = (lambda: pyro.plate("replica", replicas, dim=-2)) if replicas else None
    shape = (replicas, 1) if replicas else ()
    if kind == "normal":
        loc0, scale0, sigma = 0.0, 2.0, 0.7
        data = torch.tensor([0.8, 1.3, 0.2, 1.1, 0.9, 1.6, 0.4, 1.0])
        precision = 1 / scale0**2 + len(data) / sigma**2
        exact = {"loc_q": (loc0 / scale0**2 + data.sum() / sigma**2) / precision,
                 "scale_q": precision ** -0.5}
        normal = dist.Normal if reparameterized else fakes.NonreparameterizedNormal

        def prior():
            return dist.Normal(loc0, scale0)

        def likelihood(latent):
            return dist.Normal(latent, sigma)

        def guide_dist():
            loc = pyro.param("loc_q", torch.full(shape, float(exact["loc_q"]) + 0.3))
            scale = pyro.param("scale_q", torch.full(shape, float(exact["scale_q"]) * 1.4),
                               constraint=constraints.positive)
            return normal(loc, scale)
        name = "loc"
    elif kind == "beta":
        alpha0, beta0 = 1.0, 1.0
        data = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
        exact = {"alpha_q": alpha0 + data.sum(), "beta_q": beta0 + len(data) - data.sum()}
        beta = dist.Beta if reparameterized else fakes.NonreparameterizedBeta

        def prior():
            return dist.Beta(alpha0, beta0)

        def likelihood(latent):
            return dist.Bernoulli(latent)

        def guide_dist():
            a = pyro.param("alpha_q", torch.full(shape, float(exact["alpha_q"]) * 1.3),
                           constraint=constraints.positive)
            b = pyro.param("beta_q", torch.full(shape, float(exact["beta_q"]) * 0.8),
                           constraint=constraints.positive)
            return beta(a, b)
        name = "p"
    elif kind == "gamma":
        alpha0, beta0 = 1.0, 1.0
        data = torch.tensor([3.0, 2.0, 0.5, 1.5])
        exact = {"alpha_q": alpha0 + len(data), "beta_q": beta0 + data.sum()}
        gamma = dist.Gamma if reparameterized else fakes.NonreparameterizedGamma

        def prior():
            return dist.Gamma(alpha0, beta0)

        def likelihood(latent):
            return dist.Exponential(latent)

        def guide_dist():
            a = pyro.param("alpha_q", torch.full(shape, float(exact["alpha_q"]) * 1.3),
                           constraint=constraints.positive)
            b = pyro.param("beta_q", torch.full(shape, float(exact["beta_q"]) * 0.8),
                           constraint=constraints.positive)
            return gamma(a, b)
        name = "rate"
    else:
        raise ValueError(kind)

    def model():
        with (outer() if outer else _null()):
            latent = pyro.sample(name, prior())
            with pyro.plate(DATA, len(data), dim=-1):
                pyro.sample("obs", likelihood(latent), obs=data)

    def guide():
        with (outer() if outer else _null()):
            pyro.sample(name, guide_dist())

    return Program(model, guide), {k: float(v) for k, v in exact.items()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@case("normal_normal", "test_inference.py::NormalNormalTests (reparameterized)", has_data=True)
def _():
    return conjugate_program("normal")[0]


@case("normal_normal_nonreparam", "test_inference.py::NormalNormalTests (nonreparameterized)",
      has_data=True)
def _():
    return conjugate_program("normal", reparameterized=False)[0]


@case("beta_bernoulli", "test_inference.py::BernoulliBetaTests", has_data=True)
def _():
    return conjugate_program("beta")[0]


@case("gamma_exponential", "test_inference.py::test_exponential_gamma[reparam]", has_data=True)
def _():
    return conjugate_program("gamma")[0]


@case("gamma_exponential_nonreparam", "test_inference.py::test_exponential_gamma[nonreparam]",
      has_data=True)
def _():
    return conjugate_program("gamma", reparameterized=False)[0]


@case("sequential_plating_sum", "test_inference.py::test_sequential_plating_sum", nesting=0)
def _():
    data = torch.tensor([0.2, -0.3, 1.1, 0.9])

    def model():
        x = pyro.sample("x", dist.Bernoulli(torch.tensor(0.5)))
        for i in pyro.plate("data_plate", len(data)):
            pyro.sample(f"data_{i}", dist.Normal(x, 0.5), obs=data[i])

    def guide():
        p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
        pyro.sample("x", dist.Bernoulli(p))

    def expected(objective, particles, alpha):
        p = pyro.param("p")

        def log_weight(x):
            return (math.log(0.5) + dist.Normal(x.unsqueeze(-1), 0.5).log_prob(data).sum(-1)
                    - dist.Bernoulli(p).log_prob(x))

        return -expected_bound(objective, particles, alpha, [bernoulli_rule(p)], log_weight)

    return Program(model, guide, expected=expected)


@case("non_nested_plating_sum", "test_inference.py::test_non_nested_plating_sum", nesting=2)
def _():
    data = torch.tensor([[0.3, 1.1, -0.2], [0.8, 0.1, 0.4]])
    weights = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]])

    def model():
        with pyro.plate("x_plate", weights.shape[0]):
            x = pyro.sample("x", dist.Normal(1.0, 0.5))
        with pyro.plate("data_plate_1", data.shape[-1]):
            with pyro.plate("data_plate_2", data.shape[-2]):
                pyro.sample("data", dist.Normal(x @ weights, 0.5), obs=data)

    def guide():
        loc = pyro.param("x_loc", torch.tensor(0.5))
        with pyro.plate("x_plate", weights.shape[0]):
            pyro.sample("x", dist.Normal(loc, 0.4))

    return Program(model, guide)


# ================================================================================================
# test_enum.py
# ================================================================================================
def _gmm_batch(enumerate_guide):
    data = torch.tensor([0.0, 1.0, 9.0])
    mus = torch.tensor([-1.0, 1.0])

    def model():
        p = pyro.param("p", torch.tensor([0.3]), constraint=constraints.unit_interval)
        p = torch.cat([p, 1 - p])
        scale = pyro.param("scale", torch.tensor([1.0]), constraint=constraints.positive)
        with pyro.plate(DATA, len(data)):
            z = pyro.sample("z", dist.OneHotCategorical(p))
            pyro.sample("x", dist.Normal((z * mus).sum(-1), scale), obs=data)

    def guide():
        probs = pyro.param("probs", torch.full((3, 1), 0.6), constraint=constraints.unit_interval)
        with pyro.plate(DATA, len(data)):
            pyro.sample("z", dist.OneHotCategorical(torch.cat([probs, 1 - probs], -1)))

    def marginal():
        p = pyro.param("p", torch.tensor([0.3]), constraint=constraints.unit_interval)
        scale = pyro.param("scale", torch.tensor([1.0]), constraint=constraints.positive)
        with pyro.plate(DATA, len(data)):
            z = pyro.sample("z", dist.OneHotCategorical(torch.cat([p, 1 - p])),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal((z * mus).sum(-1), scale), obs=data)

    def expected(objective, particles, alpha):
        p, scale = pyro.param("p")[0], pyro.param("scale")[0]
        q = pyro.param("probs")[:, 0]
        total = 0.0
        for b in range(len(data)):
            q_b = torch.stack([q[b], 1 - q[b]])
            prior = torch.stack([p, 1 - p])

            def log_weight(c, b=b, q_b=q_b, prior=prior):
                c = c.long()
                return (prior.log()[c] + dist.Normal(mus[c], scale).log_prob(data[b])
                        - q_b.log()[c])

            rule = (torch.tensor([0.0, 1.0]), q_b)
            total = total + expected_bound(objective, particles, alpha, [rule], log_weight)
        return -total

    if enumerate_guide:
        guide = config_enumerate(guide, "parallel")
    return Program(model, guide, marginal=marginal, expected=expected)


@case("gmm_enumerated", "test_enum.py::test_differentiable_loss[batch-parallel]",
      enumerated=True, has_data=True, data_encloses_all=True)
def _():
    return _gmm_batch(True)


@case("gmm_score_function", "test_enum.py::test_differentiable_loss[batch-None]",
      has_data=True, data_encloses_all=True)
def _():
    return _gmm_batch(False)


@case("gmm_sequential_data", "test_enum.py::test_svi_step_smoke[single-None]", nesting=0)
def _():
    data = torch.tensor([0.0, 1.0, 9.0])

    def model():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        mus = torch.tensor([-1.0, 1.0])
        for i in pyro.plate(DATA, len(data)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(p)).long()
            pyro.sample(f"x_{i}", dist.Normal(mus[z], scale), obs=data[i])

    def guide():
        for i in pyro.plate(DATA, len(data)):
            p = pyro.param(f"p_{i}", torch.tensor(0.6), constraint=constraints.unit_interval)
            pyro.sample(f"z_{i}", dist.Bernoulli(p))

    def expected(objective, particles, alpha):
        # a sequential plate "data" is no datapoint plate: the program is one weight
        p, scale = pyro.param("p"), pyro.param("scale")
        q = [pyro.param(f"p_{i}") for i in range(len(data))]
        mus = torch.tensor([-1.0, 1.0])

        def log_weight(*bits):
            return sum(dist.Bernoulli(p).log_prob(z) + dist.Normal(mus[z.long()], scale)
                       .log_prob(data[i]) - dist.Bernoulli(q[i]).log_prob(z)
                       for i, z in enumerate(bits))

        return -expected_bound(objective, particles, alpha, [bernoulli_rule(q_i) for q_i in q],
                               log_weight)

    return Program(model, guide, expected=expected)


@case("guide_uses_grad", "test_enum.py::test_svi_step_guide_uses_grad[None]", has_data=True)
def _():
    data = torch.tensor([0.0, 1.0, 3.0])

    def model():
        scale = pyro.param("scale")
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        pyro.sample("b", dist.Bernoulli(0.5))
        with pyro.plate(DATA, len(data)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        var = pyro.param("var", torch.tensor(1.0), constraint=constraints.positive)
        x = torch.tensor(0.0, requires_grad=True)
        prior = dist.Normal(0.0, 10.0).log_prob(x)
        likelihood = dist.Normal(x, scale).log_prob(data).sum()
        loss = -(prior + likelihood)
        g = torch.autograd.grad(loss, [x], create_graph=True)[0]
        h = torch.autograd.grad(g, [x], create_graph=True)[0]
        loc = x.detach() - g / h  # a Newton step
        pyro.sample("loc", dist.Normal(loc, var))
        pyro.sample("b", dist.Bernoulli(p))

    return Program(model, guide)


def _enumerate_chain(scale):
    """x (guide-enumerated) → y (model-enumerated) → z observed; everything scaled by `scale`."""
    def probs():
        return (pyro.param("model_probs_x", torch.tensor([0.4, 0.6]),
                           constraint=constraints.simplex),
                pyro.param("model_probs_y", torch.tensor([[0.75, 0.25], [0.55, 0.45]]),
                           constraint=constraints.simplex),
                pyro.param("model_probs_z", torch.tensor([[0.3, 0.7], [0.2, 0.8]]),
                           constraint=constraints.simplex))

    @poutine.scale(scale=scale)
    def model():
        probs_x, probs_y, probs_z = probs()
        x = pyro.sample("x", dist.Categorical(probs_x))
        y = pyro.sample("y", dist.Categorical(probs_y[x]), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Categorical(probs_z[y]), obs=torch.tensor(0))

    @config_enumerate
    @poutine.scale(scale=scale)
    def guide():
        q = pyro.param("guide_probs_x", torch.tensor([0.1, 0.9]), constraint=constraints.simplex)
        pyro.sample("x", dist.Categorical(q))

    def marginal():
        probs_x, probs_y, probs_z = probs()
        x = pyro.sample("x", dist.Categorical(probs_x), infer={"enumerate": "parallel"})
        y = pyro.sample("y", dist.Categorical(probs_y[x]), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Categorical(probs_z[y]), obs=torch.tensor(0))

    def expected(objective, particles, alpha):
        # iwae, renyi, vimco: each importance weight sums x out, Σ_x q(x) w(x), where the scale
        # multiplies the weight's log-density terms (not q(x)) and y, summed out in the model,
        # contributes scale · log Σ_y p(y | x) p(z | y) (TraceEnum_ELBO's rule): so
        # log Σ_x q(x) [p(x) Σ_y p(y | x) p(z | y) / q(x)]^scale, whatever K and α. With
        # scale 1 it is log p(z)
        probs_x, probs_y, probs_z = probs()
        q = pyro.param("guide_probs_x")
        log_w = scale * (probs_x.log() + (probs_y * probs_z[:, 0]).sum(-1).log() - q.log())
        iwae = torch.logsumexp(q.log() + log_w, 0)
        if objective == "ciwae":  # and the ELBO, Σ_x q(x) log w(x), TraceEnum_ELBO's value
            return -(CIWAE_ELBO_WEIGHT * (q * log_w).sum() + (1 - CIWAE_ELBO_WEIGHT) * iwae)
        return -iwae

    return Program(model, guide, marginal=marginal, expected=expected)


@case("enumerate_chain", "test_enum.py::test_elbo_enumerate_2[1]", nesting=0, enumerated=True)
def _():
    return _enumerate_chain(1.0)


@case("enumerate_chain_scaled", "test_enum.py::test_elbo_enumerate_2[10]", nesting=0,
      enumerated=True)
def _():
    return _enumerate_chain(10.0)


@case("enumerate_global_in_data", "test_enum.py::test_elbo_enumerate_plate_1[batch]",
      enumerated=True, has_data=True)
def _():
    data = torch.tensor([0, 1])

    def model():
        probs_x = pyro.param("model_probs_x", torch.tensor([0.4, 0.6]),
                             constraint=constraints.simplex)
        probs_y = pyro.param("model_probs_y", torch.tensor([[0.75, 0.25], [0.55, 0.45]]),
                             constraint=constraints.simplex)
        probs_z = pyro.param("model_probs_z", torch.tensor([[0.3, 0.7], [0.2, 0.8]]),
                             constraint=constraints.simplex)
        x = pyro.sample("x", dist.Categorical(probs_x))
        y = pyro.sample("y", dist.Categorical(probs_y[x]), infer={"enumerate": "parallel"})
        with pyro.plate(DATA, len(data)):
            pyro.sample("z", dist.Categorical(probs_z[y]), obs=data)

    @config_enumerate
    def guide():
        q = pyro.param("guide_probs_x", torch.tensor([0.1, 0.9]), constraint=constraints.simplex)
        pyro.sample("x", dist.Categorical(q))

    return Program(model, guide)


def _bernoulli_particles(enumerate_guide):
    """KL(Bernoulli(q) ‖ Bernoulli(0.25)) over a user plate named "particles" (test_elbo_bern)."""
    size = 3

    def model():
        with pyro.plate("particles", size):
            pyro.sample("z", dist.Bernoulli(0.25).expand_by([size]))

    def guide():
        q = pyro.param("q", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("particles", size):
            pyro.sample("z", dist.Bernoulli(q).expand_by([size]))

    def expected(objective, particles, alpha):
        q = pyro.param("q")

        def log_weight(*bits):
            return sum(dist.Bernoulli(0.25).log_prob(b) - dist.Bernoulli(q).log_prob(b)
                       for b in bits)

        return -expected_bound(objective, particles, alpha, [bernoulli_rule(q)] * size,
                               log_weight)

    if enumerate_guide:
        # nothing is observed: log p(x) = 0 (every importance-weighted bound, z summed out)
        return Program(model, config_enumerate(guide, "parallel"), expected=expected,
                       marginal=config_enumerate(model, "parallel"))
    return Program(model, guide, expected=expected)


@case("bernoulli_user_particles_enumerated", "test_enum.py::test_elbo_bern[parallel]",
      enumerated=True)
def _():
    return _bernoulli_particles(True)


@case("bernoulli_user_particles", "test_enum.py::test_elbo_bern[None]")
def _():
    return _bernoulli_particles(False)


@case("normal_user_particles", "test_enum.py::test_elbo_normal[None]")
def _():
    def model():
        with pyro.plate("particles", 4):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand_by([4]))

    def guide():
        q = pyro.param("q", torch.tensor(1.0))
        with pyro.plate("particles", 4):
            pyro.sample("z", dist.Normal(q, 1.0).expand_by([4]))

    return Program(model, guide)


@case("zero_inflated_poisson", "test_enum.py::test_elbo_zip", enumerated=True, has_data=True,
      data_encloses_all=True)
def _():
    data = torch.tensor([0.0, 1.0, 2.0])

    def model():
        gate = pyro.param("gate", torch.tensor(0.25), constraint=constraints.unit_interval)
        rate = pyro.param("rate", torch.tensor(1.5), constraint=constraints.positive)
        with pyro.plate(DATA, len(data)):
            mask = pyro.sample("mask", dist.Bernoulli(gate),
                               infer={"enumerate": "parallel"}).bool()
            pyro.sample("obs", dist.MaskedMixture(mask, dist.Poisson(rate),
                                                  dist.Delta(torch.tensor(0.0))), obs=data)

    def guide():
        pass

    return Program(model, guide)


@case("mixture_of_diag_normals", "test_enum.py::test_mixture_of_diag_normals (hand model)",
      nesting=2, enumerated=True, has_data=True)
def _():
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 3.0], [1.0, 11.0]])

    def model():
        locs = pyro.param("locs", torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 10.0]]))
        coord_scale = pyro.param("coord_scale", torch.tensor([2.0, 1.0]),
                                 constraint=constraints.positive)
        logits = pyro.param("component_logits", torch.tensor([0.0, -1.0, 2.0]))
        with pyro.plate(DATA, len(data), dim=-2):
            which = pyro.sample("mask", dist.Categorical(logits=logits),
                                infer={"enumerate": "parallel"})
            with pyro.plate("components", len(logits), dim=-1) as component:
                with poutine.mask(mask=(which == component)):
                    pyro.sample("obs", dist.Normal(locs, coord_scale).to_event(1),
                                obs=data.unsqueeze(-2))

    def guide():
        pass

    return Program(model, guide)


# ================================================================================================
# the hierarchical bound (the objectives' own semantics; no single Pyro estimator computes it)
# ================================================================================================
@case("global_and_local_latents", "DESIGN.md §7 hierarchical bound (Pyro has no estimator)",
      has_data=True)
def _():
    data = torch.tensor([0.5, -1.0, 1.8])

    def model():
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate(DATA, 3):
            z = pyro.sample("z", dist.Normal(g, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide():
        g_loc = pyro.param("g_loc", torch.tensor(0.2))
        g_scale = pyro.param("g_scale", torch.tensor(0.6), constraint=constraints.positive)
        loc = pyro.param("loc", torch.tensor([0.1, -0.3, 0.6]))
        scale = pyro.param("scale", torch.tensor(0.9), constraint=constraints.positive)
        g = pyro.sample("g", dist.Normal(g_loc, g_scale))
        with pyro.plate(DATA, 3):
            pyro.sample("z", dist.Normal(loc + 0.5 * g, scale))

    def expected(objective, particles, alpha):
        g_loc, g_scale = pyro.param("g_loc"), pyro.param("g_scale")
        loc, scale = pyro.param("loc"), pyro.param("scale")
        g_points, g_weights = normal_rule(g_loc, g_scale, nodes=24, width=6.0)
        total = 0.0
        for g, w in zip(g_points, g_weights):
            value = normal_log_prob(g, 0.0, 1.0) - normal_log_prob(g, g_loc, g_scale)
            for b in range(3):
                centre = loc[b] + 0.5 * g

                def log_weight(z, centre=centre, b=b, g=g):
                    return (normal_log_prob(z, g, 1.0) + normal_log_prob(data[b], z, 1.0)
                            - normal_log_prob(z, centre, scale))

                rule = normal_rule(centre, scale, nodes=24, width=6.0)
                value = value + expected_bound(objective, particles, alpha, [rule], log_weight)
            total = total + w * value
        return -total

    return Program(model, guide, expected=expected)


# ================================================================================================
# invalid programs: Pyro rejects them (an error or a warning); so must the objectives
# ================================================================================================
def _invalid(name, source, nesting=1, enumerated=False):
    return case(name, source, nesting=nesting, enumerated=enumerated, valid=False)


@_invalid("latent_missing_from_guide",
          "test_valid_models.py::test_nonempty_model_empty_guide_error",
          nesting=0)
def _():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    def guide():
        pass

    return Program(model, guide)


@_invalid("guide_site_missing_from_model", "test_inference.py::SafetyTests::test_extra_samples",
          nesting=0)
def _():
    def model():
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1))

    def guide():
        p = pyro.param("p", torch.ones(1), constraint=constraints.positive)
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), p).to_event(1))
        pyro.sample("loc_q_2", dist.Normal(torch.zeros(1), p).to_event(1))

    return Program(model, guide)


def _clash(where):
    def model():
        pyro.sample("x", dist.Bernoulli(0.5))
        if where == "model":
            pyro.sample("x", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        pyro.sample("x", dist.Bernoulli(p))
        if where == "guide":
            pyro.sample("x", dist.Bernoulli(p))

    return Program(model, guide)


@_invalid("clash_in_model", "test_valid_models.py::test_variable_clash_in_model_error", nesting=0)
def _():
    return _clash("model")


@_invalid("clash_in_guide", "test_valid_models.py::test_variable_clash_in_guide_error", nesting=0)
def _():
    return _clash("guide")


@_invalid("clash_in_sequential_plate", "test_valid_models.py::test_iplate_variable_clash_error",
          nesting=0)
def _():
    def model():
        for _ in pyro.plate("plate", 2):
            pyro.sample("x", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        for _ in pyro.plate("plate", 2):
            pyro.sample("x", dist.Bernoulli(p))

    return Program(model, guide)


@_invalid("clash_param_and_sample", "test_inference.py::SafetyTests::test_duplicate_names",
          nesting=0)
def _():
    def model():
        pyro.param("loc_q", torch.ones(1))
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1))

    def guide():
        p = pyro.param("p", torch.ones(1), constraint=constraints.positive)
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), p).to_event(1))

    return Program(model, guide)


@_invalid("clash_observed", "test_inference.py::SafetyTests::test_duplicate_obs_name", nesting=0)
def _():
    def model():
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1))
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), torch.ones(1)).to_event(1),
                    obs=torch.zeros(1))

    def guide():
        p = pyro.param("p", torch.ones(1), constraint=constraints.positive)
        pyro.sample("loc_q", dist.Normal(torch.zeros(1), p).to_event(1))

    return Program(model, guide)


@_invalid("event_dim_mismatch", "test_valid_models.py::test_model_guide_dim_mismatch_error",
          nesting=0)
def _():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))

    def guide():
        loc = pyro.param("loc", torch.zeros(2, 1))
        scale = pyro.param("scale", torch.ones(2, 1), constraint=constraints.positive)
        pyro.sample("x", dist.Normal(loc, scale).to_event(2))

    return Program(model, guide)


@_invalid("shape_mismatch", "test_valid_models.py::test_model_guide_shape_mismatch_error",
          nesting=0)
def _():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(1, 2), torch.ones(1, 2)).to_event(2))

    def guide():
        loc = pyro.param("loc", torch.zeros(2, 1))
        scale = pyro.param("scale", torch.ones(2, 1), constraint=constraints.positive)
        pyro.sample("x", dist.Normal(loc, scale).to_event(2))

    return Program(model, guide)


@_invalid("plate_in_guide_not_model", "test_valid_models.py::test_iplate_in_guide_not_model_error",
          nesting=0)
def _():
    def model():
        pyro.sample("x", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        for _ in pyro.plate("plate", 10):
            pass
        pyro.sample("x", dist.Bernoulli(p))

    return Program(model, guide)


@_invalid("plate_broadcast", "test_valid_models.py::test_plate_broadcast_error (full)")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10):
            pyro.sample("x", dist.Bernoulli(p).expand_by([2]))

    return Program(model, model)


def _nested_dim_error(variant):
    def model():
        p = torch.tensor([0.5])
        with pyro.plate("plate_outer", 5) as i:
            if variant == 1:
                pyro.sample("x", dist.Bernoulli(p).expand_by([len(i)]))       # wrong here
            else:
                pyro.sample("x", dist.Bernoulli(p).expand_by([len(i), 1]))
            with pyro.plate("plate_inner", 6) as j:
                if variant == 2:
                    pyro.sample("y", dist.Bernoulli(p).expand_by([len(i)]))   # wrong here
                else:
                    pyro.sample("y", dist.Bernoulli(p).expand_by([len(j)]))
                if variant == 3:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(j), 1]))  # wrong here
                elif variant == 4:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(i), len(i)]))
                else:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(i), len(j)]))

    return Program(model, model)


for _variant in (1, 2, 3, 4):
    _invalid(f"nested_plate_dim_error_{_variant}",
             f"test_valid_models.py::test_nested_plate_plate_dim_error_{_variant} (full)",
             nesting=2)(functools.partial(_nested_dim_error, _variant))


@_invalid("plate_wrong_size", "test_valid_models.py::test_plate_wrong_size_error (full)")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 5) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([1 + len(ind)]))

    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("plate", 5) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([1 + len(ind)]))

    return Program(model, guide)


@_invalid("block_plate_missing", "test_valid_models.py::test_block_plate_missing_error",
          nesting=0)
def _():
    def model():
        with block_plate("plate"):
            pyro.sample("a", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    return Program(model, guide)


@_invalid("enum_batch_without_plate",
          "test_valid_models.py::test_no_plate_enum_discrete_batch_error",
          nesting=0, enumerated=True)
def _():
    def model():
        pyro.sample("x", dist.Bernoulli(torch.tensor(0.5)).expand_by([5]))

    @config_enumerate
    def guide():
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        pyro.sample("x", dist.Bernoulli(p).expand_by([5]))

    return Program(model, guide)


@_invalid("factor_in_guide_unspecified", "test_valid_models.py::test_factor_in_guide_error",
          nesting=0)
def _():
    def model():
        pass

    def guide():
        pyro.factor("f", torch.tensor(0.0))

    return Program(model, guide)


@_invalid("obs_mask_event_shape", "test_valid_models.py::test_obs_mask_multivariate_error")
def _():
    data = torch.full((3, 2), 7.0)
    mask = torch.tensor([[False, False], [False, True], [True, False]])

    def model():
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
        with pyro.plate("plate", len(data)):
            pyro.sample("y", dist.MultivariateNormal(x, torch.eye(2)), obs=data, obs_mask=mask)

    def guide():
        loc = pyro.param("loc", torch.zeros(2))
        x = pyro.sample("x", dist.MultivariateNormal(loc, torch.eye(2)))
        with pyro.plate("plate", len(data)):
            with poutine.mask(mask=~mask):
                pyro.sample("y_unobserved", dist.MultivariateNormal(x, torch.eye(2)))

    return Program(model, guide)


@_invalid("enum_sequential_in_model", "test_valid_models.py::test_enum_sequential_in_model_error",
          nesting=0, enumerated=True)
def _():
    def model():
        p = pyro.param("p", torch.tensor(0.25), constraint=constraints.unit_interval)
        pyro.sample("a", dist.Bernoulli(p), infer={"enumerate": "sequential"})

    def guide():
        pass

    return Program(model, guide)


@case("enum_sequential_in_guide", "test_valid_models.py::test_enum_discrete_misuse_warning"
      "[sequential-TraceEnum_ELBO]", nesting=0, enumerated=True)
def _():
    # as Pyro's test, with an observation and the guide away from the prior (with p = 0.5 and
    # nothing observed every value and gradient is 0, which no estimator can fail)
    observed = torch.tensor(0.4)

    def model():
        x = pyro.sample("x", dist.Bernoulli(torch.tensor(0.5)))
        pyro.sample("y", dist.Normal(2 * x - 1, 1.0), obs=observed)

    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        pyro.sample("x", dist.Bernoulli(p), infer={"enumerate": "sequential"})

    def marginal():
        x = pyro.sample("x", dist.Bernoulli(torch.tensor(0.5)), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(2 * x - 1, 1.0), obs=observed)

    return Program(model, guide, marginal=marginal)


@_invalid("enum_multi_scale", "test_valid_models.py::test_enum_in_model_multi_scale_error",
          nesting=0, enumerated=True)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.tensor([0.2, 0.8]))
        x = pyro.sample("x", dist.Bernoulli(0.3)).long()
        with poutine.scale(scale=2.0):
            pyro.sample("y", dist.Bernoulli(p[x]), obs=torch.tensor(0.0))

    def guide():
        pass

    return Program(model, guide)


@_invalid("enum_diamond", "test_valid_models.py::test_enum_in_model_diamond_error[True]",
          nesting=2, enumerated=True)
def _():
    from pyro.ops.indexing import Vindex
    data = torch.tensor([[0, 1], [0, 0]])

    @config_enumerate
    def model():
        probs_a = pyro.param("probs_a", torch.tensor([0.45, 0.55]))
        probs_b = pyro.param("probs_b", torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
        probs_c = pyro.param("probs_c", torch.tensor([[0.75, 0.25], [0.55, 0.45]]))
        probs_d = pyro.param("probs_d", torch.tensor([[[0.4, 0.6], [0.3, 0.7]],
                                                      [[0.3, 0.7], [0.2, 0.8]]]))
        b_axis = pyro.plate("b_axis", 2, dim=-1)
        c_axis = pyro.plate("c_axis", 2, dim=-2)
        a = pyro.sample("a", dist.Categorical(probs_a))
        with b_axis:
            b = pyro.sample("b", dist.Categorical(probs_b[a]))
        with c_axis:
            c = pyro.sample("c", dist.Categorical(probs_c[a]))
        with b_axis, c_axis:
            pyro.sample("d", dist.Categorical(Vindex(probs_d)[b, c]), obs=data)

    def guide():
        pass

    return Program(model, guide)


@_invalid("plate_dim_collision", "test_valid_models.py::test_dim_allocation_error")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate_outer", 10, dim=-1):
            with pyro.plate("plate_inner", 11, dim=-1):
                pyro.sample("x", dist.Bernoulli(p))

    return Program(model, model)

