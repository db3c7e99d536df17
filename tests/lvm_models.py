"""Latent-variable models written the way Pyro users write them, with no pyro_vae base class:
the tests run them through every tool. Imported by the tests, and by the command line as a
plug-in (``--import lvm_models``), which registers them as models."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae


class Encoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class ExampleVAE(nn.Module):
    """A VAE as Pyro's tutorial writes one: ``model(x)`` and ``guide(x)`` with ``pyro.module``
    calls and ``pyro.plate("data", x.shape[0])``; no minibatch scale, no labels, no config."""

    def __init__(self, x_dim: int = 64, z_dim: int = 4, hidden_dim: int = 64):
        super().__init__()
        self.encoder = Encoder(x_dim, z_dim, hidden_dim)
        self.decoder = Decoder(x_dim, z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def _mlp(sizes, last=None):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class TwoLayerVAE(nn.Module):
    """z₂ → z₁ → x with Gaussian conditionals, and the guide x → z₁ → z₂; a ``config`` that
    rebuilds it, and sampling and reconstruction for the figures."""

    def __init__(self, x_dim: int = 64, z1: int = 8, z2: int = 4, hidden: int = 64):
        super().__init__()
        self.config = {"x_dim": x_dim, "z1": z1, "z2": z2, "hidden": hidden}
        self.data_dim, self.z1, self.z2 = x_dim, z1, z2
        self.p_z1 = _mlp([z2, hidden, 2 * z1])
        self.p_x = _mlp([z1, hidden, x_dim])
        self.q_z1 = _mlp([x_dim, hidden, 2 * z1])
        self.q_z2 = _mlp([z1, hidden, 2 * z2])

    @staticmethod
    def _normal(net, inputs):
        loc, log_scale = net(inputs).chunk(2, dim=-1)
        return dist.Normal(loc, torch.nn.functional.softplus(log_scale) + 1e-3).to_event(1)

    def model(self, x, y=None, num_data=None):
        pyro.module("two_layer", self)
        with pyro_vae.lvm.data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2), 1.0).to_event(1))
            z1 = pyro.sample("z1", self._normal(self.p_z1, z2))
            pyro.sample("x", dist.Bernoulli(logits=self.p_x(z1), validate_args=False)
                        .to_event(1), obs=x)

    def guide(self, x, y=None, num_data=None):
        pyro.module("two_layer", self)
        with pyro_vae.lvm.data_plate(x, num_data):
            z1 = pyro.sample("z1", self._normal(self.q_z1, x))
            pyro.sample("z2", self._normal(self.q_z2, z1))

    @torch.no_grad()
    def sample(self, n, y=None):
        z2 = torch.randn(n, self.z2, device=self.p_x[0].weight.device)
        return torch.sigmoid(self.p_x(self._normal(self.p_z1, z2).sample()))

    @torch.no_grad()
    def reconstruct(self, x, y=None):
        return torch.sigmoid(self.p_x(self._normal(self.q_z1, x).mean))


class HandM2(nn.Module):
    """M2 (Kingma et al. 2014) by hand: p(y) uniform, p(z) = N(0, I), p(x | y, z); q(y | x) and
    q(z | x, y). ``y`` holds labels, ``-1`` where a datapoint is unlabelled (training), or is
    ``None`` (evaluation: every label latent). Labelled rows observe ``y_obs`` and draw
    ``z_lab``; unlabelled rows draw ``z`` for every class of ``y``, which the guide enumerates
    under q(y | x) (in labelled rows ``y`` has its prior as guide and nothing depends on it:
    it adds exactly nothing to the weight)."""

    semi_supervised = True

    def __init__(self, x_dim: int = 64, classes: int = 10, z_dim: int = 4, hidden: int = 64,
                 alpha: float = 10.0):
        super().__init__()
        self.config = {"x_dim": x_dim, "classes": classes, "z_dim": z_dim, "hidden": hidden,
                       "alpha": alpha}
        self.data_dim, self.num_classes, self.z_dim, self.alpha = x_dim, classes, z_dim, alpha
        self.classifier = nn.Linear(x_dim, classes)
        self.encoder = _mlp([x_dim + classes, hidden, 2 * z_dim])
        self.decoder = _mlp([z_dim + classes, hidden, x_dim])

    def _rows(self, x, y):
        if y is None:
            y = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        labelled = y >= 0
        return labelled, torch.where(labelled, y, 0)

    def _one_hot(self, y, like):
        return torch.nn.functional.one_hot(y, self.num_classes).to(like.dtype)

    def _q_z(self, x, y):
        batch = torch.broadcast_shapes(y.shape, x.shape[:-1])
        context = self._one_hot(y, x).expand(*batch, self.num_classes)
        loc, raw = self.encoder(torch.cat([x.expand(*batch, x.shape[-1]), context], -1)
                                ).chunk(2, -1)
        return dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1)

    def _p_x(self, y, z):
        batch = torch.broadcast_shapes(y.shape, z.shape[:-1])
        context = self._one_hot(y, z).expand(*batch, self.num_classes)
        logits = self.decoder(torch.cat([z.expand(*batch, z.shape[-1]), context], -1))
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)

    def model(self, x, y=None, num_data=None):
        pyro.module("hand_m2", self)
        labelled, label = self._rows(x, y)
        p_y = dist.Categorical(logits=x.new_zeros(self.num_classes))
        p_z = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
        with pyro_vae.lvm.data_plate(x, num_data):
            pyro.sample("y_obs", p_y.mask(labelled), obs=label)
            z_lab = pyro.sample("z_lab", p_z.mask(labelled))
            y_lat = pyro.sample("y", p_y)
            z_lat = pyro.sample("z", p_z.mask(~labelled))
            y_all = torch.where(labelled, label, y_lat)
            z_all = torch.where(labelled.unsqueeze(-1), z_lab, z_lat)
            pyro.sample("x", self._p_x(y_all, z_all), obs=x)
            log_q = dist.Categorical(logits=self.classifier(x)).log_prob(label)
            pyro.factor("classification", torch.where(labelled, self.alpha * log_q, 0.0))

    def guide(self, x, y=None, num_data=None):
        pyro.module("hand_m2", self)
        labelled, label = self._rows(x, y)
        with pyro_vae.lvm.data_plate(x, num_data):
            pyro.sample("z_lab", self._q_z(x, label).mask(labelled))
            logits = torch.where(labelled.unsqueeze(-1), x.new_zeros(self.num_classes),
                                 self.classifier(x))
            y_lat = pyro.sample("y", dist.Categorical(logits=logits),
                                infer={"enumerate": "parallel"})
            pyro.sample("z", self._q_z(x, y_lat).mask(~labelled))

    @torch.no_grad()
    def classify(self, x):
        return torch.softmax(self.classifier(x), -1)


# the command line finds them by name once this module is imported (--import lvm_models.py)
pyro_vae.register("model", "pyro-example")(ExampleVAE)
pyro_vae.register("model", "two-layer")(TwoLayerVAE)
pyro_vae.register("model", "hand-m2")(HandM2)
