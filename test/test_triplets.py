"""Triplet files and GPS triplet generation on known coordinates; hard-negative mining."""

import csv

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import distance_m, from_enu
from taco_cvgl.mapdb.database import ImageRecord
from taco_cvgl.training.data import (generate_triplets, make_triplets, mine_hard_negatives,
                                     pairs_within, read_triplets, write_triplets)

LAT0, LON0 = 47.37, 8.54     # any place: the code works in metres around the data's centre


def _write_csv(folder, rows, header=('image_path', 'latitude', 'longitude', 'heading'),
               touch=True):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'images.csv', 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    if touch:
        for row in rows:
            (folder / row[0]).write_bytes(b'not read by these tests')
    return folder / 'images.csv'


def _known_places(folder):
    """
    Images at known offsets (metres east, north) from a reference; headings in degrees.

    a0/a1/a2: one place (a1 4 m, a2 12 m away; a2 faces 90 degrees off); b0: 60 m from a0 (in
    the ignored band: neither positive nor negative of a); c0/c1: a second place 800 m east;
    d0: alone 3 km north (no positive, but a negative for everyone).
    """
    layout = {'a0.png': (0, 0, 10), 'a1.png': (4, 0, 20), 'a2.png': (0, 12, 100),
              'b0.png': (60, 0, 10), 'c0.png': (800, 0, 0), 'c1.png': (805, 3, 5),
              'd0.png': (0, 3000, 0)}
    rows = []
    for name, (east, north, heading) in layout.items():
        lat, lon = from_enu(LAT0, LON0, east, north)
        rows.append((name, f'{float(lat):.9f}', f'{float(lon):.9f}', heading))
    return _write_csv(folder, rows), layout


def _records(csv_path):
    from taco_cvgl.mapdb.database import read_csv
    return read_csv(csv_path)


def _dist(records, a, b):
    pos = {r.path: (r.latitude, r.longitude) for r in records}
    return float(distance_m(*pos[a], *pos[b]))


def test_generation_on_known_coordinates(tmp_path):
    csv_path, _ = _known_places(tmp_path)
    records = _records(csv_path)
    triplets, summary = generate_triplets(records, 25.0, 100.0, per_anchor=4, seed=3)
    anchors = {t.anchor for t in triplets}
    names = {r.path.split('/')[-1]: r.path for r in records}
    # b0 (60 m from a0) and d0 (3 km away) have nobody within 25 m: they are never anchors.
    assert anchors == {names[n] for n in ('a0.png', 'a1.png', 'a2.png', 'c0.png', 'c1.png')}
    assert summary.anchors == 5 and summary.without_positive == 2
    assert summary.triplets == len(triplets) == 5 * 4
    for t in triplets:
        assert _dist(records, t.anchor, t.positive) <= 25.0
        assert _dist(records, t.anchor, t.negative) > 100.0
    # a0, a1, a2 share a 25 m cell label; c0/c1 another.
    labels = {t.anchor: t.place_label for t in triplets}
    assert labels[names['a0.png']] == labels[names['a1.png']] != labels[names['c0.png']]
    # Seeded: the same seed gives the same triplets, another seed other choices.
    again, _ = generate_triplets(records, 25.0, 100.0, per_anchor=4, seed=3)
    assert again == triplets
    other, _ = generate_triplets(records, 25.0, 100.0, per_anchor=4, seed=4)
    assert other != triplets


def test_heading_constraint_removes_positives_facing_away(tmp_path):
    csv_path, _ = _known_places(tmp_path)
    records = _records(csv_path)
    triplets, summary = generate_triplets(records, 25.0, 100.0, max_heading_diff_deg=30.0,
                                          per_anchor=3)
    names = {r.path.split('/')[-1]: r.path for r in records}
    # a2 faces 80-90 degrees away from a0/a1: it is nobody's positive, and has none itself.
    assert names['a2.png'] not in {t.anchor for t in triplets}
    assert names['a2.png'] not in {t.positive for t in triplets}
    assert summary.without_positive == 3


def test_heading_constraint_needs_headings(tmp_path):
    rows = [('x.png', LAT0, LON0, ''), ('y.png', LAT0, LON0, '5'),
            ('z.png', LAT0 + 0.01, LON0, '5')]
    records = _records(_write_csv(tmp_path, rows))
    with pytest.raises(InputError, match='x.png has none'):
        generate_triplets(records, max_heading_diff_deg=20.0)


def test_make_triplets_writes_relative_paths_that_read_back(tmp_path):
    csv_path, _ = _known_places(tmp_path / 'data')
    out = tmp_path / 'runs' / 'triplets.csv'
    summary = make_triplets(csv_path, out, pos_radius_m=25, neg_radius_m=100, per_anchor=2,
                            seed=1)
    assert summary.path == out and summary.triplets == 10
    lines = out.read_text().splitlines()
    assert lines[0] == 'anchor,positive,negative,place_label'
    assert all(not line.startswith('/') for line in lines[1:])
    assert lines[1].split(',')[0].endswith('.png') and '/' not in lines[1].split(',')[0]
    triplets, skipped = read_triplets(out, tmp_path / 'data')
    records, _ = generate_triplets(_records(csv_path), 25, 100, per_anchor=2, seed=1)
    assert skipped == 0 and triplets == records
    # And written again from the read triplets, the file is identical.
    write_triplets(triplets, tmp_path / 'again.csv', tmp_path / 'data')
    assert (tmp_path / 'again.csv').read_text() == out.read_text()


def test_missing_image_names_the_line_or_is_skipped_and_counted(tmp_path):
    for name in ('a.png', 'b.png', 'c.png', 'd.png'):
        (tmp_path / name).write_bytes(b'x')
    path = tmp_path / 'triplets.csv'
    path.write_text('anchor,positive,negative,place_label\n'
                    'a.png,b.png,c.png,p1\n'
                    'a.png,b.png,gone.png,p1\n'
                    'b.png,a.png,d.png,p1\n')
    with pytest.raises(InputError) as err:
        read_triplets(path)
    assert f'{path}:3' in str(err.value) and 'gone.png' in str(err.value)
    triplets, skipped = read_triplets(path, skip_missing=True)
    assert skipped == 1 and len(triplets) == 2
    assert triplets[1].anchor == str(tmp_path / 'b.png')


def test_malformed_triplet_line_is_named(tmp_path):
    path = tmp_path / 'triplets.csv'
    path.write_text('a.png,b.png\n')
    with pytest.raises(InputError, match=r'triplets.csv:1: expected anchor,positive'):
        read_triplets(path)


def test_nan_coordinates_are_refused_naming_the_line(tmp_path):
    rows = [('a.png', LAT0, LON0, 0), ('b.png', 'nan', LON0, 0), ('c.png', LAT0, LON0, 0)]
    with pytest.raises(InputError, match=r'images.csv:3'):
        make_triplets(_write_csv(tmp_path, rows), tmp_path / 't.csv')
    assert not (tmp_path / 't.csv').exists()


def test_too_few_places_to_mine(tmp_path):
    # All images within 30 m: positives exist, negatives (beyond 100 m) do not.
    rows = [(f'{k}.png', *from_enu(LAT0, LON0, 10.0 * k, 0.0), 0) for k in range(4)]
    with pytest.raises(InputError, match='too few places'):
        make_triplets(_write_csv(tmp_path / 'one', rows), tmp_path / 't.csv')
    # Images all far apart: nobody has a positive.
    rows = [(f'{k}.png', *from_enu(LAT0, LON0, 500.0 * k, 0.0), 0) for k in range(4)]
    with pytest.raises(InputError, match='too few places'):
        make_triplets(_write_csv(tmp_path / 'apart', rows), tmp_path / 't.csv')
    with pytest.raises(InputError, match='too few images'):
        generate_triplets([ImageRecord('x', LAT0, LON0)] * 2)


def test_pairs_within_matches_brute_force():
    rng = np.random.default_rng(0)
    enu = np.concatenate([rng.uniform(-300, 300, (400, 2)),
                          rng.normal(0, 5, (100, 2))])      # a dense cluster too
    i, j = pairs_within(enu, 25.0)
    d = np.hypot(*(enu[:, None] - enu[None]).transpose(2, 0, 1))
    want_i, want_j = np.nonzero((d <= 25.0) & ~np.eye(len(enu), dtype=bool))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(want_i.tolist(), want_j.tolist()))


def test_mining_picks_look_alikes_beyond_the_radius():
    # 6 images on a line 50 m apart; embeddings make image 1 (50 m: too near) and image 4
    # (200 m) the look-alikes of image 0.
    enu = np.array([[50.0 * k, 0.0] for k in range(6)])
    emb = np.eye(6, dtype=np.float32)
    emb[1] = emb[0] * 0.99 + emb[1] * 0.14
    emb[4] = emb[0] * 0.9 + emb[4] * 0.43
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    picked = mine_hard_negatives(emb, enu, np.array([0, 5]), neg_radius_m=100.0, candidates=1)
    assert picked[0] == 4
    assert np.hypot(*(enu[picked[1]] - enu[5])) > 100.0
    # Nothing beyond 1 km: no negative.
    assert mine_hard_negatives(emb, enu, np.array([0]), 1000.0).tolist() == [-1]
