"""Geometric verification and the motion prior, on real Landsat-8 tiles and simulated views."""

import math

from conftest import GSD_M, localizer_for, view_of
import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import angle_difference_deg, distance_m
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.localization.rerank import fit_similarity, offset_to_enu, RerankConfig


def test_verification_finds_the_place_and_the_heading(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=len(tiles), rerank=RerankConfig(candidates=len(tiles)))
    for i, (tile, heading) in enumerate(zip(tiles[::4], (37.0, 160.0, 290.0, 5.0))):
        view = view_of(scene, tile.col + 11, tile.row - 7, heading, seed=i)
        m = loc.localize(view.image, timestamp=float(i))
        assert m.verified and m.fix and m.inliers >= 15
        # Far better than the 1.44 km grid: the offset inside the tile is measured.
        assert distance_m(m.latitude, m.longitude, view.latitude, view.longitude) < 150
        assert abs(angle_difference_deg(m.heading, view.heading_deg)) < 3.0
        sigma = math.sqrt(m.position_covariance[0, 0])
        assert GSD_M <= sigma < 200


def test_a_place_outside_the_map_is_not_a_fix(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=len(tiles), rerank=RerankConfig(candidates=len(tiles)))
    far = view_of(scene, 300, 1400, 45.0, seed=9)   # 20 km west of the map
    m = loc.localize(far.image, timestamp=0.0)
    assert m.verified is False and not m.fix
    assert m.no_fix_reason == 'no candidate verified'


def test_each_measurement_says_how_many_places_it_verified(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=5, rerank=RerankConfig(candidates=3))
    tile = tiles[5]
    m = loc.localize(view_of(scene, tile.col, tile.row, 20.0, seed=3).image, timestamp=0.0)
    assert m.checked == 3           # the three best retrieved, nothing else: no motion prior
    assert m.to_dict()['checked'] == 3
    wide = localizer_for(tile_map, top_k=5, rerank=RerankConfig(candidates=3,
                                                                acquisition_candidates=7))
    m = wide.localize(view_of(scene, tile.col, tile.row, 20.0, seed=3).image, timestamp=0.0)
    assert m.checked == 7           # no lock yet: the acquisition depth
    assert (m.no_fix_reason == '') == m.fix


def test_motion_prior_adds_the_places_near_the_last_fix(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=1, rerank=RerankConfig(candidates=1),
                        prior_radius_m=2000.0, prior_candidates=len(tiles))
    first = loc.localize(tiles[5].image, timestamp=10.0)  # a map image retrieves itself
    assert first.fix and first.matches[0].index == 5
    view = view_of(scene, tiles[4].col, tiles[4].row, 120.0, seed=3)  # land, not water
    retrieved, _ = loc.index.search(loc.model.encode_batch([view.image]), 1)
    assert retrieved[0, 0] != 4   # retrieval alone misses it: only the prior can find it
    second = loc.localize(view.image, timestamp=15.0)
    assert second.fix and second.matches[0].index == 4
    assert distance_m(second.latitude, second.longitude, view.latitude, view.longitude) < 150
    # A stale fix (older than prior_max_age_s) gives no prior: only the single retrieved place.
    assert loc.track.predict(15.0 + 30.5) is None
    stale = loc.localize(view.image, timestamp=15.0 + 30.5)
    assert not stale.tracked and [m.index for m in stale.matches] == stale.retrieval[:1]


def test_the_track_ranks_the_predicted_place_first_when_nothing_verifies(scene, tile_map):
    tiles = tile_map[2]
    config = {'top_k': len(tiles), 'rerank': RerankConfig(candidates=1),
              'prior_radius_m': 2000.0, 'prior_candidates': len(tiles),
              'prior_similarity_temperature': 1.0}
    rows = sorted({t.row for t in tiles})
    a, b, c = sorted((i for i, t in enumerate(tiles) if t.row == rows[1]),
                     key=lambda i: tiles[i].col)[:3]     # three places in a row, west to east
    loc = localizer_for(tile_map, **config)
    for stamp, place in ((0.0, a), (5.0, b)):   # moving east, one grid stride per 5 s
        m = loc.localize(tiles[place].image, timestamp=stamp)
        assert m.fix and m.matches[0].index == place
    blank = np.full((256, 256, 3), 90, np.uint8)    # nothing to see: no feature verifies
    m = loc.localize(blank, timestamp=10.0)
    assert m.tracked and m.verified is False and not m.fix
    assert m.matches[0].index == c                  # where the motion says the camera is
    # Without a track the same image is ranked by its embedding alone.
    fresh = localizer_for(tile_map, **config).localize(blank, timestamp=10.0)
    assert not fresh.tracked and [x.index for x in fresh.matches] == fresh.retrieval


def test_acquisition_needs_more_inliers_until_the_first_lock(scene, tile_map):
    tiles = tile_map[2]
    view = view_of(scene, tiles[4].col, tiles[4].row, 120.0, seed=3)
    every = {'top_k': len(tiles), 'prior_radius_m': 2000.0, 'prior_candidates': len(tiles)}
    loose = localizer_for(tile_map, rerank=RerankConfig(candidates=len(tiles)), **every)
    inliers = loose.localize(view.image, timestamp=0.0).inliers
    assert inliers >= 15
    strict = localizer_for(tile_map, rerank=RerankConfig(
        candidates=len(tiles), acquisition_min_inliers=inliers + 1), **every)
    first = strict.localize(view.image, timestamp=0.0)
    assert first.verified is False and not first.fix     # no lock yet: the stricter bar
    # The map's own image of that place matches itself with far more inliers: a sure lock.
    assert strict.localize(tiles[4].image, timestamp=10.0).fix
    tracked = strict.localize(view.image, timestamp=15.0)
    assert tracked.tracked and tracked.fix and tracked.inliers == inliers  # the usual bar


class RecordingIndex:
    """The localizer's real index, recording how deep each search goes."""

    def __init__(self, index):
        self.index, self.depths = index, []

    def search(self, queries, k):
        self.depths.append(k)
        return self.index.search(queries, k)


def test_only_a_frame_without_a_prediction_searches_for_the_acquisition(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=2, prior_radius_m=2000.0, prior_candidates=4,
                        rerank=RerankConfig(candidates=3, acquisition_candidates=len(tiles)))
    loc.index = RecordingIndex(loc.index)
    first = loc.localize(tiles[5].image, timestamp=10.0)      # acquiring: every tile is checked
    assert first.fix and loc.index.depths == [len(tiles)]
    view = view_of(scene, tiles[4].col, tiles[4].row, 120.0, seed=3)
    second = loc.localize(view.image, timestamp=15.0)         # locked: top_k and candidates
    assert second.tracked and second.fix and loc.index.depths[1:] == [3]
    # A batch whose second frame comes from long after the first: that one frame is searched
    # again, deeper, once the first frame's fix shows that no prediction reaches it.
    loc.index.depths.clear()
    batch = loc.localize_batch([view.image, tiles[5].image], timestamps=[16.0, 16.0 + 31.0])
    assert loc.index.depths == [len(tiles)]                  # known before the search
    # A frame 0.6 s older than the batch's first frame: its prediction is gone only once the
    # first frame's fix has moved the track on to 101 s (beyond the reordering tolerance).
    assert loc.localize(tiles[5].image, timestamp=100.0).fix
    loc.index.depths.clear()
    batch = loc.localize_batch([tiles[5].image, tiles[4].image], timestamps=[101.0, 100.4])
    assert loc.index.depths == [3, len(tiles)]
    assert batch[0].tracked and batch[1].fix and not batch[1].tracked


def test_warm_up_prepares_a_map_that_is_checked_whole(tile_map):
    tiles = tile_map[2]
    whole = localizer_for(tile_map, rerank=RerankConfig(acquisition_candidates=len(tiles)))
    part = localizer_for(tile_map, rerank=RerankConfig(acquisition_candidates=len(tiles) - 1))
    for loc in (whole, part):
        loc.warm_up(sizes=())
    assert len(whole.reranker._cache) == len(tiles)   # the first frame will not wait for them
    assert len(part.reranker._cache) == 0             # which ones a frame needs is not known


def test_offset_to_enu_follows_the_image_heading():
    # 10 px to the right and 20 px up in a north-up image: 10 m east, 20 m north at 1 m/px.
    assert np.allclose(offset_to_enu(np.array([10.0, -20.0]), 1.0, 0.0), [10, 20])
    # The same offset in an image whose top points east: up is east, right is south.
    assert np.allclose(offset_to_enu(np.array([10.0, -20.0]), 1.0, 90.0), [20, -10])


def test_prior_needs_reranking_and_missing_map_images_are_named(tile_map, tmp_path):
    with pytest.raises(InputError, match='re-ranking'):
        LocalizerConfig(prior_radius_m=100.0)
    model, db_path, _ = tile_map
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    db = EmbeddingDatabase.load(db_path)
    db.image_ids = np.array([str(tmp_path / 'gone.jpg')] * len(db))
    db.save(tmp_path / 'moved.npz')
    loc = CVGLLocalizer(model, LocalizerConfig(rerank=RerankConfig()))
    with pytest.raises(InputError, match='gone.jpg'):
        loc.load_map(tmp_path / 'moved.npz')


def test_a_map_with_calibrated_models_sets_the_covariance_and_the_confidence(
        scene, tile_map, tmp_path):
    from taco_cvgl.mapdb.calibration import ConfidenceModel, CovarianceModel
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    model, db_path, tiles = tile_map
    db = EmbeddingDatabase.load(db_path)
    # sigma = gsd * exp(log 2 - 0.5 log n) = 2 gsd / sqrt(n); P = 1 / (1 + e^(3 - log n)).
    db.meta['verified_covariance_model'] = CovarianceModel(
        kind='features', terms=('log_inliers',), coefficients=(math.log(2.0), -0.5),
        bounds=((0.0, 10.0),)).to_meta()
    db.meta['verified_confidence_model'] = ConfidenceModel(
        kind='logistic', terms=('log_inliers',), coefficients=(-3.0, 1.0),
        bounds=((0.0, 10.0),)).to_meta()
    calibrated = tmp_path / 'calibrated.npz'
    db.save(calibrated)
    loc = CVGLLocalizer(model, LocalizerConfig(top_k=len(tiles),
                                               rerank=RerankConfig(candidates=len(tiles))))
    loc.load_map(calibrated)
    tile = tiles[0]
    m = loc.localize(view_of(scene, tile.col, tile.row, 40.0, seed=2).image, timestamp=0.0)
    assert m.fix and m.inliers >= 15
    n = m.inliers
    np.testing.assert_allclose(m.position_covariance[:2, :2],
                               (2.0 * GSD_M / math.sqrt(n)) ** 2 * np.eye(2), rtol=1e-9)
    assert m.confidence == pytest.approx(n / (n + math.exp(3.0)))
    db.meta['verified_confidence_model'] = {'kind': 'logistic', 'terms': ['nonsense']}
    db.save(calibrated)
    with pytest.raises(InputError, match='calibration'):
        loc.load_map(calibrated)


def _similarity(points, angle_deg, scale, shift):
    """Return points turned by angle_deg (counter-clockwise in x-right/y-down), scaled, shifted."""
    a = math.radians(angle_deg)
    rotation = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points @ rotation.T + np.asarray(shift)).astype(np.float32)


def test_a_fit_that_squeezes_the_query_onto_one_spot_is_no_match():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 256, (60, 2)).astype(np.float32)
    # Every query corner paired with (nearly) the same candidate corner: RANSAC "fits" scale ~0
    # with all 60 pairs as inliers. Such pairs are what repeated texture gives on ground the
    # map does not hold.
    spot = (np.array([[40.0, 50.0]]) + rng.normal(0.0, 0.3, (60, 2))).astype(np.float32)
    assert fit_similarity(src, spot, RerankConfig()) is None
    # A real similarity keeps all its points, and its scale is within the bounds...
    matrix, inliers, residual = fit_similarity(src, _similarity(src, 30.0, 1.5, (10, 20)),
                                               RerankConfig())
    assert inliers == 60 and residual < 1e-3
    assert math.sqrt(abs(np.linalg.det(matrix[:, :2]))) == pytest.approx(1.5, rel=1e-4)
    # ...one 20 times larger is outside [1/8, 8].
    assert fit_similarity(src, _similarity(src, 30.0, 20.0, (10, 20)), RerankConfig()) is None
