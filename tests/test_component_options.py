"""Component options from the command line: a TOML table per component, or --KIND-option."""

from __future__ import annotations

import json

from pyro_vae.cli import main

FAST = ["--epochs", "1", "--eval-particles", "0", "--hidden", "16", "--latent-dim", "3",
        "--quiet"]


def _model_config(run) -> dict:
    return json.loads((run / "config.json").read_text())["model"]


def test_a_toml_table_names_a_component_and_sets_its_options(tmp_path):
    config = tmp_path / "options.toml"
    config.write_text('[prior]\nname = "mog"\ncomponents = 3\n'
                      '[likelihood]\nname = "normal"\nscale = 0.25\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--data",
                 str(_array(tmp_path)), *FAST]) == 0
    model = _model_config(run)
    assert model["prior"] == "mog" and model["prior_options"] == {"components": 3}
    assert model["likelihood"] == "normal" and model["likelihood_options"]["scale"] == 0.25


def test_flags_set_component_options_and_override_the_file(tmp_path):
    config = tmp_path / "options.toml"
    config.write_text('[prior]\nname = "mog"\ncomponents = 3\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(config),
                 "--guide", "categorical", "--prior", "categorical", "--guide-option",
                 "enumerate=true", "--out", str(run), *FAST]) == 0
    model = _model_config(run)
    # the file's [prior] options belonged to the mog it named, not to the flag's categorical
    assert model["prior"] == "categorical" and model["prior_options"] == {"learn": False}
    assert model["guide_options"] == {"enumerate": True}
    run = tmp_path / "run2"
    assert main(["train", "--config", str(config), "--prior-option", "components=5",
                 "--out", str(run), *FAST]) == 0
    assert _model_config(run)["prior_options"] == {"components": 5}


def _array(tmp_path):
    import numpy as np

    path = tmp_path / "data.npy"
    np.save(path, np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32))
    return path
