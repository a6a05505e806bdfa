"""
Simulated downward-camera views of the demo scene, with their ground truth.

A view is one perspective resampling of the scene (`Scene.view_homography` + `Scene.sample`): any
centre, any heading (degrees clockwise from true north of the direction the image top points; ENU
yaw = 90 - heading), a ground footprint of `scale` x footprint_px scene pixels (30 m each) and a
tilt (pitch forward, roll right, in degrees). Then appearance changes stand in for another camera,
season and light (`Appearance`, `apply_appearance`). Some are undone by per-image, per-channel
standardisation (global exposure and colour gains), and on purpose some are not: local shading,
haze with spatially varying transmission, and a seasonal colour change that depends on each
pixel's own colour (vegetation turning yellow or deeper green, water darker or lighter). They model
appearance only: the ground itself (one Landsat date) does not change.

Everything random draws from the numpy Generator passed in, so a seed reproduces a view exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import math
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from taco_cvgl.demo.scene import Region, region_mask, Scene

EFFECTS = ('seasonal', 'shading', 'haze', 'blur', 'exposure', 'colour', 'noise', 'jpeg')


@dataclass(frozen=True)
class Appearance:
    """
    How much each appearance change applies: strength (0..1) times the effect's weight.

    At strength 1: seasonal hue shifts of vegetation of 40-80 degrees on average (patchy); local
    shading of about x/÷ 1.4 (one standard deviation); haze with transmission down to 0.25 (0.5
    to 0.85 typical); blur up to 1.5 px sigma; exposure x/÷ 1.5 and gamma 0.7..1.4; per-channel
    gains of about 8 %; sensor noise of about 4 % at mid grey; JPEG quality down to 35 (the jpeg
    weight is 0 unless asked for).
    """

    strength: float = 0.5
    seasonal: float = 1.0
    shading: float = 1.0
    haze: float = 1.0
    blur: float = 1.0
    exposure: float = 1.0
    colour: float = 1.0
    noise: float = 1.0
    jpeg: float = 0.0

    @classmethod
    def none(cls) -> 'Appearance':
        """Return an appearance that leaves the image as sampled."""
        return cls(strength=0.0)

    @classmethod
    def only(cls, effect: str, strength: float = 1.0) -> 'Appearance':
        """Return an appearance with one effect (a name from EFFECTS) at the given strength."""
        if effect not in EFFECTS:
            raise ValueError(f'unknown effect {effect!r}; known: {", ".join(EFFECTS)}')
        weights = dict.fromkeys(EFFECTS, 0.0)
        weights[effect] = 1.0
        return replace(cls(strength=strength), **weights)

    def amount(self, effect: str) -> float:
        """Return strength x weight of an effect, clipped to 0..1."""
        return float(np.clip(self.strength * getattr(self, effect), 0.0, 1.0))


@dataclass
class View:
    """
    A simulated camera image and its ground truth.

    latitude/longitude (WGS84 degrees) and col/row (scene pixels) are of the ground point at the
    image centre; heading_deg is clockwise from true north of the image top; scale is the ground
    footprint over footprint_px; height_m is the camera's height above the (flat) ground.
    """

    image: np.ndarray
    latitude: float
    longitude: float
    heading_deg: float
    col: float
    row: float
    scale: float
    pitch_deg: float
    roll_deg: float
    height_m: float
    valid_fraction: float
    stamp_s: Optional[float] = None


@dataclass
class Waypoint:
    """A point of a flight: time (s), image-centre ground point (scene px, WGS84) and heading."""

    stamp_s: float
    col: float
    row: float
    heading_deg: float
    latitude: float
    longitude: float


def render_view(scene: Scene, centre_px: Sequence[float], heading_deg: float,
                scale: float = 1.0, tilt_deg: Tuple[float, float] = (0.0, 0.0),
                out_px: int = 128, rng: Optional[np.random.Generator] = None,
                appearance: Optional[Appearance] = None, footprint_px: float = 96.0,
                fov_deg: float = 60.0) -> View:
    """
    Render a camera view centred on centre_px (col, row) and return it with its ground truth.

    tilt_deg = (pitch forward, roll right) of the optical axis from nadir, degrees. appearance
    None applies no change; otherwise rng (required then) draws its random parameters.
    """
    pitch, roll = (float(tilt_deg), 0.0) if np.isscalar(tilt_deg) else map(float, tilt_deg)
    hom, height_m = scene.view_homography(centre_px, heading_deg, footprint_px * scale, out_px,
                                          pitch, roll, fov_deg)
    image, valid_fraction = scene.sample(hom, out_px)
    if appearance is not None and appearance.strength > 0:
        if rng is None:
            raise ValueError('render_view needs rng to apply an appearance change')
        image = apply_appearance(image, rng, appearance)
    col, row = float(centre_px[0]), float(centre_px[1])
    lat, lon = scene.pixel_to_latlon(col, row)
    return View(image=image, latitude=float(lat), longitude=float(lon),
                heading_deg=float(np.mod(heading_deg, 360.0)), col=col, row=row,
                scale=float(scale), pitch_deg=pitch, roll_deg=roll, height_m=height_m,
                valid_fraction=valid_fraction)


def random_view(scene: Scene, centre_px: Sequence[float], rng: np.random.Generator,
                strength: float = 0.5, heading_deg: Optional[float] = None,
                scale_range: Tuple[float, float] = (0.8, 1.25), max_tilt_deg: float = 10.0,
                jitter_px: float = 0.0, out_px: int = 128, footprint_px: float = 96.0,
                fov_deg: float = 60.0) -> View:
    """
    Render a view near centre_px with random heading (unless given), scale, tilt, appearance.

    The centre moves by up to jitter_px scene pixels (uniform in a disc); pitch and roll are
    uniform in +-max_tilt_deg. Meant for training pairs (a tile and views of its place).
    """
    radius, angle = jitter_px * math.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * math.pi)
    centre = (centre_px[0] + radius * math.cos(angle), centre_px[1] + radius * math.sin(angle))
    heading = rng.uniform(0.0, 360.0) if heading_deg is None else heading_deg
    scale = rng.uniform(*scale_range)
    tilt = tuple(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
    return render_view(scene, centre, heading, scale, tilt, out_px, rng,
                       Appearance(strength=strength), footprint_px, fov_deg)


def apply_appearance(image: np.ndarray, rng: np.random.Generator,
                     appearance: Appearance) -> np.ndarray:
    """
    Return a copy of an RGB uint8 image changed as a camera, season and light would change it.

    Order follows the light's path: surface (seasonal colour), illumination (local shading),
    atmosphere (haze), optics (blur), camera (exposure and gamma, colour balance), sensor noise,
    compression.
    """
    img = image.astype(np.float32) / 255.0
    amount = appearance.amount
    if amount('seasonal') > 0:
        img = _seasonal(img, rng, amount('seasonal'))
    if amount('shading') > 0:
        s = amount('shading')
        shade = 0.35 * s * _smooth_field(rng, image.shape[:2], int(rng.integers(2, 5)))
        tint = [0.06 * s * _smooth_field(rng, image.shape[:2], 2) for _ in range(3)]
        img = img * np.exp(shade[..., None] + np.stack(tint, axis=-1))
    if amount('haze') > 0:
        s = amount('haze')
        density = np.clip(0.6 + 0.4 * _smooth_field(rng, image.shape[:2], 3), 0.0, 1.5)
        trans = 1.0 - s * rng.uniform(0.15, 0.5) * density          # transmission, 0.25..1
        airlight = rng.uniform(0.7, 0.95) * np.array(
            [rng.uniform(0.85, 0.95), rng.uniform(0.9, 1.0), 1.0], np.float32)  # bluish white
        img = img * trans[..., None] + airlight * (1.0 - trans[..., None])
    if amount('blur') > 0:
        sigma = amount('blur') * rng.uniform(0.3, 1.5)
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if amount('exposure') > 0:
        s = amount('exposure')
        gain, gamma = math.exp(rng.uniform(-0.4, 0.4) * s), math.exp(rng.uniform(-0.35, 0.35) * s)
        img = np.clip(img * gain, 0.0, 1.0) ** gamma
    if amount('colour') > 0:
        img = img * np.exp(rng.normal(0.0, 0.08 * amount('colour'), 3)).astype(np.float32)
    if amount('noise') > 0:
        s = amount('noise') * rng.uniform(0.5, 1.0)
        # Shot noise grows with the signal, read noise does not (both in units of full scale).
        sd = np.sqrt(0.003 * s * np.clip(img, 0.0, 1.0) + (0.01 * s) ** 2)
        img = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if amount('jpeg') > 0:
        quality = int(round(95 - 60 * amount('jpeg') * rng.uniform(0.5, 1.0)))
        ok, buf = cv2.imencode('.jpg', out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(out)


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Return a smooth random field of zero mean and unit standard deviation (float32)."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _seasonal(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """
    Shift hue, saturation and value by amounts that depend on each pixel's own colour.

    Vegetation (green hues) turns yellow-brown (dry season) or deeper green (wet season), with a
    strength that varies smoothly across the image (fields ripen unevenly); water (dark blue-cyan)
    gets darker or lighter and greener (turbid); bare soil (red-pink hues) changes saturation.
    """
    hsv = cv2.cvtColor(np.clip(img, 0.0, 1.0), cv2.COLOR_RGB2HSV)   # H 0..360, S and V 0..1
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # Weights 0..1 by hue band (degrees): vegetation 95-160, water 185-215 and dark, soil 320-30.
    veg = np.minimum(_ramp(hue, 70.0, 95.0), _ramp(-hue, -185.0, -160.0)) * _ramp(sat, 0.05, 0.2)
    water = (np.minimum(_ramp(hue, 170.0, 185.0), _ramp(-hue, -230.0, -215.0))
             * _ramp(sat, 0.1, 0.3)
             * _ramp(0.7 - val, 0.0, 0.2))
    soil = np.clip(1.0 - np.minimum(np.abs(hue - 360.0), hue) / 40.0, 0.0, 1.0)
    patchy = np.clip(1.0 + 0.5 * _smooth_field(rng, img.shape[:2], 4), 0.2, 2.0) * veg
    if rng.uniform() < 0.6:        # dry season: greens towards yellow-brown, paler, brighter
        d_hue, d_sat, d_val = -rng.uniform(40, 80), -rng.uniform(0, 0.4), rng.uniform(0.1, 0.5)
    else:                          # wet season: deeper, more saturated greens
        d_hue, d_sat, d_val = rng.uniform(-10, 10), rng.uniform(0.2, 0.5), -rng.uniform(0.1, 0.3)
    w_val, w_hue = rng.uniform(-0.5, 0.5), -rng.uniform(0, 30)
    s_sat, s_hue = rng.uniform(-0.4, 0.4), rng.uniform(-10, 10)
    hue = hue + s * (d_hue * patchy + w_hue * water + s_hue * soil)
    sat = sat * (1.0 + s * (d_sat * patchy + s_sat * soil))
    val = val * (1.0 + s * d_val * patchy) * np.exp(s * w_val * water)
    hsv = np.stack([np.mod(hue, 360.0), np.clip(sat, 0, 1), np.clip(val, 0, 1)], axis=-1)
    return cv2.cvtColor(hsv.astype(np.float32), cv2.COLOR_HSV2RGB)


def view_radius_px(scene: Scene, footprint_px: float = 96.0, max_scale: float = 1.25,
                   max_tilt_deg: float = 10.0, fov_deg: float = 60.0) -> float:
    """Return the largest distance (scene px) from a view's centre to its image corners."""
    centre = ((scene.width - 1) / 2.0, (scene.height - 1) / 2.0)
    hom, _ = scene.view_homography(centre, 0.0, footprint_px * max_scale, 64,
                                   max_tilt_deg, max_tilt_deg, fov_deg)
    corners = hom @ np.array([[-0.5, -0.5, 1], [63.5, -0.5, 1], [63.5, 63.5, 1],
                              [-0.5, 63.5, 1]], float).T
    corners = corners[:2] / corners[2]
    return float(np.max(np.hypot(corners[0] - centre[0], corners[1] - centre[1])))


def safe_centres(scene: Scene, region: Region, clearance_px: float) -> np.ndarray:
    """Return a bool mask of centres with only valid, in-region pixels within clearance_px."""
    allowed = np.pad((region_mask(scene, region) & scene.valid).astype(np.uint8), 1)
    dist = cv2.distanceTransform(allowed, cv2.DIST_L2, 5)[1:-1, 1:-1]   # px to nearest outside
    return dist >= clearance_px


def flight_path(scene: Scene, region: Region, n: int, rng: np.random.Generator,
                speed_mps: float = 50.0, rate_hz: float = 0.2, heading_mode: str = 'random',
                clearance_px: Optional[float] = None, t0_s: float = 0.0,
                turn_sd_deg: float = 4.0) -> List[Waypoint]:
    """
    Return n waypoints of a smooth random flight that keeps every view inside the region.

    The aircraft flies at speed_mps with an image every 1 / rate_hz s (default 250 m apart),
    its track turning by a smoothly varying rate and veering off before it would leave the
    region or the scene's valid pixels by less than clearance_px (default: the corner radius of
    a view at scale 1.25 tilted 10 degrees, view_radius_px). heading_mode 'random' draws each
    image's heading uniformly in [0, 360) (a free-turning camera); 'track' points the image top
    along the true track, give or take a 5 degree crab angle.
    """
    if heading_mode not in ('random', 'track'):
        raise ValueError(f"heading_mode must be 'random' or 'track', got {heading_mode!r}")
    if n < 1 or speed_mps <= 0 or rate_hz <= 0:
        raise ValueError('n, speed_mps and rate_hz must be positive')
    clearance = view_radius_px(scene) if clearance_px is None else clearance_px
    safe = safe_centres(scene, region, clearance)
    where = np.flatnonzero(safe)
    if where.size == 0:
        raise ValueError(f'no point of the region is {clearance:.0f} px inside valid pixels')

    def is_safe(col: float, row: float) -> bool:
        c, r = int(round(col)), int(round(row))
        return 0 <= r < safe.shape[0] and 0 <= c < safe.shape[1] and bool(safe[r, c])

    step = speed_mps / rate_hz / scene.pixel_size_m           # scene px between images
    look = max(step, 20.0)                                     # px ahead that must stay safe
    start = int(rng.choice(where))
    pos = np.array([start % safe.shape[1], start // safe.shape[1]], float)
    track, turn = rng.uniform(0.0, 2.0 * math.pi), 0.0         # grid bearing, rad; rad / step
    max_turn = math.radians(20.0)
    offsets = [0.0] + [sign * math.radians(d) for d in range(15, 181, 15) for sign in (1, -1)]
    states = []
    for _ in range(n):
        states.append((pos.copy(), track))
        turn = float(np.clip(0.8 * turn + rng.normal(0.0, math.radians(turn_sd_deg)),
                             -max_turn, max_turn))
        for offset in offsets:
            cand = track + turn + offset
            direction = np.array([math.sin(cand), -math.cos(cand)])   # (col, row) per px
            nxt = pos + step * direction
            ahead = pos + look * direction
            if is_safe(*nxt) and is_safe(*ahead):
                track, pos = cand, nxt
                if offset:
                    turn = math.copysign(max_turn / 2.0, offset)    # keep turning away
                break
    cols = np.array([p[0] for p, _ in states])
    rows = np.array([p[1] for p, _ in states])
    lat, lon = scene.pixel_to_latlon(cols, rows)
    north = scene.grid_bearing_of_north(cols, rows)
    waypoints = []
    for k, (_, trk) in enumerate(states):
        if heading_mode == 'random':
            heading = rng.uniform(0.0, 360.0)
        else:
            heading = math.degrees(trk) - north[k] + rng.normal(0.0, 5.0)
        waypoints.append(Waypoint(stamp_s=t0_s + k / rate_hz, col=float(cols[k]),
                                  row=float(rows[k]), heading_deg=float(np.mod(heading, 360.0)),
                                  latitude=float(lat[k]), longitude=float(lon[k])))
    return waypoints


def simulate_flight(scene: Scene, region: Region, n: int, rng: np.random.Generator,
                    strength: float = 0.5, scale_range: Tuple[float, float] = (0.8, 1.25),
                    max_tilt_deg: float = 10.0, out_px: int = 128, footprint_px: float = 96.0,
                    fov_deg: float = 60.0, appearance: Optional[Appearance] = None,
                    **path_options) -> List[View]:
    """
    Return the n views of a flight_path, each with random scale, tilt and appearance.

    appearance overrides Appearance(strength=strength); path_options go to flight_path (speed_mps,
    rate_hz, heading_mode, t0_s). Each view carries its waypoint's time in stamp_s.
    """
    clearance = view_radius_px(scene, footprint_px, scale_range[1], max_tilt_deg, fov_deg)
    path_options.setdefault('clearance_px', clearance)
    look = appearance if appearance is not None else Appearance(strength=strength)
    views = []
    for wp in flight_path(scene, region, n, rng, **path_options):
        scale = rng.uniform(*scale_range)
        tilt = tuple(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
        view = render_view(scene, (wp.col, wp.row), wp.heading_deg, scale, tilt, out_px, rng,
                           look, footprint_px, fov_deg)
        view.stamp_s = wp.stamp_s
        views.append(view)
    return views


__all__ = ['Appearance', 'EFFECTS', 'View', 'Waypoint', 'apply_appearance', 'flight_path',
           'random_view', 'render_view', 'safe_centres', 'simulate_flight', 'view_radius_px']
