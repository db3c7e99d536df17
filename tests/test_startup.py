"""``pyro-vae --help`` and usage errors answer without importing torch, Pyro, ArviZ or matplotlib.

``import pyro_vae`` loads its names on first use, and the choices of the command line's flags
(priors, likelihoods, guides, networks, activations, objectives, models) come from static
tuples in :mod:`pyro_vae.config` while the catalogues' modules are not imported. These tests
run the command line in a fresh interpreter (this process has torch already), check which
modules it leaves in ``sys.modules``, check that its text is the text it prints once the real
catalogues are loaded, and check the static tuples against the catalogues. No timing here: the
timing belongs to the benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pyro_vae import config

#: The modules that --help and usage errors must not import.
HEAVY = ("torch", "pyro", "arviz", "matplotlib")
COMMANDS = ("train", "evaluate", "sample", "compare-estimators", "diagnose", "compare", "explore",
            "plot")

#: Invocations that end before any work: help (exit 0) and usage errors (exit 2).
CASES = [
    ["--help"], ["-h"], [], ["bogus"],
    *([command, "--help"] for command in COMMANDS),
    ["train", "--prior", "nope"], ["train", "--prior=nope"], ["train", "--likelihood", "nope"],
    ["train", "--guide", "nope"], ["train", "--encoder", "nope"], ["train", "--decoder", "nope"],
    ["train", "--activation", "nope"], ["train", "--objective", "nope"],
    ["train", "--model", "nope"], ["train", "--epochs", "x"], ["train", "--epochs"],
    ["train", "--lr", "-1"], ["train", "--hidden", "a,b"], ["train", "--seed", "-1"],
    ["train", "--unknown-flag"], ["train", "--threads", "0"], ["evaluate"],
    ["evaluate", "RUN", "--split", "nope"], ["evaluate", "RUN", "--particles", "0"],
    ["compare-estimators", "--prior", "nope"], ["compare-estimators", "--temperature", "nan"],
    ["sample", "RUN", "--n", "-3"], ["compare", "RUN_A"],
    ["train", "--import", "no_such_plugin_for_this_test"],
]

#: The lines these print, as they were before the command line became lazy.
EXPECTED_STDERR = {
    ("train", "--prior", "nope"):
        "pyro-vae train: error: argument --prior: invalid choice: 'nope' (choose from "
        "'categorical', 'flow', 'laplace', 'learned-normal', 'mog', 'normal', "
        "'relaxed-categorical', 'studentt', 'vamp')\n",
    ("train", "--activation", "nope"):
        "pyro-vae train: error: argument --activation: invalid choice: 'nope' (choose from "
        "'relu', 'tanh', 'softplus', 'elu', 'gelu', 'silu', 'leaky-relu')\n",
    ("train", "--objective", "nope"):
        "pyro-vae train: error: argument --objective: invalid choice: 'nope' (choose from "
        "'elbo', 'meanfield', 'iwae', 'renyi', 'dreg', 'stl', 'vimco', 'miwae', 'ciwae', "
        "'piwae')\n",
    ("train", "--model", "nope"):
        "pyro-vae train: error: argument --model: invalid choice: 'nope' (choose from "
        "'hierarchical', 'm2', 'mixture', 'vae')\n",
    ("train", "--epochs", "x"):
        "pyro-vae train: error: argument --epochs: expected a positive integer, got 'x'\n",
    ("train", "--epochs"): "pyro-vae train: error: argument --epochs: expected one argument\n",
    ("evaluate",): "pyro-vae evaluate: error: the following arguments are required: RUN_DIR\n",
    ("bogus",):
        "pyro-vae: error: argument command: invalid choice: 'bogus' (choose from 'train', "
        "'evaluate', 'compare-estimators', 'diagnose', 'compare', 'explore', 'sample', 'plot')\n",
    ("train", "--import", "no_such_plugin_for_this_test"):
        "pyro-vae train: error: cannot import the plug-in 'no_such_plugin_for_this_test': "
        "ModuleNotFoundError: No module named 'no_such_plugin_for_this_test'; install it or "
        "put it on PYTHONPATH\n",
}

#: Runs each case through ``pyro_vae.cli.main`` in a fresh interpreter, records its output,
#: exit status and the heavy modules loaded by then; then imports every catalogue (and torch
#: with them) and runs each case again, for the text the real catalogues give.
RUNNER = textwrap.dedent("""
    import contextlib, importlib, io, json, sys

    def run(argv):
        from pyro_vae.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
        return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    cases, heavy, loaded = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
    lazy = []
    for argv in cases:
        result = run(argv)
        result["heavy"] = sorted(m for m in heavy if m in sys.modules)
        lazy.append(result)
    real = []
    if loaded:
        for module in ("models.priors", "models.likelihoods", "guides.posteriors", "networks",
                       "lvm", "objectives", "data"):
            importlib.import_module("pyro_vae." + module)
        real = [run(argv) for argv in cases]
    print(json.dumps({"lazy": lazy, "real": real}))
""")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["COLUMNS"] = "100"  # argparse's help is wrapped to the terminal: the same width for all
    env.pop("PYTHONWARNINGS", None)
    return env


def _run(cases, *, real: bool, cwd) -> dict:
    process = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases), json.dumps(HEAVY), "1" if real else "0"],
        capture_output=True, text=True, cwd=cwd, env=_environment(), timeout=600)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run(CASES, real=True, cwd=tmp_path_factory.mktemp("startup"))


def test_help_and_usage_errors_import_no_torch(runs):
    for result in runs["lazy"]:
        assert result["heavy"] == [], f"{result['argv']} imported {result['heavy']}"


def test_help_and_usage_errors_exit_as_before(runs):
    for result in runs["lazy"]:
        argv = result["argv"]
        if "--help" in argv or "-h" in argv:
            assert result["code"] in (0, None), argv
            assert result["stdout"].startswith("usage: pyro-vae"), argv
            assert result["stderr"] == "", argv
            continue
        assert result["code"] == 2, argv
        assert result["stdout"] == "", argv
        assert result["stderr"].count("\n") == 1 and result["stderr"].startswith("pyro-vae"), \
            f"{argv}: {result['stderr']!r}"
        if tuple(argv) in EXPECTED_STDERR:
            assert result["stderr"] == EXPECTED_STDERR[tuple(argv)], argv
    assert all(tuple(argv) in {tuple(r["argv"]) for r in runs["lazy"]} for argv in EXPECTED_STDERR)


def test_the_text_is_that_of_the_real_catalogues(runs):
    """Every help text and error is the same before and after torch and the catalogues are
    imported: the static names are what the catalogues offer."""
    for lazy, real in zip(runs["lazy"], runs["real"], strict=True):
        assert (lazy["code"], lazy["stdout"], lazy["stderr"]) == \
            (real["code"], real["stdout"], real["stderr"]), lazy["argv"]


def test_the_installed_entry_point_answers_help_without_torch(tmp_path):
    """``python -m pyro_vae.cli`` (what the ``pyro-vae`` script runs) for help and one usage
    error; the modules loaded at exit are listed by ``-X importtime``."""
    for argv, code in ((["--help"], 0), (["train", "--help"], 0), (["train", "--epochs", "x"], 2),
                       (["train", "--prior", "nope"], 2)):
        process = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyro_vae.cli", *argv],
                                 capture_output=True, text=True, cwd=tmp_path,
                                 env=_environment(), timeout=600)
        assert process.returncode == code, process.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in process.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & set(HEAVY), (argv, sorted(imported & set(HEAVY)))
        errors = [line for line in process.stderr.splitlines()
                  if not line.startswith("import time:")]
        if code == 0:
            assert process.stdout.startswith("usage: pyro-vae") and errors == []
        else:
            assert len(errors) == 1 and errors[0].startswith("pyro-vae train: error: ")


def test_a_plug_in_name_is_a_choice(tmp_path):
    """With a plug-in given, its names are offered (torch comes with the plug-in)."""
    plugin = tmp_path / "startup_plugin.py"
    plugin.write_text(textwrap.dedent("""
        import torch
        import pyro_vae

        @pyro_vae.register("prior", "startup-test-prior")
        class StartupPrior(torch.nn.Module):
            def setup(self, latent_dim): ...
            def distribution(self): ...
    """))
    runs = _run([["train", "--import", str(plugin), "--prior", "nope"],
                 ["train", "--import", str(plugin), "--help"]], real=False, cwd=tmp_path)
    error, help_ = runs["lazy"]
    assert error["code"] == 2
    assert "'normal', 'relaxed-categorical', 'startup-test-prior', 'studentt'" in error["stderr"]
    assert help_["code"] in (0, None) and "startup-test-prior" in help_["stdout"]


def test_import_pyro_vae_is_lazy_and_keeps_its_names(tmp_path):
    script = textwrap.dedent("""
        import json, sys, types
        import pyro_vae, pyro_vae.config, pyro_vae.cli
        before = sorted(m for m in %r if m in sys.modules)
        import pyro_vae.log_weights as submodule_import
        from pyro_vae import *
        from pyro_vae import log_weights, lvm
        print(json.dumps({
            "before": before,
            "all": sorted(name for name in pyro_vae.__all__ if name in globals()),
            "log_weights_is_function": isinstance(log_weights, types.FunctionType)
                and pyro_vae.log_weights is log_weights and submodule_import is log_weights,
            "lvm_is_module": isinstance(lvm, types.ModuleType) and lvm.__name__ == "pyro_vae.lvm",
            "training": pyro_vae.training.fit is pyro_vae.fit,
            "dir": sorted(set(pyro_vae.__all__) - set(dir(pyro_vae))),
        }))
    """ % (HEAVY,))
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=tmp_path, env=_environment(), timeout=600)
    assert process.returncode == 0, process.stderr[-2000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    import pyro_vae

    assert result == {"before": [], "all": sorted(pyro_vae.__all__),
                      "log_weights_is_function": True, "lvm_is_module": True, "training": True,
                      "dir": []}
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        pyro_vae.no_such_name  # noqa: B018


def _built_in(catalogue) -> tuple[str, ...]:
    """The names of a catalogue that the package itself defines (plug-ins registered by other
    tests in this process left out; their classes live outside ``pyro_vae``)."""
    return tuple(name for name, value in catalogue.items()
                 if getattr(value, "__module__", "").startswith("pyro_vae.")
                 and not hasattr(value, "model_class"))


def test_static_names_are_the_catalogues_names():
    from pyro_vae import data, lvm, networks, objectives
    from pyro_vae.guides import posteriors
    from pyro_vae.models import likelihoods, priors

    assert config.BUILTIN_PRIORS == _built_in(priors.PRIORS)
    assert config.BUILTIN_LIKELIHOODS == _built_in(likelihoods.LIKELIHOODS)
    assert config.BUILTIN_GUIDES == _built_in(posteriors.POSTERIORS)
    assert config.BUILTIN_NETWORKS == tuple(networks.NETWORKS)
    assert config.BUILTIN_ACTIVATIONS == tuple(networks.ACTIVATIONS)
    assert config.BUILTIN_OBJECTIVES == _built_in(objectives.OBJECTIVES)
    assert config.BUILTIN_MODELS == _built_in(lvm.MODELS)
    assert config.SPLITS == tuple(data.SPLITS)


def test_choices_follow_the_loaded_catalogues():
    """Once a catalogue's module is imported its own names are the choices (plug-ins too)."""
    from pyro_vae import lvm, networks, objectives
    from pyro_vae.guides import posteriors
    from pyro_vae.models import likelihoods, priors

    choices = {name: config.BY_NAME[name].choices() for name in
               ("prior", "likelihood", "guide", "encoder", "activation", "objective", "model")}
    assert choices == {"prior": sorted(priors.PRIORS), "likelihood": sorted(likelihoods.LIKELIHOODS),
                       "guide": sorted(posteriors.POSTERIORS), "encoder": sorted(networks.NETWORKS),
                       "activation": list(networks.ACTIVATIONS),
                       "objective": list(objectives.OBJECTIVES), "model": sorted(lvm.MODELS)}
