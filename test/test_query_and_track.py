"""The query apart from the track (a stateless query, a track per flight); unverified frames."""

import math

from conftest import localizer_for, view_of
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.localization.rerank import RerankConfig
from taco_cvgl.mapdb.calibration import fit_unverified, unverified_confidence, UNVERIFIED_META_KEY
from taco_cvgl.mapdb.database import EmbeddingDatabase


def heading_localizer(tile_map):
    """Return a verifying localizer whose track turns a verified heading into the next prior."""
    tiles = tile_map[2]
    return localizer_for(tile_map, top_k=len(tiles), rerank=RerankConfig(candidates=len(tiles)),
                         track_heading_rate_sigma_dps=10.0, prior_max_age_s=30.0)


def two_frames(scene, tiles):
    """Return two views 2 s apart over neighbouring tiles, headings 40 and 45 degrees."""
    return (view_of(scene, tiles[0].col, tiles[0].row, 40.0, seed=2).image,
            view_of(scene, tiles[1].col, tiles[1].row, 45.0, seed=3).image)


def test_a_query_without_a_track_neither_uses_nor_leaves_one(scene, tile_map):
    loc = heading_localizer(tile_map)
    first, second = two_frames(scene, tile_map[2])
    assert loc.localize(first, timestamp=0.0, track=None).fix
    assert loc.track.heading_prior(2.0, 10.0) is None      # nothing remembered
    later = loc.localize(second, timestamp=2.0, track=None)
    assert later.fix and later.heading_source == ''          # and nothing used


def test_each_flight_keeps_its_own_track(scene, tile_map):
    loc = heading_localizer(tile_map)
    first, second = two_frames(scene, tile_map[2])
    flight = loc.new_track()
    assert loc.localize(first, timestamp=0.0, track=flight).fix
    assert loc.localize(second, timestamp=2.0, track=flight).heading_source == 'track'
    assert loc.track.heading_prior(2.0, 10.0) is None      # the localizer's own is untouched
    other = loc.new_track()
    assert loc.localize(second, timestamp=2.0, track=other).heading_source == ''


def test_the_localizers_own_track_is_the_default(scene, tile_map):
    loc = heading_localizer(tile_map)
    first, second = two_frames(scene, tile_map[2])
    assert loc.localize(first, timestamp=0.0).fix
    assert loc.localize(second, timestamp=2.0).heading_source == 'track'


def test_an_unverified_frame_claims_what_the_calibration_flight_measured(scene, tile_map,
                                                                         tmp_path):
    tiles = tile_map[2]
    never = RerankConfig(candidates=len(tiles), min_inliers=100000)
    image = two_frames(scene, tiles)[0]
    m = localizer_for(tile_map, top_k=len(tiles), rerank=never).localize(image, track=None)
    assert not m.fix and m.verified is False and m.no_fix_reason == 'no candidate verified'
    assert m.confidence == 0.0          # an uncalibrated map does not vouch for it
    db = EmbeddingDatabase.load(tile_map[1])
    # 2 of 3 finite errors within 40 m: Laplace's (2 + 1) / (3 + 2).
    db.meta[UNVERIFIED_META_KEY] = fit_unverified([5.0, 50.0, 10.0, math.nan], 40.0)
    db.save(tmp_path / 'calibrated.npz')
    calibrated = localizer_for((tile_map[0], tmp_path / 'calibrated.npz', tiles),
                               top_k=len(tiles), rerank=never)
    assert calibrated.localize(image, track=None).confidence == pytest.approx(0.6)


def test_unverified_records_are_checked():
    assert fit_unverified([], 40.0)['probability'] == 0.5     # (0 + 1) / (0 + 2)
    assert unverified_confidence({}) == 0.0
    with pytest.raises(InputError, match='within'):
        unverified_confidence({UNVERIFIED_META_KEY: {'probability': 1.5}})
    with pytest.raises(InputError, match='probability record'):
        unverified_confidence({UNVERIFIED_META_KEY: {'probability': 'high'}})
