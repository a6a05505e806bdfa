"""The command line end to end, as a user runs it, on real images."""

import json
import subprocess
import sys

import numpy as np
import pytest
from taco_cvgl.geo.geodesy import distance_m
from taco_cvgl.mapdb.database import EmbeddingDatabase


def taco(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'taco_cvgl.cli.main', *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_build_db_then_localize_json(small_map, tmp_path):
    out = tmp_path / 'cli.npz'
    run = taco('build-db', '--images', small_map.images_dir, '--csv', small_map.csv,
               '--out', out, '--weights', small_map.weights, '--device', 'cpu',
               '--no-progress')
    assert run.returncode == 0, run.stderr
    assert f'wrote {out}: 8 images' in run.stdout
    assert EmbeddingDatabase.load(out).model_fingerprint == \
        EmbeddingDatabase.load(small_map.db).model_fingerprint
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    images = [small_map.images_dir / 'place_03.png', broken,
              small_map.images_dir / 'place_05.png']
    run = taco('localize', '--db', out, '--weights', small_map.weights, '--json',
               '--top-k', '1', '--device', 'cpu', *images)
    assert run.returncode == 1  # one image failed; the others were still answered
    assert 'broken.jpg' in run.stderr and 'Traceback' not in run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line['image'] for line in lines] == [str(p) for p in images]
    assert 'error' in lines[1]
    for line, place in ((lines[0], 3), (lines[2], 5)):
        _, lat, lon = small_map.places[place]
        # Verified by default: confidence is inliers / (inliers + rerank_min_inliers 15).
        assert line['fix'] is True and line['verified'] is True
        assert line['confidence'] == pytest.approx(line['inliers'] / (line['inliers'] + 15))
        assert distance_m(line['latitude'], line['longitude'], lat, lon) < 0.01
        assert line['top_k'][0]['index'] == place
        assert line['top_k'][0]['similarity'] == pytest.approx(1.0, abs=1e-2)
        cov = np.array(line['position_covariance']).reshape(3, 3)
        assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)
        assert np.isfinite(line['altitude'])


def test_text_output_and_user_errors(small_map, tmp_path):
    run = taco('localize', '--db', small_map.db, '--weights', small_map.weights, '--device',
               'cpu', small_map.images_dir / 'place_01.png')
    assert run.returncode == 0, run.stderr
    assert 'place_01.png: ' in run.stdout and 'confidence' in run.stdout
    run = taco('localize', '--db', tmp_path / 'nope.npz', '--weights', small_map.weights,
               small_map.images_dir / 'place_01.png')
    assert run.returncode == 2
    assert run.stderr.strip() == \
        f'taco-cvgl: error: parameter database: file not found: {tmp_path}/nope.npz'
    bad_csv = tmp_path / 'bad.csv'
    bad_csv.write_text('image_path,latitude,longitude\nplace_00.png,12,nan\n')
    run = taco('build-db', '--images', small_map.images_dir, '--csv', bad_csv, '--out',
               tmp_path / 'x.npz', '--weights', small_map.weights, '--device', 'cpu')
    assert run.returncode == 2 and 'bad.csv:2' in run.stderr
    assert not (tmp_path / 'x.npz').exists()
    run = taco('frobnicate')
    assert run.returncode == 2 and 'unknown command' in run.stderr


def test_build_db_from_a_bag(small_map, tmp_path):
    from taco_cvgl.files.bags import BagWriter
    bag = tmp_path / 'drive'
    with BagWriter(bag, storage='sqlite3') as writer:
        for i, (rgb, lat, lon) in enumerate(small_map.places[:4]):
            stamp = (10 + 2 * i) * 10**9
            writer.write_image('/cam/image_raw/compressed', stamp, rgb, compressed='jpeg')
            # GPS at 1 Hz around each image: the image's position is interpolated between them.
            writer.write_navsat('/gps/fix', stamp - 10**9, lat, lon - 0.001, 100.0)
            writer.write_navsat('/gps/fix', stamp + 10**9, lat, lon + 0.001, 110.0)
        writer.write_image('/cam/image_raw/compressed', 60 * 10**9, rgb, compressed='jpeg')
    out = tmp_path / 'bag.npz'
    run = taco('build-db', '--bag', bag, '--image-topic', '/cam/image_raw/compressed',
               '--gps-topic', '/gps/fix', '--out', out, '--weights', small_map.weights,
               '--device', 'cpu', '--no-progress')
    assert run.returncode == 0, run.stderr
    db = EmbeddingDatabase.load(out)
    assert len(db) == 4   # the last image has no GPS within 1 s
    for i, (_, lat, lon) in enumerate(small_map.places[:4]):
        assert distance_m(db.latitude[i], db.longitude[i], lat, lon) < 0.01
        assert db.altitude[i] == pytest.approx(105.0)
    assert all(path.startswith(str(tmp_path / 'bag.npz.images')) for path in db.image_ids)
    run = taco('build-db', '--bag', bag, '--image-topic', '/cam/nope', '--gps-topic',
               '/gps/fix', '--out', tmp_path / 'x.npz', '--weights', small_map.weights)
    assert run.returncode == 2 and '/cam/image_raw/compressed' in run.stderr


def test_calibrate_is_a_command_and_reports_a_user_error_in_one_line(small_map, tmp_path):
    run = taco('--help')
    assert run.returncode == 0 and '  calibrate ' in run.stdout
    missing = tmp_path / 'nope.npz'
    run = taco('calibrate', '--db', missing, '--weights', small_map.weights, '--bag',
               tmp_path / 'no_bag', '--image-topic', '/cam', '--gt-topic', '/gps')
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and 'no_bag' in run.stderr
    assert not missing.exists()
