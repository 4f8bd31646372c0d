"""The pure renderer of the procedural FACS faces: ``FaceParams`` (identity, pose, photometry) + 12 AU intensities
-> a small RGB cartoon face. Sampling, labels and captions live in ``datamodules/toyfaces.py``.

Everything is drawn with PIL ImageDraw as polygons in a unit square at ``supersample`` x the output resolution,
then box-downscaled (antialiasing). Pose (rotation/scale/shift) is applied to the polygon coordinates, so no
image resampling is needed. AU effects (intensity 0..5, DISFA order 1,2,4,5,6,9,12,15,17,20,25,26):
  AU1 inner brow up (+ central forehead lines)   AU2 outer brow up (+ lateral forehead lines)
  AU4 brows down and inward (+ vertical knit lines) AU5 upper lid up (eyes open wider, white above the iris)
  AU6 cheeks up and rosier, lower lid narrows the eye from below (+ crow's feet)
  AU9 wrinkle lines across the nose, nostrils up and wider   AU12 lip corners up and out (+ smile folds);
  ``au12_side`` = "left"/"right" draws a single corner (contempt)   AU15 lip corners down (+ marionette lines)
  AU17 lower lip pushed up (arched mouth), chin crease and dimpling   AU20 mouth wider, flatter, thinner lips
  AU25 lips part (dark gap, teeth)   AU26 jaw drop (taller opening, chin lower)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datamodules.labels import DISFA_AUS

RGB = tuple  # (r, g, b) ints 0..255

HAIR_STYLES: tuple[str, ...] = ("none", "short", "long", "fringe")


@dataclass(frozen=True)
class FaceParams:
    """Identity, pose and photometry of one face (plain python values: ``dataclasses.asdict`` is json-safe)."""

    # identity: geometry (multipliers around 1, offsets in image units)
    face_width: float = 1.0
    face_height: float = 1.0
    jaw_taper: float = 0.15
    eye_spacing: float = 1.0
    eye_size: float = 1.0
    brow_height: float = 0.0      # + = higher resting brows
    brow_tilt: float = 0.0        # + = inner ends higher at rest (looks worried)
    brow_thickness: float = 1.0
    nose_width: float = 1.0
    nose_length: float = 1.0
    mouth_width: float = 1.0
    mouth_curve: float = 0.0      # + = resting corners up
    lip_thickness: float = 1.0
    blush: float = 0.05
    # identity: appearance
    skin: RGB = (225, 180, 145)
    lips: RGB = (190, 110, 105)
    iris: RGB = (90, 60, 40)
    hair: RGB = (70, 45, 30)
    brows: RGB = (60, 40, 28)
    hair_style: str = "short"
    background: RGB = (120, 150, 180)
    clothes: RGB = (60, 80, 120)
    glasses: bool = False
    # pose
    rotation: float = 0.0         # degrees, + = counter-clockwise
    scale: float = 1.0
    shift_x: float = 0.0          # image units
    shift_y: float = 0.0
    yaw: float = 0.0              # -1..1, features shift sideways
    # photometry
    light_angle: float = 0.0      # radians, direction the light comes from
    light_strength: float = 0.0   # 0..1 brightness gradient amplitude
    noise_std: float = 0.0        # gaussian noise std in 0..255 units
    blur_radius: float = 0.0      # at 48 px; 0 = none
    # expression rendering detail: which lip corners AU12 pulls ("both" or a single side for contempt)
    au12_side: str = "both"

    def __post_init__(self) -> None:
        if self.hair_style not in HAIR_STYLES:
            raise ValueError(f"hair_style must be one of {HAIR_STYLES}, got {self.hair_style!r}")
        if self.au12_side not in ("both", "left", "right"):
            raise ValueError(f"au12_side must be 'both', 'left' or 'right', got {self.au12_side!r}")


# ----------------------------------------------------------------------------------------------- helpers
_T = np.linspace(0.0, 2.0 * np.pi, 33)[:-1]
_COS, _SIN = np.cos(_T), np.sin(_T)
_SIN_LOW = np.clip(_SIN, 0, None)
_U = np.linspace(-1.0, 1.0, 17)  # mouth parameter, left corner -> right corner
_ARC = np.linspace(0.0, np.pi, 11)
_ARC_COS, _ARC_SIN = np.cos(_ARC), np.sin(_ARC)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    t = float(min(max(t, 0.0), 1.0))
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _shade(c, k: float) -> tuple[int, int, int]:
    """Darken (k > 0) or lighten (k < 0) a colour."""
    return _mix(c, (0, 0, 0), k) if k >= 0 else _mix(c, (255, 255, 255), -k)


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    v = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return v[None, :, None], v[:, None, None]  # x (1,S,1), y (S,1,1)


class _Canvas:
    """Unit-square drawing with the pose transform applied to every coordinate."""

    def __init__(self, params: FaceParams, px: int):
        self.img = Image.new("RGB", (px, px), tuple(params.background))
        self.draw = ImageDraw.Draw(self.img)
        a = np.deg2rad(params.rotation)
        s = params.scale * px
        # y points down, so a counter-clockwise rotation on screen is [[c, s], [-s, c]]
        self.m = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]).T * s
        self.off = np.array([0.5 + params.shift_x, 0.5 + params.shift_y]) * px
        self.unit = s

    def xf(self, pts: np.ndarray) -> list[float]:
        return ((pts - 0.5) @ self.m + self.off).ravel().tolist()

    def poly(self, pts: np.ndarray, fill) -> None:
        self.draw.polygon(self.xf(pts), fill=fill)

    def line(self, pts: np.ndarray, fill, width: float) -> None:
        self.draw.line(self.xf(pts), fill=fill, width=max(1, int(round(width * self.unit))))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill) -> None:
        self.poly(np.stack([cx + rx * _COS, cy + ry * _SIN], 1), fill)


@lru_cache(maxsize=None)
def _bezier_weights(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t ** 2], 1)  # (n, 3)


@lru_cache(maxsize=None)
def _ramp(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n)


def _curve(p0, p1, p2, n: int = 9) -> np.ndarray:
    """Quadratic Bezier through control points (unit coords), (n, 2)."""
    return _bezier_weights(n) @ np.array((p0, p1, p2), dtype=np.float64)


def _thick(spine: np.ndarray, w0: float, w1: float) -> np.ndarray:
    """A stroke polygon around a spine, width tapering from w0 to w1."""
    d = np.empty_like(spine)
    d[1:-1] = spine[2:] - spine[:-2]
    d[0], d[-1] = spine[1] - spine[0], spine[-1] - spine[-2]
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    w = (w0 + (w1 - w0) * _ramp(len(spine)))[:, None] / 2
    return np.concatenate([spine + nrm * w, (spine - nrm * w)[::-1]])


# ----------------------------------------------------------------------------------------------- renderer
def render_face(params: FaceParams, aus: np.ndarray, size: int, rng: np.random.Generator | None = None,
                supersample: int = 4, au_gain: float = 1.0) -> np.ndarray:
    """Draw one face. ``aus``: (12,) intensities 0..5 in DISFA order. Returns uint8 (size, size, 3).

    ``rng`` only drives the pixel noise (``params.noise_std``); pass None for noise-free output.
    ``au_gain`` scales how far every AU moves the face (a drawing exaggeration; the AU labels stay 0..5).
    """
    aus = np.asarray(aus, dtype=np.float64).reshape(-1)
    if aus.shape[0] != len(DISFA_AUS):
        raise ValueError(f"aus must have {len(DISFA_AUS)} values (DISFA order), got {aus.shape[0]}")
    a = dict(zip(DISFA_AUS, (np.clip(aus, 0.0, 5.0) * au_gain).tolist()))
    p = params
    cv = _Canvas(p, size * supersample)
    skin = tuple(p.skin)

    cx = 0.5 + 0.03 * p.yaw            # feature midline (yaw moves features sideways inside the head)
    hx, hy = 0.5, 0.54                 # head centre
    hw, hh = 0.30 * p.face_width, 0.38 * p.face_height
    eye_y = hy - 0.09
    eye_dx = 0.115 * p.eye_spacing * p.face_width
    brow_y = eye_y - 0.065 - p.brow_height
    mouth_y = hy + 0.205 * p.face_height
    nose_y = hy + 0.085 * p.nose_length * p.face_height
    chin_drop = 0.016 * a[26] - 0.004 * a[17]

    # ---- hair behind, neck, shoulders, ears, head
    if p.hair_style == "long":
        top = np.stack([hx + 1.22 * hw * _ARC_COS, hy - 1.1 * hh * _ARC_SIN], 1)[::-1]
        low = hy + 0.95 * hh
        cv.poly(np.concatenate([top, [[hx + 1.22 * hw, low], [hx - 1.22 * hw, low]]]), p.hair)
    cv.poly(np.array([[hx - 0.1, hy + 0.6 * hh], [hx + 0.1, hy + 0.6 * hh], [hx + 0.1, 1.1], [hx - 0.1, 1.1]]),
            _shade(skin, 0.18))
    cv.ellipse(hx, 1.1, 0.46, 0.2, tuple(p.clothes))
    if p.hair_style != "long":
        for side in (-1, 1):
            cv.ellipse(hx + side * 0.97 * hw, eye_y + 0.05, 0.035, 0.06, _shade(skin, 0.08))
    taper = 1.0 - p.jaw_taper * _SIN_LOW ** 2
    head = np.stack([hx + hw * _COS * taper, hy + hh * _SIN + chin_drop * _SIN_LOW ** 4], 1)
    cv.poly(head, skin)

    # ---- cheeks (AU6: raised, rosier)
    cheek_c = _mix(skin, (215, 90, 95), p.blush + 0.07 * a[6])
    if cheek_c != skin:
        for side in (-1, 1):
            cv.ellipse(cx + side * (eye_dx + 0.01), eye_y + 0.125 - 0.011 * a[6], 0.06, 0.042 + 0.002 * a[6], cheek_c)

    # ---- forehead lines (AU1 centre, AU2 sides), under the hair
    line_c = _shade(skin, 0.3)
    if a[1] > 0.8:
        c = _mix(skin, line_c, (a[1] - 0.8) / 2.5)
        for k in range(2):
            y = brow_y - 0.045 - 0.02 * k - 0.006 * a[1]
            cv.line(_curve((cx - 0.06, y + 0.004), (cx, y - 0.006), (cx + 0.06, y + 0.004), 5), c, 0.007)
    if a[2] > 0.8:
        c = _mix(skin, line_c, (a[2] - 0.8) / 2.5)
        for side in (-1, 1):
            for k in range(2):
                y = brow_y - 0.042 - 0.02 * k - 0.006 * a[2]
                x0 = cx + side * (eye_dx - 0.01)
                cv.line(_curve((x0, y), (x0 + side * 0.04, y - 0.01), (x0 + side * 0.075, y + 0.004), 5), c, 0.006)

    # ---- hair on top
    if p.hair_style != "none":
        temple_y = eye_y - 0.035
        s0 = float(np.arcsin(min(1.0, max(-1.0, (hy - temple_y) / (1.08 * hh)))))
        t = np.pi + s0 + (np.pi - 2 * s0) * _ramp(15)
        cap = np.stack([hx + 1.06 * hw * np.cos(t), hy + 1.08 * hh * np.sin(t)], 1)
        v = 1.0 - 2.0 * _ramp(13)
        if p.hair_style == "fringe":
            line_y = brow_y - 0.045 + 0.012 * (np.arange(13) % 2)
        else:
            line_y = hy - 0.7 * hh + 0.012 * (1 - v ** 2)
        hl = np.stack([hx + v * 0.98 * hw, line_y + (temple_y - line_y) * np.abs(v) ** 4], 1)
        cv.poly(np.concatenate([cap, hl]), p.hair)

    # ---- eyes (AU5 opens the upper lid, AU6 pushes the lower lid up)
    ew = 0.052 * p.eye_size
    eu = 0.026 * p.eye_size * (1.0 + 0.16 * a[5])
    el = 0.021 * p.eye_size * (1.0 - 0.12 * a[6])
    ri = 0.021 * p.eye_size
    dark = (35, 28, 28)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        upper = np.stack([ex + ew * _ARC_COS, eye_y - eu * _ARC_SIN], 1)
        lower = np.stack([ex - ew * _ARC_COS, eye_y + el * _ARC_SIN], 1)
        cv.poly(np.concatenate([upper, lower]), (240, 238, 232))
        for r, col in ((ri, tuple(p.iris)), (0.45 * ri, (15, 12, 12))):
            ix = ex + r * _COS
            iy = eye_y + 0.002 + r * _SIN
            half = np.sqrt(np.clip(1 - ((ix - ex) / ew) ** 2, 0, None))
            cv.poly(np.stack([ix, np.clip(iy, eye_y - eu * half, eye_y + el * half)], 1), col)
        cv.line(upper, dark, 0.011)
        cv.line(lower[2:-2], _shade(skin, 0.35), 0.005)
        if a[6] > 1.0:  # lower-lid bulge and crow's feet
            c = _mix(skin, line_c, (a[6] - 1.0) / 3.0)
            y0 = eye_y + el + 0.02 - 0.002 * a[6]
            cv.line(_curve((ex - 0.04, y0), (ex, y0 + 0.012), (ex + 0.04, y0), 5), c, 0.006)
            ox = ex + side * (ew + 0.012)
            for dy in (-0.014, 0.0, 0.014):
                cv.line(np.array([[ox, eye_y + dy * 0.5], [ox + side * 0.03, eye_y + dy * 1.6]]), c, 0.005)
    if p.glasses:
        frame = (30, 30, 35)
        for side in (-1, 1):
            ex = cx + side * eye_dx
            ring = np.stack([ex + 0.075 * _COS, eye_y + 0.005 + 0.055 * _SIN], 1)
            cv.line(np.concatenate([ring, ring[:1]]), frame, 0.008)
        cv.line(np.array([[cx - eye_dx + 0.075, eye_y], [cx + eye_dx - 0.075, eye_y]]), frame, 0.008)

    # ---- brows (AU1 inner up, AU2 outer up, AU4 down + inward)
    for side in (-1, 1):
        inner_y = brow_y - p.brow_tilt - 0.011 * a[1] + 0.010 * a[4] + 0.001 * a[9]
        outer_y = brow_y + 0.004 - 0.012 * a[2] + 0.005 * a[4]
        mid_y = 0.5 * (inner_y + outer_y) - 0.014 - 0.003 * a[1] - 0.004 * a[2] + 0.002 * a[4]
        inner_x = cx + side * (eye_dx - 0.052 - 0.008 * a[4])
        outer_x = cx + side * (eye_dx + 0.065)
        spine = _curve((inner_x, inner_y), (cx + side * (eye_dx + 0.005), mid_y), (outer_x, outer_y), 7)
        cv.poly(_thick(spine, 0.024 * p.brow_thickness, 0.012 * p.brow_thickness), tuple(p.brows))
    if a[4] > 0.8:  # knit lines between the brows
        c = _mix(skin, _shade(skin, 0.4), (a[4] - 0.8) / 2.5)
        for side in (-1, 1):
            x = cx + side * 0.014
            y = brow_y + 0.008 * a[4]
            cv.line(np.array([[x, y - 0.022], [x + side * 0.003, y + 0.02]]), c, 0.007)

    # ---- nose (AU9: wrinkles across the bridge, nostrils up and wider)
    nose_c = _shade(skin, 0.28)
    nx = cx + 0.012 * p.yaw
    nw = 0.034 * p.nose_width * (1 + 0.05 * a[9])
    ny = nose_y - 0.007 * a[9]    # AU9 pulls the nose tip up
    lx = nx + (0.022 if np.cos(p.light_angle) < 0 else -0.022)
    cv.line(np.array([[lx, eye_y + 0.03], [lx * 0.6 + nx * 0.4, ny - 0.03]]), _shade(skin, 0.12), 0.008)
    cv.line(_curve((nx - nw, ny - 0.008), (nx, ny + 0.022), (nx + nw, ny - 0.008), 7), nose_c, 0.009)
    for side in (-1, 1):
        cv.ellipse(nx + side * 0.5 * nw, ny + 0.001, 0.009, 0.0055, _shade(skin, 0.5))
    if a[9] > 0.5:
        c = _mix(skin, _shade(skin, 0.45), (a[9] - 0.5) / 2.5)
        for k in range(3):
            y = eye_y + 0.03 + 0.017 * k
            hwid = 0.022 + 0.004 * k
            cv.line(_curve((nx - hwid, y + 0.004), (nx, y - 0.005), (nx + hwid, y + 0.004), 5), c, 0.009)

    # ---- mouth
    sides = {"both": (1.0, 1.0), "left": (1.0, 0.0), "right": (0.0, 1.0)}[p.au12_side]  # image left / right
    flat = 1.0 / (1.0 + 0.12 * a[20])
    mw = 0.095 * p.mouth_width * p.face_width + 0.012 * a[20]
    up = [(p.mouth_curve + 0.014 * a[12] * s12 - 0.010 * a[15]) * flat - 0.002 * a[20] for s12 in sides]
    wid = [mw + 0.005 * a[12] * s12 for s12 in sides]
    u = _U
    neg = u < 0
    xs = cx + 0.6 * 0.012 * p.yaw + u * np.where(neg, wid[0], wid[1])
    bulge = 1.0 - u ** 2
    yc = mouth_y - 0.005 * a[17] * bulge - np.where(neg, up[0], up[1]) * u ** 2
    gap = max(0.0, 0.0065 * a[25] + 0.012 * a[26] - 0.003 * a[17])
    prof = bulge ** 0.6
    yt = yc - 0.3 * gap * prof
    yb = yc + 0.7 * gap * prof
    thin = 1.0 - 0.06 * a[20]
    tu = 0.02 * p.lip_thickness * thin * np.sqrt(bulge) * (1 - 0.3 * np.exp(-(u / 0.18) ** 2))
    tl = 0.026 * p.lip_thickness * thin * (1 + 0.06 * a[17]) * np.sqrt(bulge)
    lip_c = tuple(p.lips)
    cv.poly(np.concatenate([np.stack([xs, yt - tu], 1), np.stack([xs, yt], 1)[::-1]]), lip_c)
    cv.poly(np.concatenate([np.stack([xs, yb], 1), np.stack([xs, yb + tl], 1)[::-1]]), _shade(lip_c, -0.08))
    if gap > 0.003:
        cv.poly(np.concatenate([np.stack([xs, yt], 1), np.stack([xs, yb], 1)[::-1]]), (70, 22, 30))
        if gap > 0.012:
            inner = np.abs(u) < 0.75
            teeth = min(0.35 * gap, 0.016) * prof[inner]
            cv.poly(np.concatenate([np.stack([xs[inner], yt[inner]], 1),
                                    np.stack([xs[inner], yt[inner] + teeth], 1)[::-1]]), (235, 232, 220))
    else:
        cv.line(np.stack([xs, yc], 1), _shade(lip_c, 0.45), 0.007)
    # smile folds (AU12 per side, AU6, AU9), marionette lines (AU15), chin crease (AU17)
    for i, side in enumerate((-1, 1)):
        k = 0.09 * a[12] * sides[i] + 0.025 * a[6] + 0.04 * a[9]
        if k > 0.1:
            c = _mix(skin, _shade(skin, 0.4), k - 0.1)
            corner = np.array([xs[0 if side < 0 else -1], yc[0 if side < 0 else -1]])
            start = (nx + side * (nw + 0.012), ny - 0.005)
            cv.line(_curve(start, (corner[0] + side * 0.035, 0.5 * (start[1] + corner[1])),
                           (corner[0] + side * 0.012, corner[1] + 0.006), 7), c, 0.007)
        if a[15] > 0.8:
            c = _mix(skin, _shade(skin, 0.4), (a[15] - 0.8) / 3.0)
            corner = np.array([xs[0 if side < 0 else -1], yc[0 if side < 0 else -1]])
            cv.line(np.array([corner + [side * 0.006, 0.01], corner + [side * 0.012, 0.045]]), c, 0.007)
    chin_y = yb[8] + tl[8] + 0.028 + 0.6 * chin_drop
    if a[17] > 0.8:
        c = _mix(skin, _shade(skin, 0.45), (a[17] - 0.8) / 2.5)
        cv.line(_curve((cx - 0.045, chin_y + 0.006), (cx, chin_y - 0.014), (cx + 0.045, chin_y + 0.006), 7), c, 0.007)
        if a[17] > 2.0:
            for dx, dy in ((-0.02, 0.03), (0.0, 0.038), (0.02, 0.03)):
                cv.ellipse(cx + dx, chin_y + dy, 0.006, 0.004, c)

    # ---- downscale, light, blur, noise
    img = cv.img.reduce(supersample) if supersample > 1 else cv.img
    if p.blur_radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(p.blur_radius * size / 48.0))
    out = np.asarray(img, dtype=np.float32)
    if p.light_strength > 0:
        gx, gy = _grid(size)
        out = out * (1.0 + p.light_strength * 0.5 * (gx * np.cos(p.light_angle) + gy * np.sin(p.light_angle)))
    if p.noise_std > 0 and rng is not None:
        out = out + rng.normal(0.0, p.noise_std, out.shape).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
