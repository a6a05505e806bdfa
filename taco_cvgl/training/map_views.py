"""
Simulated camera views of a georeferenced map, for training on a map alone.

`taco-cvgl train --simulate-views N` gives each map tile N views made from the map itself, so
that a user with nothing but a map can fine-tune the embedder for the area: the (tile, view)
pairs are positives by GPS like any others (`data.generate_triplets`).

A map is either north-up tiles with their centres (the database CSV `image_path,latitude,
longitude[,heading]`, heading 0 or empty) or a GeoTIFF in a projected CRS, cut into tiles here
(`demo.scene.load_scene`, `make_tiles`). A view is the demo's camera simulator
(`demo.views.random_view`: the centre moved by up to `jitter_fraction` of the tile's width, any
heading, scale 0.8-1.25, tilt up to 10 degrees, blur, noise, light and seasonal colour at
strength 1) run over the ground around its tile, then turned north-up by its true heading
(`heading.north_up`, as the localizer turns a query by its heading prior): its CSV heading is 0.
Training adds the turns a prior leaves (`--rotate --rotate-max-deg 22.5`).

The ground around a tile: from a GeoTIFF, the file itself. From tiles, a mosaic in a local
north-up frame centred on the tile (azimuthal equidistant, the ENU of taco_cvgl.geo.geodesy): the
tile and every tile whose ground a view can reach, pasted at their offsets (geodesic, from the
centres, over the ground sampling distance, to the nearest pixel). Ground no tile covers is the
tile mirrored at its edges; the `real` column of views.csv gives each view's fraction of real
ground.

Ground sampling distance (GSD, metres per tile pixel) of tiles: given, or measured. Measured:
phase correlation of neighbouring tiles finds the pixel shift between two centres a known distance
apart (tiles of an overlapping grid); where no neighbours overlap, tiles are taken to abut
(GSD = spacing / width).

The output folder holds view_KKKKK_J.png (tile K, view J), views.csv (paths relative to the
folder; written last, so it marks a complete set), settings.json (what made them; a folder made
by the same settings is reused) and, for a GeoTIFF, tiles/ (`demo.scene.write_tiles`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pyproj import CRS
from taco_cvgl.demo.scene import load_scene, make_tiles, Scene, write_tiles
from taco_cvgl.demo.views import random_view, view_radius_px
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.atomic import atomic_path, sha256_of
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.geo.geodesy import angle_difference_deg, to_enu
from taco_cvgl.localization.heading import north_up
from taco_cvgl.mapdb.database import ImageRecord, read_csv
from taco_cvgl.training.data import pairs_within, records_enu

VIEWS_CSV = 'views.csv'
SETTINGS_FILE = 'settings.json'
TILES_FOLDER = 'tiles'
VIEW_COLUMNS = ('image_path', 'latitude', 'longitude', 'heading', 'tile', 'camera_heading',
                'real')
GEOTIFF_TILE_PX = 96          # default GeoTIFF tile footprint, in file pixels (the demo's)
GEOTIFF_MIN_VALID = 0.95      # a GeoTIFF tile or view keeps at least this much non-empty ground
GSD_PAIRS = 64                # neighbouring tile pairs phase-correlated to measure the GSD
# A phase-correlation peak counts when it is this strong (overlapping Landsat tiles mostly give
# 0.12-0.6, others under 0.1) and points within about 10 degrees of the centres' direction.
MIN_RESPONSE = 0.1
MIN_COSINE = 0.985


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """How many views each tile gets and how they differ from it (see `random_view`)."""

    per_tile: int = 1
    seed: int = 0
    jitter_fraction: float = 0.125            # of the tile width: the demo's 12 of 96 px
    max_jitter_m: float = math.inf            # and at most this far (metres)
    scale_range: Tuple[float, float] = (0.8, 1.25)
    max_tilt_deg: float = 10.0
    strength: float = 1.0                     # appearance change (demo.views.Appearance)
    fov_deg: float = 60.0


@dataclasses.dataclass
class MapViews:
    """A map's tiles and their simulated views, and how they were made."""

    tiles: List[ImageRecord]
    views: List[ImageRecord]
    csv: Path                 # views.csv
    gsd_m: float              # metres per tile pixel
    gsd_source: str           # how gsd_m was found
    footprint_m: float        # tile width on the ground (the narrowest tile's)
    jitter_m: float           # views' centres lie within this of their tile's
    real_fraction: float      # mean fraction of view pixels showing map ground (not mirrored)
    skipped: int = 0          # views not made (a GeoTIFF tile too near the empty edge)
    reused: bool = False


# ------------------------------------------------------------------------------ tiles: GSD
def estimate_gsd(records: Sequence[ImageRecord], image_of: Callable[[int], np.ndarray],
                 pairs: int = GSD_PAIRS) -> Tuple[float, str]:
    """
    Return (metres per tile pixel, how it was found) from the tiles' centres and images.

    Pairs of nearest neighbours (within 10 % of the median spacing) are phase-correlated; the
    shift of an overlapping pair, in pixels, against its geodesic distance gives the GSD (the
    median over the pairs within 3 % of the median). Without a quarter of the pairs (3 at
    least) agreeing, the tiles are taken to abut.
    """
    if len(records) < 2:
        raise InputError('one map tile only: give its ground sampling distance (--map-gsd-m)')
    enu = records_enu(records)
    rows = np.linspace(0, len(records) - 1, min(len(records), 256)).round().astype(int)
    nearest, gap = np.zeros(len(rows), int), np.zeros(len(rows))
    for k, row in enumerate(rows):          # one row at a time: memory O(tiles)
        dist = np.hypot(*(enu - enu[row]).T)
        dist[row] = np.inf
        nearest[k] = int(dist.argmin())
        gap[k] = dist[nearest[k]]
    spacing = float(np.median(gap))
    if not spacing > 0:
        raise InputError('map tiles share their centres: give --map-gsd-m')
    close = np.flatnonzero(gap <= 1.1 * spacing)[:pairs]
    found = [g for g in (_pair_gsd(records, i, j, image_of)
                         for i, j in zip(rows[close], nearest[close])) if g is not None]
    median = float(np.median(found)) if found else math.nan
    agree = [g for g in found if abs(g - median) <= 0.03 * median]
    # About half the pairs of the test maps pass; chance peaks would not agree within 3 %.
    if len(agree) >= max(3, len(close) // 4):
        return float(np.median(agree)), (f'measured from the overlap of {len(agree)} '
                                         f'neighbouring tile pairs')
    shapes = [image_of(i).shape[:2] for i in rows[close]]
    offsets = [np.abs(enu[j] - enu[i]) for i, j in zip(rows[close], nearest[close])]
    gsd = float(np.median([max(e / w, n / h) for (e, n), (h, w) in zip(offsets, shapes)]))
    return gsd, (f'from the tile spacing ({spacing:.1f} m), taking tiles to abut: no '
                 f'overlap found between neighbours')


def _pair_gsd(records, i: int, j: int, image_of) -> Optional[float]:
    """Return the GSD two overlapping tiles show (None: no overlap found, or other sizes)."""
    a, b = image_of(int(i)), image_of(int(j))
    if a.shape != b.shape:
        return None
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (a, b)]
    # No window: on tiles of 64-128 px a Hanning window pulled the shifts ~1.5 % towards zero.
    (dx, dy), response = cv2.phaseCorrelate(grey[0], grey[1])
    east, north = to_enu(records[i].latitude, records[i].longitude, records[j].latitude,
                         records[j].longitude)
    # Tile j lying east (north) of tile i shows i's content moved right (up): shift (e, -n).
    shift, expected = np.hypot(dx, dy), np.hypot(east, north)
    if response < MIN_RESPONSE or not 1.0 <= shift <= 0.9 * min(a.shape[:2]):
        return None
    if (dx * east - dy * north) / (shift * expected) < MIN_COSINE:
        return None
    return float(expected / shift)


# ------------------------------------------------------------------------------ tiles: ground
def local_scene(rgb: np.ndarray, valid: np.ndarray, latitude: float, longitude: float,
                gsd_m: float, centre_px: Tuple[float, float]) -> Scene:
    """
    Return an image as a north-up `Scene` whose pixel centre_px lies at (latitude, longitude).

    Its CRS is the azimuthal equidistant projection about that point: scene pixels are east and
    north metres over gsd_m exactly as geo.geodesy.to_enu measures them, and grid north is
    true north at the centre.
    """
    crs = CRS.from_proj4(f'+proj=aeqd +lat_0={latitude!r} +lon_0={longitude!r} +datum=WGS84 '
                         f'+units=m +no_defs')
    return Scene(rgb=np.ascontiguousarray(rgb), valid=valid, epsg=crs,
                 origin_e=-(centre_px[0] + 0.5) * gsd_m, origin_n=(centre_px[1] + 0.5) * gsd_m,
                 pixel_size_m=gsd_m)


def ground_around(records: Sequence[ImageRecord], k: int, others: Sequence[int], gsd_m: float,
                  reach_px: float, image_of: Callable[[int], np.ndarray]
                  ) -> Tuple[Scene, Tuple[float, float]]:
    """
    Return (mosaic of the ground around tile k, the tile centre's pixel in it).

    The mosaic reaches reach_px tile pixels from the centre each way; tiles `others` are pasted
    at their offsets, the nearest over the farther, and tile k over them all. Its valid mask
    marks the pixels some tile covers; the rest is tile k mirrored at its edges.
    """
    tile = image_of(k)
    h, w = tile.shape[:2]
    pad_x, pad_y = (max(0, math.ceil(reach_px - size / 2.0)) + 2 for size in (w, h))
    canvas = np.pad(tile, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode='reflect')
    covered = np.zeros(canvas.shape[:2], bool)
    cx, cy = pad_x + (w - 1) / 2.0, pad_y + (h - 1) / 2.0
    me = records[k]
    others = [j for j in others if j != k]
    if others:
        enu = np.atleast_2d(to_enu(me.latitude, me.longitude,
                                   [records[j].latitude for j in others],
                                   [records[j].longitude for j in others])) / gsd_m
        for idx in np.argsort(-np.hypot(enu[:, 0], enu[:, 1]), kind='stable'):
            _paste(canvas, covered, image_of(others[idx]), cx + enu[idx, 0], cy - enu[idx, 1])
    _paste(canvas, covered, tile, cx, cy)
    return local_scene(canvas, covered, me.latitude, me.longitude, gsd_m, (cx, cy)), (cx, cy)


def _paste(canvas: np.ndarray, covered: np.ndarray, image: np.ndarray, col: float,
           row: float) -> None:
    """Paste an image centred at canvas pixel (col, row), to the nearest pixel, clipped."""
    h, w = image.shape[:2]
    c0, r0 = int(round(col - (w - 1) / 2.0)), int(round(row - (h - 1) / 2.0))
    a0, b0 = max(c0, 0), max(r0, 0)
    a1, b1 = min(c0 + w, canvas.shape[1]), min(r0 + h, canvas.shape[0])
    if a1 > a0 and b1 > b0:
        canvas[b0:b1, a0:a1] = image[b0 - r0:b1 - r0, a0 - c0:a1 - c0]
        covered[b0:b1, a0:a1] = True


def _unit_reach(recipe: ViewRecipe, scene: Scene) -> float:
    """Return how far (in footprints) a view's corners reach from its centre, jitter aside."""
    return view_radius_px(scene, 100.0, max(recipe.scale_range), recipe.max_tilt_deg,
                          recipe.fov_deg) / 100.0


# ------------------------------------------------------------------------------ views
def draw_views(scene: Scene, centre_px: Tuple[float, float], footprint_px: float, out_px: int,
               jitter_px: float, recipe: ViewRecipe, key: int, min_valid: float = 0.0,
               tries: int = 10) -> List[Tuple[np.ndarray, object]]:
    """
    Return recipe.per_tile (north-up image, `View`) pairs of the place at centre_px.

    footprint_px: the ground a view spans at scale 1, in scene pixels. A view with less than
    min_valid of valid ground is drawn again, at most `tries` times, then left out. The draws
    come from a generator seeded by (recipe.seed, key) alone: a tile's views do not depend on
    which other tiles there are.
    """
    rng = np.random.default_rng([int(recipe.seed), int(key)])
    out = []
    for _ in range(recipe.per_tile):
        for _ in range(tries):
            view = random_view(scene, centre_px, rng, recipe.strength, None, recipe.scale_range,
                               recipe.max_tilt_deg, jitter_px, out_px, footprint_px,
                               recipe.fov_deg)
            if view.valid_fraction >= min_valid:
                out.append((north_up(view.image, view.heading_deg), view))
                break
    return out


def tile_map_views(tiles_csv, images_dir, folder, recipe: ViewRecipe,
                   gsd_m: Optional[float] = None, resume: bool = False) -> MapViews:
    """
    Make (or reuse) recipe.per_tile views of every north-up tile of a map CSV into folder.

    gsd_m: metres per tile pixel (None: measured, see `estimate_gsd`). resume: a folder made
    by other settings is an error (a resumed run's triplets name its views), not remade.
    """
    tiles_csv = Path(tiles_csv)
    records = read_csv(tiles_csv, images_dir)
    _check_north_up(records, tiles_csv)
    request = {'tiles_csv': str(tiles_csv.resolve()), 'tiles_sha256': sha256_of(tiles_csv),
               'images_dir': str(Path(images_dir or tiles_csv.parent).resolve()),
               'gsd_m': gsd_m, 'recipe': dataclasses.asdict(recipe)}
    folder = Path(folder)
    made = _reused(folder, request, records, resume)
    if made is not None:
        return made
    image_of = functools.lru_cache(maxsize=512)(lambda j: load_image_file(records[j].path))
    if gsd_m is not None:
        source = 'given (--map-gsd-m)'
    else:
        gsd_m, source = estimate_gsd(records, image_of)
    first = image_of(0)
    unit = _unit_reach(recipe, local_scene(first, np.ones(first.shape[:2], bool),
                                           records[0].latitude, records[0].longitude, gsd_m,
                                           (0.0, 0.0)))
    footprints = [min(image_of(k).shape[:2]) for k in range(len(records))]
    jitters = [min(recipe.jitter_fraction * f, recipe.max_jitter_m / gsd_m) for f in footprints]
    # Tiles that can show in a view of another: centres within its reach plus a tile's half
    # diagonal, found on one ENU plane around the map's middle (+5 % for its distortion).
    largest = max(max(image_of(k).shape[:2]) for k in range(len(records)))
    reach_m = (unit * max(footprints) + max(jitters) + largest / math.sqrt(2.0)) * gsd_m
    near_i, near_j = pairs_within(records_enu(records), 1.05 * reach_m)
    order = np.argsort(near_i, kind='stable')
    near_i, near_j = near_i[order], near_j[order]
    bounds = np.searchsorted(near_i, np.arange(len(records) + 1))
    rows, fractions = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for k, (record, footprint, jitter) in enumerate(zip(records, footprints, jitters)):
        ground, centre = ground_around(records, k, near_j[bounds[k]:bounds[k + 1]].tolist(),
                                       gsd_m, unit * footprint + jitter, image_of)
        for j, (picture, view) in enumerate(draw_views(ground, centre, footprint, footprint,
                                                       jitter, recipe, k)):
            rows.append(_write_view(folder, k, j, picture, view, record.path))
            fractions.append(view.valid_fraction)
    return _finish(folder, request, records, rows, fractions, gsd_m, source,
                   min(footprints) * gsd_m, max(jitters) * gsd_m, 0)


def _check_north_up(records: Sequence[ImageRecord], where: Path) -> None:
    """Refuse tiles whose CSV heading says they are not north-up."""
    for r in records:
        if math.isfinite(r.heading) and abs(float(angle_difference_deg(r.heading, 0.0))) > 1e-6:
            raise InputError(f'{where}: map tile {r.path} has heading {r.heading:g}; map tiles '
                             f'must be north-up (heading 0 or empty)')


def geotiff_map_views(path, folder, recipe: ViewRecipe, tile_m: Optional[float] = None,
                      stride_m: Optional[float] = None, tile_px: int = 128,
                      bands: Sequence[int] = (0, 1, 2), resume: bool = False) -> MapViews:
    """
    Cut north-up tiles from a GeoTIFF into folder/tiles, and make recipe.per_tile views of each.

    tile_m: tile footprint (default GEOTIFF_TILE_PX file pixels); stride_m: grid spacing
    (default half the footprint); tile_px: tile and view image size; bands: the file's bands
    holding red, green and blue. Tiles and views keep GEOTIFF_MIN_VALID of non-empty ground.
    """
    path = Path(path)
    request = {'geotiff': str(path.resolve()),
               'geotiff_sha256': sha256_of(path) if path.is_file() else None,
               'tile_m': tile_m, 'stride_m': stride_m, 'tile_px': int(tile_px),
               'bands': [int(b) for b in bands], 'recipe': dataclasses.asdict(recipe)}
    folder = Path(folder)
    made = _reused(folder, request, None, resume)
    if made is not None:
        return made
    scene = _geotiff_scene(path, bands)
    size = scene.pixel_size_m
    footprint = tile_m / size if tile_m else float(GEOTIFF_TILE_PX)
    stride = stride_m / size if stride_m else footprint / 2.0
    tiles = make_tiles(scene, footprint, stride, None, GEOTIFF_MIN_VALID, int(tile_px))
    if len(tiles) < 2:
        raise InputError(f'{path}: {len(tiles)} tile(s) of {footprint * size:g} m fit in its '
                         f'valid ground; a map needs several (smaller --map-tile-m?)')
    tiles_csv = write_tiles(tiles, folder / TILES_FOLDER, 'png')
    records = read_csv(tiles_csv)
    jitter = min(recipe.jitter_fraction * footprint, recipe.max_jitter_m / size)
    rows, fractions, skipped = [], [], 0
    for k, (tile, record) in enumerate(zip(tiles, records)):
        drawn = draw_views(scene, (tile.col, tile.row), footprint, int(tile_px), jitter, recipe,
                           k, GEOTIFF_MIN_VALID)
        skipped += recipe.per_tile - len(drawn)
        for j, (picture, view) in enumerate(drawn):
            rows.append(_write_view(folder, k, j, picture, view, record.path))
            fractions.append(view.valid_fraction)
    return _finish(folder, request, records, rows, fractions, footprint * size / tile_px,
                   f'{size:g} m GeoTIFF pixels x {footprint:g} / {tile_px} px tiles',
                   footprint * size, jitter * size, skipped)


def _geotiff_scene(path: Path, bands: Sequence[int]) -> Scene:
    """Read the GeoTIFF (`load_scene`), naming bands that it does not have."""
    if len(bands) != 3 or min(bands) < 0:
        raise InputError(f'GeoTIFF bands must be three band numbers from 0 (red, green, blue), '
                         f'got {list(bands)}')
    try:
        return load_scene(path, tuple(int(b) for b in bands))
    except IndexError:
        raise InputError(f'{path}: has no band {max(bands)} (bands count from 0; give '
                         f'--map-bands R G B)') from None


# ------------------------------------------------------------------------------ files
def _write_view(folder: Path, k: int, j: int, picture: np.ndarray, view, tile_path: str
                ) -> list:
    """Write one view image; return its views.csv row."""
    name = f'view_{k:05d}_{j}.png'
    ok, buf = cv2.imencode('.png', cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f'cannot encode view {name}')
    with atomic_path(folder / name) as tmp:
        tmp.write_bytes(buf.tobytes())
    return [name, f'{view.latitude:.9f}', f'{view.longitude:.9f}', '0', tile_path,
            f'{view.heading_deg:.4f}', f'{view.valid_fraction:.4f}']


def _finish(folder: Path, request: Dict, tiles: List[ImageRecord], rows: List[list],
            fractions: List[float], gsd_m: float, source: str, footprint_m: float,
            jitter_m: float, skipped: int) -> MapViews:
    """Write settings.json, then views.csv (the mark of a complete set); return the result."""
    if not rows:
        raise InputError(f'no view could be made of the map ({skipped} left out)')
    made = {'gsd_m': gsd_m, 'gsd_source': source, 'footprint_m': footprint_m,
            'jitter_m': jitter_m, 'real_fraction': float(np.mean(fractions)),
            'skipped': skipped}
    with atomic_path(folder / SETTINGS_FILE) as tmp:
        tmp.write_text(json.dumps({'request': request, 'made': made}, indent=2) + '\n',
                       encoding='utf-8')
    with atomic_path(folder / VIEWS_CSV) as tmp, open(tmp, 'w', newline='',
                                                      encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(VIEW_COLUMNS)
        writer.writerows(rows)
    return MapViews(tiles=list(tiles), views=read_csv(folder / VIEWS_CSV), csv=folder / VIEWS_CSV,
                    **made)


def _reused(folder: Path, request: Dict, tiles: Optional[List[ImageRecord]],
            resume: bool) -> Optional[MapViews]:
    """
    Return the views in folder when the same request made them; None when they must be made.

    resume: views made by another request are an error rather than remade.
    """
    if not (folder / VIEWS_CSV).is_file():
        return None
    try:
        stored = json.loads((folder / SETTINGS_FILE).read_text(encoding='utf-8'))
        same, made = stored['request'] == json.loads(json.dumps(request)), stored['made']
    except (OSError, ValueError, KeyError, TypeError):
        same, made = False, None
    if not same:
        if resume:
            raise MismatchError(f'cannot resume: the views in {folder} were made from another '
                                f'map or with other settings (see {folder / SETTINGS_FILE})')
        (folder / VIEWS_CSV).unlink()
        return None
    if tiles is None:
        tiles = read_csv(folder / TILES_FOLDER / 'tiles.csv')
    return MapViews(tiles=list(tiles), views=read_csv(folder / VIEWS_CSV), csv=folder / VIEWS_CSV,
                    reused=True, **made)
