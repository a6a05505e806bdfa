"""Heading priors: north-up queries, rotations tried without a prior, the verification gate."""

import math

from conftest import localizer_for, view_of
import numpy as np
import pytest
from taco_cvgl.demo.views import Appearance, render_view
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import angle_difference_deg
from taco_cvgl.localization.heading import (HeadingPrior, merge_rotations, north_up,
                                            quaternion_heading, rotation_agrees, tta_angles)
from taco_cvgl.localization.rerank import RerankConfig


def test_north_up_turns_an_east_facing_image_back_to_the_map():
    ground = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    # A camera whose image top points east sees the map's east edge at its top: the map turned
    # a quarter counter-clockwise (np.rot90), so its north edge is on the image's left.
    east_up = np.rot90(ground, 1)
    assert np.array_equal(east_up[:, 0], ground[0, ::-1])    # north edge on the left
    np.testing.assert_array_equal(north_up(east_up, 90.0), ground)
    np.testing.assert_array_equal(north_up(np.rot90(ground, 2), 180.0), ground)
    np.testing.assert_array_equal(north_up(np.rot90(ground, -1), 270.0), ground)


def test_north_up_leaves_a_north_up_image_as_it_is():
    wide = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    assert north_up(wide, 0.0) is wide and north_up(wide, 360.0) is wide
    assert north_up(wide, 30.0).shape == wide.shape


def test_a_simulated_view_turned_north_up_matches_the_north_up_view(scene):
    def view(heading):
        return render_view(scene, (1500.0, 900.0), heading, 1.0, (0.0, 0.0), 128,
                           np.random.default_rng(0), Appearance.none(), 96).image
    reference = view(0.0).astype(float)
    yy, xx = np.mgrid[:128, :128]
    disc = np.hypot(xx - 63.5, yy - 63.5) < 60     # the turn only fills the corners
    for heading in (35.0, 200.0):
        turned = north_up(view(heading), heading).astype(float)
        wrong = north_up(view(heading), -heading).astype(float)
        error = np.abs(turned - reference)[disc].mean()
        assert error < 8.0, error
        assert np.abs(wrong - reference)[disc].mean() > 3 * error


def test_quaternion_headings_are_compass_headings():
    half = math.sqrt(0.5)
    assert quaternion_heading(0, 0, half, half) == pytest.approx(0.0)     # ENU yaw 90: north
    assert quaternion_heading(0, 0, 0, 1) == pytest.approx(90.0)          # yaw 0: east
    assert quaternion_heading(0, 0, 1, 0) == pytest.approx(270.0)         # yaw 180: west
    assert quaternion_heading(0, 0, 2 * half, 2 * half) == pytest.approx(0.0)  # not unit
    for bad in ((0, 0, 0, 0), (0, 0, math.nan, 1)):
        with pytest.raises(InputError):
            quaternion_heading(*bad)


def test_priors_refuse_what_is_not_a_heading():
    assert HeadingPrior(10.0, 5.0).camera_heading(90.0) == pytest.approx(280.0)  # looks left
    for heading, sigma in ((math.nan, 5.0), (0.0, 0.0), (0.0, math.inf)):
        with pytest.raises(InputError):
            HeadingPrior(heading, sigma)


def test_rotations_merge_keeping_each_entry_best():
    indices = [np.array([3, 1, 2]), np.array([2, 3, 5])]
    sims = [np.array([0.9, 0.5, 0.1]), np.array([0.95, 0.2, 0.4])]
    found, found_sims, rotation = merge_rotations(indices, sims, 3)
    assert found.tolist() == [2, 3, 1]
    np.testing.assert_allclose(found_sims, [0.95, 0.9, 0.5])
    assert rotation.tolist() == [1, 0, 0]
    assert tta_angles(4).tolist() == [0.0, 90.0, 180.0, 270.0]


def test_the_rotation_gate_is_three_sigma_at_least_five_degrees():
    assert rotation_agrees(10.0, 0.0, 4.0, 3.0)          # 12 degree gate
    assert not rotation_agrees(13.0, 0.0, 4.0, 3.0)
    assert rotation_agrees(358.0, 2.0, 1.0, 3.0)         # 4 degrees across north: 5 floor
    assert not rotation_agrees(355.0, 2.0, 1.0, 3.0)


def test_a_wrong_heading_prior_withholds_the_fix_and_the_right_one_keeps_it(scene, tile_map):
    tiles = tile_map[2]
    tile = tiles[5]
    view = view_of(scene, tile.col, tile.row, 160.0, seed=3)
    loc = localizer_for(tile_map, top_k=len(tiles), rerank=RerankConfig(candidates=len(tiles)))
    right = loc.localize(view.image, timestamp=0.0, heading=HeadingPrior(163.0, 5.0))
    assert right.fix and right.heading_source == 'given'
    assert abs(angle_difference_deg(right.heading, 160.0)) < 3.0
    # A compass 180 degrees off: the true tile verifies only at a rotation the prior rules out.
    wrong = loc.localize(view.image, timestamp=0.0, heading=HeadingPrior(340.0, 5.0))
    assert not wrong.fix and wrong.no_fix_reason == 'no candidate verified'
    # The camera's mounting yaw counts: a camera looking left (yaw 90) on a robot heading 250.
    left = loc.localize(view.image, timestamp=0.0, camera_yaw_deg=90.0,
                        heading=HeadingPrior(250.0, 5.0))
    assert left.fix and abs(angle_difference_deg(left.heading, 250.0)) < 3.0


def test_the_last_verified_heading_becomes_the_prior(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=len(tiles), rerank=RerankConfig(candidates=len(tiles)),
                        track_heading_rate_sigma_dps=10.0, prior_max_age_s=30.0)
    first = loc.localize(view_of(scene, tiles[0].col, tiles[0].row, 40.0, seed=2).image,
                         timestamp=0.0)
    assert first.fix and first.heading_source == ''
    later = loc.localize(view_of(scene, tiles[1].col, tiles[1].row, 45.0, seed=3).image,
                         timestamp=2.0)
    assert later.fix and later.heading_source == 'track'
    assert loc.localize(view_of(scene, tiles[1].col, tiles[1].row, 45.0, seed=3).image,
                        timestamp=60.0).heading_source == ''    # too old: no prior
    loc.reset_track()
    assert loc.track.heading_prior(2.0, 10.0) is None


def test_without_a_prior_the_query_is_tried_at_each_rotation(scene, tile_map):
    tiles = tile_map[2]
    loc = localizer_for(tile_map, top_k=3, rotation_tta=4)
    m = loc.localize(view_of(scene, tiles[6].col, tiles[6].row, 90.0, seed=4).image)
    assert m.heading_source == 'tta' and len(m.matches) == 3
    # The best similarity over the four turns is at least that of the image as it came.
    plain = localizer_for(tile_map, top_k=len(tiles))
    same = plain.localize(view_of(scene, tiles[6].col, tiles[6].row, 90.0, seed=4).image)
    as_it_came = {match.index: match.similarity for match in same.matches}
    for match in m.matches:
        assert match.similarity >= as_it_came[match.index] - 1e-5
