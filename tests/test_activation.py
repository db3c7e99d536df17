"""The activation of the built-in MLP is an option (tanh is the IWAE paper's architecture)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pyro_vae import VAE, load_run
from pyro_vae.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.networks import ACTIVATIONS


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_hidden_layer_of_both_mlps_has_the_activation(name):
    vae = VAE(64, 2, hidden=(8, 8), activation=name)
    for network in (vae.encoder, vae.decoder):
        kinds = [type(m) for m in network.net]
        assert kinds.count(ACTIVATIONS[name]) == 2, kinds
        assert all(k in (nn.Linear, ACTIVATIONS[name]) for k in kinds)
    assert VAE.from_config(vae.config).config == vae.config


def test_the_activation_changes_the_function_not_the_parameters():
    torch.manual_seed(0)
    relu = VAE(64, 2, hidden=(8,))
    torch.manual_seed(0)
    tanh = VAE(64, 2, hidden=(8,), activation="tanh")
    assert all(torch.equal(a, b) for a, b in zip(relu.parameters(), tanh.parameters()))
    z = torch.randn(5, 2)
    expected = relu.decoder.net[2](torch.tanh(relu.decoder.net[0](z)))
    assert torch.allclose(tanh.decoder(z), expected)


def test_bad_activations_are_one_line():
    with pytest.raises(ConfigError, match="unknown activation 'sigmoidal'; choose one of: relu"):
        VAE(64, 2, activation="sigmoidal")
    with pytest.raises(ConfigError, match="applies to mlp networks"):
        VAE((1, 8, 8), 2, encoder="conv", decoder="linear", activation="tanh")


def test_a_tanh_run_from_the_command_line_is_restored_with_tanh(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--activation", "tanh", "--epochs", "1", "--hidden", "8",
                 "--latent-dim", "2", "--quiet", "--eval-particles", "0", "--batch-size", "512",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["activation"] == "tanh"
    assert any(isinstance(m, nn.Tanh) for m in load_run(out).vae.encoder.modules())
    # a run written before the option existed has no "activation": it is a ReLU run
    del config["model"]["activation"]
    (out / "config.json").write_text(json.dumps(config))
    assert load_run(out).vae.activation == "relu"
