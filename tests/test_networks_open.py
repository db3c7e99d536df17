"""Any nn.Module as encoder or decoder: the output contract checked once at construction, the
network recorded in the run's config, rebuilt from it where its class and options allow."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from torch import nn

from pyro_vae import VAE, fit, load_run, log_weights
from pyro_vae.errors import ConfigError
from pyro_vae.networks import ContextFree, join_context
from pyro_vae.resources import model_size


class SmallNet(nn.Module):
    """A user's network: Linear → Tanh → Linear on the inputs joined with the context, with the
    keyword arguments that rebuild it as ``config``."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 16,
                 context_features: int = 0):
        super().__init__()
        self.options = {"in_features": in_features, "out_features": out_features,
                        "hidden": hidden, "context_features": context_features}
        self.body = nn.Sequential(nn.Linear(in_features + context_features, hidden), nn.Tanh(),
                                  nn.Linear(hidden, out_features))

    @property
    def config(self) -> dict:
        return dict(self.options)

    def forward(self, inputs, context=None):
        return self.body(join_context(inputs, context))


class NoConfig(nn.Module):
    """An importable network with no ``config``: recorded, but not rebuildable."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 64)

    def forward(self, z, context=None):
        return self.linear(z)


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def _same_log_weights(a: VAE, b: VAE, x: torch.Tensor, y=None) -> None:
    pyro.set_rng_seed(7)
    first = log_weights(a.model, a.guide, x, y, particles=3)
    pyro.set_rng_seed(7)
    second = log_weights(b.model, b.guide, x, y, particles=3)
    for field in ("log_likelihood", "log_prior", "log_guide"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field


def test_a_user_network_trains_is_recorded_and_restored(digits, tmp_path):
    pyro.set_rng_seed(0)
    encoder, decoder = SmallNet(64, 4), SmallNet(2, 64)   # normal guide: 2 × latent_dim outputs
    vae = VAE(digits.data_shape, 2, encoder=encoder, decoder=decoder)
    assert vae.encoder is encoder and vae.decoder is decoder
    before = [p.detach().clone() for p in encoder.parameters()]
    fit(vae, digits, "elbo", epochs=2, out=tmp_path, progress=False, device="cpu")
    assert not all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model["encoder"] == {"class": f"{__name__}:SmallNet",
                                "options": {"in_features": 64, "out_features": 4, "hidden": 16,
                                            "context_features": 0}}
    assert model["decoder"]["options"]["in_features"] == 2
    run = load_run(tmp_path)
    assert type(run.vae.encoder) is SmallNet and type(run.vae.decoder) is SmallNet
    assert run.vae.config == vae.config
    _same_log_weights(vae, run.vae, digits.test[:20])


def test_a_conditional_user_network_gets_the_labels_and_is_rebuilt(digits):
    torch.manual_seed(0)
    vae = VAE(digits.data_shape, 2, conditional=True, num_classes=10,
              encoder=SmallNet(64, 4, context_features=10),
              decoder=SmallNet(2, 64, context_features=10))
    z = torch.randn(3, 5, 2)                               # [particles, batch, latent]
    means = [vae.decode(z, torch.full((5,), label)).mean for label in (0, 1)]
    assert means[0].shape == (3, 5, 64)
    assert not torch.equal(means[0], means[1])             # the label reaches the decoder
    rebuilt = VAE.from_config(vae.config)
    assert rebuilt.config == vae.config
    rebuilt.load_state_dict(vae.state_dict())
    x, y = digits.test[:8], digits.labels["test"][:8]
    _same_log_weights(vae, rebuilt, x, y)


def test_a_one_argument_module_serves_an_unconditional_vae():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    decoder = nn.Linear(2, 64)
    vae = VAE(64, 2, encoder=encoder, decoder=decoder, likelihood="normal")
    assert isinstance(vae.encoder, ContextFree) and vae.encoder.module is encoder
    x = torch.rand(5, 64)
    assert torch.equal(vae.encoder_output(x), encoder(x))
    z = torch.randn(3, 5, 2)
    assert torch.equal(vae.decode(z).mean, decoder(z))     # a Normal's mean is the decoder output
    weights = log_weights(vae.model, vae.guide, x, particles=3)
    assert weights.log_likelihood.shape == (3, 5)
    assert torch.isfinite(weights.log_likelihood).all()
    assert vae.config["encoder"] == {"class": "torch.nn.modules.container:Sequential",
                                     "rebuildable": False}


class WrongWidth(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(2, width)

    def forward(self, z, context=None):
        return self.linear(z)


class Flattening(nn.Module):
    """Folds the particle dimension into the batch: right for ``[batch, latent]`` only."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 64)

    def forward(self, z, context=None):
        return self.linear(z.reshape(-1, z.shape[-1]))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 64)

    def forward(self, z, context=None):
        return self.linear(z), z


class Broken(nn.Module):
    def forward(self, x, context=None):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(a second line)")


@pytest.mark.parametrize("case", ["encoder width", "decoder width", "flattened particles",
                                  "non-tensor", "raises", "no context", "not a module"])
def test_every_contract_violation_is_one_line(case):
    options = dict(hidden=(8,))
    if case == "encoder width":
        options["encoder"], expected = nn.Linear(64, 5), (
            r"^the encoder Linear returned shape \[2, 5\] for x of shape \[2, 64\]; expected a "
            r"tensor of shape \[2, 4\]")
    elif case == "decoder width":
        options["decoder"], expected = WrongWidth(63), (
            r"^the decoder WrongWidth returned shape \[2, 63\] for z of shape \[2, 2\]; "
            r"expected a tensor of shape \[2, 64\]")
    elif case == "flattened particles":
        options["decoder"], expected = Flattening(), (
            r"^the decoder Flattening returned shape \[6, 64\] for z of shape \[3, 2, 2\]; "
            r"expected a tensor of shape \[3, 2, 64\]")
    elif case == "non-tensor":
        options["decoder"], expected = Pair(), r"^the decoder Pair returned tuple for z .*tensor"
    elif case == "raises":
        options["encoder"], expected = Broken(), (
            r"^the encoder Broken fails on x of shape \[2, 64\]: mat1 and mat2 shapes")
    elif case == "no context":
        options.update(decoder=nn.Linear(2, 64), conditional=True, num_classes=10)
        expected = r"^the decoder Linear takes no context .*conditional VAE"
    else:
        options["encoder"], expected = lambda x: x, (
            r"^the encoder must be a network name \(mlp, linear, conv\) or an nn.Module, not "
            r"function$")
    with pytest.raises(ConfigError, match=expected) as info:
        VAE(64, 2, **options)
    _one_line(info)


class Noisy(nn.Module):
    """A decoder that draws from the global random number generator at every call."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 64)

    def forward(self, z, context=None):
        return self.linear(z) + 0.1 * torch.randn(*z.shape[:-1], 64)


def test_the_probe_leaves_the_networks_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))
    encoder[2].eval()                                      # one submodule in its own mode
    decoder = Noisy()
    buffers = [b.clone() for b in encoder.buffers()]       # running statistics, batches seen
    state = torch.get_rng_state()
    VAE(64, 2, encoder=encoder, decoder=decoder)
    # in train mode the probe would have moved the running mean to 0.1 × the first bias
    assert all(torch.equal(a, b) for a, b in zip(buffers, encoder.buffers()))
    assert [m.training for m in encoder.modules()] == [True, True, True, False, True]
    assert torch.equal(torch.get_rng_state(), state)       # the noisy decoder's draws undone


def test_the_model_size_counts_a_user_network():
    encoder, decoder = SmallNet(64, 4, hidden=300), nn.Linear(2, 64)
    vae = VAE(64, 2, encoder=encoder, decoder=decoder)
    size = model_size(64, 2, encoder=encoder, decoder=decoder)
    assert size["exact"]
    assert size["parameters"] == sum(p.numel() for p in vae.parameters())
    assert size["parameters"] > sum(p.numel() for p in encoder.parameters()) > 64 * 300
    assert all(p.device.type == "cpu" for p in encoder.parameters())   # the caller's copy untouched


def test_a_network_defined_in_a_function_trains_but_cannot_be_rebuilt(digits, tmp_path):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 64)

        @property
        def config(self):
            return {}

        def forward(self, z, context=None):
            return self.linear(z)

    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 2, decoder=Local(), hidden=(16,))
    fit(vae, digits, "elbo", epochs=2, out=tmp_path, progress=False, device="cpu")
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model["decoder"] == {"class": f"{__name__}:{Local.__qualname__}",
                                "rebuildable": False}
    assert model["encoder"] == "mlp"
    with pytest.raises(ConfigError, match=r"^the decoder network .*Local cannot be rebuilt from "
                                          r"the config; load the run with "
                                          r"load_run\(run_dir, model=\.\.\.\)$") as info:
        VAE.from_config(model)
    _one_line(info)
    # an importable class without config is recorded the same way
    assert VAE(64, 2, decoder=NoConfig()).config["decoder"] == {
        "class": f"{__name__}:NoConfig", "rebuildable": False}


def test_a_recorded_network_that_cannot_be_found_is_one_line():
    config = VAE(64, 2, hidden=(8,)).config
    for entry, expected in (
            ({"class": f"{__name__}:Missing", "options": {}}, "has no decoder network class .Missing."),
            ({"class": "no_such_module_here:Net", "options": {}}, "cannot import"),
            ({"class": f"{__name__}:SmallNet", "options": {"width": 3}}, "bad options"),
            ({"options": {}}, "network name .* or a table with a 'class'")):
        with pytest.raises(ConfigError, match=expected) as info:
            VAE.from_config({**config, "decoder": entry})
        _one_line(info)
