"""The shape world's drawing atlas: K silhouettes (implicit functions, <= 0 inside) and K
procedural textures with their class palettes. `shapes.ShapeWorld` renders images from them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------
# Shapes: implicit functions f(u, v) <= 0 inside, in object-local coordinates. Every shape lies
# within the unit disk, so an object of scale s centred at c stays within radius s of c.
# ------------------------------------------------------------------------------------------


def _box(u: Tensor, v: Tensor, cu: float, cv: float, hu: float, hv: float) -> Tensor:
    return torch.maximum((u - cu).abs() - hu, (v - cv).abs() - hv)


def _polygon(u: Tensor, v: Tensor, sides: int, apothem: float, phase: float) -> Tensor:
    out = None
    for k in range(sides):
        a = phase + 2 * math.pi * k / sides
        d = u * math.cos(a) + v * math.sin(a) - apothem
        out = d if out is None else torch.maximum(out, d)
    assert out is not None
    return out


def _disk(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u * u + v * v) - 0.9


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) - 0.68


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Equilateral, circumradius 0.98 (apothem 0.49), centroid at the origin.
    return _polygon(u, v, 3, 0.49, math.pi / 2)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 0, 0, 0.92, 0.3), _box(u, v, 0, 0, 0.3, 0.92))


def _star(u: Tensor, v: Tensor) -> Tensor:
    # Five points: tips at radius 1.0, notches at 0.42, straight edges between them.
    r = torch.sqrt(u * u + v * v)
    phi = torch.atan2(v, u)
    sector = 2 * math.pi / 5
    a = torch.remainder(phi, sector) - sector / 2  # in [-36°, 36°); tip at |a| = 36°
    a = sector / 2 - a.abs()  # angle from the nearest tip, in [0, 36°]
    # Edge from tip (R, 0) to notch (Ri, 36°), in polar form r(a) = p / cos(a - alpha).
    big, small, half = 1.0, 0.42, sector / 2
    tx, ty = big, 0.0
    nx, ny = small * math.cos(half), small * math.sin(half)
    ex, ey = nx - tx, ny - ty
    length = math.hypot(ex, ey)
    normal = (-ey / length, ex / length)  # unit normal of the edge line
    p = abs(tx * normal[0] + ty * normal[1])
    alpha = math.atan2(normal[1], normal[0])
    if tx * normal[0] + ty * normal[1] < 0:
        alpha += math.pi
    boundary = p / torch.cos(a - alpha)
    return r - boundary


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (torch.sqrt(u * u + v * v) - 0.68).abs() - 0.25


def _crescent(u: Tensor, v: Tensor) -> Tensor:
    outer = torch.sqrt(u * u + v * v) - 0.92
    bite = torch.sqrt((u - 0.42) ** 2 + v * v) - 0.72
    return torch.maximum(outer, -bite)


def _ell(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, -0.4, 0.0, 0.25, 0.75), _box(u, v, 0.0, 0.5, 0.65, 0.25))


def _heart(u: Tensor, v: Tensor) -> Tensor:
    # (x² + y² − 1)³ − x² y³ <= 0, scaled by 0.76 and centred.
    x = u / 0.76
    y = -v / 0.76 + 0.12
    q = x * x + y * y - 1
    return q * q * q - x * x * y * y * y


def _arrow(u: Tensor, v: Tensor) -> Tensor:
    shaft = _box(u, v, -0.4, 0.0, 0.5, 0.2)
    norm = math.hypot(0.6, 0.85)
    d = 0.6 * 0.95 / norm
    head = torch.maximum(
        0.1 - u,
        torch.maximum((0.6 * u + 0.85 * v) / norm - d, (0.6 * u - 0.85 * v) / norm - d),
    )
    return torch.minimum(shaft, head)


def _tee(u: Tensor, v: Tensor) -> Tensor:
    return torch.minimum(_box(u, v, 0.0, -0.5, 0.7, 0.2), _box(u, v, 0.0, 0.05, 0.2, 0.7))


def _hexagon(u: Tensor, v: Tensor) -> Tensor:
    return _polygon(u, v, 6, 0.8, 0.0)


SHAPES: list[tuple[str, Callable[[Tensor, Tensor], Tensor]]] = [
    ("disk", _disk),
    ("square", _square),
    ("triangle", _triangle),
    ("cross", _cross),
    ("star", _star),
    ("ring", _ring),
    ("crescent", _crescent),
    ("ell", _ell),
    ("heart", _heart),
    ("arrow", _arrow),
    ("tee", _tee),
    ("hexagon", _hexagon),
]
SHAPE_NAMES: tuple[str, ...] = tuple(name for name, _ in SHAPES)

# ------------------------------------------------------------------------------------------
# Textures: pattern t(x, y) in [0, 1] in image coordinates (so a pattern's orientation is part of
# its class), blended between the class's two palette colours. `u` holds per-image uniforms.
# ------------------------------------------------------------------------------------------

TEX_PARAMS = 12
TWO_PI = 2 * math.pi


def _sq(z: Tensor) -> Tensor:
    """Sharpen a wave in about [-1, 1] into a near-binary pattern in [0, 1]."""
    return 0.5 + 0.5 * torch.tanh(3.0 * z)


def _c(u: Tensor, j: int) -> Tensor:
    return u[:, j, None, None]


def _rot(x: Tensor, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    c, s = torch.cos(theta), torch.sin(theta)
    return x * c + y * s, -x * s + y * c


def _frac(z: Tensor) -> Tensor:
    return z - torch.floor(z)


def _stripes_at(x: Tensor, y: Tensor, u: Tensor, angle: float, f0: float, df: float) -> Tensor:
    theta = angle + (_c(u, 0) - 0.5) * 0.4
    a, _ = _rot(x, y, theta)
    f = f0 + df * _c(u, 1)
    return _sq(torch.sin(TWO_PI * (f * a + _c(u, 2))))


def _tex_stripes(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    return _stripes_at(x, y, u, math.pi / 2, 3.0, 0.8)  # horizontal bands


def _tex_checker(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    a, b = _rot(x, y, (_c(u, 0) - 0.5) * 0.3)
    f = 1.6 + 0.5 * _c(u, 1)
    wave = torch.sin(TWO_PI * (f * a + _c(u, 2))) * torch.sin(TWO_PI * (f * b + _c(u, 3)))
    return _sq(2.0 * wave)


def _tex_dots(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    a, b = _rot(x, y, (_c(u, 0) - 0.5) * 0.3)
    period = 0.33 + 0.08 * _c(u, 1)
    da = _frac(a / period + _c(u, 2)) - 0.5
    db = _frac(b / period + _c(u, 3)) - 0.5
    d = torch.sqrt(da * da + db * db)
    return _sq((0.3 - d) * 8.0)


def _tex_zigzag(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    amp = 0.15 + 0.05 * _c(u, 3)
    g = 1.5 + 0.5 * _c(u, 4)
    tri = 4.0 * (_frac(g * x + _c(u, 5)) - 0.5).abs() - 1.0
    yy = y + amp * tri
    f = 2.4 + 0.5 * _c(u, 1)
    return _sq(torch.sin(TWO_PI * (f * yy + _c(u, 2))))


def _tex_rings(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    cx, cy = 2 * _c(u, 3) - 1, 2 * _c(u, 4) - 1
    r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    f = 2.5 + 0.7 * _c(u, 1)
    return _sq(torch.sin(TWO_PI * (f * r + _c(u, 2))))


def _lines(z: Tensor, width: float) -> Tensor:
    """1 on thin lines at integer z (line width `width` of a period), else 0 (soft edges)."""
    return _sq(((_frac(z) - 0.5).abs() - (0.5 - width / 2)) * 12.0)


def _tex_crosshatch(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    f = 2.2 + 0.5 * _c(u, 1)
    a = (x + y) / math.sqrt(2)
    b = (x - y) / math.sqrt(2)
    return torch.maximum(_lines(f * a + _c(u, 2), 0.3), _lines(f * b + _c(u, 3), 0.3))


def _tex_blobs(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    field = torch.zeros_like(x + _c(u, 0))
    for k in range(4):
        theta = math.pi * _c(u, k)
        a, _ = _rot(x, y, theta)
        field = field + torch.sin(TWO_PI * (1.1 * a + _c(u, 4 + k)))
    return _sq(field / 1.5)


def _tex_diagonal(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    return _stripes_at(x, y, u, math.pi / 4, 2.0, 0.5)  # wide diagonal bands


def _tex_speckle(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    return _sq((noise - 0.5) * 4.0)


def _tex_spiral(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    cx, cy = (2 * _c(u, 3) - 1) * 0.4, (2 * _c(u, 4) - 1) * 0.4
    dx, dy = x - cx, y - cy
    r = torch.sqrt(dx * dx + dy * dy)
    phi = torch.atan2(dy, dx)
    f = 2.0 + 0.5 * _c(u, 1)
    return _sq(torch.sin(3.0 * phi + TWO_PI * (f * r + _c(u, 2))))


def _tex_grid(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    a, b = _rot(x, y, (_c(u, 0) - 0.5) * 0.2)
    f = 1.8 + 0.4 * _c(u, 1)
    return torch.maximum(_lines(f * a + _c(u, 2), 0.25), _lines(f * b + _c(u, 3), 0.25))


def _tex_bricks(x: Tensor, y: Tensor, u: Tensor, noise: Tensor) -> Tensor:
    h = 0.26 + 0.06 * _c(u, 1)
    rows = y / h + _c(u, 2)
    shift = 0.5 * torch.remainder(torch.floor(rows), 2.0)
    cols = x / (2 * h) + shift + _c(u, 3)
    return torch.maximum(_lines(rows, 0.25), _lines(cols, 0.13))


TEXTURES: list[tuple[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]]] = [
    ("stripes", _tex_stripes),
    ("checker", _tex_checker),
    ("dots", _tex_dots),
    ("zigzag", _tex_zigzag),
    ("rings", _tex_rings),
    ("crosshatch", _tex_crosshatch),
    ("blobs", _tex_blobs),
    ("diagonal", _tex_diagonal),
    ("speckle", _tex_speckle),
    ("spiral", _tex_spiral),
    ("grid", _tex_grid),
    ("bricks", _tex_bricks),
]
TEXTURE_NAMES: tuple[str, ...] = tuple(name for name, _ in TEXTURES)

# (base colour, pattern colour) per texture class: saturated, class-specific, unlike the
# dull grey-ish backgrounds.
PALETTES = torch.tensor(
    [
        [[0.95, 0.80, 0.10], [0.12, 0.08, 0.04]],  # stripes: yellow / black
        [[0.85, 0.10, 0.10], [0.95, 0.95, 0.95]],  # checker: red / white
        [[0.10, 0.25, 0.80], [0.95, 0.95, 0.65]],  # dots: blue / cream
        [[0.10, 0.55, 0.20], [0.65, 0.95, 0.60]],  # zigzag: green / light green
        [[0.95, 0.50, 0.10], [0.40, 0.10, 0.50]],  # rings: orange / purple
        [[0.10, 0.75, 0.80], [0.05, 0.10, 0.35]],  # crosshatch: cyan / navy
        [[0.45, 0.30, 0.12], [0.60, 0.65, 0.25]],  # blobs: brown / olive
        [[0.85, 0.15, 0.65], [0.98, 0.80, 0.90]],  # diagonal: magenta / pink
        [[0.95, 0.55, 0.50], [0.15, 0.45, 0.45]],  # speckle: salmon / teal
        [[0.60, 0.90, 0.10], [0.50, 0.20, 0.90]],  # spiral: lime / violet
        [[0.90, 0.72, 0.20], [0.45, 0.05, 0.10]],  # grid: gold / maroon
        [[0.70, 0.25, 0.15], [0.90, 0.85, 0.75]],  # bricks: brick / mortar
    ],
    dtype=torch.float32,
)
