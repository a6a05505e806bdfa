"""taco-cvgl calibrate and build-db's calibration options, on a flight over real Landsat tiles."""

import shutil

from conftest import GSD_M
import pytest
from taco_cvgl.cli import build_db, calibrate
from taco_cvgl.demo.views import render_view
from taco_cvgl.files import bags
from taco_cvgl.files.atomic import sha256_of
from taco_cvgl.mapdb.calibration import MIN_FALLBACK_FIXES
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_features import features_path, load_features

CAMERA = '/camera/image_raw'
GT = '/gps/fix'
SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND
# Tiles of the tile_map whose nadir views verify (the others are water or too plain for SIFT),
# flown over in this order with these offsets (scene pixels): ten verified fixes.
FLIGHT = ((0, 10, -5), (1, -8, 6), (4, 6, 9), (5, -10, -4), (7, 4, -8), (8, -6, 5),
          (11, 9, 3), (0, -4, 10), (4, -9, -7), (8, 7, -9))
# Places 20 km west of the map: no candidate verifies, the retrieval estimate is kilometres off.
FAR = ((300, 1400), (420, 1400))


def views_of(scene, tiles, flight=FLIGHT, far=FAR):
    """Return the flight's nadir views: over the tiles first, then far from the map."""
    over = [render_view(scene, (tiles[i].col + dc, tiles[i].row + dr), 40.0 + 2.0 * k, 1.0,
                        (0.0, 0.0), 256) for k, (i, dc, dr) in enumerate(flight)]
    away = [render_view(scene, centre, 60.0, 1.0, (0.0, 0.0), 256) for centre in far]
    return over + away


def write_flight(path, views, truth=True):
    """Write the views 2 s apart with ground truth at each image stamp (none: truth False)."""
    with bags.BagWriter(path) as writer:
        for k, view in enumerate(views):
            stamp = T0 + 2 * k * SECOND
            writer.write_image(CAMERA, stamp, view.image)
            shift = 0 if truth else 60 * SECOND     # a minute off: no image has ground truth
            writer.write_navsat(GT, stamp + shift, view.latitude, view.longitude, 500.0)
    return path


def params_file(path):
    """Return a params file that checks every tile of the small map, on the CPU."""
    path.write_text('/**:\n  ros__parameters:\n    top_k: 20\n    rerank_candidates: 20\n'
                    "    fast_path: 'off'\n    device: 'cpu'\n    precision: 'fp32'\n")
    return path


def calibrate_args(root, db, bag, *extra):
    """Return the arguments of a calibrate run."""
    return ['--db', str(db), '--weights', str(root / 'w.safetensors'), '--bag', str(bag),
            '--image-topic', CAMERA, '--gt-topic', GT, '--params-file',
            str(params_file(root / 'params.yaml')), *extra]


@pytest.fixture(scope='module')
def tiles_map(tile_map, tmp_path_factory):
    """Return (folder, map path, tiles): the tile map as build-db writes it, --gsd-m given."""
    _, built, tiles = tile_map
    root = tmp_path_factory.mktemp('calibrate')
    shutil.copy(built.parent / 'w.safetensors', root / 'w.safetensors')
    csv = built.parent / 'tiles' / 'tiles.csv'
    assert build_db.main(['--images', str(csv.parent), '--csv', str(csv), '--out',
                          str(root / 'map.npz'), '--weights', str(root / 'w.safetensors'),
                          '--device', 'cpu', '--precision', 'fp32', '--no-progress',
                          '--gsd-m', str(GSD_M), '--covariance-scale', '1.5']) == 0
    return root, root / 'map.npz', tiles


def test_calibrate_stores_the_models_fitted_on_the_flight(scene, tiles_map, tmp_path, capsys):
    root, db_path, tiles = tiles_map
    bag = write_flight(tmp_path / 'flight', views_of(scene, tiles))
    before = EmbeddingDatabase.load(db_path)
    features = sha256_of(features_path(db_path))
    capsys.readouterr()
    assert calibrate.main(calibrate_args(root, db_path, bag)) == 0
    out = capsys.readouterr().out
    db = EmbeddingDatabase.load(db_path)
    calibration = db.calibration
    # Ten fixes: too few for the three-term feature model (8 per coefficient: 32), enough for
    # the single scale; all of them right within 40 m, so the confidence keeps the inlier share.
    assert len(FLIGHT) == 10 >= MIN_FALLBACK_FIXES
    covariance, confidence = calibration.covariance_model, calibration.confidence_model
    assert (covariance.kind, covariance.fixes) == ('single_scale', 10)
    assert 'fewer than the 32' in covariance.note and covariance.scale > 0
    assert (confidence.kind, confidence.fixes, confidence.min_inliers) == ('inlier_ratio', 10, 15)
    assert confidence.right_within_m == 40.0 and '10 right and 0 wrong' in confidence.note
    # The two frames far from the map: neither verified, neither right: (0 + 1) / (2 + 2).
    record = db.meta['unverified_confidence']
    assert (record['frames'], record['right'], record['right_within_m']) == (2, 0, 40.0)
    assert calibration.unverified_confidence == pytest.approx(0.25)
    # What the map knew of itself stays; its entries and its features file are untouched.
    assert calibration.gsd_m == GSD_M and calibration.covariance_scale == 1.5
    assert calibration.grid_spacing_m == before.calibration.grid_spacing_m
    assert (db.embeddings == before.embeddings).all() and db.embeddings.dtype == 'float16'
    assert sha256_of(features_path(db_path)) == features
    assert len(load_features(features_path(db_path), db, db_path)) == len(db)
    assert 'calibration flight' in out and '12 frames with ground truth, 10 verified fixes' in out
    assert 'covariance model: single_scale on 10 fixes' in out
    assert 'unverified frames: 0 of 2 right within 40 m: confidence 0.250' in out
    assert f'wrote {db_path}' in out


def test_calibrate_to_another_file_takes_the_features_along(scene, tiles_map, tmp_path,
                                                            capsys):
    root, db_path, tiles = tiles_map
    original = sha256_of(db_path)
    bag = write_flight(tmp_path / 'short', views_of(scene, tiles, FLIGHT[:2], FAR[:1]))
    out = tmp_path / 'calibrated' / 'map2.npz'
    out.parent.mkdir()
    # Every matcher's file goes along (copied as bytes, so any bytes stand in for DISK's); a
    # stale file of a matcher the map has none of is removed from beside the new database.
    disk = features_path(db_path, 'disk_lightglue')
    disk.write_bytes(b'the DISK features of map.npz')
    features_path(out, 'aliked_lightglue').write_bytes(b'those of a database replaced')
    try:
        assert calibrate.main(calibrate_args(root, db_path, bag, '--out', str(out))) == 0
    finally:
        disk.unlink()
    assert features_path(out, 'disk_lightglue').read_bytes() == b'the DISK features of map.npz'
    assert not features_path(out, 'aliked_lightglue').exists()
    assert 'only 2 verified fixes of 3 frames' in capsys.readouterr().out
    assert sha256_of(db_path) == original          # --out: the map itself is not touched
    db = EmbeddingDatabase.load(out)
    calibration = db.calibration
    # Two fixes: no model; the one far frame: (0 + 1) / (1 + 2).
    assert calibration.covariance_model is None and calibration.confidence_model is None
    assert (db.meta['unverified_confidence']['frames'],
            db.meta['unverified_confidence']['right']) == (1, 0)
    assert calibration.unverified_confidence == pytest.approx(1 / 3)
    assert calibration.gsd_m == GSD_M
    assert len(load_features(features_path(out), db, out)) == len(db)


def test_a_failing_calibrate_leaves_the_map_as_it_was(scene, tiles_map, tmp_path, capsys):
    root, db_path, tiles = tiles_map
    kept = {path: sha256_of(path) for path in (db_path, features_path(db_path))}
    views = views_of(scene, tiles, FLIGHT[:1], ())
    untimed = write_flight(tmp_path / 'untimed', views, truth=False)
    for bag, words in ((tmp_path / 'missing', 'missing'),
                       (untimed, 'no image with ground truth')):
        capsys.readouterr()
        assert calibrate.main(calibrate_args(root, db_path, bag)) == 2
        err = capsys.readouterr().err
        assert err.startswith('taco-cvgl: error: ') and len(err.strip().splitlines()) == 1
        assert words in err or str(bag) in err, err
        assert {path: sha256_of(path) for path in kept} == kept
    assert sorted(p.name for p in db_path.parent.iterdir() if p.name.startswith('.')) == []


def test_build_db_stores_its_calibration_options(small_map, tmp_path, capsys):
    out = tmp_path / 'scaled.npz'
    common = ['--images', str(small_map.images_dir), '--csv', str(small_map.csv), '--out',
              str(out), '--weights', str(small_map.weights), '--device', 'cpu',
              '--no-progress', '--no-features']
    assert build_db.main(common + ['--gsd-m', '2.5']) == 0
    assert ', ground pixel 2.5 m,' in capsys.readouterr().out
    calibration = EmbeddingDatabase.load(out).calibration
    assert calibration.gsd_m == 2.5 and calibration.covariance_scale == 1.0
    assert calibration.grid_spacing_m > 0                    # measured and recorded
    assert build_db.main(common + ['--grid-spacing-m', '300', '--covariance-scale', '2']) == 0
    calibration = EmbeddingDatabase.load(out).calibration
    assert (calibration.gsd_m, calibration.grid_spacing_m, calibration.covariance_scale) == \
        (None, 300.0, 2.0)


@pytest.mark.parametrize('flag, value', [('--gsd-m', '0'), ('--grid-spacing-m', '-5'),
                                         ('--covariance-scale', 'nan')])
def test_build_db_refuses_a_calibration_option_that_is_not_positive(small_map, tmp_path, capsys,
                                                                    flag, value):
    out = tmp_path / 'never.npz'
    assert build_db.main(['--images', str(small_map.images_dir), '--csv', str(small_map.csv),
                          '--out', str(out), '--weights', str(small_map.weights), flag,
                          value]) == 2
    assert capsys.readouterr().err == \
        f'taco-cvgl: error: {flag} must be a positive number, got {float(value)!r}\n'
    assert not out.exists()


def test_each_bag_run_has_its_own_track(scene, tiles_map, tmp_path):
    from taco_cvgl.evaluation.runs import evaluate_bag
    from taco_cvgl.localization.localizer import CVGLLocalizer
    from taco_cvgl.localization.settings import settings
    root, db_path, tiles = tiles_map
    first, second = views_of(scene, tiles, FLIGHT[:2], ())
    localizer = CVGLLocalizer.from_settings(settings(
        params_file(root / 'params.yaml'), weights=str(root / 'w.safetensors'),
        database=str(db_path)))
    # The localizer's own track remembers a verified heading 2 s before the bag's one frame.
    assert localizer.localize(first.image, timestamp=T0 * 1e-9 - 2.0).fix
    assert localizer.track.heading_prior(T0 * 1e-9, 10.0) is not None
    result = evaluate_bag(write_flight(tmp_path / 'one', [second]), CAMERA, GT, db_path,
                          root / 'w.safetensors', tmp_path / 'eval', localizer=localizer,
                          plots=False, progress=False)
    # The bag's frame starts a track of its own: no heading from the earlier fix, rotations tried.
    assert result.metrics['heading_prior']['localizer_sources'] == {'tta': 1}
