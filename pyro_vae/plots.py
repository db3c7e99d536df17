"""Figures written to a run directory: reconstructions, samples, and the loss curves.

Every figure is written atomically (:func:`pyro_vae.runs.atomic_write`): a full disk or a crash
leaves the previous figure, never an empty or torn PNG.

The files of a run are drawn with PIL: image grids as torchvision writes them (without its
import), the loss curves by :func:`loss_image`. matplotlib is imported only for what asks for it
(:func:`loss_figure` in a notebook, a loss figure saved as PDF or SVG), and then without pyplot
(a :class:`matplotlib.figure.Figure` saved through the Agg canvas), so every file can be written
from a background thread (:func:`pyro_vae.training.write_figures`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch


def as_images(x: torch.Tensor, data_shape: Sequence[int]) -> torch.Tensor:
    """``[n, D]`` → ``[n, C, H, W]`` for image data; non-image vectors become 1×1×D strips."""
    if len(data_shape) == 3:
        return x.reshape(-1, *data_shape)
    return x.reshape(x.shape[0], 1, 1, -1)


def _image_format(path: Path) -> str:
    """The image format that the name of ``path`` asks for (PNG without a known suffix)."""
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix) or "png"


def _make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """``torchvision.utils.make_grid`` (unnormalized), pixel for pixel, without importing
    torchvision (about half a second): ``[n, C, H, W]`` → ``[3, H', W']`` (one channel is
    repeated into three), ``nrow`` images per row, ``padding`` pixels of ``pad_value`` around and
    between them; a single image is returned unpadded."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.shape[1] == 1:
        images = torch.cat((images, images, images), 1)
    if images.shape[0] == 1:
        return images.squeeze(0)
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, cell_h * rows + padding, cell_w * columns + padding),
                           pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        grid[:, y * cell_h + padding:(y + 1) * cell_h,
             x * cell_w + padding:(x + 1) * cell_w] = images[k]
    return grid


def _save_image(grid: torch.Tensor, path: str | Path) -> Path:
    """A ``[3, H, W]`` grid in [0, 1] written as ``torchvision.utils.save_image`` writes it
    (pixels ``⌊255·v + 0.5⌋`` clamped to 0…255, through PIL), into a temporary file renamed over
    ``path``."""
    from PIL import Image

    from .runs import atomic_write

    path = Path(path)
    pixels = (_make_grid(grid).mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0)
              .to("cpu", torch.uint8).numpy())
    image = Image.fromarray(pixels)
    atomic_write(path, lambda stream: image.save(stream, format=_image_format(path)))
    return path


def save_grid(x: torch.Tensor, data_shape: Sequence[int], path: str | Path, nrow: int = 8) -> Path:
    """Save datapoints as an image grid (values clamped to [0, 1], upscaled for small images)."""
    return _save_image(image_grid(x, data_shape, nrow), path)


def save_reconstructions(vae, x: torch.Tensor, path: str | Path, n: int = 32,
                         labels: torch.Tensor | None = None) -> Path:
    """Originals (odd rows) above their reconstructions (even rows)."""
    return _save_image(reconstruction_grid(vae, x, n, labels), path)


def save_samples(vae, path: str | Path, n: int = 64) -> Path:
    """Decoder means of ``n`` draws from the prior."""
    return _save_image(sample_grid(vae, n), path)


def loss_figure(history: list[dict]) -> "Figure":
    """Training loss and validation ELBO (nats per datapoint) against the epoch (a pyplot
    figure: shown by a notebook; :func:`save_loss` draws the same without pyplot)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    _draw_loss(fig, ax, history)
    return fig


def _draw_loss(fig, ax, history: list[dict]) -> None:
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [-row["train_loss"] for row in history], label="train bound (−loss)")
    ax.plot(epochs, [row["val_elbo"] for row in history], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()


def save_loss(history: list[dict], path: str | Path) -> Path:
    """The curves of :func:`loss_figure` saved (atomically) to ``path``. A raster format (PNG,
    JPEG, …) is drawn with PIL (:func:`loss_image`: no matplotlib import, about half a second
    of a short job); another (PDF, SVG) with matplotlib, on a figure of its own, not through
    pyplot (no global figure state: safe in any thread, and nothing to close)."""
    from .runs import atomic_write

    path = Path(path)
    fmt = _image_format(path)
    if fmt in _RASTER_FORMATS:
        image = loss_image(history)
        atomic_write(path, lambda stream: image.save(stream, format=fmt))
        return path
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    _draw_loss(fig, fig.add_subplot(), history)
    fmt = fmt if fmt in fig.canvas.get_supported_filetypes() else "png"
    atomic_write(path, lambda stream: fig.savefig(stream, format=fmt, dpi=100))
    return path


_RASTER_FORMATS = ("png", "jpeg", "bmp", "gif", "tiff", "webp")
# matplotlib's default colours (tab:blue, tab:orange) and light grid, as loss_figure draws them
_SERIES = (("train bound (−loss)", (31, 119, 180)), ("validation ELBO", (255, 127, 14)))
_GRID, _AXES, _TEXT = (231, 231, 231), (0, 0, 0), (0, 0, 0)


def nice_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """At most ``most`` round tick values (steps of 1, 2, 2.5 or 5 × 10^k) covering
    [``low``, ``high``], as an axis of matplotlib would place them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(most - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    ticks = [(first + i) * step for i in range(int(math.floor(high / step + 1e-9)) - first + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _tick_label(value: float, ticks: list[float]) -> str:
    """``value`` with as many decimals as the ticks' step needs (0.025: three)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(12)
                     if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6 * step * 10 ** d), 12)
    return f"{value:.{decimals}f}"


def _plotted(point: tuple[float, float] | None) -> bool:
    """Whether a curve's (epoch, value) is drawn: present and finite."""
    return point is not None and math.isfinite(point[0]) and math.isfinite(point[1])


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def loss_image(history: list[dict], width: int = 600, height: int = 350):
    """The training bound (−loss) and the validation ELBO against the epoch, as a PIL image of
    ``width`` × ``height`` pixels: the curves of :func:`loss_figure` (same colours, grid, axis
    labels and legend), drawn with PIL at twice the size and scaled down (smooth lines). Points
    that are not finite are left out, and a curve is broken there."""
    from PIL import Image, ImageDraw

    scale = 2
    W, H = width * scale, height * scale
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    font, label_font = _font(13 * scale), _font(14 * scale)  # matplotlib's 10 pt at 100 dpi
    series = []
    for name, colour in _SERIES:
        points = []
        for row in history:
            value = -row["train_loss"] if name.startswith("train") else row["val_elbo"]
            epoch = row["epoch"]
            points.append((float(epoch), float(value)) if value is not None else None)
        series.append((name.replace("−", "-"), colour, points))  # PIL's font lacks U+2212
    finite = [p for _, _, ps in series for p in ps if _plotted(p)]
    xs, ys = [p[0] for p in finite] or [0.0, 1.0], [p[1] for p in finite] or [0.0, 1.0]

    def limits(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        if high == low:
            pad = abs(low) * 0.05 or 0.5
            return low - pad, high + pad
        pad = 0.05 * (high - low)  # matplotlib's default margins
        return low - pad, high + pad

    (x0, x1), (y0, y1) = limits(xs), limits(ys)
    x_ticks = [t for t in nice_ticks(x0, x1, 9) if x0 <= t <= x1]
    y_ticks = [t for t in nice_ticks(y0, y1, 9) if y0 <= t <= y1]
    y_labels = [_tick_label(t, y_ticks) for t in y_ticks]
    label_width = max((draw.textlength(t, font=font) for t in y_labels), default=0)
    left = int(label_width + 8 * scale + 14 * scale + 14 * scale)
    right, top, bottom = W - 12 * scale, 10 * scale, H - 46 * scale

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for t in x_ticks:  # grid, ticks and their labels
        draw.line([(px(t), top), (px(t), bottom)], fill=_GRID, width=scale)
        draw.line([(px(t), bottom), (px(t), bottom + 4 * scale)], fill=_AXES, width=scale)
        text = _tick_label(t, x_ticks)
        draw.text((px(t), bottom + 6 * scale), text, fill=_TEXT, font=font, anchor="ma")
    for t, text in zip(y_ticks, y_labels):
        draw.line([(left, py(t)), (right, py(t))], fill=_GRID, width=scale)
        draw.line([(left - 4 * scale, py(t)), (left, py(t))], fill=_AXES, width=scale)
        draw.text((left - 6 * scale, py(t)), text, fill=_TEXT, font=font, anchor="rm")
    for name, colour, points in series:  # the curves, broken where a value is not finite
        run: list[tuple[float, float]] = []
        for p in [*points, None]:
            if _plotted(p):
                run.append((px(p[0]), py(p[1])))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2 * scale, joint="curve")
            elif run:  # a lone point
                (cx, cy), r = run[0], 2 * scale
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            run = []
    draw.rectangle([left, top, right, bottom], outline=_AXES, width=scale)
    draw.text(((left + right) / 2, H - 4 * scale), "epoch", fill=_TEXT, font=label_font,
              anchor="md")
    ylabel = "nats per datapoint"
    box = draw.textbbox((0, 0), ylabel, font=label_font)
    strip = Image.new("RGB", (box[2] - box[0] + 2, box[3] - box[1] + 2), "white")
    ImageDraw.Draw(strip).text((-box[0] + 1, -box[1] + 1), ylabel, fill=_TEXT, font=label_font)
    strip = strip.rotate(90, expand=True)
    image.paste(strip, (4 * scale, int((top + bottom - strip.height) / 2)))
    _legend(draw, series, font, scale, (left, top, right, bottom), px, py)
    return image.resize((width, height), Image.LANCZOS)


def _legend(draw, series, font, scale: int, frame, px, py) -> None:
    """The legend in the corner of the plot that the fewest points fall in (as matplotlib's
    ``loc="best"`` does)."""
    left, top, right, bottom = frame
    row_h, swatch, pad = 20 * scale, 26 * scale, 6 * scale
    text_w = max(draw.textlength(name, font=font) for name, _, _ in series)
    box_w, box_h = pad * 3 + swatch + text_w, pad * 2 + row_h * len(series)
    corners = [(right - pad - box_w, top + pad), (left + pad, top + pad),
               (right - pad - box_w, bottom - pad - box_h), (left + pad, bottom - pad - box_h)]
    points = [(px(p[0]), py(p[1])) for _, _, ps in series for p in ps if _plotted(p)]

    def covered(corner) -> int:
        x, y = corner
        return sum(x <= u <= x + box_w and y <= v <= y + box_h for u, v in points)

    x, y = min(corners, key=covered)
    draw.rounded_rectangle([x, y, x + box_w, y + box_h], radius=3 * scale, fill="white",
                           outline=(204, 204, 204), width=scale)
    for i, (name, colour, _) in enumerate(series):
        middle = y + pad + row_h * i + row_h / 2
        draw.line([(x + pad, middle), (x + pad + swatch, middle)], fill=colour, width=2 * scale)
        draw.text((x + 2 * pad + swatch, middle), name, fill=_TEXT, font=font, anchor="lm")


# -- the same figures as image tensors (for experiment trackers: TensorBoard, MLflow) ----------

def image_grid(x: torch.Tensor, data_shape: Sequence[int], nrow: int = 8) -> torch.Tensor:
    """Datapoints as an image grid (values clamped to [0, 1], upscaled for small images): a
    ``[3, H, W]`` float tensor in [0, 1] on the CPU."""
    images = as_images(x.detach().float().cpu(), data_shape).clamp(0, 1)
    if images.shape[-1] < 32 and images.shape[-2] > 1:
        factor = max(1, 32 // images.shape[-1])
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    return _make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def reconstruction_grid(vae, x: torch.Tensor, n: int = 32,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """The image of :func:`save_reconstructions` (originals above their reconstructions) as a
    ``[3, H, W]`` tensor in [0, 1]."""
    return image_grid(reconstruction_rows(vae, x, n, labels), _data_shape(vae), nrow=8)


def reconstruction_rows(vae, x: torch.Tensor, n: int = 32,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's part of :func:`reconstruction_grid`: the first ``n`` datapoints and their
    reconstructions, in alternating rows of 8 (``[2n, D]``)."""
    x = x[:n]
    recon = vae.reconstruct(x) if labels is None else vae.reconstruct(x, labels[:n])
    rows = []
    for start in range(0, x.shape[0], 8):
        rows.extend([x[start:start + 8], recon[start:start + 8]])
    return torch.cat(rows)


def sample_grid(vae, n: int = 64) -> torch.Tensor:
    """The image of :func:`save_samples` (decoder means of ``n`` prior draws) as a
    ``[3, H, W]`` tensor in [0, 1]."""
    return image_grid(vae.sample(n), _data_shape(vae), nrow=max(1, int(n ** 0.5)))


def _data_shape(vae) -> tuple[int, ...]:
    shape = getattr(vae, "data_shape", None)
    return tuple(shape) if shape is not None else (int(vae.data_dim),)
