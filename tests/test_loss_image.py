"""loss.png drawn with PIL: round ticks, the two curves where the numbers put them, gaps where
a value is not finite, and no matplotlib import."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from pyro_vae.plots import _tick_label, loss_image, nice_ticks

BLUE, ORANGE = "blue", "orange"  # matplotlib's tab:blue (31, 119, 180), tab:orange (255, 127, 14)


def _mask(image, colour):
    """The pixels of one curve (anti-aliased: mixed with the white around them)."""
    r, g, b = np.moveaxis(np.asarray(image).astype(int), -1, 0)
    return (b - r > 60) if colour == BLUE else (r - b > 100)


def _history(train, val):
    return [{"epoch": e + 1, "train_loss": -t, "val_elbo": v}
            for e, (t, v) in enumerate(zip(train, val))]


@pytest.mark.parametrize("low, high, most, expected", [
    (0.0, 1.0, 7, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (-86.5, -21.7, 9, [-80.0, -70.0, -60.0, -50.0, -40.0, -30.0]),
    (-9.95, 209.95, 9, [0.0, 50.0, 100.0, 150.0, 200.0]),
    (0.9, 1.1, 9, [0.9 + 0.025 * i for i in range(9)]),
    (0.9, 1.1, 5, [0.9, 0.95, 1.0, 1.05, 1.1]),
    (3.0, 3.0, 9, [3.0]),
    (0.0, math.inf, 9, []),
])
def test_ticks_are_round_and_cover_the_range(low, high, most, expected):
    assert nice_ticks(low, high, most) == pytest.approx(expected)


def test_ticks_of_any_range_step_by_one_two_two_and_a_half_or_five():
    rng = np.random.default_rng(0)
    for _ in range(200):
        low = float(rng.normal(0, 10 ** rng.uniform(-3, 4)))
        high = low + float(10 ** rng.uniform(-4, 5))
        ticks = nice_ticks(low, high, 9)
        assert 2 <= len(ticks) <= 9
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0])
        mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
        assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5, 10)) < 1e-6
        assert low - 1e-9 * abs(steps[0]) <= ticks[0] < low + steps[0]
        assert high - steps[0] < ticks[-1] <= high + 1e-9 * abs(steps[0])


@pytest.mark.parametrize("value, ticks, text", [
    (0.925, [0.9, 0.925], "0.925"), (-30.0, [-40.0, -30.0], "-30"), (1e-4, [0.0, 1e-4], "0.0001"),
    (250.0, [0.0, 250.0], "250"), (2.5, [0.0, 2.5], "2.5")])
def test_tick_labels_carry_the_decimals_their_step_needs(value, ticks, text):
    assert _tick_label(value, ticks) == text


def _frame_rows(image):
    """The top and bottom rows of the plot's black frame."""
    pixels = np.asarray(image).astype(int)
    grey_dark = (pixels.max(-1) < 160) & (pixels.max(-1) - pixels.min(-1) < 30)
    rows = np.nonzero(grey_dark.sum(1) > image.size[0] // 2)[0]
    middle = image.size[1] / 2
    return rows[rows < middle].mean(), rows[rows > middle].mean()


def test_the_curves_lie_where_their_values_put_them():
    # the train bound at -30 throughout, the validation ELBO falling from -40 to -80: the
    # y axis then spans -82.5 .. -27.5 (5 % margins) over the frame's height
    epochs = 50
    image = loss_image(_history([-30.0] * epochs, np.linspace(-40, -80, epochs)))
    assert image.size == (600, 350)
    top, bottom = _frame_rows(image)
    per_nat = (bottom - top) / 55.0

    def row_of(value):
        return top + (-27.5 - value) * per_nat

    blue, orange = _mask(image, BLUE), _mask(image, ORANGE)
    middle = slice(270, 560)  # clear of a legend in a left corner (it sits lower left here)
    blue_rows = np.nonzero(blue[:, middle].any(1))[0]
    assert abs(blue_rows.mean() - row_of(-30.0)) < 2
    assert blue_rows.max() - blue_rows.min() <= 3  # one flat line
    orange_x, orange_y = np.nonzero(orange.T)
    right_end = orange_y[orange_x > orange_x.max() - 3].mean()
    assert abs(right_end - row_of(-80.0)) < 3
    # the falling line's slope: 40 nats over the epochs' span
    span = orange_x.max() - np.nonzero(blue.any(0))[0].min()
    inside = (orange_x > 300) & (orange_x < 500)
    slope = np.polyfit(orange_x[inside], orange_y[inside], 1)[0]
    assert slope == pytest.approx(40 * per_nat / span, rel=0.05)


def test_a_value_that_is_not_finite_breaks_its_curve():
    values = np.linspace(-60, -20, 40)
    val = values.copy()
    val[20] = math.nan
    image = loss_image(_history(values - 5, val))
    orange = _mask(image, ORANGE)
    columns = np.nonzero(orange[:, :].any(0))[0]
    gaps = np.diff(columns)
    assert gaps.max() > 8  # a break around epoch 21 (one epoch is ~13 px)
    blue_columns = np.nonzero(_mask(image, BLUE).any(0))[0]
    blue_columns = blue_columns[(blue_columns > columns.min()) & (blue_columns < columns.max())]
    assert np.diff(blue_columns).max() <= 2  # the other curve is whole


@pytest.mark.parametrize("history", [
    [],
    [{"epoch": 1, "train_loss": 30.0, "val_elbo": -31.0}],
    [{"epoch": 1, "train_loss": math.inf, "val_elbo": math.nan}],
    [{"epoch": e, "train_loss": 5.0, "val_elbo": -5.0} for e in range(1, 4)],
])
def test_degenerate_histories_still_give_a_figure(history):
    image = loss_image(history)
    assert image.size == (600, 350)
    if len(history) == 1 and math.isfinite(history[0]["train_loss"]):
        assert _mask(image, BLUE)[:, 60:].any() and _mask(image, ORANGE)[:, 60:].any()


def test_a_png_loss_figure_does_not_import_matplotlib(tmp_path):
    script = ("import sys\nfrom pyro_vae import plots\n"
              "plots.save_loss([{'epoch': 1, 'train_loss': 3.0, 'val_elbo': -3.0}], sys.argv[1])\n"
              "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "loss.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
