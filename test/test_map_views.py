"""
Training on a map alone: simulated views of real Landsat-8 map tiles, and a train run on them.

Tiles are cut from the demo scene (`make_tiles`): 64 scene pixels of 30 m resampled to 64 px, so
their ground sampling distance is 30 m/px by construction. The views are checked against that
scene itself (the ground truth the tiles were cut from), never against the code that made them.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
from taco_cvgl.cli.train import main
from taco_cvgl.demo.scene import Box, make_tiles, write_tiles
from taco_cvgl.demo.views import render_view
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.geo.geodesy import angle_difference_deg, to_enu
from taco_cvgl.mapdb.database import read_csv
from taco_cvgl.training.map_views import (geotiff_map_views, tile_map_views, ViewRecipe,
                                          VIEWS_CSV)
import tifffile

GSD_M = 30.0          # 64 scene px of 30 m on 64 tile px
JITTER_M = 0.125 * 64 * GSD_M   # the recipe's default: an eighth of the tile width, 240 m
# A 5 x 4 grid of 64 px tiles, 32 px apart (each overlaps its neighbours by half); the tile
# grid starts at the scene's corner, so tiles' edges lie at -0.5 + 32 k.
GRID = Box(1023.5, 703.5, 1023.5 + 64 + 4 * 32, 703.5 + 64 + 3 * 32)
FAST = ['--input-size', '32', '--normalization', 'per_image', '--backbone', 'efficientnet_lite2',
        '--backbone-weights', 'none', '--batch-size', '4', '--max-epochs', '1',
        '--limit-train-batches', '2', '--num-workers', '0', '--no-progress',
        '--pos-radius-m', '500', '--neg-radius-m', '1920']


@pytest.fixture(scope='module')
def tiles_csv(scene, tmp_path_factory):
    """Write the grid's tiles (PNG) and their database CSV; return the CSV path."""
    tiles = make_tiles(scene, 64, 32, GRID, out_px=64)
    assert len(tiles) == 20
    return write_tiles(tiles, tmp_path_factory.mktemp('map') / 'tiles')


def _centre_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Return the correlation of two grey images inside the disc that no turn moves out of."""
    h, w = a.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    disc = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) < 0.45 * min(h, w)
    x, y = (cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)[disc].astype(float) for im in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def _scene_view(scene, col: float, row: float, heading_deg: float = 0.0) -> np.ndarray:
    """Return the scene's own 64 px nadir view of 64 scene px at (col, row), top at heading."""
    return render_view(scene, (col, row), heading_deg, out_px=64, footprint_px=64).image


def _rows(csv_path: Path):
    return [line.split(',') for line in csv_path.read_text().splitlines()[1:]]


def test_views_have_the_tile_size_and_lie_within_the_jitter(tiles_csv, tmp_path):
    made = tile_map_views(tiles_csv, None, tmp_path / 'views', ViewRecipe(per_tile=2, seed=1))
    # The GSD was measured from the tiles' overlap: 30 m/px to within 2 %.
    assert made.gsd_m == pytest.approx(GSD_M, rel=0.02) and 'overlap' in made.gsd_source
    assert made.jitter_m == pytest.approx(JITTER_M, rel=0.02)
    assert made.footprint_m == pytest.approx(64 * GSD_M, rel=0.02)
    assert len(made.tiles) == 20 and len(made.views) == 40
    tiles = {r.path: r for r in read_csv(tiles_csv)}
    offsets = []
    for row, view in zip(_rows(made.csv), made.views):
        assert load_image_file(view.path).shape == (64, 64, 3)
        assert view.heading == 0.0                       # north-up
        tile = tiles[row[4]]
        offsets.append(np.hypot(*to_enu(tile.latitude, tile.longitude, view.latitude,
                                        view.longitude)))
    # Within the jitter (measured GSD's 2 % allowed), and really moved: uniform in a disc,
    # 40 draws all inside half the radius would have odds 4^-40.
    assert max(offsets) <= JITTER_M * 1.02
    assert max(offsets) > 0.5 * JITTER_M
    headings = [float(row[5]) for row in _rows(made.csv)]
    assert np.ptp(headings) > 180.0                      # drawn at any heading


def test_a_view_shows_the_ground_at_its_position_turned_north_up(scene, tiles_csv, tmp_path):
    """No appearance change, scale 1, no tilt: each stored view is the scene at its centre."""
    recipe = ViewRecipe(per_tile=3, seed=2, scale_range=(1.0, 1.0), max_tilt_deg=0.0,
                        strength=0.0)
    made = tile_map_views(tiles_csv, None, tmp_path / 'views', recipe, gsd_m=GSD_M)
    checked = 0
    for row, view in zip(_rows(made.csv), made.views):
        if float(row[6]) < 1.0:              # partly mirrored ground at the grid's edge
            continue
        image, heading = load_image_file(view.path), float(row[5])
        col, row_px = scene.latlon_to_pixel(view.latitude, view.longitude)
        truth = _scene_view(scene, col, row_px)
        match = _centre_correlation(image, truth)
        # Its position is right to within a scene pixel (30 m): the scene there matches it
        # better than the scene 1 px away matches itself.
        assert match > max(_centre_correlation(_scene_view(scene, col + dx, row_px + dy), truth)
                           for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))), row
        assert match > 0.85, row
        if abs(angle_difference_deg(heading, 0.0)) > 30.0:      # and it was turned north-up
            unturned = _scene_view(scene, col, row_px, heading)
            assert _centre_correlation(unturned, truth) < match - 0.3
        checked += 1
    assert checked >= 12


def test_turned_north_up_a_view_matches_its_tile_better(scene, tiles_csv, tmp_path):
    """
    A view turned north-up correlates with its tile; the camera's unturned image does not.

    The views are centred on their tile (no jitter), with scale and tilt as drawn and no
    appearance change.
    """
    recipe = ViewRecipe(per_tile=2, seed=3, jitter_fraction=0.0, strength=0.0)
    made = tile_map_views(tiles_csv, None, tmp_path / 'views', recipe, gsd_m=GSD_M)
    records = {r.path: r for r in read_csv(tiles_csv)}
    turned, unturned = [], []
    for row, view in zip(_rows(made.csv), made.views):
        tile, image = load_image_file(row[4]), load_image_file(view.path)
        heading, where = float(row[5]), records[row[4]]
        assert np.hypot(*to_enu(where.latitude, where.longitude, view.latitude,
                                view.longitude)) < 1.0
        if abs(angle_difference_deg(heading, 0.0)) < 30.0:
            continue
        col, row_px = scene.latlon_to_pixel(view.latitude, view.longitude)
        camera = _scene_view(scene, col, row_px, heading)
        turned.append(_centre_correlation(image, tile))
        unturned.append(_centre_correlation(camera, tile))
    turned, unturned = np.array(turned), np.array(unturned)
    # Measured: 33 views, mean correlation 0.75 turned, -0.05 unturned; a water tile or two
    # (grey levels flat to 1-2 units) correlate with nothing.
    assert len(turned) >= 25
    assert turned.mean() > unturned.mean() + 0.5
    assert np.mean(turned > unturned + 0.2) >= 0.8


def test_seeded_views_repeat_and_are_reused(tiles_csv, tmp_path):
    def views(folder, seed, **kw):
        return tile_map_views(tiles_csv, None, tmp_path / folder, ViewRecipe(seed=seed), **kw)

    a, b, c = views('a', 5), views('b', 5), views('c', 6)
    assert a.csv.read_text() == b.csv.read_text() != c.csv.read_text()
    for x, y, z in zip(a.views, b.views, c.views):
        assert Path(x.path).read_bytes() == Path(y.path).read_bytes()
        assert Path(x.path).read_bytes() != Path(z.path).read_bytes()
    # The same request again reuses the folder, writing nothing; another one remakes it, or,
    # when resuming a run (whose triplets name these views), is refused.
    stamp = a.csv.stat().st_mtime_ns
    again = views('a', 5)
    assert again.reused and a.csv.stat().st_mtime_ns == stamp and again.gsd_m == a.gsd_m
    with pytest.raises(MismatchError, match='cannot resume'):
        views('a', 7, resume=True)
    assert a.csv.stat().st_mtime_ns == stamp
    assert not views('a', 7).reused


def test_gsd_from_spacing_when_tiles_abut(scene, tmp_path):
    """Abutting tiles show no overlap: GSD = spacing / width, 40 m/px for 48 px of 64 x 30 m."""
    tiles = make_tiles(scene, 64, 64, Box(1023.5, 703.5, 1023.5 + 4 * 64, 703.5 + 3 * 64),
                       out_px=48)
    csv_path = write_tiles(tiles, tmp_path / 'tiles')
    made = tile_map_views(csv_path, None, tmp_path / 'views', ViewRecipe())
    assert made.gsd_m == pytest.approx(40.0, rel=0.01) and 'abut' in made.gsd_source
    assert made.jitter_m == pytest.approx(0.125 * 48 * 40.0, rel=0.01)
    # Every view reaches past its tile: partly the neighbours, at the corners mirrored ground.
    assert 0.6 < made.real_fraction < 1.0


def test_views_of_a_geotiff(scene, tmp_path):
    """A GeoTIFF cut out of the scene: tiles where the scene says, views within the jitter."""
    c0, r0 = 1000, 700
    path = tmp_path / 'map.tif'
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, scene.epsg]  # projected
    tie = (0, 0, 0, scene.origin_e + c0 * 30.0, scene.origin_n - r0 * 30.0, 0)
    tifffile.imwrite(path, scene.rgb[r0:r0 + 160, c0:c0 + 192], photometric='rgb',
                     extratags=[(33550, 'd', 3, (30.0, 30.0, 0.0), False),
                                (33922, 'd', 6, tie, False), (34735, 'H', len(keys), keys, False)])
    made = geotiff_map_views(path, tmp_path / 'views', ViewRecipe(seed=4), tile_m=64 * 30.0,
                             tile_px=64)
    # 64 px tiles every 32 px: centres 31.5 .. 159.5 across (5), 31.5 .. 127.5 down (4).
    assert len(made.tiles) == 20 and made.gsd_m == pytest.approx(30.0)
    lat, lon = scene.pixel_to_latlon(c0 + 31.5, r0 + 31.5)
    assert made.tiles[0].latitude == pytest.approx(float(lat), abs=1e-7)
    assert made.tiles[0].longitude == pytest.approx(float(lon), abs=1e-7)
    assert len(made.views) + made.skipped == 20 and len(made.views) >= 10
    tiles = {r.path: r for r in made.tiles}
    for row, view in zip(_rows(made.csv), made.views):
        tile = tiles[row[4]]
        assert np.hypot(*to_enu(tile.latitude, tile.longitude, view.latitude,
                                view.longitude)) <= JITTER_M + 1e-6
        assert load_image_file(view.path).shape == (64, 64, 3)
    with pytest.raises(InputError, match='no band 5'):
        geotiff_map_views(path, tmp_path / 'other', ViewRecipe(), bands=(5, 1, 0))


def test_map_tiles_must_be_north_up(tiles_csv, tmp_path):
    text = tiles_csv.read_text().splitlines()
    name, lat, lon, _ = text[3].split(',')
    text[3] = f'{name},{lat},{lon},90'
    turned = tiles_csv.parent / 'turned.csv'
    turned.write_text('\n'.join(text) + '\n')
    with pytest.raises(InputError, match='heading 90; map tiles must be north-up'):
        tile_map_views(turned, None, tmp_path / 'views', ViewRecipe())


@pytest.mark.integration
def test_train_on_a_map_alone_then_build_db(tiles_csv, tmp_path, capsys):
    """taco-cvgl train --simulate-views 1 on map tiles; the weights build a database."""
    from taco_cvgl.cli.build_db import build_db
    from taco_cvgl.model.embedder import ImageRetrievalModel
    out = tmp_path / 'run'
    argv = ['--out', str(out), '--train-dir', str(tiles_csv.parent), '--train-csv',
            str(tiles_csv), '--simulate-views', '1'] + FAST
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert 'made 20 simulated views of 20 map tiles' in said
    views = read_csv(out / 'map_views' / VIEWS_CSV)
    assert len(views) == 20
    # Every anchor's positive lies within --pos-radius-m: tile-view pairs are positives.
    # Every tile is an anchor whose positive is its own view (its neighbours lie 960 m away,
    # the views within 240 m of their tile), and the tiles stay in the training set.
    triplets = _rows(out / 'train_triplets.csv')
    assert len(triplets) == 40
    pairs = {Path(t[0]).name: Path(t[1]).name for t in triplets}
    assert all(pairs[f'tile_{k:05d}.png'] == f'view_{k:05d}_0.png' for k in range(20))
    db = build_db(tmp_path / 'map.npz', out / 'weights.safetensors', images=tiles_csv.parent,
                  csv=tiles_csv, device='cpu', precision='fp32', progress=False)
    model = ImageRetrievalModel.load(out / 'weights.safetensors', 'cpu', 'fp32')
    assert len(db) == 20
    db.check_model(model.fingerprint(), model.config)
    # Resumed, the run reuses its views.
    assert main(argv + ['--max-epochs', '2', '--resume']) == 0
    assert 'reused 20 simulated views' in capsys.readouterr().out


def test_map_options_are_checked(tiles_csv, tmp_path, capsys):
    base = ['--out', str(tmp_path / 'x'), '--train-dir', str(tiles_csv.parent)]
    cases = [
        (['--train-csv', str(tiles_csv), '--map-gsd-m', '30'], 'for --simulate-views N'),
        (['--simulate-views', '1', '--train-triplets', str(tiles_csv)], 'not --train-triplets'),
        (['--simulate-views', '1', '--train-csv', str(tiles_csv), '--map-geotiff',
          str(tiles_csv)], 'give one map'),
        (['--simulate-views', '1'], 'needs the map'),
        (['--simulate-views', '1', '--map-geotiff', str(tmp_path / 'none.tif')],
         'GeoTIFF not found'),
        (['--simulate-views', '1', '--train-csv', str(tiles_csv), '--map-tile-m', '900'],
         'cut tiles from --map-geotiff'),
        (['--simulate-views', '-1', '--train-csv', str(tiles_csv)], 'must be >= 0'),
        (['--simulate-views', '1', '--train-csv', str(tiles_csv), '--map-gsd-m', '0'],
         'must be positive: map_gsd_m = 0'),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / 'x').exists()
