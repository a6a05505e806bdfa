"""Fitted covariance and confidence of verified fixes, and the metrics that judge them."""

import dataclasses
import json
import math

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.scoring import (average_precision, calibration_summary, FrameResult,
                                          GAUSSIAN_2D_WITHIN_3SIGMA, summarize)
from taco_cvgl.geo.geodesy import from_enu
from taco_cvgl.localization.rerank import Verification
from taco_cvgl.mapdb.calibration import (ConfidenceModel, COVARIANCE_META_KEY, CovarianceModel,
                                         fit_confidence, fit_covariance, fit_single_scale,
                                         fit_unverified, FixFeatures)
from taco_cvgl.mapdb.database import EmbeddingDatabase
from taco_cvgl.mapdb.map_calibration import MapCalibration
from taco_cvgl.model.config import ModelConfig

# Known coefficients of the synthetic flights, on [1, log inliers, log residual (px),
# offset (px) / 100] for the sigma ...
SIGMA_COEFFICIENTS = np.array([0.5, -0.4, 0.8, 0.6])
# ... and on [1, log inliers, log residual, log((inliers + 1) / (runner-up + 1)), offset / 100]
# for the logit of P(right).
LOGIT_COEFFICIENTS = np.array([-4.0, 1.0, -1.5, 1.2, -0.8])


def synthetic_fixes(n, seed):
    """Return fixes spread as a real flight's, their columns and the generator."""
    rng = np.random.default_rng(seed)
    c = {'inliers': np.exp(rng.uniform(math.log(15), math.log(300), n)).astype(int),
         'residual': np.exp(rng.uniform(math.log(0.4), math.log(3.0), n)),
         'scale': np.exp(rng.uniform(math.log(0.6), math.log(1.6), n)),
         'gsd': rng.choice([11.25, 5.0], n), 'offset': rng.uniform(0.0, 200.0, n)}
    c['runner_up'] = (c['inliers'] * rng.uniform(0.0, 0.9, n)).astype(int)
    fixes = [FixFeatures(int(a), float(b), float(s), float(g), int(r), float(o))
             for a, b, s, g, r, o in zip(c['inliers'], c['residual'], c['scale'], c['gsd'],
                                         c['runner_up'], c['offset'])]
    return fixes, c, rng


def gaussian_errors(n, seed):
    """Return fixes and (east, north) errors drawn from sigma = gsd exp(c . x), c known."""
    fixes, c, rng = synthetic_fixes(n, seed)
    x = np.stack([np.ones(n), np.log(c['inliers']), np.log(c['residual']),
                  c['offset'] / 100], axis=1)
    sigma = c['gsd'] * np.exp(x @ SIGMA_COEFFICIENTS)
    return fixes, rng.normal(size=(n, 2)) * sigma[:, None], sigma


# ---------------------------------------------------------------------------------------------
# Metrics


def test_average_precision_known_answers():
    # Positives at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]) == 1.0
    # Reversed: positives at ranks 3 and 4: (1/3 + 2/4) / 2.
    assert average_precision([4, 3, 2, 1], [0, 0, 1, 1]) == pytest.approx(5 / 12)
    # The input order does not matter, only the scores.
    assert average_precision([0.6, 0.7, 0.8, 0.9], [0, 1, 0, 1]) == pytest.approx(5 / 6)
    assert average_precision([0.5, 0.1], [0, 0]) is None
    assert average_precision([], []) is None


def test_average_precision_ties_and_missing_scores():
    # A tie at the top holds one right of two: both count at rank 2 (precision 1/2), then the
    # third item brings 2/3, whichever order the tied items come in.
    for labels in ([0, 1, 1], [1, 0, 1]):
        assert average_precision([0.5, 0.5, 0.1], labels) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # NaN ranks below any number, -inf included.
    assert average_precision([math.nan, 0.2], [1, 0]) == pytest.approx(1 / 2)
    assert average_precision([-math.inf, math.nan], [1, 0]) == 1.0
    # All tied: the share of positives, what an uninformed score gets.
    assert average_precision([math.nan] * 4, [1, 0, 0, 0]) == pytest.approx(1 / 4)
    with pytest.raises(InputError, match='3 scores but 2 labels'):
        average_precision([1, 2, 3], [1, 0])


def test_calibration_summary_reports_the_three_sigma_share():
    # Mahalanobis distances 0.5, 1.5, 2.5, 3.5 under the identity; 2.5 again under 4 I is 1.25.
    errors = np.array([[0.5, 0.0], [0.0, 1.5], [1.5, 2.0], [3.5, 0.0], [1.5, 2.0]])
    covariances = np.array([np.eye(2)] * 4 + [4 * np.eye(2)])
    cal = calibration_summary(errors, covariances)
    assert cal['count'] == 5
    assert cal['within_1sigma'] == pytest.approx(1 / 5)
    assert cal['within_2sigma'] == pytest.approx(3 / 5)
    assert cal['within_3sigma'] == pytest.approx(4 / 5)
    assert cal['expected_gaussian_within_3sigma'] == pytest.approx(0.98889, abs=1e-5)
    assert GAUSSIAN_2D_WITHIN_3SIGMA == pytest.approx(1 - math.exp(-9 / 2))
    assert calibration_summary(np.zeros((0, 2)), np.zeros((0, 2, 2)))['within_3sigma'] is None


def frame_off_by(index, east_m, confidence, fix=True, truth=True):
    """Return a frame whose estimate lies east_m east of its true point."""
    lat, lon = 47.0, 8.0 + 0.01 * index
    est_lat, est_lon = from_enu(lat, lon, east_m, 0.0)
    return FrameResult(index=index, stamp_ns=index, truth_lat=lat if truth else math.nan,
                       truth_lon=lon if truth else math.nan, est_lat=float(est_lat),
                       est_lon=float(est_lon), fix=fix, confidence=confidence,
                       covariance_en=np.eye(2) * 100.0)


def test_summarize_ranks_the_frames_by_their_confidence():
    frames = [frame_off_by(0, 5.0, 0.9),             # right
              frame_off_by(1, 400.0, 0.8),           # wrong, ranked second
              frame_off_by(2, 10.0, 0.3, fix=False),  # right, no fix: keeps its confidence
              frame_off_by(3, 20.0, math.nan),       # right, no confidence: ranked last
              frame_off_by(4, 900.0, 0.7),           # wrong
              frame_off_by(5, 1.0, 1.0, truth=False)]  # no truth: not scored
    m = summarize(frames, threshold_m=25.0)
    block = m['confidence']
    # Ranking 0.9 R, 0.8 W, 0.7 W, 0.3 R, NaN R: (1/1 + 2/4 + 3/5) / 3.
    assert block['auc_pr'] == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)
    assert block['positives'] == 3 and block['count'] == 5
    assert '25 m' in block['definition'] and m['definitions']['confidence'] == \
        block['definition']
    # Fixes 5, 400, 20 and 900 m off, sigma 10 m: 1 sigma holds one, 3 sigma two.
    assert m['calibration']['within_1sigma'] == pytest.approx(1 / 4)
    assert m['calibration']['within_3sigma'] == pytest.approx(2 / 4)
    # A frame list with no confidence at all says so instead of ranking ties.
    silent = summarize([frame_off_by(0, 5.0, math.nan)], threshold_m=25.0)['confidence']
    assert silent['auc_pr'] is None and 'no scored frame' in silent['reason']


# ---------------------------------------------------------------------------------------------
# Covariance model


def test_covariance_fit_recovers_known_coefficients_and_covers_as_a_gaussian():
    fixes, errors, _ = gaussian_errors(4000, seed=1)
    model = fit_covariance(fixes, errors)
    assert model.kind == 'features' and model.fixes == 4000
    assert model.terms == ('log_inliers', 'log_residual', 'offset_100px')
    # Standard errors are about 0.02 (0.04 for the constant): 4-6 of them allowed.
    assert np.asarray(model.coefficients) == pytest.approx(SIGMA_COEFFICIENTS, abs=0.15)
    assert np.asarray(model.coefficients)[1:] == pytest.approx(SIGMA_COEFFICIENTS[1:], abs=0.1)
    held_out, held_errors, true_sigma = gaussian_errors(20000, seed=2)
    sigma = model.sigmas_m(held_out)
    assert np.median(np.abs(sigma / true_sigma - 1)) < 0.05
    d2 = np.sum(held_errors ** 2, axis=1) / sigma ** 2
    for k, expected in ((1, 0.393), (2, 0.865), (3, 0.989)):
        assert np.mean(d2 <= k * k) == pytest.approx(expected, abs=0.02)
    one = held_out[0]
    assert model.covariance_en(one) == pytest.approx(model.sigma_m(one) ** 2 * np.eye(2))


def test_covariance_terms_are_clipped_to_the_calibrated_range():
    fixes, errors, _ = gaussian_errors(400, seed=3)
    model = fit_covariance(fixes, errors)
    most = max(f.inliers for f in fixes)
    seen = FixFeatures(most, 1.0, 1.0, 11.25)
    assert model.sigma_m(FixFeatures(100 * most, 1.0, 1.0, 11.25)) == model.sigma_m(seen)


def test_covariance_falls_back_to_one_scale_with_few_fixes():
    fixes, errors, _ = gaussian_errors(20, seed=4)
    model = fit_covariance(fixes, errors)
    assert model.kind == 'single_scale' and model.fixes == 20 and 'fewer than' in model.note
    # The base formula gsd * hypot(1, 3 residual / sqrt(inliers)), scaled so that 95 % of the
    # squared Mahalanobis distances are within 4 (numpy's linear quantile).
    base = np.array([f.gsd_m * math.hypot(1.0, 3.0 * f.residual_px / math.sqrt(f.inliers))
                     for f in fixes])
    d2 = np.sum(errors ** 2, axis=1) / base ** 2
    assert model.scale == pytest.approx(np.quantile(d2, 0.95) / 4)
    assert model.sigma_m(fixes[0]) == pytest.approx(math.sqrt(model.scale) * base[0])
    # A constant term is dropped rather than fitted: here every fix is at the centre.
    centred = [FixFeatures(f.inliers, f.residual_px, f.scale, f.gsd_m) for f in fixes * 3]
    fitted = fit_covariance(centred, np.concatenate([errors] * 3))
    assert fitted.kind == 'features' and fitted.terms == ('log_inliers', 'log_residual')
    # Too few for even one scale: uncalibrated.
    assert fit_single_scale(fixes[:3], errors[:3]).scale == 1.0
    with pytest.raises(InputError, match='3 fixes but 2 errors'):
        fit_covariance(fixes[:3], errors[:2])


# ---------------------------------------------------------------------------------------------
# Confidence model


def labelled_fixes(n, seed):
    """Return fixes, their errors (10 m right, 3 km wrong) and the true P(right)."""
    fixes, c, rng = synthetic_fixes(n, seed)
    x = np.stack([np.ones(n), np.log(c['inliers']), np.log(c['residual']),
                  np.log1p(c['inliers']) - np.log1p(c['runner_up']), c['offset'] / 100], axis=1)
    p = 1.0 / (1.0 + np.exp(-(x @ LOGIT_COEFFICIENTS)))
    right = rng.uniform(size=n) < p
    return fixes, np.where(right, 10.0, 3000.0), p


def test_confidence_fit_recovers_known_coefficients():
    fixes, errors, p = labelled_fixes(6000, seed=5)
    model = fit_confidence(fixes, errors, right_within_m=100.0)
    assert model.kind == 'logistic' and model.right_within_m == 100.0
    assert model.terms == ('log_inliers', 'log_residual', 'log_inlier_margin', 'offset_100px')
    # Standard errors are about 0.06 (0.25 for the constant).
    assert np.asarray(model.coefficients)[1:] == pytest.approx(LOGIT_COEFFICIENTS[1:], abs=0.25)
    assert model.coefficients[0] == pytest.approx(LOGIT_COEFFICIENTS[0], abs=1.0)
    assert np.mean(np.abs(model.probabilities(fixes) - p)) < 0.03
    assert average_precision(model.probabilities(fixes), errors <= 100) > \
        average_precision(model.probabilities(fixes)[::-1], errors <= 100)


def test_confidence_falls_back_to_the_inlier_ratio_without_wrong_fixes():
    fixes, _, _ = labelled_fixes(200, seed=6)
    model = fit_confidence(fixes, np.full(200, 10.0), right_within_m=100.0, min_inliers=20)
    assert model.kind == 'inlier_ratio' and '0 wrong' in model.note
    assert model.probability(FixFeatures(60, 1.0, 1.0, 11.25)) == pytest.approx(60 / 80)


# ---------------------------------------------------------------------------------------------
# Features and storage


def test_features_of_a_verification_name_the_runner_up():
    verification = Verification(index=3, inliers=40, residual_px=1.2,
                                offset_px=np.array([30.0, -40.0]), rotation_deg=10.0, scale=1.1,
                                inliers_per_candidate=[12, 0, 40, 25, 7])
    features = FixFeatures.of(verification, gsd_m=11.25)
    assert features == FixFeatures(40, 1.2, 1.1, 11.25, runner_up_inliers=25, offset_px=50.0)
    alone = FixFeatures.of(Verification(0, 30, 1.0, np.zeros(2), 0.0, 1.0, [30]), 5.0)
    assert alone.runner_up_inliers == 0


def test_the_calibration_record_survives_the_database(tmp_path):
    fixes, errors, _ = gaussian_errors(400, seed=7)
    covariance = fit_covariance(fixes, errors)
    labelled, label_errors, _ = labelled_fixes(400, seed=8)
    confidence = fit_confidence(labelled, label_errors, right_within_m=100.0)
    record = MapCalibration(gsd_m=2.5, grid_spacing_m=40.0, covariance_scale=1.5,
                            covariance_model=covariance, confidence_model=confidence)
    n = 3
    db = EmbeddingDatabase(np.eye(n, 512, dtype=np.float32), np.array([47.0, 47.01, 47.02]),
                           np.full(n, 8.0), np.full(n, np.nan), np.zeros(n),
                           np.array(['a.png', 'b.png', 'c.png']), ModelConfig(), 'f' * 32)
    record.apply_to(db.meta, unverified=fit_unverified([1.0, 90.0], 40.0))
    db.save(tmp_path / 'map.npz')
    loaded = EmbeddingDatabase.load(tmp_path / 'map.npz')
    assert loaded.calibration == dataclasses.replace(record, unverified_confidence=0.5)
    assert loaded.grid_spacing_m == 40.0          # recorded, not measured
    assert EmbeddingDatabase.load(tmp_path / 'map.npz').meta[COVARIANCE_META_KEY] == \
        covariance.to_meta()
    assert MapCalibration.from_meta({}) == MapCalibration()


def test_an_unrecorded_grid_spacing_is_measured_and_not_written(tmp_path):
    # Three places 0.01 degree of latitude apart: about 1112 m (WGS84 at 47 N: 1111.9 m).
    n = 3
    db = EmbeddingDatabase(np.eye(n, 512, dtype=np.float32), np.array([47.0, 47.01, 47.02]),
                           np.full(n, 8.0), np.full(n, np.nan), np.zeros(n),
                           np.array(['a.png', 'b.png', 'c.png']), ModelConfig(), 'f' * 32)
    assert db.grid_spacing_m == pytest.approx(1112.0, abs=2.0)
    assert 'grid_spacing_m' not in db.meta


@pytest.mark.parametrize('meta, message', [
    ({'gsd_m': 0.0}, 'gsd_m must be a positive number'),
    ({'covariance_scale': float('nan')}, 'covariance_scale must be a positive number'),
    ({'grid_spacing_m': True}, 'grid_spacing_m must be a positive number'),
    ({COVARIANCE_META_KEY: {'kind': 'nonsense'}}, 'covariance'),
])
def test_a_malformed_calibration_is_named(meta, message):
    with pytest.raises(InputError, match=message):
        MapCalibration.from_meta(meta)
    uncalibrated = ConfidenceModel()
    assert ConfidenceModel.from_meta(json.loads(json.dumps(uncalibrated.to_meta()))) == \
        uncalibrated


@pytest.mark.parametrize('change, message', [
    ({'kind': 'spline'}, 'kind must be one of'),
    ({'terms': ['log_inliers', 'log_altitude']}, "unknown term 'log_altitude'"),
    ({'coefficients': [1.0, 2.0]}, 'need 4 coefficients'),
    ({'coefficients': [1.0, 'x', 0.0, 0.0]}, 'coefficients must hold numbers'),
    ({'coefficients': [1.0, math.nan, 0.0, 0.0]}, 'must be finite'),
    ({'bounds': [[0, 1], [2, 1], [0, 1]]}, 'low <= high'),
    ({'bounds': [[0, 1]] * 2}, 'need 3 bounds'),
    ({'scale': -1.0}, 'scale must be a positive'),
    ({'scale': '2'}, 'scale must be a number'),
    ({'colour': 'red'}, "unknown keys \\['colour'\\]"),
])
def test_malformed_covariance_meta_is_refused(change, message):
    fixes, errors, _ = gaussian_errors(400, seed=9)
    meta = {**fit_covariance(fixes, errors).to_meta(), **change}
    with pytest.raises(InputError, match=message):
        CovarianceModel.from_meta(meta)


def test_malformed_confidence_meta_is_refused():
    for meta, message in (([], 'expected a JSON object'), ({'terms': []}, 'no kind'),
                          ({'kind': 'inlier_ratio', 'min_inliers': 0}, 'min_inliers'),
                          ({'kind': 'inlier_ratio', 'right_within_m': -5}, 'right_within_m')):
        with pytest.raises(InputError, match=message):
            ConfidenceModel.from_meta(meta)
