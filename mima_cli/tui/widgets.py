"""Widgets of the dashboard: loss curves (textual-plotext), sample thumbnails (textual-image)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static
from textual_plotext import PlotextPlot

from mima_cli.tui.data import downsample, fmt_value

IMAGE_MODES = ("auto", "halfcell", "sixel", "tgp", "unicode", "none")
"""``--images``: how thumbnails are drawn. ``halfcell`` (coloured ▀ half blocks) works in every colour
terminal, over SSH and in tmux; ``sixel`` / ``tgp`` (kitty) are sharper where the terminal has them;
``auto`` asks the terminal, except inside tmux/screen and when not on a terminal (half blocks)."""

THUMB_PIXELS = 64
"""Images are scaled to this many pixels high when loaded (more than any thumbnail shows)."""


def in_multiplexer(env: Mapping[str, str] = os.environ) -> bool:
    """Inside tmux or GNU screen, where pixel graphics protocols are unreliable."""
    term = env.get("TERM", "")
    return bool(env.get("TMUX") or env.get("STY")) or term.startswith(("screen", "tmux"))


def unsized_terminal() -> bool:
    """stdout is a terminal that reports 0 columns or rows (a pty nobody has sized, e.g. ``stty rows 0 cols 0``)."""
    try:
        size = os.get_terminal_size(sys.__stdout__.fileno())  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
        return False
    return size.columns == 0 or size.lines == 0


def resolve_image_mode(mode: str = "auto", env: Mapping[str, str] = os.environ, isatty: bool | None = None,
                       unsized: bool | None = None) -> str:
    """The concrete renderer for ``mode`` (one of :data:`IMAGE_MODES`).

    ``auto`` must be resolved before the app starts: textual-image asks the terminal for Sixel and kitty
    graphics support when it is imported, which does not work once Textual owns the terminal. On a terminal
    that reports 0 columns or rows (``unsized``; None: :func:`unsized_terminal`) every mode is ``none``:
    textual-image divides the terminal's pixel size by its columns and rows when it is imported, and Textual
    draws such a terminal at 80x25 anyway.
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    if mode != "none" and (unsized_terminal() if unsized is None else unsized):
        return "none"
    if mode != "auto":
        return mode
    if isatty is None:
        isatty = bool(sys.__stdout__ and sys.__stdout__.isatty())
    if not isatty or in_multiplexer(env) or env.get("TEXTUAL_DRIVER"):
        return "halfcell"
    from textual_image.renderable import Image as Detected
    from textual_image.renderable import SixelImage, TGPImage

    if Detected is SixelImage:
        return "sixel"
    if Detected is TGPImage:
        return "tgp"
    return "halfcell"


def image_widget_class(mode: str) -> type[Widget] | None:
    """The textual-image widget class for a concrete mode (``none``: no images)."""
    if mode == "none":
        return None
    import textual_image.widget as tiw

    return {
        "halfcell": tiw.HalfcellImage,
        "sixel": tiw.SixelImage,
        "tgp": tiw.TGPImage,
        "unicode": tiw.UnicodeImage,
    }[mode]


def load_strip(paths: list[Path] | tuple[Path, ...]) -> Any:
    """The images at ``paths`` scaled to :data:`THUMB_PIXELS` high and put side by side (one RGB PIL
    image), or None if none can be read (not written yet, or deleted)."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                width = max(1, round(im.width * THUMB_PIXELS / max(im.height, 1)))
                images.append(im.resize((width, THUMB_PIXELS)))
        except (OSError, ValueError, SyntaxError):
            continue
    if not images:
        return None
    gap = 2 if len(images) > 1 else 0
    strip = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), THUMB_PIXELS))
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width + gap
    return strip


# ---------------------------------------------------------------------------------------- curves


PALETTE = ("cyan+", "orange+", "green+", "magenta+", "blue+", "yellow+", "red+", "white")
TWIN_PALETTE = ("cyan", "orange", "green", "magenta", "blue", "yellow", "red", "gray")


def step_ticks(low: float, high: float, count: int) -> list[float]:
    """At most ``count`` round integer ticks covering [low, high] (steps are integers)."""
    span = max(high - low, 1.0)
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), 10 * magnitude)
    step = max(1.0, float(round(step)))
    first = math.ceil(low / step) * step
    ticks = []
    t = first
    while t <= high + 1e-9:
        ticks.append(t)
        t += step
    return ticks or [low]


class CurvePlot(PlotextPlot):
    """One scalar group (e.g. ``inner_loss`` with a line per concept), optionally with a twin's lines."""

    DEFAULT_CSS = """
    CurvePlot { height: 12; width: 1fr; }
    """

    def __init__(self, group: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.twin: dict[str, list[tuple[float, float]]] = {}

    def set_series(
        self,
        series: dict[str, list[tuple[float, float]]],
        twin: dict[str, list[tuple[float, float]]] | None = None,
    ) -> None:
        self.series = {k: list(v) for k, v in series.items()}
        self.twin = {k: list(v) for k, v in (twin or {}).items()}
        self.refresh()

    def title_text(self) -> str:
        """``inner_loss  Van Gogh 0.12  Picasso 0.34``: the group and the last finite value of each line."""
        parts = [self.group]
        for label, points in self.series.items():
            last = next((y for _, y in reversed(points) if math.isfinite(y)), None)
            if last is not None:
                parts.append(fmt_value(last) if label == self.group else f"{label} {fmt_value(last)}")
        return "  ".join(parts)

    def render(self) -> Any:
        plt = self.plt
        plt.clear_data()
        limit = max(self.size.width * 2, 10)
        drawn = 0
        labelled = len(self.series) + len(self.twin) > 1
        for i, (label, points) in enumerate(self.series.items()):
            xs, ys = downsample(points, limit)
            if xs:
                plt.plot(xs, ys, marker="braille", color=PALETTE[i % len(PALETTE)], label=label if labelled else None)
                drawn += 1
        for i, (label, points) in enumerate(self.twin.items()):
            xs, ys = downsample(points, limit)
            if xs:
                plt.plot(xs, ys, marker="dot", color=TWIN_PALETTE[i % len(TWIN_PALETTE)], label=f"{label} (twin)")
                drawn += 1
        plt.title(self.title_text() if drawn else f"{self.group}: no finite values yet")
        plt.xlabel("step")
        xs = [x for points in (*self.series.values(), *self.twin.values()) for x, _ in points if math.isfinite(x)]
        if xs:
            ticks = step_ticks(min(xs), max(xs), max(2, self.size.width // 14))
            plt.xticks(ticks, [str(int(t)) for t in ticks])
        return super().render()


# ------------------------------------------------------------------------------------------ images


class Thumbnail(Vertical):
    """The latest image(s) of one name, with a caption; several seeds of one step side by side.

    Its children are fixed (caption, placeholder, image); :meth:`show` only updates them and toggles
    which one is displayed, so it can be called at any time, even before the widget is mounted. The
    image keeps its aspect ratio: its height is set in CSS, its width follows."""

    DEFAULT_CSS = """
    Thumbnail { width: 1fr; height: auto; padding: 0 1; }
    Thumbnail > .thumb-caption { width: 1fr; height: 1; text-style: bold; }
    Thumbnail > .thumb-image { width: auto; height: 8; }
    Thumbnail > .thumb-missing { width: auto; height: 1; color: $text-muted; }
    """

    def __init__(self, image_class: type[Widget] | None, caption: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_class = image_class
        self.caption = caption
        self.paths: tuple[Path, ...] = ()
        self.step: int | None = None
        self.image: Any = None
        self._shown: tuple[Any, ...] | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.caption, classes="thumb-caption", markup=False)
        yield Static("no image yet", classes="thumb-missing", markup=False)
        if self.image_class is not None:
            image = self.image_class(None, classes="thumb-image")
            image.display = False
            yield image

    def on_mount(self) -> None:
        self._apply()

    def show(self, caption: str, paths: list[Path] | tuple[Path, ...], step: int | None) -> None:
        """Show ``paths`` (read again only when they or the step changed, or could not be read)."""
        self.caption = caption
        paths = tuple(paths)
        if paths != self.paths or step != self.step or (paths and self.image is None):
            self.paths, self.step = paths, step
            self.image = load_strip(paths) if paths and self.image_class is not None else None
        if self.is_mounted:
            self._apply()

    @property
    def note(self) -> str:
        if self.image is not None:
            return ""
        if not self.paths:
            return "no image yet"
        return "(images off: --images)" if self.image_class is None else "image missing"

    def _apply(self) -> None:
        state = (self.caption, self.paths, self.step, id(self.image))
        if state == self._shown:
            return
        self._shown = state
        self.query_one(".thumb-caption", Static).update(self.caption)
        placeholder = self.query_one(".thumb-missing", Static)
        placeholder.update(self.note)
        placeholder.display = self.image is None
        if self.image_class is not None:
            widget = self.query_one(".thumb-image")
            if self.image is not None:
                widget.image = self.image  # type: ignore[attr-defined]
            widget.display = self.image is not None
