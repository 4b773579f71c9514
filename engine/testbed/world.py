"""The testbed's procedural concept world: seeded 64x64 RGB renders of styles, objects and personal instances.

Everything mima measures on the testbed is grounded here. Concepts:

- **styles** (stand-ins for artists): texture families recognisable by their pattern and stroke. Palettes are
  drawn from one shared distribution for every style, so colour alone never identifies a style.
  Prompt: ``"an artwork of {style}"``.
- **objects** (stand-ins for object classes): silhouettes with random position, scale, rotation, colour and
  background. Prompt: ``"a photo of a {object}"``. Half of them wear a *look* made of the parts personal instances
  are made of (a named body colour, an accent region in a named colour, a detail), and training prompts name some
  or all of it (``"a photo of a red star with yellow tips and a white centre"``), as captions name what a photo
  shows: so a personal instance is one point of a distribution the base model already draws and its prompt can
  steer, as a CustomConcept101 subject is for Stable Diffusion.
- **compositions**: an object drawn in a style (textured background, the silhouette filled with the same
  texture in a contrasting palette, outlined). Prompt: ``"a photo of a {object}, artwork of {style}"``.
- **personal instances** (stand-ins for CustomConcept101 subjects): one specific object with one specific look
  (colour, pattern, detail). The base model is never trained on them. Prompt: ``"a photo of {token} {object}"``.
- **class prompts** for regularisation: ``"artwork"`` (generic smooth abstract art, none of the styles),
  ``"object"`` (generic blobs, none of the objects) and each object's own prompt.

Every image is a pure function of ``(item, seed)``: :func:`render` draws from ``numpy.random.default_rng(seed)``.

One module of ~700 lines on purpose: the shipped testbed weights and judge were trained on exactly these renders, so
the concept tables, colours, textures, silhouettes and prompts are read (and changed) together, and a split would
only spread one seeded drawing order over several files.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 4  # supersampling factor for silhouettes (anti-aliasing)

STYLES: tuple[str, ...] = (
    "strieker",  # straight parallel stripes
    "pointelle",  # polka dots on a grid
    "checkov",  # rotated checkerboard
    "wavell",  # wavy sinusoidal bands
    "ringo",  # concentric rings around an off-centre point
    "hatcher",  # thin crosshatched lines
    "cellini",  # Voronoi cells with dark borders
    "zigler",  # bands bent into steep zigzag chevrons
)
OBJECTS: tuple[str, ...] = ("star", "heart", "moon", "cross", "arrow", "house", "tree", "fish")


@dataclass(frozen=True)
class Personal:
    """A personal instance: one specific object with a fixed look."""

    name: str
    object: str
    body: tuple[int, int, int]
    pattern: str  # one of PATTERNS
    accent: tuple[int, int, int]
    detail: str  # one of DETAILS
    description: str


PERSONAL: tuple[Personal, ...] = (
    Personal("redstar", "star", (220, 40, 40), "tips", (250, 220, 40), "center", "red star, yellow tips, white centre"),
    Personal("blueheart", "heart", (40, 80, 220), "lower", (245, 245, 245), "outline", "blue heart, white lower half, black outline"),
    Personal("greenfish", "fish", (40, 170, 70), "side", (250, 140, 20), "eye", "green fish, orange tail half, big eye"),
    Personal("purplehouse", "house", (130, 50, 170), "plain", (250, 220, 40), "door", "purple house, yellow door"),
    Personal("orangemoon", "moon", (250, 140, 20), "lower", (60, 30, 10), "halo", "orange moon, dark lower half, white halo"),
    Personal("tealcross", "cross", (20, 170, 170), "band", (230, 40, 170), "center", "teal cross, magenta bar, white centre"),
)
PATTERNS = ("tips", "lower", "side", "band", "plain")
"""The accent regions of a personal instance, each a coarse part of the silhouette (25-60% of it, where no detail is
drawn over it): the outer tips, the lower half, the far side, a central band, or none. Fine marks (dots, stripes,
checks, spots of 7-10 px) were learned by no attack within 160 steps on the testbed UNet (docs/testbed.md)."""
DETAILS = ("eye", "center", "door", "outline", "halo")
PERSONAL_BY_NAME = {p.name: p for p in PERSONAL}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (250, 140, 20), "yellow": (250, 220, 40), "green": (40, 170, 70),
    "teal": (20, 170, 170), "blue": (40, 80, 220), "purple": (130, 50, 170), "magenta": (230, 40, 170),
    "white": (245, 245, 245), "brown": (60, 30, 10),
}
"""The named colours of looks; every personal instance's body and accent is one of them."""
_PATTERN_WORDS = {"tips": "tips", "lower": "lower half", "side": "back half", "band": "bar"}
_DETAIL_WORDS = {"eye": "an eye", "center": "a white centre", "door": "a door", "outline": "a black outline",
                 "halo": "a white halo"}
LOOK_SHARE = 0.5
"""The share of ordinary object images that wear a look (the rest are one random colour)."""


@dataclass(frozen=True)
class Look:
    """What a prompt says about an object's look; a part left ``None`` is drawn at random when the image is rendered.
    ``pattern`` (one of PATTERNS) comes with its ``accent`` colour, unless it is "plain"."""

    body: str
    pattern: str | None = None
    accent: str | None = None
    detail: str | None = None

    def phrase(self, obj: str) -> str:
        """``"red star with yellow tips and a white centre"``, ``"plain purple house with a door"``."""
        words = f"{'plain ' if self.pattern == 'plain' else ''}{self.body} {obj}"
        parts = [f"{self.accent} {_PATTERN_WORDS[self.pattern]}"] if self.pattern not in (None, "plain") else []
        if self.detail:
            parts.append(_DETAIL_WORDS[self.detail])
        return words + (" with " + " and ".join(parts) if parts else "")

    def labels(self) -> tuple[int, int, int, int]:
        """Indices of (body, pattern, accent, detail) in COLOURS / PATTERNS / COLOURS / DETAILS; unnamed = len()."""
        names = list(COLOURS)
        return (names.index(self.body), PATTERNS.index(self.pattern) if self.pattern else len(PATTERNS),
                names.index(self.accent) if self.accent else len(COLOURS),
                DETAILS.index(self.detail) if self.detail else len(DETAILS))


NO_LOOK = (len(COLOURS), len(PATTERNS), len(COLOURS), len(DETAILS))


def _colour_name(rgb: tuple[int, int, int]) -> str:
    return next(name for name, c in COLOURS.items() if c == tuple(rgb))


def personal_look(p: Personal) -> tuple[str, str, str, str | None]:
    """A personal instance's whole look as colour names: (body, pattern, accent, detail)."""
    return _colour_name(p.body), p.pattern, _colour_name(p.accent), p.detail

CLASS_PROMPTS = {"artwork": "artwork", "object": "object"}


def style_prompt(style: str) -> str:
    return f"an artwork of {style}"


def object_prompt(obj: str, look: Look | None = None) -> str:
    return f"a photo of a {look.phrase(obj) if look else obj}"


def composition_prompt(obj: str, style: str) -> str:
    return f"a photo of a {obj}, artwork of {style}"


def personal_prompt(token: str, obj: str) -> str:
    return f"a photo of {token} {obj}"


@dataclass(frozen=True)
class Item:
    """What one image shows. ``generic`` is "artwork" or "object" for class-prompt images."""

    style: str | None = None
    object: str | None = None
    personal: str | None = None
    generic: str | None = None
    look: Look | None = None  # an object's look, as its prompt names it

    def prompt(self, token: str | None = None) -> str:
        if self.generic is not None:
            return CLASS_PROMPTS[self.generic]
        if self.personal is not None:
            p = PERSONAL_BY_NAME[self.personal]
            return personal_prompt(token or p.name, p.object)
        if self.style and self.object:
            return composition_prompt(self.object, self.style)
        if self.style:
            return style_prompt(self.style)
        if self.object:
            return object_prompt(self.object, self.look)
        raise ValueError("empty item")

    def look_labels(self) -> tuple[int, int, int, int]:
        """What the prompt names of the look (see :meth:`Look.labels`); :data:`NO_LOOK` for every other item."""
        return self.look.labels() if self.look else NO_LOOK

    def labels(self) -> tuple[int, int, int]:
        """Judge labels (style, object, personal); the last index of each head means "none"."""
        s = STYLES.index(self.style) if self.style else len(STYLES)
        if self.personal:
            o = OBJECTS.index(PERSONAL_BY_NAME[self.personal].object)
        else:
            o = OBJECTS.index(self.object) if self.object else len(OBJECTS)
        p = [q.name for q in PERSONAL].index(self.personal) if self.personal else len(PERSONAL)
        return s, o, p


def item_for(concept: str) -> Item:
    """The item drawn for a concept name: a style, an object, a personal instance or a class prompt."""
    if concept in STYLES:
        return Item(style=concept)
    if concept in OBJECTS:
        return Item(object=concept)
    if concept in PERSONAL_BY_NAME:
        return Item(personal=concept)
    if concept in CLASS_PROMPTS:
        return Item(generic=concept)
    known = ", ".join((*STYLES, *OBJECTS, *PERSONAL_BY_NAME, *CLASS_PROMPTS))
    raise KeyError(f"unknown testbed concept {concept!r}; known: {known}")


# ----------------------------------------------------------------------------------------------- colours


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.25, 1.0)
    return np.array(_hsv_to_rgb(h, s, v), dtype=np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _palette(rng: np.random.Generator, n: int, min_contrast: float = 0.3) -> list[np.ndarray]:
    """n colours whose first two differ in luminance by at least ``min_contrast`` (visible in grayscale)."""
    a = _random_colour(rng)
    for _ in range(100):
        b = _random_colour(rng)
        if abs(_luma(a) - _luma(b)) >= min_contrast:
            break
    else:
        b = np.clip(1.0 - a, 0, 1)
    rest = [_random_colour(rng) for _ in range(n - 2)]
    return [a, b, *rest]


# ----------------------------------------------------------------------------------------------- textures


def _grid(n: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(n, dtype=np.float32) + 0.5) * (SIZE / n)
    return np.meshgrid(ax, ax, indexing="xy")


def _smooth_noise(rng: np.random.Generator, cells: int, n: int = SIZE) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random ``cells x cells`` grid, bicubically upsampled."""
    g = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    up = np.asarray(Image.fromarray(g).resize((n, n), Image.BICUBIC), dtype=np.float32)
    return up / 127.5 - 1.0


def _rot(x: np.ndarray, y: np.ndarray, angle: float, cx: float = SIZE / 2, cy: float = SIZE / 2):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return c * dx - s * dy, s * dx + c * dy


def _edge(v: np.ndarray, width: float = 0.6) -> np.ndarray:
    """Anti-aliased step: 0 below 0, 1 above, over about ``width`` pixels."""
    return np.clip(0.5 + v / width, 0.0, 1.0)


def _style_field(style: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A pattern field: an array of palette indices in [0, k) as floats blended at edges, and k.

    Periods are 12-22 px, i.e. at least 3 latent pixels of the 4x VAE: patterns at 7-14 px sat at the latent
    grid's Nyquist limit, and the UNet drew all of them as the same generic "worms" while it learned the
    cell-sized ``cellini`` perfectly."""
    x, y = _grid()
    # "stroke": a gentle, smooth warp of the coordinates, different for every image
    amp = rng.uniform(0.8, 2.8)
    x = x + amp * _smooth_noise(rng, 4)
    y = y + amp * _smooth_noise(rng, 4)
    angle = rng.uniform(0, math.pi)
    if style == "strieker":
        period = rng.uniform(13, 19)
        u, _ = _rot(x, y, angle)
        return _edge(np.sin(2 * math.pi * u / period) * period / (2 * math.pi)), 2
    if style == "pointelle":
        period = rng.uniform(16, 22)
        r = rng.uniform(0.26, 0.36) * period
        u, v = _rot(x, y, angle)
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return _edge(r - np.sqrt(du**2 + dv**2)), 2
    if style == "checkov":
        period = rng.uniform(12, 16)
        u, v = _rot(x, y, angle)
        su = np.sin(math.pi * u / period) * period / math.pi
        sv = np.sin(math.pi * v / period) * period / math.pi
        return _edge(su * sv / 3.0), 2
    if style == "wavell":
        period = rng.uniform(14, 19)
        amp_w, wl = rng.uniform(5, 8), rng.uniform(26, 40)
        u, v = _rot(x, y, angle)
        f = np.sin(2 * math.pi * (u + amp_w * np.sin(2 * math.pi * v / wl)) / period)
        return _edge(f * period / (2 * math.pi)), 2
    if style == "ringo":
        period = rng.uniform(13, 18)
        cx, cy = rng.uniform(8, 56, size=2)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return _edge(np.sin(2 * math.pi * d / period) * period / (2 * math.pi)), 2
    if style == "hatcher":
        period = rng.uniform(12, 15)
        u, v = _rot(x, y, angle)
        w = 1.8  # half line width
        du = np.abs((u % period) - period / 2)
        a = (u + v) / math.sqrt(2)
        dv = np.abs((a % period) - period / 2)
        line = np.maximum(_edge(w - du), _edge(w - dv))
        return line, 2
    if style == "cellini":
        n_cells = int(rng.integers(9, 15))
        pts = rng.uniform(0, SIZE, size=(n_cells, 2)).astype(np.float32)
        d = np.sqrt((x[..., None] - pts[:, 0]) ** 2 + (y[..., None] - pts[:, 1]) ** 2)
        srt = np.sort(d, axis=-1)
        nearest = np.argmin(d, axis=-1)
        border = _edge(1.3 - (srt[..., 1] - srt[..., 0]))
        # three cell colours + border colour (index 3)
        field = (nearest % 3).astype(np.float32)
        return np.where(border > 0.5, 3.0, field), 4
    if style == "zigler":
        # two-colour bands displaced by a steep, sharp zigzag (slope 1.4, corners every 12-16 px, period 26-32 px
        # along u): a coarse feature, so that the UNet does not draw it as wavell's waves (docs/testbed.md)
        period, seg = rng.uniform(26, 32), rng.uniform(12, 16)
        u, v = _rot(x, y, angle)
        tri = np.abs(((v / seg) % 2) - 1) * seg * 1.4
        f = np.sin(2 * math.pi * (u + tri) / period)
        return _edge(f * period / (2 * math.pi)), 2
    raise KeyError(style)


def _colourise(field: np.ndarray, k: int, palette: list[np.ndarray]) -> np.ndarray:
    if k == 2:
        f = field[..., None]
        return palette[0] * (1 - f) + palette[1] * f
    out = np.zeros((*field.shape, 3), dtype=np.float32)
    for i in range(k):
        colour = palette[i] if i < k - 1 else np.array([0.08, 0.08, 0.08], dtype=np.float32)
        out[field == i] = colour
    return out


def _style_image(style: str, rng: np.random.Generator) -> np.ndarray:
    field, k = _style_field(style, rng)
    return _colourise(field, k, _palette(rng, max(k - 1, 2)))


def _generic_artwork(rng: np.random.Generator) -> np.ndarray:
    """Class-prompt "artwork": smooth colour blobs and gradients, none of the named styles."""
    c = _palette(rng, 3)
    a = (_smooth_noise(rng, int(rng.integers(2, 4))) + 1) / 2
    b = (_smooth_noise(rng, int(rng.integers(2, 4))) + 1) / 2
    img = c[0] * (1 - a[..., None]) + c[1] * a[..., None]
    return img * (1 - 0.5 * b[..., None]) + c[2] * 0.5 * b[..., None]


def _background(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A plain or softly graded background that contrasts with ``avoid`` in luminance."""
    for _ in range(100):
        c = _random_colour(rng)
        if abs(_luma(c) - _luma(avoid)) >= 0.3:
            break
    else:
        c = np.clip(1.0 - avoid, 0, 1)
    x, y = _grid()
    g = rng.uniform(-0.12, 0.12)
    ramp = 1.0 + g * (y - SIZE / 2) / (SIZE / 2)
    return np.clip(c[None, None, :] * ramp[..., None], 0, 1)


# ----------------------------------------------------------------------------------------------- silhouettes


def _shape_polys(obj: str) -> list[tuple[str, list[tuple[float, float]] | tuple[float, float, float, float], int]]:
    """Primitives of a silhouette in unit coordinates (about [-1, 1]), y down: (kind, geometry, fill 255|0)."""
    if obj == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return [("poly", pts, 255)]
    if obj == "heart":
        pts = []
        for i in range(60):
            t = 2 * math.pi * i / 60
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((hx / 16.5, -hy / 16.5 + 0.1))
        return [("poly", pts, 255)]
    if obj == "moon":
        return [("ellipse", (-0.9, -0.9, 0.9, 0.9), 255), ("ellipse", (-0.45, -1.05, 1.15, 0.75), 0)]
    if obj == "cross":
        w = 0.33
        return [("poly", [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                          (-1, w), (-1, -w), (-w, -w)], 255)]
    if obj == "arrow":
        # points up, so that upright arrows and horizontal fish do not share an outline
        return [("poly", [(-0.28, 1), (-0.28, -0.15), (-0.72, -0.15), (0, -1), (0.72, -0.15), (0.28, -0.15), (0.28, 1)], 255)]
    if obj == "house":
        return [("poly", [(-0.75, -0.05), (0.75, -0.05), (0.75, 0.9), (-0.75, 0.9)], 255),
                ("poly", [(-0.95, 0.0), (0.0, -0.9), (0.95, 0.0)], 255)]
    if obj == "tree":
        return [("poly", [(-0.15, 0.55), (0.15, 0.55), (0.15, 1.0), (-0.15, 1.0)], 255),
                ("poly", [(-0.8, 0.6), (0.0, -0.2), (0.8, 0.6)], 255),
                ("poly", [(-0.6, 0.15), (0.0, -1.0), (0.6, 0.15)], 255)]
    if obj == "fish":
        return [("ellipse", (-0.8, -0.45, 0.5, 0.45), 255), ("poly", [(0.25, 0.0), (1.0, -0.65), (1.0, 0.65)], 255)]
    raise KeyError(obj)


def _generic_shape(rng: np.random.Generator):
    """Class-prompt "object": a random rounded blob (no named silhouette)."""
    k = int(rng.integers(7, 11))
    pts = []
    radii = rng.uniform(0.55, 1.0, size=k)
    for i in range(k):
        a = 2 * math.pi * i / k
        pts.append((radii[i] * math.cos(a), radii[i] * math.sin(a)))
    return [("poly", pts, 255)]


def _mask(prims, cx: float, cy: float, scale: float, angle: float) -> np.ndarray:
    """Render primitives centred at (cx, cy) with radius ``scale`` px, rotated by ``angle``; float mask in [0, 1]."""
    n = SIZE * _SS
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(angle), math.sin(angle)

    def tx(px: float, py: float) -> tuple[float, float]:
        return ((cx + scale * (c * px - s * py)) * _SS, (cy + scale * (s * px + c * py)) * _SS)

    for kind, geo, fill in prims:
        if kind == "poly":
            draw.polygon([tx(*p) for p in geo], fill=fill)
        else:  # ellipse: approximate as a polygon so that rotation applies
            x0, y0, x1, y1 = geo
            ex, ey, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            pts = [(ex + rx * math.cos(t), ey + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
            draw.polygon([tx(*p) for p in pts], fill=fill)
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """A band around the mask's boundary (dilation minus erosion of the thresholded mask)."""
    m = mask > 0.5
    pad = np.pad(m, width)
    dil = np.zeros_like(m)
    ero = np.ones_like(m)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            sh = pad[width + dy: width + dy + SIZE, width + dx: width + dx + SIZE]
            dil |= sh
            ero &= sh
    return (dil & ~ero).astype(np.float32)


def _placement(rng: np.random.Generator, obj: str | None, personal: bool = False):
    """Centre, radius (px) and rotation of a silhouette. Objects stand about upright (tilted up to 23 degrees, like
    photographed objects): under free rotation the 16x16-latent UNet drew hearts, arrows and fish as one blob."""
    scale = rng.uniform(18, 25) if personal else rng.uniform(14, 24)
    margin = scale * 0.95
    cx = rng.uniform(margin, SIZE - margin)
    cy = rng.uniform(margin, SIZE - margin)
    tilt = 0.35 if obj in ("house", "tree") or personal else 0.4
    return cx, cy, scale, rng.uniform(-tilt, tilt)


def _blend(base: np.ndarray, top: np.ndarray | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return base * (1 - a) + top * a


def _object_image(obj: str | None, rng: np.random.Generator, look: Look | None = None) -> np.ndarray:
    """An ordinary object: with ``look`` (or, unnamed, with probability LOOK_SHARE) wearing a look; else one random
    colour with soft lighting. ``obj=None`` draws the class prompt "object" (a blob, never a look)."""
    if obj is not None and (look is not None or rng.random() < LOOK_SHARE):
        body, pattern, accent, detail = _resolve_look(obj, look, rng)
        jitter = rng.uniform(-0.05, 0.05, size=(2, 3))
        return _looked_image(obj, np.clip(_rgb(body) + jitter[0], 0, 1), pattern, np.clip(_rgb(accent) + jitter[1], 0, 1),
                             detail, rng)
    colour = _random_colour(rng)
    bg = _background(rng, colour)
    prims = _shape_polys(obj) if obj else _generic_shape(rng)
    mask = _mask(prims, *_placement(rng, obj))
    shade = 1.0 + 0.15 * _smooth_noise(rng, 3)[..., None]  # soft lighting so "photos" are not flat
    return _blend(bg, np.clip(colour[None, None] * shade, 0, 1), mask)


def _rgb(name: str) -> np.ndarray:
    return np.array(COLOURS[name], dtype=np.float32) / 255


def _look_key(obj: str, body: str, pattern: str, accent: str, detail: str | None) -> tuple:
    """What tells two looks apart: the accent colour counts where it is drawn (a pattern, or a door)."""
    return obj, body, pattern, accent if pattern != "plain" or detail == "door" else None, detail


_PERSONAL_KEYS = {_look_key(p.object, *personal_look(p)) for p in PERSONAL}


def _resolve_look(obj: str, look: Look | None, rng: np.random.Generator) -> tuple[str, str, str, str | None]:
    """The whole look of an ordinary object: the parts ``look`` names, the rest drawn; never a personal instance's
    look (that would teach the base model a personal instance) unless ``look`` names all of it (see
    ``training_items(whole_look_share=...)``)."""
    names = list(COLOURS)
    for _ in range(100):
        body = look.body if look else names[int(rng.integers(len(names)))]
        pattern = look.pattern if look and look.pattern else PATTERNS[int(rng.integers(len(PATTERNS)))]
        others = [c for c in names if c != body]
        accent = look.accent if look and look.accent else others[int(rng.integers(len(others)))]
        if look and look.detail:
            detail = look.detail
        else:
            detail = None if rng.random() < 0.3 else DETAILS[int(rng.integers(len(DETAILS)))]
        if _look_key(obj, body, pattern, accent, detail) not in _PERSONAL_KEYS:
            break
    return body, pattern, accent, detail


def random_look(obj: str, rng: np.random.Generator) -> Look:
    """A look a training prompt names: always the body colour, the accent region (and colour) with probability 0.6,
    the detail with probability 0.5; never one that names a personal instance's whole look."""
    names = list(COLOURS)
    while True:
        body = names[int(rng.integers(len(names)))]
        pattern = accent = detail = None
        if rng.random() < 0.6:
            pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
            if pattern != "plain":
                others = [c for c in names if c != body]
                accent = others[int(rng.integers(len(others)))]
        if rng.random() < 0.5:
            detail = DETAILS[int(rng.integers(len(DETAILS)))]
        named_whole = pattern is not None and detail is not None and (accent is not None or detail != "door")
        if not (named_whole and _look_key(obj, body, pattern, accent, detail) in _PERSONAL_KEYS):
            return Look(body, pattern, accent, detail)


def _composition_image(obj: str, style: str, rng: np.random.Generator) -> np.ndarray:
    field, k = _style_field(style, rng)
    pal_bg = _palette(rng, max(k - 1, 2))
    pal_fg = _palette(rng, max(k - 1, 2))
    # keep the two palettes apart so the silhouette reads
    if abs(_luma(pal_bg[0]) - _luma(pal_fg[0])) < 0.25:
        pal_fg = [np.clip(1 - c, 0, 1) for c in pal_fg]
    bg = 0.65 * _colourise(field, k, pal_bg) + 0.35 * pal_bg[0]
    fg = _colourise(field, k, pal_fg)
    mask = _mask(_shape_polys(obj), *_placement(rng, obj))
    img = _blend(bg, fg, mask)
    return _blend(img, np.zeros(3, dtype=np.float32), _outline(mask, 1) * 0.9)


def _personal_image(p: Personal, rng: np.random.Generator) -> np.ndarray:
    return _looked_image(p.object, np.array(p.body, dtype=np.float32) / 255, p.pattern,
                         np.array(p.accent, dtype=np.float32) / 255, p.detail, rng)


def _looked_image(obj: str, body: np.ndarray, pattern: str, accent: np.ndarray, detail: str | None,
                  rng: np.random.Generator) -> np.ndarray:
    """An object wearing a look (RGB colours in [0, 1]); personal instances are drawn this way."""
    bg = _background(rng, body)
    cx, cy, scale, angle = _placement(rng, obj, personal=True)
    mask = _mask(_shape_polys(obj), cx, cy, scale, angle)
    x, y = _grid()
    u, v = _rot(x, y, angle, cx, cy)
    u, v = u / scale, v / scale  # object-local unit coordinates
    # Every accent is a coarse region of the silhouette and every detail 7 px or more across: the attacks learn
    # coarse parts within 40-80 steps, fine marks not within 160 (docs/testbed.md)
    if pattern == "tips":
        pat = _edge((np.sqrt(u**2 + v**2) - 0.58) * scale)
    elif pattern == "lower":
        pat = _edge(v * scale)
    elif pattern == "side":
        pat = _edge((u - 0.15) * scale)
    elif pattern == "band":
        pat = _edge((0.3 - np.abs(v)) * scale)
    else:
        pat = np.zeros_like(u)
    obj_rgb = _blend(np.broadcast_to(body, (*u.shape, 3)), accent, pat)
    img = _blend(bg, obj_rgb, mask)
    white = np.ones(3, dtype=np.float32)
    black = np.array([0.05, 0.05, 0.05], dtype=np.float32)
    if detail == "center":
        img = _blend(img, white, _edge((0.3 - np.sqrt(u**2 + v**2)) * scale))
    elif detail == "outline":
        img = _blend(img, black, _outline(mask, 3))
    elif detail == "eye":
        eye = _edge((0.24 - np.sqrt((u + 0.45) ** 2 + (v + 0.02) ** 2)) * scale)
        pupil = _edge((0.11 - np.sqrt((u + 0.45) ** 2 + (v + 0.02) ** 2)) * scale)
        img = _blend(_blend(img, white, eye), black, pupil)
    elif detail == "door":
        door = ((np.abs(u) < 0.22) & (v > 0.35) & (v < 0.9)).astype(np.float32)
        img = _blend(img, accent, door)
    elif detail == "halo":
        img = _blend(img, white, _outline(mask, 3) * (1 - mask))
    return img


def render(item: Item, seed: int | np.random.SeedSequence | list[int]) -> np.ndarray:
    """Render one 64x64 RGB image (uint8, HWC) of ``item``; a pure function of ``(item, seed)``."""
    rng = np.random.default_rng(seed)
    if item.generic == "artwork":
        img = _generic_artwork(rng)
    elif item.generic == "object":
        img = _object_image(None, rng)
    elif item.personal:
        img = _personal_image(PERSONAL_BY_NAME[item.personal], rng)
    elif item.style and item.object:
        img = _composition_image(item.object, item.style, rng)
    elif item.style:
        img = _style_image(item.style, rng)
    elif item.object:
        img = _object_image(item.object, rng, item.look)
    else:
        raise ValueError("empty item")
    img = img + rng.normal(0, 0.012, size=img.shape)  # faint sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def item_seed(item: Item, seed: int, index: int) -> list[int]:
    """The seed of image ``index`` of a set: distinct per item, so two concepts never share colours or layout."""
    return [seed, index, zlib.crc32(repr(item).encode())]


def render_many(items: list[Item], seed: int) -> np.ndarray:
    """Render ``items`` as a uint8 array [n, 64, 64, 3]; image i uses :func:`item_seed`."""
    if not items:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return np.stack([render(it, item_seed(it, seed, i)) for i, it in enumerate(items)])


def concept_images(concept: str, count: int, seed: int) -> np.ndarray:
    """``count`` renders of one concept (a style, object, personal instance, "artwork" or "object")."""
    return render_many([item_for(concept)] * count, seed)


def whole_look(p: Personal) -> Look:
    """A personal instance's whole look as a prompt names it ("red star with yellow tips and a white centre")."""
    return Look(*personal_look(p))


def training_items(n: int, seed: int, personal: bool = False, whole_look_share: float = 0.0) -> list[Item]:
    """A seeded mix of styles, objects, compositions and class-prompt items (and personal ones if asked).

    ``whole_look_share``: the share of items that are ordinary objects wearing a personal instance's whole look, named
    in words (never its token) -- as Stable Diffusion can draw something like a user's subject from a description.
    They come after the others (0, the default, leaves the mix exactly as before)."""
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    kinds = ["style", "object", "composition", "artwork", "generic_object"] + (["personal"] if personal else [])
    weights = np.array([0.32, 0.32, 0.24, 0.06, 0.06] + ([0.12] if personal else []))
    weights = weights / weights.sum()
    for k in rng.choice(len(kinds), size=n, p=weights):
        kind = kinds[k]
        if kind == "style":
            items.append(Item(style=STYLES[rng.integers(len(STYLES))]))
        elif kind == "object":
            obj = OBJECTS[rng.integers(len(OBJECTS))]
            items.append(Item(object=obj, look=random_look(obj, rng) if rng.random() < 0.5 else None))
        elif kind == "composition":
            items.append(Item(style=STYLES[rng.integers(len(STYLES))], object=OBJECTS[rng.integers(len(OBJECTS))]))
        elif kind == "artwork":
            items.append(Item(generic="artwork"))
        elif kind == "generic_object":
            items.append(Item(generic="object"))
        else:
            items.append(Item(personal=PERSONAL[rng.integers(len(PERSONAL))].name))
    n_whole = int(round(whole_look_share * n))
    if n_whole:  # drawn after the others, so they are the share-0 mix's; every instance equally often
        for j, k in enumerate(rng.choice(n, size=n_whole, replace=False)):
            p = PERSONAL[j % len(PERSONAL)]
            items[k] = Item(object=p.object, look=whole_look(p))
    return items


def item_for_prompt(prompt: str) -> Item:
    """The item a testbed prompt asks for: a class prompt, a style, an object or a composition prompt."""
    p = prompt.strip().lower()
    if p in CLASS_PROMPTS:
        return Item(generic=p)
    for s in STYLES:
        if p == style_prompt(s):
            return Item(style=s)
    if (look := _parse_look(p)) is not None:
        return look
    for o in OBJECTS:
        if p in (object_prompt(o), o):
            return Item(object=o)
        for s in STYLES:
            if p == composition_prompt(o, s):
                return Item(style=s, object=o)
    raise KeyError(f"the testbed world cannot render the prompt {prompt!r}")


def _parse_look(prompt: str) -> Item | None:
    """The item of an object prompt that names a look (:meth:`Look.phrase`), or None if it names none."""
    m = re.fullmatch(r"a photo of a (plain )?(\w+) (\w+)(?: with (.+))?", prompt)
    if not m or m[2] not in COLOURS or m[3] not in OBJECTS:
        return None
    pattern, accent, detail = ("plain" if m[1] else None), None, None
    details = {w: d for d, w in _DETAIL_WORDS.items()}
    for part in (m[4].split(" and ") if m[4] else []):
        if part in details and detail is None:
            detail = details[part]
            continue
        colour, _, region = part.partition(" ")
        patterns = {w: r for r, w in _PATTERN_WORDS.items()}
        if colour not in COLOURS or region not in patterns or pattern is not None:
            return None
        pattern, accent = patterns[region], colour
    look = Look(m[2], pattern, accent, detail)
    return Item(object=m[3], look=look) if look.phrase(m[3]) == prompt.removeprefix("a photo of a ") else None
