"""The demo's data on the real Landsat-8 scene: georeference, tiles, regions, views."""

import cv2
import numpy as np
from pyproj import Geod
import pytest
from taco_cvgl.demo.scene import (Box, fetch_scene, load_scene, make_tiles, split_regions,
                                  write_tiles)
from taco_cvgl.demo.views import (Appearance, apply_appearance, flight_path, random_view,
                                  render_view, simulate_flight, view_radius_px)
from taco_cvgl.errors import InputError
import tifffile

GEOD = Geod(ellps='WGS84')
# shared/DATA.md: the scene covers about lon -54.84..-54.23, lat -25.60..-25.08; the corners of the
# outermost pixels reach 0.01 degree past these rounded figures.
LON_RANGE, LAT_RANGE, SLACK = (-54.84, -54.23), (-25.60, -25.08), 0.02


@pytest.fixture(scope='module')
def scene():
    return load_scene(fetch_scene())


def _z(image):
    """Per-image, per-channel standardisation (what a normalising front end would do)."""
    x = image.reshape(-1, 3).astype(float)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def test_load_rejects_bad_files(tmp_path):
    junk = tmp_path / 'junk.tif'
    junk.write_bytes(b'hello')
    with pytest.raises(InputError, match='junk.tif'):
        load_scene(junk)
    plain = tmp_path / 'plain.tif'
    tifffile.imwrite(plain, np.ones((8, 8, 3), np.uint16))
    with pytest.raises(InputError, match='ModelPixelScale'):
        load_scene(plain)
    with pytest.raises(InputError, match='not found'):
        load_scene(tmp_path / 'missing.tif')


def test_georeference_known_answers(scene):
    assert scene.epsg == 32621                           # WGS 84 / UTM zone 21
    assert (scene.height, scene.width) == (1860, 2041)
    assert scene.pixel_size_m == 30.0
    # The tie point: the top-left corner of pixel (0, 0).
    e, n = scene.pixel_to_utm(-0.5, -0.5)
    assert (float(e), float(n)) == (717345.0, -2776995.0)
    # About 16 % of the scene is empty edge.
    assert 0.80 < scene.valid.mean() < 0.87
    assert scene.rgb.dtype == np.uint8 and scene.rgb.flags['C_CONTIGUOUS']
    assert not scene.rgb[~scene.valid].any()
    cols = np.array([-0.5, scene.width - 0.5, -0.5, scene.width - 0.5, (scene.width - 1) / 2])
    rows = np.array([-0.5, -0.5, scene.height - 0.5, scene.height - 0.5, (scene.height - 1) / 2])
    lat, lon = scene.pixel_to_latlon(cols, rows)
    assert np.all((lat > LAT_RANGE[0] - SLACK) & (lat < LAT_RANGE[1] + SLACK))
    assert np.all((lon > LON_RANGE[0] - SLACK) & (lon < LON_RANGE[1] + SLACK))
    assert lat[0] > lat[2] and lon[1] > lon[0]           # north at the top, east on the right
    # The scene is 61.23 km wide (2041 px of 30 m) at the top edge, on the ellipsoid.
    _, _, width = GEOD.inv(lon[0], lat[0], lon[1], lat[1])
    assert width == pytest.approx(2041 * 30.0, rel=2e-3)
    rng = np.random.default_rng(1)
    c, r = rng.uniform(0, scene.width, 200), rng.uniform(0, scene.height, 200)
    c2, r2 = scene.latlon_to_pixel(*scene.pixel_to_latlon(c, r))
    assert np.max(np.hypot(c2 - c, r2 - r)) < 0.01
    # True north is turned about +1 degree from grid north here (convergence south of the
    # equator, east of the central meridian 57 W).
    assert 0.8 < float(scene.grid_bearing_of_north(1020, 930)) < 1.3


def test_tiles_on_a_known_grid(scene):
    box = Box(600.0, 600.0, 1000.0, 1000.0)               # inside the valid area
    tiles = make_tiles(scene, footprint_px=96, stride_px=48, region=box, out_px=128)
    # Centres 47.5 + 48 k whose 96 px footprint fits in [600, 1000): k = 13..18 on both axes.
    assert len(tiles) == 36
    cols = sorted({t.col for t in tiles})
    assert cols == [47.5 + 48 * k for k in range(13, 19)]
    by_place = {(t.col, t.row): t for t in tiles}
    for (col, row), tile in by_place.items():
        assert tile.heading_deg == 0.0 and tile.image.shape == (128, 128, 3)
        for neighbour in ((col + 48, row), (col, row + 48)):
            if neighbour in by_place:
                other = by_place[neighbour]
                _, _, dist = GEOD.inv(tile.longitude, tile.latitude, other.longitude,
                                      other.latitude)
                assert dist == pytest.approx(48 * 30.0, rel=0.01)
    # The tile shows the scene around its centre, north up.
    tile = tiles[0]
    c0, r0 = int(tile.col - 47.5), int(tile.row - 47.5)
    crop = cv2.resize(scene.rgb[r0:r0 + 96, c0:c0 + 96], (128, 128),
                      interpolation=cv2.INTER_LINEAR).astype(float)
    assert np.corrcoef(crop.ravel(), tile.image.astype(float).ravel())[0, 1] > 0.9
    shifted = cv2.resize(scene.rgb[r0 + 24:r0 + 120, c0:c0 + 96], (128, 128)).astype(float)
    assert np.corrcoef(shifted.ravel(), tile.image.astype(float).ravel())[0, 1] < 0.8


def test_valid_pixel_filter(scene):
    strict = make_tiles(scene, min_valid=0.95, out_px=32)
    loose = make_tiles(scene, min_valid=0.0, out_px=32)
    assert len(loose) == 41 * 37                          # the whole grid
    assert 1000 < len(strict) < len(loose)
    assert min(t.valid_fraction for t in strict) >= 0.95
    assert min(t.valid_fraction for t in loose) < 0.5
    for tile in strict:                                   # few black (empty) pixels
        assert np.mean(tile.image.max(axis=2) == 0) < 0.06
    # The top-right corner of the scene is empty.
    assert not [t for t in strict if t.col > 1900 and t.row < 150]


def test_write_tiles_is_a_database_csv(scene, tmp_path):
    from taco_cvgl.mapdb.database import read_csv
    tiles = make_tiles(scene, region=Box(600.0, 600.0, 800.0, 800.0), out_px=64)
    csv_path = write_tiles(tiles, tmp_path / 'db')
    assert csv_path.read_text().splitlines()[0] == 'image_path,latitude,longitude,heading'
    records = read_csv(csv_path)
    assert len(records) == len(tiles) == 4
    for record, tile in zip(records, tiles):
        assert record.latitude == pytest.approx(tile.latitude, abs=1e-7)
        assert record.heading == 0.0
        image = cv2.imread(record.path, cv2.IMREAD_COLOR)[..., ::-1]
        assert np.array_equal(image, tile.image)          # PNG: lossless
    assert not list((tmp_path / 'db').glob('*.tmp'))


def test_train_and_eval_regions_are_apart(scene):
    train, evaluation = split_regions(scene, train_fraction=0.6, gap_px=96)
    assert train.col1 < evaluation.col0
    train_tiles = make_tiles(scene, region=train, out_px=32)
    eval_tiles = make_tiles(scene, region=evaluation, out_px=32)
    assert len(train_tiles) > 500 and len(eval_tiles) > 200
    west_edge = max(t.col for t in train_tiles) + 48
    east_edge = min(t.col for t in eval_tiles) - 48
    assert east_edge - west_edge >= 96                     # footprints one footprint apart
    views = simulate_flight(scene, evaluation, 20, np.random.default_rng(5), out_px=32)
    radius = view_radius_px(scene)
    assert min(v.col for v in views) - radius >= evaluation.col0
    assert min(v.valid_fraction for v in views) == 1.0


def test_views_are_reproducible(scene):
    def run(seed):
        return simulate_flight(scene, None, 5, np.random.default_rng(seed), strength=0.8)
    first, again, other = run(3), run(3), run(4)
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and a.heading_deg == b.heading_deg
    assert not np.array_equal(first[0].image, other[0].image)


def test_random_view_for_training(scene):
    views = [random_view(scene, (1000.0, 900.0), np.random.default_rng(k), jitter_px=20.0)
             for k in range(20)]
    again = random_view(scene, (1000.0, 900.0), np.random.default_rng(0), jitter_px=20.0)
    assert np.array_equal(again.image, views[0].image)
    assert all(np.hypot(v.col - 1000.0, v.row - 900.0) <= 20.0 for v in views)
    assert all(0.8 <= v.scale <= 1.25 and abs(v.pitch_deg) <= 10.0 for v in views)
    assert np.ptp([v.heading_deg for v in views]) > 180.0
    assert all(v.image.shape == (128, 128, 3) and v.image.dtype == np.uint8 for v in views)


def test_heading_rotates_the_view_clockwise(scene):
    centre = (1100.0, 800.0)
    north = render_view(scene, centre, 0.0).image.astype(float)
    east = render_view(scene, centre, 90.0).image
    # Heading 90: the image top points east, so turning the image back by 90 degrees clockwise
    # gives the north-up view; turning it the other way does not.
    back = np.rot90(east, k=-1).astype(float)
    wrong = np.rot90(east, k=1).astype(float)
    assert np.corrcoef(back.ravel(), north.ravel())[0, 1] > 0.99
    assert np.corrcoef(wrong.ravel(), north.ravel())[0, 1] < 0.8
    hom, _ = scene.view_homography(centre, 90.0, 96, 128)
    top = hom @ np.array([63.5, 0.0, 1.0])
    col, row = top[:2] / top[2]
    assert col - centre[0] == pytest.approx(48 * 127 / 128, abs=1.5) and abs(row - centre[1]) < 2


def test_scale_and_tilt_change_the_footprint(scene):
    def spacing(hom, u, v):
        def at(a, b):
            p = hom @ np.array([a, b, 1.0])
            return p[:2] / p[2]
        return np.linalg.norm(at(u + 1, v) - at(u, v))
    hom, height = scene.view_homography((1000, 900), 0.0, 96 * 1.25, 128)
    assert spacing(hom, 63.5, 63.5) == pytest.approx(1.25 * 96 / 128)
    assert height == pytest.approx(96 * 1.25 * 30 / 2 / np.tan(np.radians(30)))
    hom, _ = scene.view_homography((1000, 900), 0.0, 96, 128, pitch_deg=15.0)
    assert spacing(hom, 63.5, 0) > 1.1 * spacing(hom, 63.5, 127)   # top looks farther away
    with pytest.raises(ValueError):
        scene.view_homography((1000, 900), 0.0, 96, 128, pitch_deg=60.0)


def test_appearance_changes_survive_standardisation(scene):
    rng = np.random.default_rng(11)
    centres = [(rng.uniform(300, 1700), rng.uniform(500, 1500)) for _ in range(6)]
    clean = [render_view(scene, c, 0.0).image for c in centres]

    def residual(effect):
        out = [apply_appearance(img, np.random.default_rng(k), Appearance.only(effect, 1.0))
               for k, img in enumerate(clean)]
        return np.median([np.sqrt(np.mean((_z(a) - _z(b)) ** 2)) for a, b in zip(out, clean)])
    # Global per-channel gains are undone by standardisation; the others are not.
    assert residual('colour') < 0.06
    for effect in ('shading', 'seasonal', 'haze'):
        assert residual(effect) > 0.2, effect
    assert np.array_equal(apply_appearance(clean[0], rng, Appearance.none()), clean[0])


def test_flight_path_is_smooth_and_timed(scene):
    _, evaluation = split_regions(scene)
    path = flight_path(scene, evaluation, 60, np.random.default_rng(2), speed_mps=60,
                       rate_hz=0.25, heading_mode='track')
    assert [w.stamp_s for w in path] == [4.0 * k for k in range(60)]
    lon = np.array([w.longitude for w in path])
    lat = np.array([w.latitude for w in path])
    az, _, dist = GEOD.inv(lon[:-1], lat[:-1], lon[1:], lat[1:])
    assert np.median(dist) == pytest.approx(240.0, rel=0.01)   # 60 m/s x 4 s
    assert np.all(dist < 245.0)
    heading = np.array([w.heading_deg for w in path[:-1]])
    off = np.abs((heading - az + 180.0) % 360.0 - 180.0)
    assert np.median(off) < 10.0                               # along the track, with crab
    turns = np.abs((np.diff(az) + 180.0) % 360.0 - 180.0)
    assert np.median(turns) < 15.0                             # smooth, mostly gentle turns
    random_heads = flight_path(scene, evaluation, 200, np.random.default_rng(2))
    assert np.std([w.heading_deg for w in random_heads]) > 80  # spread over 0..360
