"""taco-cvgl evaluate on dataset folders named in the VPR convention, on real Landsat imagery."""

import csv
import json
import shutil
import types

from conftest import place_centres
import cv2
import numpy as np
import pytest
from taco_cvgl.cli import evaluate
from taco_cvgl.evaluation.scoring import positives_within
from taco_cvgl.mapdb.database import EmbeddingDatabase

CROP = (160, 200)           # height, width of each image, pixels of 30 m
THRESHOLD_M = 150.0         # 5 pixels: a jittered crop's own place is within it, no other place
JITTER_PX = [(0, 0), (2, 1), (-1, 2), (2, -2)]   # query i: place i moved by (dcol, drow)
BANDS = 'CDEFGHJKLMNPQRSTUVWX'


def vpr_name(east='', north='', zone='', band='', lat='', lon='', heading=''):
    """Return a file name in the VPR convention, the fields not given left empty."""
    fields = [east, north, zone, band, lat, lon, '', '', heading, '', '', '', '', '']
    return '@' + '@'.join(str(f) for f in fields) + '@.jpg'


def position(scene, col, row):
    """Return (lat, lon, east, north, zone, band) of a pixel centre, UTM as a VPR name has it."""
    lat, lon = (float(v) for v in scene.pixel_to_latlon(col, row))
    east, north = (float(v) for v in scene.pixel_to_utm(col, row))
    band = BANDS[int((lat + 80) // 8)]
    if band < 'N' and scene.epsg // 100 == 326:    # the south counts from 10,000 km south
        north += 10_000_000.0
    return lat, lon, east, north, scene.epsg % 100, band


def crop(scene, col, row):
    """Return the BGR crop of the scene centred on a pixel."""
    h, w = CROP
    return cv2.cvtColor(scene.rgb[row - h // 2:row + h // 2, col - w // 2:col + w // 2],
                        cv2.COLOR_RGB2BGR)


@pytest.fixture(scope='module')
def dataset(scene, tmp_path_factory):
    """
    Write 6 database places and 6 queries, each named with its position.

    Places are >= 250 px (7.5 km) apart. Query 0 is a byte copy of place 0, queries 1-3 are
    crops of places 1-3 moved by at most 2 px (67 m), query 2 carries only UTM fields, query 4
    is a 7th place, far from every database image, and query 5 a byte copy of place 5 named
    at place 3: it ranks place 5 first, a miss.
    """
    root = tmp_path_factory.mktemp('vpr')
    db_dir, q_dir = root / 'database', root / 'queries'
    db_dir.mkdir()
    q_dir.mkdir()
    centres = place_centres(scene, 7, shape=CROP)
    db_names, rows = [], []
    for col, row in centres[:6]:
        lat, lon, east, north, zone, band = position(scene, col, row)
        name = vpr_name(f'{east:.2f}', f'{north:.2f}', zone, band, f'{lat:.8f}', f'{lon:.8f}')
        cv2.imwrite(str(db_dir / name), crop(scene, col, row))
        db_names.append(name)
        rows.append((name, lat, lon))
    queries = {}
    for i, (dcol, drow) in enumerate(JITTER_PX):
        col, row = centres[i][0] + dcol, centres[i][1] + drow
        lat, lon, east, north, zone, band = position(scene, col, row)
        if i == 2:
            name = vpr_name(f'{east:.3f}', f'{north:.3f}', zone, band)   # UTM only
        else:
            name = vpr_name(lat=f'{lat:.8f}', lon=f'{lon:.8f}', heading='90')
        if i == 0:
            shutil.copy(db_dir / db_names[0], q_dir / name)
        else:
            cv2.imwrite(str(q_dir / name), crop(scene, col, row))
        queries[name] = (i, lat, lon)
    lat, lon = position(scene, *centres[6])[:2]
    far = vpr_name(lat=f'{lat:.8f}', lon=f'{lon:.8f}')
    cv2.imwrite(str(q_dir / far), crop(scene, col, row))
    queries[far] = (None, lat, lon)
    lat, lon = position(scene, *centres[3])[:2]
    misnamed = vpr_name(lat=f'{lat:.8f}', lon=f'{lon:.8f}', heading='0')
    shutil.copy(db_dir / db_names[5], q_dir / misnamed)
    queries[misnamed] = (3, lat, lon)
    with open(root / 'database.csv', 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['image_path', 'latitude', 'longitude'])
        writer.writerows(rows)
    names = list(queries)
    return types.SimpleNamespace(root=root, db_dir=db_dir, q_dir=q_dir, db_names=db_names,
                                 queries=queries, copy=names[0], utm_only=names[2],
                                 misnamed=misnamed)


def run(args, capsys):
    """Run taco-cvgl evaluate in-process; return (exit code, stdout, stderr)."""
    rc = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def brute_force_recall(out, data, ks):
    """Return Recall@k over queries with a place, and over all, ranked from the written files."""
    db = EmbeddingDatabase.load(out / 'database.npz')
    q = EmbeddingDatabase.load(out / 'queries.npz')
    db_index = [data.db_names.index(str(p).rsplit('/', 1)[-1]) for p in db.image_ids]
    sim = q.embeddings.astype(np.float64) @ db.embeddings.astype(np.float64).T
    order = np.argsort(-sim, axis=1, kind='stable')
    found = dict.fromkeys(ks, 0)
    places = 0
    for row, path in enumerate(q.image_ids):
        place = data.queries[str(path).rsplit('/', 1)[-1]][0]
        if place is None:
            continue
        places += 1
        ranked = [db_index[j] for j in order[row]]
        for k in ks:
            found[k] += place in ranked[:k]
    total = len(q.image_ids)
    return {k: n / places for k, n in found.items()}, {k: n / total for k, n in found.items()}


def test_recall_on_vpr_folders_matches_a_brute_force_ranking(small_map, dataset, tmp_path,
                                                             capsys):
    out = tmp_path / 'eval'
    rc, stdout, err = run(['--database-folder', dataset.db_dir, '--queries-folder',
                           dataset.q_dir, '--weights', small_map.weights, '--out', out,
                           '--threshold-m', THRESHOLD_M, '--recall-values', 5, 1, 2,
                           '--device', 'cpu', '--precision', '32-true', '--no-progress'],
                          capsys)
    assert rc == 0, err
    m = json.loads((out / 'metrics.json').read_text())
    assert m['mode'] == 'retrieval' and m['complete'] is True
    assert m['frames']['total'] == 6
    # By construction: queries 0-3 and 5 are within 67 m of their place, query 4 of none.
    assert (m['frames']['with_positive'], m['frames']['without_positive']) == (5, 1)
    with_place, over_all = brute_force_recall(out, dataset, (1, 2, 5))
    for k in (1, 2, 5):
        assert m['recall']['at_' + str(k)] == pytest.approx(with_place[k])
        assert m['recall_all_queries']['at_' + str(k)] == pytest.approx(over_all[k])
    # Query 0 (a copy of place 0) is found at 1, query 5 (a copy of place 5) is not.
    assert 1 / 5 <= m['recall']['at_1'] <= 4 / 5
    assert m['recall_all_queries']['at_5'] <= 5 / 6   # the far query is a miss at any rank
    assert 'Recall@1/2/5 (150 m)' in stdout and '1 without a database image' in stdout

    rows = {r['image'].rsplit('/', 1)[-1]: r
            for r in csv.DictReader((out / 'frames.csv').open())}
    assert len(rows) == 6
    assert rows[dataset.copy]['first_hit_rank'] == '1'
    assert rows[dataset.copy]['top1_id'].endswith(dataset.db_names[0])
    assert rows[dataset.misnamed]['top1_id'].endswith(dataset.db_names[5])
    assert rows[dataset.misnamed]['first_hit_rank'] != '1'
    utm_only = dataset.utm_only
    _, lat, lon = dataset.queries[utm_only]
    # The UTM-only name gives the position the scene's own georeference gives (1e-7 deg: 1 cm).
    assert float(rows[utm_only]['truth_lat']) == pytest.approx(lat, abs=1e-7)
    assert float(rows[utm_only]['truth_lon']) == pytest.approx(lon, abs=1e-7)
    assert (out / 'retrieval_grid.png').is_file() and (out / 'error_cdf.png').is_file()
    assert not (out / 'track.png').exists()
    assert {'database_embeddings', 'queries_embeddings', 'metrics'} <= set(m['outputs'])

    # The same database given as a build-db CSV: the same embeddings, the same recall.
    out_csv = tmp_path / 'eval_csv'
    rc, _, err = run(['--database-csv', dataset.root / 'database.csv', '--database-folder',
                      dataset.db_dir, '--queries-folder', dataset.q_dir, '--weights',
                      small_map.weights, '--out', out_csv, '--threshold-m', THRESHOLD_M,
                      '--recall-values', 1, 2, 5, '--device', 'cpu', '--no-progress',
                      '--no-plots'], capsys)
    assert rc == 0, err
    assert json.loads((out_csv / 'metrics.json').read_text())['recall'] == m['recall']


@pytest.mark.parametrize('name, words', [
    ('photo.jpg', ['photo.jpg', 'not a VPR dataset file name']),
    (vpr_name('500000', '4649776', '33', 'I'), ['utm_zone_letter', "'I'"]),
    (vpr_name(lat='91.0', lon='10.0'), ['out of range']),
    (vpr_name(lat='forty', lon='10.0'), ["latitude 'forty' is not a number"]),
])
def test_a_badly_named_image_is_one_clear_error(small_map, dataset, tmp_path, capsys, name,
                                                words):
    queries = tmp_path / 'queries'
    queries.mkdir()
    shutil.copy(dataset.db_dir / dataset.db_names[0], queries / name)
    rc, _, err = run(['--database-folder', dataset.db_dir, '--queries-folder', queries,
                      '--weights', small_map.weights, '--out', tmp_path / 'out'], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith('taco-cvgl: error: ') and all(w in err for w in words)
    assert not (tmp_path / 'out').exists()


def test_dataset_flags_are_checked_before_any_work(small_map, dataset, tmp_path, capsys):
    both = ['--database-folder', dataset.db_dir, '--queries-folder', dataset.q_dir]
    rc, _, err = run(both + ['--out', tmp_path / 'o'], capsys)
    assert rc == 2 and 'needs --weights' in err
    rc, _, err = run(both + ['--bag', tmp_path, '--weights', small_map.weights, '--out',
                             tmp_path / 'o'], capsys)
    assert rc == 2 and 'two different evaluations' in err
    rc, _, err = run(['--database-folder', dataset.db_dir, '--weights', small_map.weights,
                      '--out', tmp_path / 'o'], capsys)
    assert rc == 2 and '--queries-folder DIR' in err
    taken = tmp_path / 'taken'
    taken.write_text('keep me')
    rc, _, err = run(both + ['--weights', small_map.weights, '--out', taken], capsys)
    assert rc == 2 and 'is a file' in err and taken.read_text() == 'keep me'
    rc, _, err = run(both + ['--weights', small_map.weights, '--out', tmp_path / 'o',
                             '--recall-values', 0], capsys)
    assert rc == 2 and '--recall-values' in err
    rc, _, err = run(['--out', tmp_path / 'o'], capsys)
    assert rc == 2 and '--database-folder DIR --queries-folder DIR' in err
    assert not (tmp_path / 'o').exists()


def test_positives_within_the_threshold_by_hand():
    metres_per_degree = 110_574.0       # of latitude at the equator
    db = np.array([[20.0 / metres_per_degree, 0.0],        # 20 m north of (0, 0)
                   [1.0 + 30.0 / metres_per_degree, 0.0],  # 30 m north of (1, 0)
                   [0.0, -179.9999]])                     # 22 m west across the antimeridian
    queries = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 179.9999], [0.0, 90.0]])
    assert positives_within(queries, db, 25.0).tolist() == [True, False, True, False]
    assert positives_within(queries, db, 35.0).tolist() == [True, True, True, False]
