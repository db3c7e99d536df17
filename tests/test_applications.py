"""The applications of a trained VAE (``pyro_vae.applications``): interpolation, traversals,
anomaly detection, a linear probe of the representation, the latent scatter, reconstructions.

One small VAE is trained on digits once for the module; the anomaly and probe tests compare
against thresholds derived from chance (hypergeometric and binomial), not hand-picked numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from scipy.stats import hypergeom

from pyro_vae import VAE, fit
from pyro_vae.applications import (anomaly_scores, interpolate, latent_scatter,
                                   reconstructions, representation_probe, traverse)
from pyro_vae.data import from_array
from pyro_vae.errors import ConfigError


@pytest.fixture(scope="module")
def vae(digits):
    pyro.set_rng_seed(0)
    model = VAE(digits.data_shape, 8, hidden=(128,))
    fit(model, digits, "elbo", epochs=60, progress=False, device="cpu")
    return model


@pytest.fixture(scope="module")
def cvae(digits):
    pyro.set_rng_seed(0)
    model = VAE(digits.data_shape, 2, hidden=(32,), conditional=True, num_classes=10)
    fit(model, digits, "elbo", epochs=3, progress=False, device="cpu")
    return model


def renders(figure, tmp_path, name="figure.png"):
    """The figure has axes and saves to a non-empty PNG."""
    assert figure.axes
    path = tmp_path / name
    figure.savefig(path, dpi=40)
    return path.stat().st_size > 0


# -- interpolation ----------------------------------------------------------------------------

def test_interpolation_runs_from_one_posterior_mean_to_the_other(vae, digits, tmp_path):
    x_a, x_b = digits.test[0], digits.test[1]
    result = interpolate(vae, x_a, x_b, steps=7)
    assert result.t.shape == (7,) and result.latents.shape == (7, 8)
    assert result.images.shape == (7, 64) and result.labels is None
    ends = vae.posterior_mean(torch.stack([x_a, x_b]))
    # the endpoints are the posterior means, bit for bit ...
    assert torch.equal(result.latents[0], ends[0]) and torch.equal(result.latents[-1], ends[1])
    # ... and decode to their decodes (a batch of 7 vs 2 may round the last float bit apart)
    torch.testing.assert_close(result.images[[0, -1]], vae.decode(ends).mean,
                               rtol=0, atol=1e-6)
    # intermediate latents lie on the segment, at t = i / (steps - 1)
    torch.testing.assert_close(result.t, torch.linspace(0, 1, 7))
    expected = (1 - result.t)[:, None] * ends[0] + result.t[:, None] * ends[1]
    torch.testing.assert_close(result.latents, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.images, vae.decode(result.latents).mean)
    assert len(result.figure.axes) == 7
    assert renders(result.figure, tmp_path)


def test_spherical_interpolation_keeps_the_endpoints_and_leaves_the_segment(vae, digits):
    x_a, x_b = digits.test[2], digits.test[3]
    linear = interpolate(vae, x_a, x_b, steps=5)
    slerp = interpolate(vae, x_a, x_b.reshape(1, 8, 8), steps=5, spherical=True)
    assert torch.equal(slerp.latents[[0, -1]], linear.latents[[0, -1]])
    # slerp interpolates the norm between the endpoints' (linear shrinks it in between)
    norms = slerp.latents.norm(dim=1)
    low, high = sorted(norms[[0, -1]].tolist())
    assert bool(((norms >= low - 1e-5) & (norms <= high + 1e-5)).all())
    assert not torch.allclose(slerp.latents[2], linear.latents[2])


# -- traversal --------------------------------------------------------------------------------

def test_traversal_grid_is_dims_by_values(vae, digits, tmp_path):
    values = torch.linspace(-2, 2, 5)
    result = traverse(vae, digits.test[0], dims=[0, 3, 7], values=values)
    assert result.images.shape == (3, 5, 64) and result.latents.shape == (3, 5, 8)
    base = vae.posterior_mean(digits.test[:1])[0]
    torch.testing.assert_close(result.base, base)
    for row, d in enumerate([0, 3, 7]):
        assert torch.equal(result.latents[row, :, d], values)
        others = [k for k in range(8) if k != d]
        assert torch.equal(result.latents[row][:, others], base[others].expand(5, 7))
    assert len(result.figure.axes) == 15
    assert renders(result.figure, tmp_path)

    default = traverse(vae)
    assert default.images.shape == (8, 9, 64) and default.dims == list(range(8))
    assert torch.equal(default.base, torch.zeros(8))


# -- anomaly detection ------------------------------------------------------------------------

def test_anomaly_scores_find_corrupted_digits(vae, digits, tmp_path):
    x = digits.test.clone()
    n, corrupted_count = len(x), 18
    generator = torch.Generator().manual_seed(1)
    corrupted = torch.randperm(n, generator=generator)[:corrupted_count]
    noise, inverted = corrupted[: corrupted_count // 2], corrupted[corrupted_count // 2:]
    x[noise] = torch.rand(len(noise), x.shape[1], generator=generator)
    x[inverted] = 1 - x[inverted]

    result = anomaly_scores(vae, x, particles=1000, top=32)
    assert result.nll.shape == (n,) and torch.isfinite(result.nll).all()
    assert sorted(result.ranking.tolist()) == list(range(n))
    assert bool((result.nll[result.ranking].diff() <= 0).all())
    torch.testing.assert_close(result.nll, -result.evaluation.log_likelihood)

    decile = n // 10
    found = len(set(result.ranking[:decile].tolist()) & set(corrupted.tolist()))
    # under a random ranking, `found` is hypergeometric(population n, corrupted_count marked,
    # decile drawn): mean 1.8; demand more than its 99.9 % quantile
    threshold = hypergeom.ppf(0.999, n, corrupted_count, decile)
    print(f"\nanomaly detection: {found}/{corrupted_count} corrupted digits in the top "
          f"{decile} (chance mean {corrupted_count * decile / n:.1f}, "
          f"99.9 % quantile {threshold:.0f})")
    assert found > threshold, (found, threshold)
    assert len(result.figure.axes) == 32
    assert renders(result.figure, tmp_path)


def test_anomaly_scores_of_a_split_match_evaluate(vae, digits):
    from pyro_vae import evaluate

    result = anomaly_scores(vae, digits, split="val", particles=20, top=5)
    reference = evaluate(vae, digits, particles=20, split="val")
    assert torch.equal(result.nll, -reference.log_likelihood)
    assert len(result.figure.axes) == 5


# -- representation probe ---------------------------------------------------------------------

def test_probe_accuracy_is_well_above_chance(vae, digits, tmp_path):
    result = representation_probe(vae, digits)
    test_labels = digits.split_labels("test")
    n = len(test_labels)
    assert (result.num_train, result.num_test) == (len(digits.train), n)
    assert result.chance == pytest.approx(float(torch.bincount(test_labels).max()) / n)
    assert result.confusion.shape == (10, 10) and result.confusion.sum() == n
    assert result.accuracy == pytest.approx(np.trace(result.confusion) / n)
    band = result.chance + 3 * math.sqrt(result.chance * (1 - result.chance) / n)
    print(f"\nprobe: test accuracy {result.accuracy:.3f} (chance {result.chance:.3f}, "
          f"3σ band {band:.3f}, n = {n})")
    assert result.accuracy > band, (result.accuracy, band)
    assert renders(result.figure, tmp_path)


# -- latent scatter ---------------------------------------------------------------------------

def test_latent_scatter_projects_with_pca_and_colours_by_class(vae, digits, tmp_path):
    result = latent_scatter(vae, digits)
    assert result.coordinates.shape == (len(digits.test), 2) and result.method == "pca"
    assert result.explained_variance.shape == (2,)
    ax = result.figure.axes[0]
    assert "PC 1" in ax.get_xlabel() and "PC 2" in ax.get_ylabel()
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(ax.collections) == 10 and len(colours) == 10
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(digits.test)
    assert renders(result.figure, tmp_path)


@pytest.mark.parametrize("latent_dim,method", [(1, "index"), (2, "latent")])
def test_latent_scatter_in_one_and_two_dimensions(digits, latent_dim, method):
    small = VAE(digits.data_shape, latent_dim, hidden=(16,))
    result = latent_scatter(small, digits, split="val")
    means = small.posterior_mean(digits.val)
    assert result.method == method and result.coordinates.shape == (len(digits.val), 2)
    assert torch.equal(result.coordinates[:, -1], means[:, -1])
    if latent_dim == 1:
        assert torch.equal(result.coordinates[:, 0], torch.arange(len(digits.val)).float())


# -- reconstructions --------------------------------------------------------------------------

def test_reconstructions_are_decoded_posterior_means(vae, digits, tmp_path):
    result = reconstructions(vae, digits.test, n=12)
    assert result.originals.shape == result.reconstructions.shape == (12, 64)
    assert torch.equal(result.originals, digits.test[:12])
    torch.testing.assert_close(result.reconstructions, vae.reconstruct(digits.test[:12]))
    assert len(result.figure.axes) == 2 * 12
    assert renders(result.figure, tmp_path)


# -- conditional VAE --------------------------------------------------------------------------

def test_conditional_vae_takes_the_split_labels(cvae, digits, tmp_path):
    labels = digits.split_labels("test")
    result = interpolate(cvae, digits.test[0], digits.test[1], steps=6,
                         y=(labels[0], labels[1]))
    ends = cvae.posterior_mean(digits.test[:2], labels[:2])
    assert torch.equal(result.latents[[0, -1]], ends)
    assert result.labels.tolist() == [int(labels[0])] * 3 + [int(labels[1])] * 3
    torch.testing.assert_close(result.images[[0, -1]], cvae.decode(ends, labels[:2]).mean,
                               rtol=0, atol=1e-6)

    scores = anomaly_scores(cvae, digits, particles=20, top=8)
    assert scores.nll.shape == (len(digits.test),) and torch.isfinite(scores.nll).all()
    by_tensor = anomaly_scores(cvae, digits.test, particles=20, top=8, labels=labels)
    assert torch.equal(scores.nll, by_tensor.nll)
    with pytest.raises(ConfigError, match="needs labels"):
        anomaly_scores(cvae, digits.test, particles=2)

    assert traverse(cvae, digits.test[0], y=int(labels[0])).images.shape == (2, 9, 64)
    assert latent_scatter(cvae, digits).method == "latent"
    assert reconstructions(cvae, digits.test, y=labels, n=4).reconstructions.shape == (4, 64)
    assert renders(result.figure, tmp_path)


# -- non-image data ---------------------------------------------------------------------------

def test_vector_data_get_line_histogram_and_heat_map_figures(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 5, generator=generator)
    data = from_array(x.numpy(), labels=(x[:, 0] > 0.5).long().numpy())
    small = VAE(5, 3, hidden=(16,))
    figures = [
        interpolate(small, data.test[0], data.test[1]).figure,
        traverse(small, dims=[0, 2]).figure,
        anomaly_scores(small, data, particles=10, top=3).figure,
        representation_probe(small, data).figure,
        latent_scatter(small, data).figure,
        reconstructions(small, data.test).figure,
    ]
    for i, figure in enumerate(figures):
        assert renders(figure, tmp_path, f"{i}.png")


# -- bad input --------------------------------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_probe_refuses_unlabelled_data(vae, digits):
    unlabelled = from_array(torch.cat([digits.train, digits.val, digits.test]).numpy())
    with pytest.raises(ConfigError) as excinfo:
        representation_probe(vae, unlabelled)
    assert "labelled" in one_line(excinfo)


def test_interpolate_refuses_a_datapoint_of_the_wrong_dimension(vae, digits):
    with pytest.raises(ConfigError) as excinfo:
        interpolate(vae, digits.test[0], torch.rand(63))
    assert "x_b" in one_line(excinfo) and "64" in one_line(excinfo)
    with pytest.raises(ConfigError):
        interpolate(vae, digits.test[:2], digits.test[2])  # two datapoints, not one


@pytest.mark.parametrize("call", [
    lambda vae, d: interpolate(vae, d.test[0], d.test[1], steps=1),
    lambda vae, d: traverse(vae, dims=[8]),
    lambda vae, d: traverse(vae, values=[]),
    lambda vae, d: traverse(vae, y=3),
    lambda vae, d: anomaly_scores(vae, d.test[:, :10], particles=2),
    lambda vae, d: anomaly_scores(vae, d, top=-1),
    lambda vae, d: reconstructions(vae, d.test, n=0),
    lambda vae, d: latent_scatter(vae, d.test, labels=torch.zeros(3)),
])
def test_bad_arguments_fail_in_one_line(vae, digits, call):
    with pytest.raises(ConfigError) as excinfo:
        call(vae, digits)
    one_line(excinfo)
