"""Hostile and careless input to the map side: build-db outputs, CSVs, database and cache files."""

import io
import json
import math
import os
from pathlib import Path
import re
import shutil
import zipfile

from conftest import brute_force_topk
import numpy as np
import pytest
from taco_cvgl.cli.build_db import main as build_db_main
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.localization.rerank import RerankConfig
from taco_cvgl.mapdb.database import build_database, EmbeddingDatabase, read_csv
from taco_cvgl.mapdb.search import make_index
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch


def copy_map(small_map, folder: Path) -> Path:
    """Copy the small map's images, CSV and weights into folder (the tests may damage them)."""
    shutil.copytree(small_map.images_dir, folder / 'images')
    shutil.copy(small_map.weights, folder / 'weights.safetensors')
    return folder


def build_args(folder: Path, out) -> list:
    """Return build-db arguments for a map copied by copy_map."""
    return ['--images', str(folder / 'images'), '--csv', str(folder / 'images' / 'places.csv'),
            '--weights', str(folder / 'weights.safetensors'), '--out', str(out),
            '--device', 'cpu', '--no-progress']


def one_error_line(capsys) -> str:
    """Return the single `taco-cvgl: error:` line the command printed (and nothing else)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith('taco-cvgl: error: ') and '\n' not in err, err
    return err


def database_arrays(path) -> dict:
    """Return the arrays of a database file, to be altered and written by write_npz."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def write_npz(path: Path, arrays: dict) -> Path:
    """Write arrays as an .npz file and return its path."""
    np.savez(path, **arrays)
    return path


def test_build_db_refuses_an_out_that_is_one_of_its_inputs(small_map, tmp_path, capsys):
    folder = copy_map(small_map, tmp_path)
    (folder / 'sub').mkdir()
    csv_spelt_otherwise = os.path.join(folder, 'sub', '..', 'images', 'places.csv')
    for victim in (folder / 'images' / 'places.csv', folder / 'weights.safetensors',
                   folder / 'images' / 'place_03.png', csv_spelt_otherwise):
        before = Path(victim).read_bytes()
        assert build_db_main(build_args(folder, victim)) == 2
        assert 'would destroy it' in one_error_line(capsys)
        assert Path(victim).read_bytes() == before
    assert build_db_main(build_args(folder, folder / 'images')) == 2
    assert 'is a folder' in one_error_line(capsys)
    assert sorted(p.name for p in (folder / 'images').iterdir()) == \
        sorted(p.name for p in small_map.images_dir.iterdir())


def test_weights_that_embed_nan_never_replace_a_good_database(small_map, tmp_path, capsys):
    folder = copy_map(small_map, tmp_path)
    good = folder / 'map.npz'
    shutil.copy(small_map.db, good)
    before = good.read_bytes()
    model = ImageRetrievalModel.load(small_map.weights, device='cpu')
    with torch.no_grad():
        model.head[-1].weight[0, 0] = math.nan
    db = build_database(model, read_csv(small_map.csv)[:2], progress=False)
    with pytest.raises(InputError, match=r'NaN.*nothing was written to .*map\.npz'):
        db.save(good)
    # The same through build-db, with the broken weights in a file: named, and nothing written.
    model.save(folder / 'weights.safetensors')
    places = folder / 'images' / 'places.csv'
    places.write_text(''.join(places.read_text().splitlines(keepends=True)[:3]))
    assert build_db_main(build_args(folder, good)) == 2
    line = one_error_line(capsys)
    assert 'NaN' in line and 'weights.safetensors' in line and 'nothing was written' in line
    assert good.read_bytes() == before


def test_build_db_refuses_bad_counts_and_unwritable_outputs(small_map, tmp_path, capsys):
    folder = copy_map(small_map, tmp_path)
    for flag, value in (('--batch-size', '0'), ('--batch-size', '-4'), ('--every', '0')):
        assert build_db_main(build_args(folder, folder / 'x.npz') + [flag, value]) == 2
        assert f'{flag} must be a whole number of 1 or more' in one_error_line(capsys)
    plain = folder / 'plain_file'
    plain.write_text('')
    assert build_db_main(build_args(folder, plain / 'deeper' / 'map.npz')) == 2
    assert f'{plain} is a file, not a folder' in one_error_line(capsys)
    if os.geteuid() != 0:   # root writes anywhere
        locked = folder / 'locked'
        locked.mkdir(mode=0o555)
        assert build_db_main(build_args(folder, locked / 'map.npz')) == 2
        assert 'no permission' in one_error_line(capsys)
    assert not (folder / 'x.npz').exists()


def test_image_paths_resolve_from_the_database_folder(small_map, tmp_path, monkeypatch):
    folder = copy_map(small_map, tmp_path / 'site')
    monkeypatch.chdir(folder)
    assert build_db_main(['--images', 'images', '--csv', 'images/places.csv', '--out', 'map.npz',
                          '--weights', 'weights.safetensors', '--device', 'cpu',
                          '--no-progress']) == 0
    # Stored relative to the database's folder, which is also where build-db ran here.
    assert database_arrays('map.npz')['image_ids'][0] == 'images/place_00.png'
    moved = tmp_path / 'moved'
    shutil.move(folder, moved)      # the whole map folder moves; the working folder differs
    monkeypatch.chdir(tmp_path)
    localizer = CVGLLocalizer.from_files(
        moved / 'weights.safetensors', moved / 'map.npz', device='cpu',
        config=LocalizerConfig(top_k=3, rerank=RerankConfig(candidates=3)))
    assert localizer.database.image_ids[2] == str(moved / 'images' / 'place_02.png')
    m = localizer.localize(small_map.places[2][0])
    assert m.verified and m.matches[0].index == 2
    # A database written before `image_base` keeps its paths as they are.
    old = database_arrays(moved / 'map.npz')
    del old['image_base']
    old['image_ids'] = np.array(['somewhere/a.png'] * len(old['image_ids']))
    db = EmbeddingDatabase.load(write_npz(tmp_path / 'old.npz', old))
    assert list(db.image_ids) == ['somewhere/a.png'] * len(db)


def test_csv_encodings_headings_and_altitudes(tmp_path):
    excel = tmp_path / 'excel.csv'   # "CSV UTF-8" from a spreadsheet: BOM and CRLF
    excel.write_bytes('\ufeffimage_path,latitude,longitude,heading,altitude\r\n'
                      'S\u00e3o.png,1.5,-2.5,-90,12\r\nb.png,2,3,359.5,\r\n'.encode('utf-8'))
    first, second = read_csv(excel)
    assert (first.path, first.latitude, first.longitude) == (str(tmp_path / 'S\u00e3o.png'),
                                                             1.5, -2.5)
    assert (first.heading, first.altitude) == (270.0, 12.0)   # -90 is 270 clockwise from north
    assert second.heading == 359.5 and math.isnan(second.altitude)
    text = 'image_path,latitude,longitude\nS\u00e3o.png,1,2\n'
    ascii_text = 'image_path,latitude,longitude\na.png,1,2\n'
    for name, data, pattern in (
            ('utf16.csv', text.encode('utf-16'), r'utf16\.csv:1: not UTF-8'),
            ('bare16.csv', ascii_text.encode('utf-16-le'), r'bare16\.csv:1: .*NUL'),
            ('latin1.csv', text.encode('latin-1'), r'latin1\.csv:2: not UTF-8')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=pattern + '.*save the file as UTF-8'):
            read_csv(tmp_path / name)
    header = 'image_path,latitude,longitude,heading,altitude\na.png,1,2,0,0\n'
    for row, pattern in (('b.png,1,2,inf,0', 'heading'), ('b.png,1,2,1e9,0', 'heading'),
                         ('b.png,1,2,720,0', 'heading'), ('b.png,1,2,0,-inf', 'altitude'),
                         ('b.png,1,2,north,0', "'north' is not a number")):
        bad = tmp_path / 'bad.csv'
        bad.write_text(header + row + '\n')
        with pytest.raises(InputError, match=r'bad\.csv:3: .*' + pattern):
            read_csv(bad)


def test_malformed_database_files_are_one_clear_error(small_map, tmp_path):
    good = database_arrays(small_map.db)
    n = len(good['latitude'])

    def changed(key, value):
        arrays = dict(good)
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
        return arrays

    lat_out, lat_nan, heading_inf, alt_inf = (good[k].copy() for k in
                                              ('latitude', 'latitude', 'heading', 'altitude'))
    lat_out[3], lat_nan[5], heading_inf[1], alt_inf[6] = 95.0, math.nan, math.inf, -math.inf
    cases = [
        (changed('latitude', None), r"\['latitude'\] are missing"),
        (changed('meta', None), r"\['meta'\] are missing"),
        (changed('meta', np.array('[1, 2]')), 'meta must be a JSON object'),
        (changed('meta', np.array('{not json')), 'meta is not valid JSON'),
        (changed('meta', np.array('{"gsd_m": "2 m"}')),
         "meta calibration: gsd_m must be a positive number, got '2 m'"),
        (changed('latitude', good['latitude'].astype(str)), 'latitude must be a 1-D array of '
                                                            'numbers'),
        (changed('embeddings', np.ones((n, 512), np.int32)), 'fp16 or fp32'),
        (changed('embeddings', good['embeddings'][0]), '2-D'),
        (changed('longitude', good['longitude'][:-1]), f'longitude has {n - 1} entries'),
        (changed('image_ids', np.arange(n)), 'image_ids must be a 1-D array of text'),
        (changed('latitude', lat_out), 'entry 3: .*out of range'),
        (changed('latitude', lat_nan), 'entry 5: .*must be numbers'),
        (changed('heading', heading_inf), 'heading of entry 1 is inf'),
        (changed('altitude', alt_inf), 'altitude of entry 6 is -inf'),
        (changed('model_config', np.array('[1]')), 'model.config'),
    ]
    for i, (arrays, pattern) in enumerate(cases):
        path = write_npz(tmp_path / f'case{i}.npz', arrays)
        with pytest.raises(InputError, match=re.escape(str(path)) + '.*' + pattern):
            EmbeddingDatabase.load(path)


def test_a_header_claiming_a_huge_array_is_refused_before_allocating(small_map, tmp_path):
    path = tmp_path / 'huge.npz'
    arrays = database_arrays(small_map.db)
    del arrays['embeddings']
    write_npz(path, arrays)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {'descr': '<f2', 'fortran_order': False, 'shape': (10**12, 512)})
    with zipfile.ZipFile(path, 'a') as archive:   # 1 PB declared, 1 KB held
        archive.writestr('embeddings.npy', header.getvalue() + bytes(1024))
    with pytest.raises(InputError, match=r'huge\.npz.*embeddings\.npy declares shape '
                                         r'\(1000000000000, 512\)'):
        EmbeddingDatabase.load(path)


def test_degenerate_maps_are_refused(small_map, tmp_path):
    good = database_arrays(small_map.db)
    assert len(EmbeddingDatabase.load(small_map.db)) == 8   # fp16 rows pass the unit test
    for name, embeddings, pattern in (
            ('zero', np.zeros_like(good['embeddings']), '8 of 8 embeddings are zero vectors'),
            ('long', good['embeddings'] * np.float16(1.5), r'not unit length.*norm 1\.[45]')):
        path = write_npz(tmp_path / f'{name}.npz', dict(good, embeddings=embeddings))
        with pytest.raises(InputError, match=pattern):
            EmbeddingDatabase.load(path)
    model = ImageRetrievalModel.load(small_map.weights, device='cpu')
    db = EmbeddingDatabase.load(small_map.db)
    for count in (1, 3):   # one entry, or three headings of one place
        one_place = dict(good, **{k: good[k][:count] for k in
                                  ('embeddings', 'altitude', 'heading', 'image_ids')},
                         latitude=np.full(count, db.latitude[0]),
                         longitude=np.full(count, db.longitude[0]))
        path = write_npz(tmp_path / f'one_place_{count}.npz', one_place)
        with pytest.raises(InputError, match=fr'a single place \({count} entr.*at least 2'):
            CVGLLocalizer(model, LocalizerConfig()).load_map(path)


def test_a_damaged_index_cache_is_rebuilt(tmp_path, caplog):
    rows = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    prefix = str(tmp_path / 'map.npz')
    cache = tmp_path / 'map.npz.hnsw.faiss'
    make_index(rows, 'hnsw', cache_prefix=prefix)
    record = json.loads((tmp_path / 'map.npz.hnsw.faiss.json').read_text())
    assert record['size'] == cache.stat().st_size
    intact = cache.read_bytes()
    flipped = bytearray(intact)
    flipped[len(intact) // 2] ^= 0xFF
    truth, _ = brute_force_topk(rows[:20], rows, 1)
    for damaged in (intact[:len(intact) // 3], bytes(flipped)):
        cache.write_bytes(damaged)
        caplog.clear()
        index = make_index(rows, 'hnsw', cache_prefix=prefix)
        assert index.loaded_from is None and 'unreadable' in caplog.text
        assert np.array_equal(index.search(rows[:20], 1)[0], truth)
        # Rebuilt and kept again, with a record that fits the new file.
        assert make_index(rows, 'hnsw', cache_prefix=prefix).loaded_from == cache


def test_fuzzed_database_files_load_or_raise_a_taco_error(small_map, tmp_path):
    data = small_map.db.read_bytes()
    rng = np.random.default_rng(7)
    variants = [data[:int(rng.integers(0, len(data)))] for _ in range(14)]
    for _ in range(13):
        raw = bytearray(data)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 5))):
            raw[at] ^= int(rng.integers(1, 256))
        variants.append(bytes(raw))
    with zipfile.ZipFile(small_map.db) as archive:   # damage inside a member, CRC made right
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    for _ in range(13):
        name = sorted(members)[int(rng.integers(0, len(members)))]
        payload = bytearray(members[name])
        at = int(rng.integers(0, min(len(payload), 160)) if rng.random() < 0.5
                 else rng.integers(0, len(payload)))
        payload[at] ^= int(rng.integers(1, 256))
        out = io.BytesIO()
        with zipfile.ZipFile(out, 'w') as archive:
            for member, content in members.items():
                archive.writestr(member, bytes(payload) if member == name else content)
        variants.append(out.getvalue())
    outcomes = {'loaded': 0, 'refused': 0}
    path = tmp_path / 'fuzz.npz'
    for variant in variants:
        path.write_bytes(variant)
        try:
            db = EmbeddingDatabase.load(path)
        except TacoError:
            outcomes['refused'] += 1
            continue
        assert len(db) > 0 and np.isfinite(db.embeddings).all()
        assert np.all(np.abs(db.latitude) <= 90) and len(db.image_ids) == len(db)
        outcomes['loaded'] += 1
    assert outcomes['refused'] >= 14    # at least every truncation
