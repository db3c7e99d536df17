"""Conformance with Pyro: every program of tests/conformance_models.py (ported from Pyro's own
tests) run with every objective, each (program, objective) ending in exactly one outcome that
the table ``ROWS`` declares and the test asserts:

(a) ``Same``: equal, at the same random seed, to the reference computed with Pyro, in value and
    in the gradient of every parameter (float64; values to rtol 1e-10, gradients to 1e-8).
    The reference is Pyro's estimator where the math coincides — ``Trace_ELBO``,
    ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``, ``RenyiELBO`` (K particles, vectorized, the
    same ``max_plate_nesting``) — or, for the path-gradient objectives, the estimator's
    formula evaluated on Pyro's own traces: ``stl`` is ``Trace_ELBO`` (``TraceEnum_ELBO`` with
    model-side enumeration) less the score term ∂φ log q(z; φ) at fixed z; ``dreg`` is
    Σ_k w̃_k ∂θ log w_k for the model and
    Σ_k w̃_k² (∂/∂φ log w_k + ∂φ log q(z_k; φ)|_z) for the guide (Tucker et al. 2019).
    With a guide site sampled without rsample, ``elbo`` is ``TraceEnum_ELBO`` (its Dice
    estimator, not ``Trace_ELBO``'s: both reward a datapoint's site with that datapoint's terms,
    and keep the zero-mean term −∂φ log q(z) that ``Trace_ELBO`` drops).
    ``ciwae`` (``Mixed``) is ``elbo_weight`` times the ELBO's reference plus the rest times
    IWAE's, both at the same seed (the same K draws).
    Two program transformations make Pyro's RenyiELBO compute the same bound, without changing
    any random draw: with no plate "data", a zero ``pyro.factor`` outside every plate (RenyiELBO
    reduces plates that enclose every site per element; the objectives do so for "data" only);
    with a subsampled "data" plate, ``poutine.scale(B/N)`` on both programs and the result
    multiplied by N/B (RenyiELBO puts N/B inside the log-mean-exp; the objectives outside).
(b) ``Exact``: equal to the exact expectation (quadrature or enumeration, see
    conformance_models.py) within 3 Monte Carlo standard errors over R = 400 independent
    replicates, for the value and every gradient component (for m quantities checked together
    the limit is widened so that the cell's false-alarm rate is that of one 3-SE check,
    Bonferroni). Used where no Pyro estimator computes the same bound (global latents shared by
    local particles) or the same gradient (the score-function gradients of the
    importance-weighted objectives: Pyro's RenyiELBO differentiates the weights only).
(c) ``Refused``: a ``ConfigError`` in one line that names the site or the reason; for an
    invalid program, also the error (raised inside Pyro, not torch) or warning that Pyro's own
    validation gives it. Never a torch internal error.

``miwae`` and ``piwae`` run with one group (MIWAE(1, K) and PIWAE(1, K) are IWAE_K in value and
gradient; their groups are tested in test_rainforth_objectives.py), ``ciwae`` with its default
``elbo_weight`` 0.5.

``KNOWN_BUGS`` lists the cells where the objectives do not reach the declared outcome: strict
xfails, each expecting the exception it raises today. ``outcome_counts()`` tallies the table;
``python tests/test_conformance.py`` prints it, the refusals, the known bugs, and the share of
programs that pass among those Pyro's own estimator runs. The conjugate-inference tests at the
end train with SVI and compare the fitted guide with the exact posterior.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

sys.path.insert(0, str(Path(__file__).parent))
from conformance_models import CASES, CIWAE_ELBO_WEIGHT, DATA, conjugate_program  # noqa: E402

from pyro_vae.errors import ConfigError  # noqa: E402
from pyro_vae.objectives import OBJECTIVES, make_objective  # noqa: E402

OBJECTIVE_NAMES = tuple(OBJECTIVES)  # elbo, meanfield, iwae, renyi, dreg, stl, vimco, miwae, …
RENYI_ALPHA = 0.5
SEED = 0
VALUE_RTOL, GRAD_RTOL = 1e-10, 1e-8


# -- outcomes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Same:
    """(a) equal to a Pyro reference at the same seed; ``reference_particles`` when the
    reference runs with another K (a program whose K weights are all equal)."""

    reference: str               # trace | meanfield | enum | renyi | marginal | stl | dreg
    particles: int
    reference_particles: int | None = None
    alpha: float = 0.0           # RenyiELBO's alpha (renyi reference)


@dataclass(frozen=True)
class Exact:
    """(b) within 3 Monte Carlo standard errors of the exact expectation."""

    particles: int
    replicates: int = 400


@dataclass(frozen=True)
class Refused:
    """(c) refused: a ConfigError in one line matching ``match`` (``config_match`` if given);
    for an invalid program also Pyro's own validation error (an exception of a ``pyro_error``
    type raised inside Pyro, not torch) or warning (``warning=True``) matching ``match``."""

    match: str
    pyro_error: tuple = ()
    warning: bool = False
    config_match: str | None = None


@dataclass(frozen=True)
class Mixed:
    """(a) for ``ciwae``: ``CIWAE_ELBO_WEIGHT`` × the ``elbo`` reference + the rest × the
    ``iwae`` reference, in value and gradients, with ``particles`` particles."""

    elbo: Same
    iwae: Same
    particles: int = 3


VALIDATION = (ValueError,)
DUPLICATE = (RuntimeError,)  # Pyro's trace: "Multiple sample sites named ..."


def _row(elbo, meanfield, iwae, renyi, vimco, dreg, stl, ciwae):
    """One program's outcomes. ``miwae`` with one group is ``iwae``; so is ``piwae`` with one
    group, except that, its gradient built on stopped guide parameters as dreg's, it refuses
    what dreg refuses (non-pathwise and enumerated guide sites)."""
    return {"elbo": elbo, "meanfield": meanfield, "iwae": iwae, "renyi": renyi,
            "vimco": vimco, "dreg": dreg, "stl": stl, "miwae": iwae, "ciwae": ciwae,
            "piwae": dreg if isinstance(dreg, Refused) else iwae}


def one_weight():
    """All guide sites reparameterized, no global latent shared by local particles: no plate
    "data" (one weight for everything) or a "data" plate around every site."""
    return _row(Same("trace", 2), Same("meanfield", 2), Same("renyi", 3),
                Same("renyi", 3, alpha=RENYI_ALPHA), Same("renyi", 3), Same("dreg", 3),
                Same("stl", 1), Mixed(Same("trace", 3), Same("renyi", 3)))


def score_one_weight(site):
    """As ``one_weight`` with a guide site sampled without rsample: the score-function
    gradients of the importance-weighted objectives are checked against the exact gradient."""
    refuse = Refused(rf"'{site}'.*(reparameteriz|pathwise)|needs reparameterized guide sites")
    return _row(Same("enum", 1), refuse, Exact(3), Exact(3), Exact(3), refuse, refuse, Exact(3))


def globals_only():
    """Latents only outside plate "data": the K local weights are equal, so every objective
    is the single-draw ELBO (Trace_ELBO with one particle), and dreg keeps the global path
    gradient (stl's)."""
    return _row(Same("trace", 2), Same("meanfield", 2), Same("trace", 3, 1),
                Same("trace", 3, 1), Same("trace", 3, 1), Same("stl", 3, 1), Same("stl", 1),
                Same("trace", 3, 1))


def globals_only_score(site):
    refuse = Refused(rf"'{site}'.*(reparameteriz|pathwise)|needs reparameterized guide sites")
    return _row(Same("enum", 1), refuse, Same("enum", 3, 1), Same("enum", 3, 1),
                Same("enum", 3, 1), refuse, refuse, Same("enum", 3, 1))


def hierarchical(particles=3):
    """Global latents and local latents: the K local particles share one draw of the globals
    (the hierarchical bound), which no Pyro estimator computes."""
    return _row(Same("trace", 2), Same("meanfield", 2), Exact(particles), Exact(particles),
                Exact(particles), Exact(particles), Same("stl", 1), Exact(particles))


def hierarchical_score(site, particles=3, elbo=Same("enum", 1)):
    refuse = Refused(rf"'({site})'.*(reparameteriz|pathwise)|needs reparameterized guide sites")
    return _row(elbo, refuse, Exact(particles), Exact(particles), Exact(particles),
                refuse, refuse, Exact(particles))


def enumerated_guide():
    """Every guide site enumerated: elbo is TraceEnum_ELBO; each importance weight sums the
    enumerated values out, Σ_c q(c) w(c) = p(x), so the other bounds are log p(x) exactly:
    TraceEnum_ELBO of the same model with the sites enumerated in the model. meanfield has no
    closed-form KL for a discrete guide site; stl and dreg need pathwise sites."""
    refuse = Refused(r"enumerat|needs reparameterized guide sites")
    return _row(Same("enum", 1),
                Refused(r"'meanfield' needs reparameterized guide sites; site '\w+' is not"),
                Same("marginal", 3), Same("marginal", 3), Same("marginal", 3), refuse, refuse,
                Mixed(Same("enum", 1), Same("marginal", 3)))


def enumerated_model():
    """Model-side enumeration and an empty guide: every weight is log p(x) (meanfield has no
    KL to take: it is the same)."""
    return _row(Same("enum", 1), Same("enum", 1), Same("enum", 3, 1), Same("enum", 3, 1),
                Same("enum", 3, 1), Same("enum", 3, 1), Same("enum", 1), Same("enum", 3, 1))


def subsampled():
    """A plate other than "data" subsamples: the ELBO family (and stl at K = 1) follow
    Trace_ELBO (the plate's scale stays on its sites); the bounds non-linear in the particles
    refuse it at K > 1."""
    refuse = Refused(SUBSAMPLES)
    return _row(Same("trace", 2), Same("meanfield", 2), refuse, refuse, refuse, refuse,
                Same("stl", 1), refuse)


def refused(match, pyro_error=(), warning=False, config_match=None):
    outcome = Refused(match, pyro_error, warning, config_match)
    return _row(*[outcome] * 8)


def invalid(match, pyro_error=VALIDATION, warning=False):
    """An invalid program: Pyro's own error or warning, or any one-line ConfigError (which
    names its site and reason: the objectives may find another fault first)."""
    return refused(match, pyro_error, warning, config_match=r"site '\w+'|\w")


MEANFIELD_ORDER = r"'meanfield' needs the guide to sample the latent sites in the model's order"
SUBSAMPLES = (r"site '\w+': plate '\w+' subsamples .* only the vectorized datapoint plate 'data' "
              r"may subsample under a multi-particle bound")

ROWS = {
    # test_valid_models.py
    "obs_only": one_weight(),
    "empty_program": one_weight(),  # scores 0, as Trace_ELBO
    "rsample_true": one_weight(),
    "rsample_false": score_one_weight("z"),
    "not_rsample_rounded": score_one_weight("z"),
    "sequential_plate": score_one_weight("x_0"),
    "sequential_plate_subsample": {**score_one_weight("x_0"),
                                   **{objective: Refused(SUBSAMPLES) for objective in (
                                       "iwae", "renyi", "vimco", "dreg", "miwae", "ciwae",
                                       "piwae")}},
    "plate_full": one_weight(),
    "plate_subsample": subsampled(),
    "data_plate_subsample": one_weight(),
    "param_in_plate_full": one_weight(),
    "param_in_plate_subsample": subsampled(),
    "param_in_data_subsample": one_weight(),
    "subsample_primitive_data": one_weight(),
    "plate_no_size": one_weight(),
    "sequential_nested": one_weight(),
    "sequential_nested_swap": {**one_weight(), "meanfield": Refused(MEANFIELD_ORDER)},
    "sequential_plate_model_only": one_weight(),
    "vectorized_in_sequential": one_weight(),
    "sequential_in_vectorized": one_weight(),
    "plate_stack_3": one_weight(),
    "plate_stack_3_4": one_weight(),
    "plate_stack_3_4_5": one_weight(),
    "plate_stack_and_plate": one_weight(),
    "nested_plates": one_weight(),
    "nested_plates_subsample": subsampled(),
    "plate_reuse": one_weight(),
    "nonnested_plates": one_weight(),
    "nonnested_plates_subsample": subsampled(),
    "plates_at_different_depths": one_weight(),
    "block_plate_name": {**one_weight(), "meanfield": Refused(MEANFIELD_ORDER)},
    "enum_guide_single": enumerated_guide(),
    "enum_guide_two": enumerated_guide(),
    "enum_guide_onehot": enumerated_guide(),
    # summed out per element of the plate 'plate' (not 'data': one weight for the program)
    "enum_guide_in_plate": enumerated_guide(),
    "enum_guide_in_data": enumerated_guide(),
    # three independent enumerated groups: global, in 'outer', in 'inner' nested in it
    "enum_nested_plates": enumerated_guide(),
    # TraceEnum_ELBO runs it; a score-function guide site (d) given an enumerated one (b) is
    # refused
    "enum_chain_mixed": refused(r"guide site 'd' is sampled without rsample given an "
                                r"enumerated site"),
    # TraceEnum_ELBO runs it; b (global) and e (in 'data') are linked through d, a
    # score-function site given b: one group enumerated in two plate contexts, refused
    "enum_chain_in_data": refused(r"guide sites 'b', 'e' are enumerated together in different "
                                  r"plates"),
    # two global enumerated sites, each with its dependents in its own plate
    "enum_model_plate_reuse": enumerated_model(),
    "enum_model_empty_guide": enumerated_model(),
    # the plate "features" nested in "data" is summed inside the mixture
    "enum_in_plate_nested_in_data": enumerated_model(),
    # TraceEnum_ELBO enumerates the guide site sequentially; the objectives in parallel (the
    # same sum)
    "enum_sequential_in_guide": enumerated_guide(),
    # meanfield has no closed-form KL against p(z) = Σ_c p(c) p(z | c): it must refuse
    "enum_model_parent_of_latent": _row(Same("enum", 1), Refused(r"'z'.*enumerat|enumerat.*'z'"),
                                        Exact(3), Exact(3), Exact(3), Exact(3), Same("stl", 1),
                                        Exact(3)),
    "components_and_data": globals_only(),
    # Pyro broadcasts p (plate "components", dim -1) into "obs", which no plate at dim -1
    # encloses, and sums the undeclared dimension: so does every objective at a site inside
    # plate "data" (within the datapoint's weight)
    "user_plate_num_particles": globals_only(),
    "factor_in_model": one_weight(),
    # a guide factor is a term of log q (TraceMeanField_ELBO subtracts it, as Trace_ELBO does);
    # one declared has_rsample=False is not pathwise: the score function treats it (Trace_ELBO's
    # semantics), TraceMeanField_ELBO refuses it, and so do meanfield, stl and dreg
    "factor_in_guide_rsample": one_weight(),
    "factor_in_guide_no_rsample": {
        **one_weight(), "meanfield": Refused(r"'meanfield' needs reparameterized guide sites"),
        "dreg": Refused(r"guide factor 'f' has has_rsample=False"),
        "stl": Refused(r"guide factor 'f' has has_rsample=False"),
        "piwae": Refused(r"guide factor 'f' has has_rsample=False")},
    "mean_field": one_weight(),
    "mean_field_mask_true": one_weight(),
    "mean_field_mask_false": one_weight(),
    "mean_field_violated": {**one_weight(), "meanfield": Refused(MEANFIELD_ORDER)},
    "reparam": one_weight(),
    "mask_observed_false": one_weight(),
    "mask_observed_tensor_false": one_weight(),
    "mask_data_plate_false": globals_only(),
    "mask_data_plate_tensor": globals_only(),
    "scale_data_plate_scalar": globals_only(),
    "scale_data_plate_tensor": globals_only(),
    "obs_mask": one_weight(),
    "obs_mask_multivariate": one_weight(),
    "scale_observed_scalar": one_weight(),
    "scale_observed_tensor": one_weight(),
    "scale_latent_scalar": one_weight(),
    "scale_latent_tensor_data": one_weight(),
    "mask_latent_data": one_weight(),
    # test_gradient.py
    "particle_gradient_reparam": one_weight(),
    "particle_gradient_rsample_false": score_one_weight("z"),
    "particle_gradient_nonreparam": score_one_weight("z"),
    "subsample_gradient_full": one_weight(),
    "subsample_gradient_one": one_weight(),
    "subsample_gradient_scaled": one_weight(),
    "subsample_gradient_nonreparam": score_one_weight("z"),
    "user_particles_plate": {**hierarchical(2), "meanfield": Refused(MEANFIELD_ORDER)},
    # the user plate "particles" is folded into the datapoint: the score-function reward of
    # z[j, b] is datapoint b's (every j), TraceEnum_ELBO's is element (j, b)'s: no reference
    "user_particles_plate_nonreparam": hierarchical_score("z|nuisance_[abc]", 2, Exact(1)),
    "nuisance_globals": {**hierarchical(), "meanfield": Refused(MEANFIELD_ORDER)},
    "nuisance_globals_nonreparam": hierarchical_score("z|nuisance_[abc]"),
    "subsample_sequential_draws": one_weight(),
    # test_multi_sample_elbos.py, test_elbo_mapdata.py, test_inference.py
    "inner_outer": one_weight(),
    "outer_inner": one_weight(),
    "mapdata_plate": subsampled(),
    "mapdata_plate_full": one_weight(),
    "mapdata_data_subsample": globals_only(),
    "mapdata_iplate": subsampled(),
    "mapdata_iplate_full": one_weight(),
    "mapdata_range": one_weight(),
    "normal_normal": globals_only(),
    "normal_normal_nonreparam": globals_only_score("loc"),
    "beta_bernoulli": globals_only(),
    "gamma_exponential": globals_only(),
    "gamma_exponential_nonreparam": globals_only_score("rate"),
    "sequential_plating_sum": score_one_weight("x"),
    "non_nested_plating_sum": one_weight(),
    # test_enum.py
    "gmm_enumerated": enumerated_guide(),
    "gmm_score_function": score_one_weight("z"),
    # a sequential plate "data" is no datapoint plate: the program is one weight
    "gmm_sequential_data": score_one_weight("z_0"),
    "guide_uses_grad": globals_only_score("b"),
    "enumerate_chain": enumerated_guide(),
    # the group's scale 10 multiplies its terms, not q(x): each weight is
    # log Σ_x q(x) w(x)^10, which no Pyro estimator computes (conformance_models.py)
    "enumerate_chain_scaled": {**enumerated_guide(), "iwae": Exact(3), "renyi": Exact(3),
                               "vimco": Exact(3), "miwae": Exact(3), "ciwae": Exact(3)},
    # a guide site (x) and a model site (y) enumerated outside plate "data": the additive
    # objectives (and any at K = 1) follow TraceEnum_ELBO; at K > 1 the local particles would
    # share them, refused
    "enumerate_global_in_data": {
        **refused(r"model site 'y' is enumerated outside plate 'data': under a "
                  r"multi-particle bound"),
        "elbo": Same("enum", 1), "meanfield": enumerated_guide()["meanfield"],
        "stl": enumerated_guide()["stl"]},
    # summed out per element of the user plate "particles" (one weight for the program)
    "bernoulli_user_particles_enumerated": enumerated_guide(),
    # one weight (no plate "data"): the score-function reward is the whole weight; Pyro's
    # estimators reward each element of the user plate "particles": no reference for elbo
    "bernoulli_user_particles": {**score_one_weight("z"), "elbo": Exact(1)},
    "normal_user_particles": one_weight(),
    "zero_inflated_poisson": enumerated_model(),
    # the enumerated site is directly in "data"; the nested plate's site depends on it only
    # through its mask, and summing the nested plate before the enumerated value is exact
    "mixture_of_diag_normals": enumerated_model(),
    # the hierarchical bound
    "global_and_local_latents": hierarchical(),
    # invalid programs
    "latent_missing_from_guide": invalid(r"Found vars in model but not guide: \{'x'\}", (),
                                         warning=True),
    "guide_site_missing_from_model": invalid(r"guide but not model(.|\n)*'loc_q_2'", (),
                                             warning=True),
    "clash_in_model": invalid(r"Multiple sample sites named 'x'", DUPLICATE),
    "clash_in_guide": invalid(r"Multiple sample sites named 'x'", DUPLICATE),
    "clash_in_sequential_plate": invalid(r"Multiple sample sites named 'x'", DUPLICATE),
    "clash_param_and_sample": invalid(r"loc_q is already in the trace", DUPLICATE),
    "clash_observed": invalid(r"Multiple sample sites named 'loc_q'", DUPLICATE),
    "event_dim_mismatch": invalid(r"event_dims disagree at site 'x'"),
    "shape_mismatch": invalid(r"shapes disagree at site 'x'"),
    "plate_in_guide_not_model": invalid(r"plate statements in guide but not model", (),
                                        warning=True),
    "plate_broadcast": invalid(r"Shape mismatch inside plate\('plate'\) at site x"),
    "nested_plate_dim_error_1": invalid(r"site x|invalid log_prob shape"),
    "nested_plate_dim_error_2": invalid(r"Shape mismatch inside plate\('plate_inner'\) at site y"),
    "nested_plate_dim_error_3": invalid(r"site [xz]|invalid log_prob shape"),
    "nested_plate_dim_error_4": invalid(r"Shape mismatch inside plate\('plate_inner'\) at site z"),
    "plate_wrong_size": invalid(r"Shape mismatch inside plate\('plate'\) at site x"),
    "block_plate_missing": invalid(r"block_plate matched 0 messengers"),
    "enum_batch_without_plate": invalid(r"site x|invalid log_prob shape"),
    "factor_in_guide_unspecified": invalid(r"missing specification of has_rsample"),
    "obs_mask_event_shape": invalid(r"Invalid obs_mask shape"),
    "enum_sequential_in_model": invalid(r"model-side sequential enumeration is not implemented",
                                        (NotImplementedError,)),
    "enum_multi_scale": invalid(r"common poutine.scale"),
    "enum_diamond": invalid(r"tree-structured plate nesting"),
    "plate_dim_collision": invalid(r"collide at dim="),
}

OUTCOMES = {(name, objective): outcome
            for name, row in ROWS.items() for objective, outcome in row.items()}
CELLS = [(name, objective) for name in CASES for objective in OBJECTIVE_NAMES]

# Cells where pyro_vae does not reach the outcome the table declares: strict xfails, each with
# the exception it raises instead (an assertion failure, a wrong number, stays a failure).
KNOWN_BUGS: dict = {}


def _cell(name, objective):
    bug = KNOWN_BUGS.get((name, objective))
    marks = [pytest.mark.xfail(strict=True, raises=bug[1], reason=bug[0])] if bug else []
    return pytest.param(name, objective, marks=marks, id=f"{name}-{objective}")


def pass_rates() -> dict:
    """For elbo, meanfield and iwae: among the valid programs on which Pyro's own estimator
    (Trace_ELBO or TraceEnum_ELBO, TraceMeanField_ELBO, RenyiELBO(alpha=0)) runs without an
    error, how many cells end in (a) or (b) and are not known bugs. Runs Pyro on each."""
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    estimators = {"elbo": lambda c: _pyro_estimator("enum" if c.enumerated else "trace", 1,
                                                    c.nesting),
                  "meanfield": lambda c: _pyro_estimator("meanfield", 1, c.nesting),
                  "iwae": lambda c: _pyro_estimator("renyi", 3, c.nesting)}
    rates = {}
    for objective, make in estimators.items():
        runs, passing, failing = 0, 0, []
        for name, case in CASES.items():
            if not case.valid:
                continue
            program = case.build()
            pyro.clear_param_store()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make(case).loss_and_grads(program.model, program.guide, *program.args)
            except Exception:
                continue
            runs += 1
            outcome = OUTCOMES[name, objective]
            if isinstance(outcome, Refused) or (name, objective) in KNOWN_BUGS:
                failing.append(name)
            else:
                passing += 1
        rates[objective] = (passing, runs, failing)
    return rates


def outcome_counts() -> dict:
    """How many (program, objective) cells end in each outcome, per objective and in all."""
    kind = {Same: "a: same as Pyro", Mixed: "a: same as Pyro", Exact: "b: exact within 3 SE",
            Refused: "c: refused"}
    per_objective = {objective: Counter() for objective in OBJECTIVE_NAMES}
    for (name, objective), outcome in OUTCOMES.items():
        per_objective[objective][kind[type(outcome)]] += 1
    total = sum(per_objective.values(), Counter())
    refusals = {name: ROWS[name]["elbo"].match for name in ROWS
                if all(isinstance(o, Refused) for o in ROWS[name].values())}
    return {"programs": len(ROWS), "valid": sum(CASES[n].valid for n in ROWS),
            "per_objective": per_objective, "total": total, "refused_everywhere": refusals}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def float64_validated():
    """float64 and Pyro's validation on, as in Pyro's tests; both restored afterwards."""
    dtype = torch.get_default_dtype()
    validation = is_validation_enabled()
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    pyro.enable_validation(validation)
    torch.set_default_dtype(dtype)


# -- running a program --------------------------------------------------------------------------
def _objective(name: str, particles: int):
    if name == "renyi":
        return make_objective(name, particles, alpha=RENYI_ALPHA)
    if name == "ciwae":
        return make_objective(name, particles, elbo_weight=CIWAE_ELBO_WEIGHT)
    return make_objective(name, particles)


def _store_parameters() -> dict[str, torch.Tensor]:
    return dict(pyro.get_param_store().named_parameters())


def _gradients(loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
    params = _store_parameters()
    if not params:  # a program without parameters (the empty program)
        return {}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                retain_graph=retain_graph)
    return {name: (torch.zeros_like(p) if g is None else g)
            for (name, p), g in zip(params.items(), grads)}


def run_objective(name, particles, program, seed=SEED):
    """Value and gradients of one objective at ``seed``, from ``differentiable_loss`` of a
    fresh objective (as SVI's first step sees it)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = _objective(name, particles).differentiable_loss(program.model, program.guide,
                                                               *program.args)
        grads = _gradients(loss)
    return loss.item(), grads, [str(w.message) for w in caught]


def run_objective_loss(name, particles, program, seed=SEED):
    """``loss()`` of a fresh objective at ``seed``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _objective(name, particles).loss(program.model, program.guide, *program.args)


def _anchored(model):
    """The model with a zero factor outside every plate: no plate encloses every site, so
    RenyiELBO reduces one weight for everything; no random draw changes."""
    def anchored(*args, **kwargs):
        pyro.factor("_conformance_anchor", torch.zeros(()))
        return model(*args, **kwargs)
    return anchored


def _pyro_estimator(kind, particles, nesting, alpha=0.0):
    options = dict(num_particles=particles, vectorize_particles=particles > 1,
                   max_plate_nesting=nesting)
    if kind == "trace":
        return Trace_ELBO(**options)
    if kind == "meanfield":
        return TraceMeanField_ELBO(**options)
    if kind in ("enum", "marginal"):
        return TraceEnum_ELBO(strict_enumeration_warning=False, **options)
    if kind == "renyi":
        return RenyiELBO(alpha=alpha, **options)
    raise ValueError(kind)


def run_pyro(kind, particles, case, program, alpha=0.0, seed=SEED):
    """Value and gradients of Pyro's estimator (loss_and_grads, as SVI calls it)."""
    model, guide = program.model, program.guide
    factor = 1.0
    if kind == "marginal":
        model, guide = program.marginal, (lambda *args, **kwargs: None)
    if kind == "renyi":
        if not case.has_data:
            model = _anchored(model)
        if case.data_scale != 1.0:
            factor = case.data_scale
            model = poutine.scale(model, scale=1 / factor)
            guide = poutine.scale(guide, scale=1 / factor)
    estimator = _pyro_estimator(kind, particles, case.nesting, alpha)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = estimator.loss_and_grads(model, guide, *program.args)
    grads = {name: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) * factor
             for name, p in _store_parameters().items()}
    return value * factor, grads, [str(w.message) for w in caught]


def _latent_sites(trace):
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and type(site["fn"]).__name__ != "_Subsample"]


def _detached(trace):
    copy = trace.copy()
    for name, site in _latent_sites(trace):
        copy.nodes[name] = {**site, "value": site["value"].detach()}
    return copy


def _direct_log_q(guide, guide_trace, args):
    """log q(z; φ) at the trace's values held fixed: its φ-gradient is the score term that the
    path-gradient estimators drop."""
    trace = poutine.trace(poutine.replay(guide, trace=_detached(guide_trace))).get_trace(*args)
    trace.compute_log_prob()
    return trace


def stl_reference(case, program, seed=SEED):
    """Trace_ELBO (one particle) less the score term, at the same seed; TraceEnum_ELBO for a
    program with model-side enumerated sites (which Trace_ELBO would sample)."""
    value, grads, _ = run_pyro("enum" if case.enumerated else "trace", 1, case, program,
                               seed=seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(program.guide).get_trace(*program.args)
    direct = _direct_log_q(program.guide, guide_trace, program.args)
    score = sum((site["log_prob_sum"] for _, site in _latent_sites(direct)), torch.zeros(()))
    corrections = _gradients(score) if score.requires_grad else {}
    return value, {name: g - corrections.get(name, torch.zeros_like(g))
                   for name, g in grads.items()}


def _in_particles(fn, particles, dim):
    def vectorized(*args, **kwargs):
        with pyro.plate("_reference_particles", particles, dim=dim):
            return fn(*args, **kwargs)
    return vectorized


def _fold(term, nesting, data_dim):
    """A site's log-density, ``[K, *plates]``, summed over the plates (but "data"): [K, B]."""
    if term.dim() < nesting + 1:
        term = term.reshape((1,) * (nesting + 1 - term.dim()) + term.shape)
    dims = [d for d in range(-nesting, 0) if d != data_dim]
    if dims:
        term = term.sum(dims, keepdim=True)
    return term.reshape(term.shape[-(nesting + 1)], -1)


def dreg_reference(case, program, particles, seed=SEED):
    """The DReG estimator evaluated on Pyro's own vectorized traces (same draws): value
    Σ_b log (1/K) Σ_k w_kb; model gradient Σ w̃ ∇θ log w; guide gradient
    Σ w̃² (d/dφ log w + ∂φ log q|_z), i.e. w̃² times the path derivative."""
    nesting, factor = case.nesting, case.data_scale
    model, guide = program.model, program.guide
    if factor != 1.0:  # the minibatch scale outside the log-mean-exp
        model = poutine.scale(model, scale=1 / factor)
        guide = poutine.scale(guide, scale=1 / factor)
    model = _in_particles(model, particles, -(nesting + 1))
    guide = _in_particles(guide, particles, -(nesting + 1))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(*program.args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*program.args)
    direct = _direct_log_q(guide, guide_trace, program.args)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    data_dim = None
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            for frame in site.get("cond_indep_stack", ()):
                if frame.name == DATA:
                    data_dim = frame.dim

    def total(trace, sign, latent_only=False):
        terms = [sign * _fold(site["log_prob"], nesting, data_dim)
                 for name, site in trace.nodes.items()
                 if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample"
                 and not (latent_only and site["is_observed"])]
        return sum(terms[1:], terms[0]) if terms else torch.zeros(particles, 1)

    log_w = total(model_trace, 1.0) + total(guide_trace, -1.0)
    direct_log_q = total(direct, 1.0, latent_only=True)
    weights = torch.softmax(log_w.detach(), 0)
    value = (torch.logsumexp(log_w, 0) - math.log(particles)).sum()
    model_params = {n for n, s in model_trace.nodes.items() if s["type"] == "param"}
    model_grads = _gradients(-(weights * log_w).sum(), retain_graph=True)
    guide_grads = _gradients(-(weights**2 * (log_w + direct_log_q)).sum())
    grads = {name: factor * (model_grads[name] if name in model_params else guide_grads[name])
             for name in _store_parameters()}
    return -factor * value.item(), grads


def _assert_close(actual, expected, rtol, what):
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=rtol), \
        f"{what}: {actual!r} != {expected!r}"


def _assert_same_gradients(actual, expected, what):
    for name in sorted(set(actual) | set(expected)):
        a = actual.get(name)
        e = expected.get(name)
        a = torch.zeros_like(e) if a is None else a
        e = torch.zeros_like(a) if e is None else e
        assert torch.allclose(a, e, rtol=GRAD_RTOL, atol=1e-10), \
            f"{what}: gradient of {name!r}: {a.tolist()} != {e.tolist()}"


# -- the three outcomes ------------------------------------------------------------------------
def reference_of(case, program, outcome: Same):
    """The value and gradients of the reference that ``outcome`` names."""
    k = outcome.reference_particles or outcome.particles
    if outcome.reference == "stl":
        return stl_reference(case, program)
    if outcome.reference == "dreg":
        return dreg_reference(case, program, k)
    value, grads, _ = run_pyro(outcome.reference, k, case, program, alpha=outcome.alpha)
    return value, grads


def check_same(case, program, objective, outcome: Same):
    value, grads, _ = run_objective(objective, outcome.particles, program)
    k = outcome.reference_particles or outcome.particles
    expected_value, expected_grads = reference_of(case, program, outcome)
    what = f"{case.name} × {objective} (K={outcome.particles}) vs {outcome.reference} (K={k})"
    _assert_close(value, expected_value, VALUE_RTOL, what + ": differentiable_loss")
    _assert_same_gradients(grads, expected_grads, what)
    loss_value = run_objective_loss(objective, outcome.particles, program)
    _assert_close(loss_value, expected_value, VALUE_RTOL, what + ": loss()")


def check_mixed(case, program, objective, outcome: Mixed):
    value, grads, _ = run_objective(objective, outcome.particles, program)
    weight = CIWAE_ELBO_WEIGHT
    elbo_value, elbo_grads = reference_of(case, program, outcome.elbo)
    iwae_value, iwae_grads = reference_of(case, program, outcome.iwae)
    expected_value = weight * elbo_value + (1 - weight) * iwae_value
    expected_grads = {}
    for name in set(elbo_grads) | set(iwae_grads):
        first, second = elbo_grads.get(name), iwae_grads.get(name)
        first = torch.zeros_like(second) if first is None else first
        second = torch.zeros_like(first) if second is None else second
        expected_grads[name] = weight * first + (1 - weight) * second
    what = (f"{case.name} × {objective} (K={outcome.particles}) vs {weight} × "
            f"{outcome.elbo.reference} + {1 - weight} × {outcome.iwae.reference}")
    _assert_close(value, expected_value, VALUE_RTOL, what + ": differentiable_loss")
    _assert_same_gradients(grads, expected_grads, what)
    loss_value = run_objective_loss(objective, outcome.particles, program)
    _assert_close(loss_value, expected_value, VALUE_RTOL, what + ": loss()")


def check_exact(case, program, objective, outcome: Exact):
    """The mean over R replicates of the value and of each gradient component, within 3 of
    their standard errors (sample SD / √R) of the exact expectation, widened for the number of
    quantities checked together (``_z_limit``)."""
    loss_fn = _objective(objective, outcome.particles)
    values, grads = [], []
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for replicate in range(outcome.replicates):
            pyro.set_rng_seed(1000 + replicate)
            loss = loss_fn.differentiable_loss(program.model, program.guide, *program.args)
            values.append(loss.detach())
            grads.append(torch.cat([g.reshape(-1) for g in _gradients(loss).values()]))
    expected = program.expected(objective, outcome.particles, RENYI_ALPHA)
    expected_grads = torch.cat([g.reshape(-1) for g in _gradients(expected).values()])
    samples = torch.cat([torch.stack(values)[:, None], torch.stack(grads)], 1)
    target = torch.cat([expected.detach().reshape(1), expected_grads])
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(outcome.replicates)
    names = ["value"] + [f"d/d {n}[{i}]" for n, p in _store_parameters().items()
                         for i in range(p.numel())]
    z = (mean - target).abs() / standard_error.clamp(min=1e-12)
    limit = _z_limit(len(names))
    bad = [(names[i], float(mean[i]), float(target[i]), float(standard_error[i]))
           for i in range(len(names))
           if abs(float(mean[i] - target[i])) > limit * float(standard_error[i])
           + 1e-8 * (1 + abs(float(target[i])))]
    assert not bad, (f"{case.name} × {objective}: (component, MC mean, exact, SE) beyond "
                     f"{limit:.2f} SE: {bad}; max |z| = {float(z.max()):.2f}")


def _z_limit(components: int) -> float:
    """3 standard errors for one quantity; for m quantities checked together, the limit with
    the same chance of a false alarm for the cell as one 3-SE check (0.27%, Bonferroni)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    false_alarm = 2 * (1 - float(normal.cdf(torch.tensor(3.0))))
    return float(normal.icdf(torch.tensor(1 - false_alarm / (2 * components))))


def check_refused(case, program, objective, outcome: Refused):
    particles = 1 if objective in ("elbo", "meanfield", "stl") else 3
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _objective(objective, particles).differentiable_loss(program.model, program.guide,
                                                                 *program.args)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message, f"ConfigError is not one line: {message!r}"
            assert re.search(outcome.config_match or outcome.match, message), message
            return
        except outcome.pyro_error or () as error:
            origin = _raised_in(error)
            assert "/pyro/" in origin and "/pyro_vae/" not in origin, \
                f"{type(error).__name__} raised in {origin}, not by Pyro: {error}"
            assert re.search(outcome.match, str(error)), str(error)
            return
    assert outcome.warning, f"{case.name} × {objective}: ran without refusing"
    assert any(re.search(outcome.match, str(w.message)) for w in caught), \
        [str(w.message) for w in caught]


def _raised_in(error: BaseException) -> str:
    """The file of the innermost frame that raised ``error``."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


@pytest.mark.parametrize("name,objective", [_cell(n, o) for n, o in CELLS])
def test_conformance(name, objective):
    case = CASES[name]
    outcome = OUTCOMES[name, objective]
    program = case.build()
    if isinstance(outcome, Same):
        check_same(case, program, objective, outcome)
    elif isinstance(outcome, Mixed):
        check_mixed(case, program, objective, outcome)
    elif isinstance(outcome, Exact):
        check_exact(case, program, objective, outcome)
    else:
        check_refused(case, program, objective, outcome)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.valid])
def test_pyro_itself_rejects_each_invalid_program(name):
    """The invalid programs are invalid for Pyro too: its own estimator raises or warns."""
    case = CASES[name]
    program = case.build()
    estimator = _pyro_estimator("enum" if case.enumerated else "trace", 1, case.nesting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            estimator.loss_and_grads(program.model, program.guide, *program.args)
        except (ValueError, RuntimeError, NotImplementedError):
            return
    assert caught, f"Pyro accepted {name} silently"


K1_PROGRAMS = ["plate_full", "inner_outer", "data_plate_subsample", "nuisance_globals",
               "global_and_local_latents", "components_and_data"]


@pytest.mark.parametrize("name,objective", [(n, o) for n in K1_PROGRAMS
                                            for o in ("iwae", "renyi", "vimco", "dreg", "miwae",
                                                      "ciwae", "piwae")])
def test_one_particle_is_the_elbo_without_a_particle_dimension(name, objective):
    """K = 1: iwae, renyi, vimco, miwae, ciwae and piwae are Trace_ELBO (one particle) in
    value and gradients (piwae adds back the direct term of log q that its stopped weights
    drop); dreg is stl's path gradient (the identity w̃ = 1)."""
    case = CASES[name]
    program = case.build()
    value, grads, _ = run_objective(objective, 1, program)
    if objective == "dreg":
        expected_value, expected_grads = stl_reference(case, program)
    else:
        expected_value, expected_grads, _ = run_pyro("trace", 1, case, program)
    _assert_close(value, expected_value, VALUE_RTOL, f"{name} × {objective} (K=1)")
    _assert_same_gradients(grads, expected_grads, f"{name} × {objective} (K=1)")


def test_renyi_elbo_reduces_a_plate_around_every_site_per_element():
    """Why the reference anchors programs without plate "data": RenyiELBO log-mean-exps each
    element of a plate that encloses every site separately (here "outer"), the objectives only
    the elements of "data"; with a zero factor outside the plates the two coincide."""
    case = CASES["inner_outer"]
    program = case.build()
    value, _, _ = run_objective("iwae", 3, program)
    anchored, _, _ = run_pyro("renyi", 3, case, program)
    estimator = _pyro_estimator("renyi", 3, case.nesting)
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    plain = estimator.loss(program.model, program.guide)
    _assert_close(value, anchored, VALUE_RTOL, "iwae vs anchored RenyiELBO")
    assert abs(plain - anchored) > 0.1, (plain, anchored)


def test_meanfield_does_not_silently_score_a_guide_that_is_not_mean_field():
    """A guide that is not mean field (x drawn given y, y given nothing) would get per-site
    closed-form KLs, a biased bound: meanfield refuses a guide sampling the latent sites in
    another order than the model (TraceMeanField_ELBO warns), in one line."""
    program = CASES["mean_field_violated"].build()
    with pytest.raises(ConfigError, match=r"needs the guide to sample the latent sites in the "
                       r"model's order \(model: x, y; guide: y, x\)") as error:
        make_objective("meanfield").differentiable_loss(program.model, program.guide)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("validation", [True, False])
def test_meanfield_refuses_a_prior_that_depends_on_a_model_enumerated_site(validation):
    """No closed-form KL applies against p(z) = Σ_c p(c) p(z | c): meanfield refuses, with
    Pyro's validation on or off."""
    program = CASES["enum_model_parent_of_latent"].build()
    pyro.enable_validation(validation)
    with pytest.raises(ConfigError, match=r"prior of site 'z' depends on an enumerated site"):
        make_objective("meanfield").differentiable_loss(program.model, program.guide)


def test_the_table_covers_every_cell_once():
    assert set(ROWS) == set(CASES)
    assert set(OUTCOMES) == set(CELLS)
    for name, row in ROWS.items():
        if not CASES[name].valid:
            assert all(isinstance(o, Refused) for o in row.values()), name
        for outcome in row.values():
            if isinstance(outcome, Exact):
                assert CASES[name].build().expected is not None, name


def test_outcome_counts(capsys):
    counts = outcome_counts()
    assert sum(counts["total"].values()) == len(CASES) * len(OBJECTIVE_NAMES)
    with capsys.disabled():
        print(_format_counts(counts))


def _format_counts(counts) -> str:
    lines = [f"\nconformance: {counts['programs']} programs ({counts['valid']} valid) × "
             f"{len(OBJECTIVE_NAMES)} objectives"]
    def tallied(tally):
        return ", ".join(f"{k}: {v}" for k, v in sorted(tally.items()))

    for objective, tally in counts["per_objective"].items():
        lines.append(f"  {objective:9s} {tallied(tally)}")
    lines.append(f"  all       {tallied(counts['total'])}")
    bugs = Counter(objective for _, objective in KNOWN_BUGS)
    lines.append("  of which known bugs (strict xfail): "
                 + ", ".join(f"{o}: {bugs[o]}" for o in OBJECTIVE_NAMES))
    return "\n".join(lines)


# ================================================================================================
# conjugate inference with SVI (test_inference.py)
# ================================================================================================
REPLICAS = 24


def _fit(kind, objective, steps, lr, average_over, reparameterized=True):
    """Train R = REPLICAS independent copies of the conjugate problem in one SVI run (each
    replica its own guide parameters; Adam is elementwise, so this is R independent runs);
    return each replica's parameters averaged over the last ``average_over`` steps, and the
    exact posterior."""
    program, exact = conjugate_program(kind, reparameterized, replicas=REPLICAS)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(program.model, program.guide, pyro.optim.Adam({"lr": lr}),
              _objective(objective, 5 if objective == "iwae" else 1))
    sums = {name: torch.zeros(REPLICAS) for name in exact}
    for step in range(steps):
        svi.step()
        if step >= steps - average_over:
            for name in exact:
                sums[name] += pyro.param(name).detach().reshape(-1)
    return {name: total / average_over for name, total in sums.items()}, exact


CONJUGATE = [("normal", 0.02, 400, 200), ("beta", 0.02, 400, 200), ("gamma", 0.02, 400, 200)]


@pytest.mark.parametrize("objective", ["elbo", "meanfield", "iwae"])
@pytest.mark.parametrize("kind,lr,steps,average_over", CONJUGATE,
                         ids=[c[0] for c in CONJUGATE])
def test_svi_fits_the_exact_conjugate_posterior(kind, lr, steps, average_over, objective):
    """Each replica's trailing average estimates the fixed point of the expected gradient,
    the exact posterior (the guide family contains it; with one global latent the iwae bound
    is the ELBO of one draw). Their mean is within 3 standard errors (SD over replicas / √R)
    of the exact posterior's parameters."""
    validation = is_validation_enabled()
    pyro.enable_validation(False)
    try:
        fitted, exact = _fit(kind, objective, steps, lr, average_over)
    finally:
        pyro.enable_validation(validation)
    for name, value in exact.items():
        estimates = fitted[name]
        mean, se = float(estimates.mean()), float(estimates.std() / math.sqrt(REPLICAS))
        assert abs(mean - value) <= 3 * se, \
            f"{kind} × {objective}: {name} = {mean:.4f} ± {se:.4f} (SE), exact {value:.4f}"


if __name__ == "__main__":
    counts = outcome_counts()
    print(_format_counts(counts))
    print(f"known bugs (strict xfail): {len(KNOWN_BUGS)} cells")
    for (name, objective), (reason, _) in sorted(KNOWN_BUGS.items()):
        print(f"  {name} × {objective}: {reason}")
    print("refusals (valid programs):")
    for (name, objective), outcome in OUTCOMES.items():
        if isinstance(outcome, Refused) and CASES[name].valid:
            print(f"  {name} × {objective}: {outcome.config_match or outcome.match}")
    for objective, (passing, runs, failing) in pass_rates().items():
        print(f"{objective}: {passing}/{runs} = {passing / runs:.0%} of the valid programs on "
              f"which Pyro's estimator runs; not passing: {failing}")
