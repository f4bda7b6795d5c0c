"""Synthetic street in the course layout: the project's own default demo data set.

A straight street with procedurally textured facades on both sides (buildings, window grids, shop
fronts, signs with text-like marks, graffiti, stains, noise). Cameras stand in the street and look at
one side (heading about +-90 degrees to the street, with jitter); each view is the facade plane and the
ground plane warped into a pinhole camera with a homography. Map images are one capture along the
street; queries are another "day": other positions and yaws, photometric changes, a few beyond the
mapped stretch (no relevant map image). Ground truth comes from the locations alone, with the same rule
as the London data (dataset.relevance), so relevance means "sees the same part of the same facade".

    python -c "from pathlib import Path; from dataset import synthetic; synthetic.main(Path('demo-data'))"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dataset.relevance import fov_matrix, sim_matrix

GENERATOR_VERSION = "1"
MANIFEST = "manifest.json"


class SyntheticConf(BaseModel):
    """What the generated street looks like; any change gives other data (the manifest records it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    n_db: int = Field(400, ge=2)  # map images, split over the two street sides
    n_query: int = Field(120, ge=1)
    db_spacing_m: float = 5.0  # along the street, per side
    query_offmap_frac: float = 0.05  # queries beyond the mapped stretch: no relevant map image
    offmap_dist_m: tuple[float, float] = (45.0, 65.0)  # how far beyond the ends (> 25 m: the relevance radius)
    street_width_m: float = 34.0  # facade to facade
    lane_halfwidth_m: float = 4.0  # cameras stand within +-this of the street axis
    street_bearing_deg: float = 63.0  # compass bearing of the street axis
    origin_utm: tuple[float, float] = (700000.0, 5710000.0)  # easting, northing of the first map position
    image_size: tuple[int, int] = (341, 256)  # width, height, like the London images
    hfov_deg: float = 90.0  # same width as the relevance rule's viewing sector
    cam_height_m: float = 2.5
    pitch_deg: float = 8.0  # tilted up a little so facades fill more of the frame than the road
    db_yaw_jitter_deg: float = 8.0
    db_pos_jitter_m: float = 0.5
    query_yaw_jitter_deg: float = 20.0
    query_pitch_jitter_deg: float = 3.0
    query_roll_jitter_deg: float = 2.0
    query_height_jitter_m: float = 0.3
    texture_ppm: float = 16.0  # facade texture pixels per metre (views see ~8-14 px/m)
    jpeg_quality: int = 90

    @model_validator(mode="after")
    def _views_stay_on_the_facades(self) -> SyntheticConf:
        if max(self.db_yaw_jitter_deg, self.query_yaw_jitter_deg) + self.hfov_deg / 2 + 10 >= 85:
            raise ValueError("yaw jitter + hfov/2 too large: views would look past the end of the facade plane")
        if self.lane_halfwidth_m + 4 > self.street_width_m / 2 - _SIDEWALK_M:
            raise ValueError("lane_halfwidth_m too large for street_width_m")
        return self


_FACADE_HEIGHT_M = 30.0
_GROUND_PPM = 10.0
_SIDEWALK_M = 4.0
# BGR base colours of facades: brick, sand, cream, greys, pale blue, sage, terracotta, white, ochre.
_PALETTE = [
    (60, 70, 150),
    (150, 190, 210),
    (200, 220, 230),
    (150, 150, 150),
    (95, 95, 100),
    (200, 170, 140),
    (140, 170, 140),
    (70, 110, 190),
    (225, 228, 230),
    (60, 150, 200),
]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789&"


confs: dict[str, SyntheticConf] = {
    "demo": SyntheticConf(n_db=400, n_query=120),
    "tiny": SyntheticConf(n_db=60, n_query=20),
}


def as_conf(conf: SyntheticConf | Mapping[str, Any] | None) -> SyntheticConf:
    """A conf, or settings over the defaults; raises ValueError for an unknown key or a bad value."""
    if isinstance(conf, SyntheticConf):
        return conf
    try:
        return SyntheticConf.model_validate(dict(conf or {}))
    except ValidationError as e:
        raise ValueError(f"invalid synthetic conf: {e}") from e


# ----------------------------------------------------------------------------- textures


def _px(m: float, ppm: float) -> int:
    return max(1, round(m * ppm))


def _col(c: Any, alpha: int = 255) -> tuple[int, int, int, int]:
    c = np.clip(np.asarray(c, dtype=np.float64), 0, 255).astype(int)
    return (int(c[0]), int(c[1]), int(c[2]), alpha)


def _jitter(rng: np.random.Generator, c: Any, amount: int) -> tuple[int, int, int, int]:
    return _col(np.asarray(c[:3]) + rng.integers(-amount, amount + 1, 3))


def _shade(c: tuple[int, ...], k: float) -> tuple[int, int, int, int]:
    return _col(np.asarray(c[:3], dtype=np.float64) * k)


def _vivid(rng: np.random.Generator) -> tuple[int, int, int, int]:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(110, 256)]]], dtype=np.uint8)
    return _col(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _text(
    tex: np.ndarray, rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int, color: tuple[int, ...]
) -> None:
    """Random letters filling the box (x0, y0)-(x1, y1): signs are corner-rich and unique."""
    h = y1 - y0
    if h < 5 or x1 - x0 < 8:
        return
    font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX][rng.integers(3)]
    thick = 1 if h < 12 else 2
    scale = cv2.getFontScaleFromHeight(font, int(h * 0.7), thick)
    s = "".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 12))))
    while len(s) > 1 and cv2.getTextSize(s, font, scale, thick)[0][0] > x1 - x0 - 4:
        s = s[:-1]
    tw = cv2.getTextSize(s, font, scale, thick)[0][0]
    org = (x0 + max(2, (x1 - x0 - tw) // 2), y1 - (h - int(h * 0.7)) // 2)
    cv2.putText(tex, s, org, font, scale, color, thick, cv2.LINE_AA)


def _window(
    tex: np.ndarray, rng: np.random.Generator, x: int, y: int, w: int, h: int, frame: tuple[int, ...], mullion: int
) -> None:
    lit = rng.random() < 0.15  # a few lit windows: strong, unique blobs
    glass = _col((210, 200, 120) if lit else (rng.integers(40, 95), rng.integers(35, 80), rng.integers(30, 70)))
    cv2.rectangle(tex, (x, y), (x + w, y + h), glass, -1)
    # Sky reflection: a skewed lighter band at a random place, so windows of one grid differ.
    a, b = int(rng.integers(0, w)), int(rng.integers(2, max(3, w // 2)))
    band = np.array(
        [[x + a, y], [x + min(w, a + b), y], [x + max(0, a + b - h // 2), y + h], [x + max(0, a - h // 2), y + h]]
    )
    cv2.fillConvexPoly(tex, band, _shade(glass, 1.6 + rng.random()), cv2.LINE_AA)
    if rng.random() < 0.4:  # curtain
        cw = int(w * rng.uniform(0.2, 0.6))
        cx = x if rng.random() < 0.5 else x + w - cw
        cv2.rectangle(tex, (cx, y), (cx + cw, y + int(h * rng.uniform(0.4, 1.0))), _vivid(rng), -1)
    cv2.rectangle(tex, (x, y), (x + w, y + h), frame, 2)
    if mullion == 1:
        cv2.line(tex, (x + w // 2, y), (x + w // 2, y + h), frame, 2)
        cv2.line(tex, (x, y + h // 3), (x + w, y + h // 3), frame, 2)
    elif mullion == 2:
        cv2.line(tex, (x + w // 2, y), (x + w // 2, y + h), frame, 2)
    elif mullion == 3:
        cv2.line(tex, (x, y + h // 4), (x + w, y + h // 4), frame, 1)
    cv2.rectangle(tex, (x - 2, y + h), (x + w + 2, y + h + 3), _shade(frame, 0.9), -1)  # sill
    if rng.random() < 0.2:  # shutters
        sh = _vivid(rng)
        cv2.rectangle(tex, (x - w // 2 - 1, y), (x - 2, y + h), sh, -1)
        cv2.rectangle(tex, (x + w + 2, y), (x + w + w // 2 + 1, y + h), sh, -1)
    if rng.random() < 0.15:  # flower pot
        cv2.circle(tex, (x + int(rng.integers(3, w - 2)), y + h - 3), int(rng.integers(3, 6)), _vivid(rng), -1)


def _shop(tex: np.ndarray, rng: np.random.Generator, x0: int, x1: int, top: int, bottom: int, ppm: float) -> None:
    sign_h = _px(rng.uniform(0.7, 1.1), ppm)
    sy0 = top + _px(0.25, ppm)
    sign = _vivid(rng)
    cv2.rectangle(tex, (x0, sy0), (x1, sy0 + sign_h), sign, -1)
    dark = sum(sign[:3]) > 380
    _text(tex, rng, x0 + 2, sy0 + 1, x1 - 2, sy0 + sign_h - 1, (20, 20, 20, 255) if dark else (245, 245, 245, 255))
    cv2.rectangle(tex, (x0, sy0), (x1, sy0 + sign_h), _shade(sign, 0.5), 1)
    if rng.random() < 0.3:  # striped awning below the sign
        ay, ah, stripe = sy0 + sign_h + 1, _px(0.6, ppm), _px(0.4, ppm)
        c1, c2 = _vivid(rng), (235, 235, 235, 255)
        for i, sx in enumerate(range(x0, x1, stripe)):
            cv2.rectangle(tex, (sx, ay), (min(x1, sx + stripe), ay + ah), c1 if i % 2 else c2, -1)
    wy0, wy1 = sy0 + sign_h + _px(0.3, ppm), bottom - _px(0.6, ppm)
    door_w = _px(rng.uniform(1.0, 1.4), ppm)
    door_left = rng.random() < 0.5
    dx0 = x0 + _px(0.2, ppm) if door_left else x1 - _px(0.2, ppm) - door_w
    gx0, gx1 = (
        (dx0 + door_w + _px(0.3, ppm), x1 - _px(0.2, ppm)) if door_left else (x0 + _px(0.2, ppm), dx0 - _px(0.3, ppm))
    )
    if gx1 - gx0 > 6:
        glass = _col((rng.integers(50, 110), rng.integers(50, 100), rng.integers(40, 90)))
        cv2.rectangle(tex, (gx0, wy0), (gx1, wy1), glass, -1)
        for _ in range(int(rng.integers(3, 9))):  # goods on display
            ix, iy = int(rng.integers(gx0, gx1)), int(rng.integers(wy0, wy1))
            iw, ih = int(rng.integers(3, 14)), int(rng.integers(3, 14))
            if rng.random() < 0.5:
                cv2.rectangle(tex, (ix, iy), (min(gx1, ix + iw), min(wy1, iy + ih)), _vivid(rng), -1)
            else:
                cv2.circle(tex, (ix, iy), min(iw, ih) // 2 + 1, _vivid(rng), -1)
        cv2.rectangle(tex, (gx0, wy0), (gx1, wy1), (40, 40, 40, 255), 2)
        if rng.random() < 0.5:
            _text(tex, rng, gx0 + 3, wy0 + 3, gx1 - 3, wy0 + _px(0.5, ppm), (240, 240, 240, 255))
    door = _col((rng.integers(20, 90), rng.integers(20, 70), rng.integers(20, 60)))
    cv2.rectangle(tex, (dx0, wy0), (dx0 + door_w, bottom), door, -1)
    cv2.rectangle(tex, (dx0 + 3, wy0 + 3), (dx0 + door_w - 3, wy0 + (bottom - wy0) // 2), _shade(door, 1.8), -1)
    cv2.rectangle(
        tex,
        (dx0 + door_w - 6, (wy0 + bottom) // 2),
        (dx0 + door_w - 4, (wy0 + bottom) // 2 + 5),
        (200, 200, 200, 255),
        -1,
    )


def _marks(tex: np.ndarray, rng: np.random.Generator, x0: int, x1: int, y0: int, y1: int) -> None:
    """Graffiti, posters and blobs: irregular, unique corners at street level."""
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = int(rng.integers(x0, x1)), int(rng.integers(y0, y1))
        kind = rng.integers(3)
        if kind == 0:
            pts = np.stack([cx + rng.integers(-25, 26, 5), cy + rng.integers(-10, 11, 5)], axis=1).astype(np.int32)
            cv2.polylines(tex, [pts], False, _vivid(rng), int(rng.integers(2, 4)), cv2.LINE_AA)
        elif kind == 1:
            w, h = int(rng.integers(8, 16)), int(rng.integers(12, 22))
            cv2.rectangle(tex, (cx, cy), (cx + w, cy + h), _vivid(rng), -1)
            _text(tex, rng, cx, cy + 2, cx + w, cy + h // 2, (30, 30, 30, 255))
            cv2.line(tex, (cx + 2, cy + h - 4), (cx + w - 2, cy + h - 6), (30, 30, 30, 255), 1)
        else:
            axes = (int(rng.integers(3, 12)), int(rng.integers(2, 8)))
            cv2.ellipse(tex, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, _vivid(rng), -1, cv2.LINE_AA)


def _building(tex: np.ndarray, rng: np.random.Generator, x0: int, x1: int, top: int, ppm: float) -> None:
    h_tex = tex.shape[0]
    base = _jitter(rng, _PALETTE[rng.integers(len(_PALETTE))], 18)
    dark, light = _shade(base, 0.72), _shade(base, 1.25)
    cv2.rectangle(tex, (x0, top), (x1 - 1, h_tex - 1), base, -1)
    material = rng.integers(4)
    if material == 1:  # stone blocks, staggered joints
        bh, bw = _px(rng.uniform(0.45, 0.8), ppm), _px(rng.uniform(0.9, 1.6), ppm)
        for row, y in enumerate(range(top, h_tex, bh)):
            cv2.line(tex, (x0, y), (x1 - 1, y), dark, 1)
            for x in range(x0 + (bw // 2) * (row % 2), x1, bw):
                cv2.line(tex, (x, y), (x, min(y + bh, h_tex - 1)), dark, 1)
    elif material == 2:  # horizontal siding
        for y in range(top, h_tex, _px(rng.uniform(0.3, 0.45), ppm)):
            cv2.line(tex, (x0, y), (x1 - 1, y), dark, 1)
    elif material == 3:  # vertical panels
        for x in range(x0, x1, _px(rng.uniform(1.0, 2.0), ppm)):
            cv2.line(tex, (x, top), (x, h_tex - 1), dark, 1)
    cornice = _px(rng.uniform(0.3, 0.7), ppm)
    cv2.rectangle(tex, (x0, top), (x1 - 1, top + cornice), light if rng.random() < 0.5 else dark, -1)
    for _ in range(int(rng.integers(0, 3))):  # chimneys / roof boxes: skyline corners
        cw, ch = _px(rng.uniform(0.6, 1.6), ppm), _px(rng.uniform(0.8, 2.5), ppm)
        cx = int(rng.integers(x0, max(x0 + 1, x1 - cw)))
        cv2.rectangle(tex, (cx, max(0, top - ch)), (cx + cw, top), _shade(dark, 0.8), -1)
    # Ground floor: shop units with signs, display windows and doors.
    gf_top = h_tex - _px(rng.uniform(3.8, 4.8), ppm)
    cv2.rectangle(tex, (x0, gf_top), (x1 - 1, h_tex - 1), _jitter(rng, _shade(base, 0.85), 20), -1)
    cv2.line(tex, (x0, gf_top), (x1 - 1, gf_top), dark, 3)
    x = x0 + _px(0.3, ppm)
    while x < x1 - _px(2.5, ppm):
        ux1 = min(x + _px(rng.uniform(3.5, 7.0), ppm), x1 - _px(0.3, ppm))
        _shop(tex, rng, x, ux1, gf_top, h_tex - 1, ppm)
        x = ux1 + _px(rng.uniform(0.3, 0.8), ppm)
    # Upper floors: one window grid per building, each window varied.
    fh = _px(rng.uniform(3.0, 3.6), ppm)
    ww, wh = _px(rng.uniform(0.9, 1.6), ppm), _px(rng.uniform(1.3, 2.0), ppm)
    spacing = max(ww + _px(0.6, ppm), _px(rng.uniform(2.0, 3.4), ppm))
    ncols = max(1, (x1 - x0 - _px(1.0, ppm)) // spacing)
    xs = x0 + ((x1 - x0) - ncols * spacing) // 2 + (spacing - ww) // 2
    frame = _col((235, 235, 235)) if rng.random() < 0.5 else _jitter(rng, (40, 45, 55), 20)
    mullion = int(rng.integers(4))
    floor_bottom = gf_top
    while floor_bottom - fh >= top + cornice + _px(0.5, ppm):
        wy = floor_bottom - fh + (fh - wh) // 2
        for c in range(ncols):
            _window(tex, rng, xs + c * spacing, wy, ww, wh, frame, mullion)
        if rng.random() < 0.3:
            cv2.line(tex, (x0, floor_bottom - fh), (x1 - 1, floor_bottom - fh), dark, 2)
        floor_bottom -= fh
    _marks(tex, rng, x0, x1, gf_top + _px(1.0, ppm), h_tex - _px(0.3, ppm))
    cv2.line(tex, (x1 - 3, top), (x1 - 3, h_tex - 1), (70, 70, 75, 255), 2)  # drainpipe
    cv2.line(tex, (x0, top), (x0, h_tex - 1), dark, 1)


def _grain(tex: np.ndarray, rng: np.random.Generator, sigma: float, chunk: int = 4096) -> None:
    """Low-frequency stains times the colour, plus fine noise; in column chunks to bound memory."""
    h, w = tex.shape[:2]
    cells = rng.uniform(0.82, 1.18, (h // 24 + 2, w // 24 + 2)).astype(np.float32)
    for c0 in range(0, w, chunk):
        c1 = min(w, c0 + chunk)
        # Resize the matching block of cells with a one-cell overlap, then cut: seamless across chunks.
        k0, k1 = c0 // 24, min(cells.shape[1], c1 // 24 + 2)
        stain = cv2.resize(cells[:, k0:k1], ((k1 - k0) * 24, h), interpolation=cv2.INTER_CUBIC)
        stain = stain[:, c0 - k0 * 24 : c0 - k0 * 24 + (c1 - c0)]
        noise = np.float32(sigma) * rng.standard_normal((h, c1 - c0), dtype=np.float32)
        block = tex[:, c0:c1, :3].astype(np.float32) * stain[..., None] + noise[..., None]
        tex[:, c0:c1, :3] = np.clip(block, 0, 255).astype(np.uint8)


def _facade_texture(rng: np.random.Generator, length_m: float, ppm: float) -> np.ndarray:
    """BGRA facade strip, row 0 at _FACADE_HEIGHT_M above ground; alpha 0 above the roofs."""
    h, w = round(_FACADE_HEIGHT_M * ppm), round(length_m * ppm)
    tex = np.zeros((h, w, 4), np.uint8)
    x = 0
    while x < w:
        x1 = min(w, x + _px(rng.uniform(8.0, 24.0), ppm))
        top = h - _px(rng.uniform(9.0, _FACADE_HEIGHT_M - 4.0), ppm)
        _building(tex, rng, x, x1, top, ppm)
        x = x1
    _grain(tex, rng, 5.0)
    return cv2.GaussianBlur(tex, (3, 3), 0.6)  # softens aliasing when views shrink the texture


def _ground_texture(rng: np.random.Generator, length_m: float, width_m: float) -> np.ndarray:
    """BGR ground strip: row 0 at the left facade (u = +width/2), columns along the street."""
    p = _GROUND_PPM
    h, w = round(width_m * p), round(length_m * p)
    tex = np.zeros((h, w, 4), np.uint8)
    tex[:] = (84, 86, 88, 255)
    sw = _px(_SIDEWALK_M, p)
    paving = (160, 165, 168, 255)
    for r0, r1 in ((0, sw), (h - sw, h)):
        tex[r0:r1] = paving
        step = _px(rng.uniform(0.6, 0.9), p)
        for x in range(0, w, step):
            cv2.line(tex, (x, r0), (x, r1 - 1), (120, 124, 126, 255), 1)
        for y in range(r0, r1, step):
            cv2.line(tex, (0, y), (w - 1, y), (120, 124, 126, 255), 1)
    cv2.rectangle(tex, (0, sw - 2), (w - 1, sw), (205, 205, 205, 255), -1)  # kerbs
    cv2.rectangle(tex, (0, h - sw), (w - 1, h - sw + 2), (205, 205, 205, 255), -1)
    mid, dash, gap = h // 2, _px(3.0, p), _px(6.0, p)
    for x in range(0, w, dash + gap):
        cv2.rectangle(tex, (x, mid - 1), (x + dash, mid + 1), (235, 235, 235, 255), -1)
    for y in (sw + _px(0.5, p), h - sw - _px(0.5, p)):
        cv2.line(tex, (0, y), (w - 1, y), (225, 225, 225, 255), 1)
    for _ in range(int(length_m / 6)):  # repairs, manholes, oil stains
        cx, cy = int(rng.integers(0, w)), int(rng.integers(sw, h - sw))
        if rng.random() < 0.3:
            cv2.circle(tex, (cx, cy), _px(0.35, p), (60, 62, 64, 255), -1)
            cv2.circle(tex, (cx, cy), _px(0.35, p), (120, 120, 120, 255), 1)
        else:
            axes = (int(rng.integers(4, 25)), int(rng.integers(3, 12)))
            shade = int(rng.integers(55, 115))
            cv2.ellipse(tex, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, (shade, shade, shade + 2, 255), -1)
    _grain(tex, rng, 6.0)
    return tex[..., :3].copy()


# ----------------------------------------------------------------------------- cameras


def _rotation(phi_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """World -> camera rotation. World (street frame): s along the street, u to its left, z up.
    Camera: x right, y down, z forward; phi = yaw from +s towards +u."""
    phi, th, ro = np.deg2rad([phi_deg, pitch_deg, roll_deg])
    fwd = np.array([np.cos(th) * np.cos(phi), np.cos(th) * np.sin(phi), np.sin(th)])
    right = np.array([np.sin(phi), -np.cos(phi), 0.0])
    down = np.cross(fwd, right)
    right, down = np.cos(ro) * right + np.sin(ro) * down, -np.sin(ro) * right + np.cos(ro) * down
    return np.stack([right, down, fwd])


class _Renderer:
    """Renders a view of the street for a camera pose, from the two facade strips and the ground strip."""

    def __init__(self, conf: SyntheticConf, s_min: float, s_max: float, seed: np.random.SeedSequence) -> None:
        self.w, self.h = (int(v) for v in conf.image_size)
        f = self.w / 2 / np.tan(np.deg2rad(conf.hfov_deg) / 2)
        self.K = np.array([[f, 0, self.w / 2], [0, f, self.h / 2], [0, 0, 1.0]])
        self.ppm = float(conf.texture_ppm)
        self.half = conf.street_width_m / 2
        self.s_min, self.s_max = s_min, s_max
        length = s_max - s_min
        # Separate generators per strip: changing one strip's drawing does not reshuffle the others.
        r_left, r_right, r_ground = (np.random.default_rng(s) for s in seed.spawn(3))
        self.facade = {+1: _facade_texture(r_left, length, self.ppm), -1: _facade_texture(r_right, length, self.ppm)}
        self.ground = _ground_texture(r_ground, length, conf.street_width_m)
        # Pixel coordinates as a column and a row: rays are linear in them, so broadcasting is enough.
        self.xs = np.arange(self.w, dtype=np.float32)[None, :]
        self.ys = np.arange(self.h, dtype=np.float32)[:, None]

    def _facade_plane(self, side: int) -> np.ndarray:
        """Texture pixel (tx, ty, 1) -> street point (s, u, z). Texture x runs left-to-right as seen from the street."""
        p, top = self.ppm, _FACADE_HEIGHT_M
        if side > 0:
            return np.array([[1 / p, 0, self.s_min], [0, 0, self.half], [0, -1 / p, top]])
        return np.array([[-1 / p, 0, self.s_max], [0, 0, -self.half], [0, -1 / p, top]])

    def render(self, s: float, u: float, z: float, phi: float, pitch: float, roll: float, side: int) -> np.ndarray:
        R = _rotation(phi, pitch, roll)
        C = np.array([s, u, z])
        KR = self.K @ R
        e3 = np.array([[0.0, 0.0, 1.0]])
        # Sky: gradient by elevation of each pixel's ray.
        M = (R.T @ np.linalg.inv(self.K)).astype(np.float32)
        rx, ry, rz = (M[k, 0] * self.xs + M[k, 1] * self.ys + M[k, 2] for k in range(3))
        elev = rz / np.sqrt(rx * rx + ry * ry + rz * rz)
        t = np.clip(elev / 0.7, 0, 1)[..., None]
        horizon, zenith = np.array([235, 225, 215], dtype=np.float32), np.array([215, 160, 110], dtype=np.float32)
        img: np.ndarray = (1 - t) * horizon + t * zenith
        # Ground plane, only where the ray goes down (a homography also maps rays that point up).
        p = _GROUND_PPM
        gx0 = max(0, int((s - 80 - self.s_min) * p))
        gx1 = min(self.ground.shape[1], int((s + 80 - self.s_min) * p))
        A_g = np.array([[1 / p, 0, self.s_min + gx0 / p], [0, -1 / p, self.half], [0, 0, 0]])
        H_g = KR @ (A_g - C[:, None] @ e3)
        ground = cv2.warpPerspective(
            self.ground[:, gx0:gx1],
            H_g,
            (self.w, self.h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(84, 86, 88),
        )
        down = (rz < -1e-6)[..., None]
        img = np.where(down, ground.astype(np.float32), img)
        # Facade plane: crop the strip to what the four image corners see, then warp that crop.
        H_f = KR @ (self._facade_plane(side) - C[:, None] @ e3)
        corners = np.array([[0, 0, 1], [self.w, 0, 1], [0, self.h, 1], [self.w, self.h, 1.0]]).T
        tc = np.linalg.inv(H_f) @ corners
        if (tc[2] <= 0).any():
            raise ValueError("camera looks past the facade plane; reduce yaw jitter or hfov")
        tx = tc[0] / tc[2]
        tex = self.facade[side]
        x0 = int(np.clip(np.floor(tx.min()) - 4, 0, tex.shape[1] - 1))
        x1 = int(np.clip(np.ceil(tx.max()) + 4, x0 + 1, tex.shape[1]))
        H_crop = H_f @ np.array([[1, 0, x0], [0, 1, 0], [0, 0, 1.0]])
        fac = cv2.warpPerspective(
            tex[:, x0:x1],
            H_crop,
            (self.w, self.h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0, 0),
        ).astype(np.float32)
        a = fac[..., 3:4] / 255.0
        img = img * (1 - a) + fac[..., :3] * a
        return img  # float32 BGR, 0..255


def _photometric(img: np.ndarray, rng: np.random.Generator, strong: bool) -> np.ndarray:
    """Another day's light and camera: colour cast, gamma, contrast, brightness, blur, sensor noise."""
    x, sigma = img, 1.5
    if strong:
        x = img / 255.0 * rng.uniform(0.9, 1.1, 3).astype(np.float32)
        x = np.clip(x, 0, 1) ** rng.uniform(0.75, 1.35)
        x = (x - 0.5) * rng.uniform(0.75, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
        x = np.clip(x * 255.0, 0, 255).astype(np.float32)
        if rng.random() < 0.6:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.4, 1.2))
        sigma = rng.uniform(1.5, 5.0)
    x = x + np.float32(sigma) * rng.standard_normal(x.shape[:2], dtype=np.float32)[..., None]
    out: np.ndarray = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- data set


def _poses(conf: SyntheticConf, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Map and query poses (n, 7): s, u, z, phi, pitch, roll, side (+1 looks at the left facade)."""
    n_db, n_q = int(conf.n_db), int(conf.n_query)
    n_left = (n_db + 1) // 2
    spacing = float(conf.db_spacing_m)
    length = (n_left - 1) * spacing
    lane = conf.lane_halfwidth_m
    rows = []
    for side, n in ((+1, n_left), (-1, n_db - n_left)):  # one pass per side, like two drives
        s = np.arange(n) * spacing + rng.uniform(-1, 1, n) * conf.db_pos_jitter_m
        u = rng.uniform(-lane, lane, n)
        phi = side * 90.0 + rng.uniform(-1, 1, n) * conf.db_yaw_jitter_deg
        pitch = conf.pitch_deg + rng.uniform(-1, 1, n)
        rows.append(np.stack([s, u, np.full(n, conf.cam_height_m), phi, pitch, np.zeros(n), np.full(n, side)], 1))
    db = np.concatenate(rows)
    n_off = round(conf.query_offmap_frac * n_q)
    q_side = rng.choice([-1.0, 1.0], n_q)
    s = rng.uniform(0, length, n_q)
    lo, hi = conf.offmap_dist_m
    off = rng.choice(n_q, n_off, replace=False)
    s[off] = np.where(rng.random(n_off) < 0.5, -rng.uniform(lo, hi, n_off), length + rng.uniform(lo, hi, n_off))
    q = np.stack(
        [
            s,
            rng.uniform(-lane, lane, n_q),
            conf.cam_height_m + rng.uniform(-1, 1, n_q) * conf.query_height_jitter_m,
            q_side * 90.0 + rng.uniform(-1, 1, n_q) * conf.query_yaw_jitter_deg,
            conf.pitch_deg + rng.uniform(-1, 1, n_q) * conf.query_pitch_jitter_deg,
            rng.uniform(-1, 1, n_q) * conf.query_roll_jitter_deg,
            q_side,
        ],
        1,
    )
    return db, q, length


def _to_utm(conf: SyntheticConf, poses: np.ndarray) -> np.ndarray:
    """Street frame -> [easting, northing, compass heading], rounded as written to JSON."""
    b = np.deg2rad(conf.street_bearing_deg)
    e0, n0 = conf.origin_utm
    s, u, phi = poses[:, 0], poses[:, 1], poses[:, 3]
    # Along the street: bearing b = (sin b, cos b); its left: bearing b - 90 = (-cos b, sin b).
    east = e0 + s * np.sin(b) - u * np.cos(b)
    north = n0 + s * np.cos(b) + u * np.sin(b)
    heading = (conf.street_bearing_deg - phi) % 360.0  # yaw phi turns left, compass turns right
    return np.stack([np.round(east, 3), np.round(north, 3), np.round(heading, 2) % 360.0], 1)


def _readme(conf: SyntheticConf, counts: dict[str, int]) -> str:
    return (
        "# Synthetic street (demo data)\n\n"
        "Not real photographs: generated by `dataset/synthetic.py` (generator version "
        f"{GENERATOR_VERSION}) with seed {conf.seed}. Procedural facades on both sides of a straight "
        "street, rendered into pinhole cameras; queries are a second capture with other poses and "
        "photometric changes. Same layout as the London data (database/, query/, london_gt.h5), and the "
        "ground truth follows the same rule from the locations (dataset/relevance.py).\n\n"
        f"{counts['database']} map images, {counts['query']} queries, {counts['relevant_pairs']} relevant "
        f"pairs; {counts['queries_with_relevant']} queries have at least one relevant map image.\n\n"
        "Regenerate with `dataset.synthetic.main(out_dir, conf)`; the conf used is in manifest.json:\n\n"
        f"```json\n{json.dumps(conf.model_dump(mode='json'), indent=1, sort_keys=True)}\n```\n"
    )


def _generate(out: Path, conf: SyntheticConf) -> dict[str, int]:
    import h5py

    seed_seq = np.random.SeedSequence(int(conf.seed))
    pose_seed, tex_seed, photo_seed = seed_seq.spawn(3)
    db, q, length = _poses(conf, np.random.default_rng(pose_seed))
    hi = conf.offmap_dist_m[1]
    reach = (conf.street_width_m / 2 + conf.lane_halfwidth_m) * np.tan(
        np.deg2rad(max(conf.db_yaw_jitter_deg, conf.query_yaw_jitter_deg) + conf.hfov_deg / 2 + 10)
    )
    margin = float(np.ceil(hi + reach + 10))  # strips extend past every camera's view
    renderer = _Renderer(conf, -margin, length + margin, tex_seed)
    q_enc = [int(cv2.IMWRITE_JPEG_QUALITY), int(conf.jpeg_quality)]
    photo_db, photo_q = photo_seed.spawn(2)
    listing = {}
    for name, poses, prefix, pseeds in (("database", db, "db", photo_db), ("query", q, "q", photo_q)):
        (out / name / "images").mkdir(parents=True)
        paths = []
        for i, (pose, ps) in enumerate(zip(poses, pseeds.spawn(len(poses)), strict=True)):
            s, u, z, phi, pitch, roll = pose[:6]
            img = renderer.render(s, u, z, phi, pitch, roll, side=int(pose[6]))
            img = _photometric(img, np.random.default_rng(ps), strong=name == "query")
            ok, buf = cv2.imencode(".jpg", img, q_enc)
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            rel = f"{name}/images/{prefix}_{i + 1:04d}.jpg"
            (out / rel).write_bytes(buf.tobytes())
            paths.append(rel)
        loc = _to_utm(conf, poses)
        listing[name] = loc
        (out / name / f"{name}.json").write_text(json.dumps({"im_paths": paths, "loc": loc.tolist()}), encoding="utf-8")
    sim = sim_matrix(listing["query"], listing["database"])
    fov = fov_matrix(listing["query"], listing["database"])
    with h5py.File(out / "london_gt.h5", "w") as f:
        # No timestamps in the file: the same conf gives byte-identical output.
        f.create_dataset("sim", data=sim.astype(np.uint8), track_times=False)
        f.create_dataset("fov", data=fov.astype(np.float16), track_times=False)
    counts = {
        "database": len(db),
        "query": len(q),
        "relevant_pairs": int(sim.sum()),
        "queries_with_relevant": int(sim.any(axis=1).sum()),
    }
    manifest = {
        "generator": "dataset.synthetic",
        "version": GENERATOR_VERSION,
        "conf": conf.model_dump(mode="json"),
        "counts": counts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    (out / "README.md").write_text(_readme(conf, counts), encoding="utf-8")
    return counts


def _matches(out_dir: Path, conf: SyntheticConf) -> bool:
    try:
        m = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(m, dict) and m.get("version") == GENERATOR_VERSION and m.get("conf") == conf.model_dump(mode="json")
    )


def main(out_dir: Path, conf: SyntheticConf | Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Generate the synthetic data set into out_dir (a conf, or settings over the defaults); return out_dir.

    An existing folder made with the same conf is returned as is unless overwrite. The data are built
    in a temporary sibling folder and renamed into place, so out_dir is never half-written.
    """
    conf = as_conf(conf)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        if _matches(out_dir, conf):
            return out_dir
        if not (out_dir.is_dir() and not any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir}: exists and was not generated with this conf; pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _generate(tmp, conf)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            if not overwrite and _matches(out_dir, conf):
                shutil.rmtree(tmp)  # another process published the same data meanwhile
                return out_dir
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # rename onto the empty placeholder
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
