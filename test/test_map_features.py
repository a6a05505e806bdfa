"""The verification features stored beside a map: exact, used without images, refused if stale."""

import os
import shutil

import cv2
import numpy as np
import pytest
from taco_cvgl.cli.build_db import build_db, main as build_db_main
from taco_cvgl.demo.scene import Box, make_tiles, write_tiles
from taco_cvgl.demo.views import Appearance, render_view
from taco_cvgl.errors import InputError
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.localization.rerank import Features, RerankConfig, Reranker
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_features import features_path, load_features, make_reranker
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
import torch

MAX_FEATURES = 600      # fewer than the default: quicker, and a setting the file must record
CONFIG = RerankConfig(max_features=MAX_FEATURES, candidates=20)


@pytest.fixture(scope='module')
def tile_map(scene, tmp_path_factory):
    """
    Build a 12-tile map of real imagery (tiny random model) with build_db, features included.

    Tiles 0, 4 and 7 are textured (60-220 SIFT features); 2, 6, 9 and 10 show flat ground and
    have none, which the store keeps as empty entries.
    """
    root = tmp_path_factory.mktemp('features_map')
    tiles = make_tiles(scene, 96, 48, Box(1000, 700, 1000 + 4 * 48 + 96, 700 + 3 * 48 + 96),
                       out_px=256)
    csv_path = write_tiles(tiles, root / 'tiles', image_format='jpg')
    torch.manual_seed(0)
    model = ImageRetrievalModel(ModelConfig(input_size=(64, 64))).to_runtime('cpu')
    weights = root / 'w.safetensors'
    model.save(weights)
    db_path = root / 'map.npz'
    build_db(db_path, weights, images=csv_path.parent, csv=csv_path, device='cpu',
             precision='fp32', progress=False, max_features=MAX_FEATURES)
    return db_path, tiles, weights, csv_path


def query_of(scene, tile, seed=0):
    """Return a camera view of `tile`'s ground, turned 37 degrees, with another appearance."""
    view = render_view(scene, (tile.col + 4, tile.row + 3), 37.0, 1.1, (3.0, -2.0), 256,
                       np.random.default_rng(seed), Appearance(strength=0.6), 96)
    return view.image


def same_verification(a, b):
    """Assert that two verifications agree in every field, to the bit."""
    assert (a.index, a.inliers, a.residual_px, a.rotation_deg, a.scale) == \
        (b.index, b.inliers, b.residual_px, b.rotation_deg, b.scale)
    np.testing.assert_array_equal(a.offset_px, b.offset_px)
    assert a.inliers_per_candidate == b.inliers_per_candidate


def moved_without_images(tile_map, folder):
    """Copy the database and its features file, and nothing else, into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    db_path = folder / 'map.npz'
    shutil.copy(tile_map[0], db_path)
    shutil.copy(features_path(tile_map[0]), features_path(db_path))
    return db_path


def test_stored_features_are_exactly_those_extracted_from_each_image(tile_map):
    db_path, tiles = tile_map[:2]
    db = EmbeddingDatabase.load(db_path)
    stored = load_features(features_path(db_path), db, db_path, MAX_FEATURES)
    detector = cv2.SIFT_create(nfeatures=MAX_FEATURES)
    total, counts = 0, []
    for index, name in enumerate(db.image_ids):
        want = Features(load_image_file(name), detector)
        got = stored[index]
        assert got.shape == (256, 256) and len(got.points) == len(want.points)
        np.testing.assert_array_equal(got.points, want.points)
        np.testing.assert_array_equal(got.descriptors, want.descriptors)
        assert got.descriptors.dtype == np.float32   # what the matcher needs
        total += len(want.points)
        counts.append(len(want.points))
    assert len(db) == 12 and max(counts) > 150 and min(counts) == 0
    # 136 bytes a keypoint: 2 float32 coordinates and 128 uint8 descriptor values.
    assert stored.descriptors.dtype == np.uint8 and isinstance(stored.descriptors, np.memmap)
    assert stored.bytes_per_entry == (total * 136 + (len(db) + 1) * 8 + len(db) * 8) / len(db)
    assert features_path(db_path).stat().st_size < total * 136 + 10_000


def test_verification_from_stored_features_equals_that_from_images(scene, tile_map):
    db_path, tiles = tile_map[:2]
    db = EmbeddingDatabase.load(db_path)
    from_images = Reranker(lambda i: load_image_file(db.image_ids[i]), CONFIG)
    from_store = make_reranker(db, db_path, CONFIG)
    assert from_store.load_image is None and from_store.stored is not None
    for seed, tile_index in enumerate((0, 4)):
        rgb = query_of(scene, tiles[tile_index], seed)
        query = from_images.query_features(rgb)
        want = from_images.verify(query, range(len(db)))
        got = from_store.verify(query, range(len(db)))
        assert want is not None and want.inliers >= CONFIG.min_inliers
        assert want.index == tile_index       # the tile the view was rendered in
        same_verification(got, want)


def test_a_map_without_its_images_still_verifies_from_its_store(scene, tile_map, tmp_path):
    db_path, tiles = tile_map[:2]
    moved = moved_without_images(tile_map, tmp_path)
    db = EmbeddingDatabase.load(moved)
    assert not any(os.path.exists(p) for p in db.image_ids)
    reranker = make_reranker(db, moved, CONFIG)
    query = reranker.query_features(query_of(scene, tiles[7]))
    assert reranker.verify(query, [7]) is not None
    got = reranker.verify(query, range(len(db)))
    original = EmbeddingDatabase.load(db_path)
    want = Reranker(lambda i: load_image_file(original.image_ids[i]), CONFIG).verify(
        query, range(len(db)))
    same_verification(got, want)
    # Without the store either, the message says both ways out.
    features_path(moved).unlink()
    with pytest.raises(InputError, match=f'are missing.*build-db --features-only --db {moved}'):
        make_reranker(db, moved, CONFIG)


def test_a_store_of_another_database_or_setting_is_refused(tile_map, tmp_path):
    db_path = tile_map[0]
    db = EmbeddingDatabase.load(db_path)
    other = EmbeddingDatabase.load(db_path)
    other.latitude = other.latitude + 1e-6          # another map: the same tiles 0.1 m north
    other_path = tmp_path / 'other.npz'
    other.save(other_path)
    shutil.copy(features_path(db_path), features_path(other_path))
    other = EmbeddingDatabase.load(other_path)
    with pytest.raises(InputError, match=rf'features file {features_path(other_path)} was '
                       rf'written for another database than {other_path}; rebuild it with '
                       rf'taco-cvgl build-db --features-only --db {other_path}$'):
        make_reranker(other, other_path, CONFIG)
    with pytest.raises(InputError, match=f'holds up to {MAX_FEATURES} features per image, and '
                       'verification asks for 1500.*--max-features 1500'):
        make_reranker(db, db_path, RerankConfig())
    # The database file moved (paths rewritten relative to it) is the same database.
    moved = moved_without_images(tile_map, tmp_path / 'moved')
    assert len(make_reranker(EmbeddingDatabase.load(moved), moved, CONFIG).stored) == len(db)


def refuses_damage(path, good, load, hint=''):
    """Check that load() refuses path cut in half, then path with one bit flipped."""
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(InputError, match=rf'features file {path} is not readable.*{hint}'):
        load()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x40           # one bit, inside the descriptors
    path.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=rf'not readable.*CRC.*{hint}'):
        load()


def test_a_truncated_or_damaged_store_is_refused(tile_map, tmp_path):
    moved = moved_without_images(tile_map, tmp_path)
    db = EmbeddingDatabase.load(moved)
    path = features_path(moved)
    good = path.read_bytes()
    refuses_damage(path, good, lambda: make_reranker(db, moved, CONFIG))
    shutil.copy(moved, path)                  # a database where the features belong
    with pytest.raises(InputError, match='is not a taco_cvgl features file'):
        make_reranker(db, moved, CONFIG)


def test_build_db_writes_removes_and_adds_the_features_file(tile_map, tmp_path, capsys):
    _, _, weights, csv_path = tile_map
    out = tmp_path / 'map.npz'
    base = ['--images', str(csv_path.parent), '--csv', str(csv_path), '--weights', str(weights),
            '--out', str(out), '--device', 'cpu', '--no-progress']
    assert build_db_main(base + ['--max-features', '200']) == 0
    stdout = capsys.readouterr().out
    assert f'with its verification features {features_path(out)}: ' in stdout
    assert 'kB per image' in stdout and stdout.count('wrote ') == 1    # the database's line
    db = EmbeddingDatabase.load(out)
    store = make_reranker(db, out, RerankConfig(max_features=200)).stored
    assert max(np.diff(store.offsets)) <= 200 < max(np.diff(
        load_features(features_path(tile_map[0]), EmbeddingDatabase.load(tile_map[0]),
                      tile_map[0], MAX_FEATURES).offsets))
    written = features_path(out).read_bytes()
    # Rebuilt without features: the old file, stale now, goes; added later, it is the same.
    assert build_db_main(base + ['--no-features']) == 0
    assert not features_path(out).exists()
    assert build_db_main(['--features-only', '--db', str(out), '--max-features', '200',
                          '--no-progress']) == 0
    assert features_path(out).read_bytes() == written
    assert f'wrote {features_path(out)}' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_db_main(['--features-only', '--db', str(out), '--out', str(out)])
    assert '--out cannot go with it' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_db_main(['--images', 'x'])
    assert 'required: --out, --weights' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_db_main(base + ['--no-features', '--matcher', 'sift'])
    assert '--no-features writes none' in capsys.readouterr().err
    assert build_db_main(['--features-only', '--db', str(out), '--matcher', 'sift,orb']) == 2
    assert '--matcher takes sift, aliked_lightglue, disk_lightglue (repeated or ' \
        "comma-separated), got 'orb'" in capsys.readouterr().err
    assert features_path(out).read_bytes() == written


def test_a_map_without_its_images_starts_no_int8_build_it_could_not_calibrate(tile_map, tmp_path):
    from taco_cvgl.localization.localizer import CVGLLocalizer
    from taco_cvgl.localization.settings import NodeParams
    moved = moved_without_images(tile_map, tmp_path)
    said = []
    localizer = CVGLLocalizer.from_settings(
        NodeParams(weights=str(tile_map[2]), database=str(moved), device='cpu',
                   fast_path='auto', rerank=False), report_upgrade=said.append)
    # int8 calibrates on the map's images; none here: a quicker backend, no doomed build.
    assert localizer.upgrade is None and said == []
    assert localizer.model.backend != 'int8'
