"""Plug-ins: --import MODULE and the pyro_vae.plugins entry-point group register priors and models
for every command, a run records them, and what cannot be imported is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import invoke
from pyro_vae import plugins
from pyro_vae.errors import ConfigError

PRIOR_PLUGIN = textwrap.dedent('''
    import pyro.distributions as dist
    import torch
    import pyro_vae

    @pyro_vae.register("prior", "{name}")
    class LogisticPrior(torch.nn.Module):
        def setup(self, latent_dim):
            self.register_buffer("zeros", torch.zeros(latent_dim))

        def distribution(self):
            uniform = dist.Uniform(self.zeros, self.zeros + 1)
            return dist.TransformedDistribution(
                uniform, [dist.transforms.SigmoidTransform().inv]).to_event(1)

        def options(self):
            return {{}}
''')


def _package(root: Path, name: str, body: str, entry_point: str | None = None) -> None:
    """A module ``name`` under ``root``, with an installed distribution's metadata declaring
    it in the entry-point group when ``entry_point`` is given."""
    (root / f"{name}.py").write_text(body)
    if entry_point is not None:
        info = root / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[pyro_vae.plugins]\n{name} = {entry_point}\n")


def _cli(argv: list[str], root: Path, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pyro_vae.cli", *argv], cwd=cwd, text=True,
                          capture_output=True, env=environment, timeout=300)


def test_import_makes_a_registered_prior_a_choice_and_the_run_finds_it_again(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    _package(root, "logistic_plugin", PRIOR_PLUGIN.format(name="logistic"))
    run = tmp_path / "run"
    without = _cli(["train", "--prior", "logistic", "--epochs", "1"], root, tmp_path)
    assert without.returncode == 2 and "invalid choice: 'logistic'" in without.stderr
    trained = _cli(["train", "--import", "logistic_plugin", "--prior", "logistic", "--epochs",
                    "1", "--hidden", "8", "--latent-dim", "2", "--quiet", "--eval-particles", "0",
                    "--out", str(run)], root, tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["plugins"] == ["logistic_plugin"] and config["model"]["prior"] == "logistic"
    evaluated = _cli(["evaluate", str(run), "--particles", "10", "--json"], root, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    # without the plug-in on the path: one line naming it
    missing = _cli(["evaluate", str(run), "--particles", "10"], tmp_path / "nowhere", tmp_path)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1
    assert "this run needs the plug-in 'logistic_plugin'" in lines[0]


def test_an_entry_point_is_loaded_by_every_command_and_a_broken_one_is_a_warning(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    _package(root, "entry_plugin", PRIOR_PLUGIN.format(name="entry-logistic"), "entry_plugin")
    _package(root, "broken_plugin", "raise RuntimeError('broken on purpose')\n", "broken_plugin")
    result = _cli(["train", "--prior", "entry-logistic", "--hidden", "8", "--latent-dim", "2",
                   "--dry-run"], root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run: the configuration is valid" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == ["pyro-vae: warning: the pyro-vae plug-in 'broken_plugin' "
                        "(broken_plugin) failed to load: RuntimeError: broken on purpose"]


def test_import_plugins_refuses_bad_specs_in_one_line(tmp_path):
    for spec, words in (("", "needs a module name"), ("two words", "is not a module name"),
                        ("no_such_module_here", "cannot import the plug-in"),
                        (str(tmp_path / "absent.py"), "plug-in file not found")):
        with pytest.raises(ConfigError) as error:
            plugins.import_plugins([spec], remember=False)
        assert words in str(error.value) and "\n" not in str(error.value)


def test_a_plug_in_file_is_recorded_by_its_absolute_path(tmp_path, capsys):
    path = tmp_path / "file_plugin.py"
    path.write_text(PRIOR_PLUGIN.format(name="file-logistic"))
    run = tmp_path / "run"
    outcome = invoke(["train", "--import", str(path), "--prior", "file-logistic", "--epochs", "1",
                      "--hidden", "8", "--latent-dim", "2", "--quiet", "--eval-particles", "0",
                      "--out", str(run)], capsys)
    assert outcome.code == 0, outcome.stderr
    assert str(path.resolve()) in json.loads((run / "config.json").read_text())["plugins"]
