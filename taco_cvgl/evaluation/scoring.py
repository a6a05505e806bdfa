"""
Scoring localization results against ground truth: pure functions over arrays, no plotting.

One `FrameResult` per camera frame (or per recorded estimate) holds the truth interpolated at the
frame's time, what the localizer said, and what it retrieved. `summarize` turns a list of them
into the metrics dictionary that `taco-cvgl evaluate` writes as metrics.json; its "definitions"
entry says in words how each figure is computed.

Conventions: positions in WGS84 degrees, distances geodesic in metres, headings in degrees
clockwise from true north, covariances 2x2 on (east, north) axes in m^2, times in ns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.recall import hits_within
from taco_cvgl.geo.geodesy import angle_difference_deg, distance_m, to_enu
from taco_cvgl.localization.estimate import calibrate_scale, mahalanobis_sq

SCHEMA = 'taco_cvgl.evaluation/1'
DEFAULT_KS = (1, 5, 10)
# Share of a 2-D Gaussian inside the Mahalanobis distance r ellipse: 1 - exp(-r^2 / 2).
GAUSSIAN_2D_WITHIN_1SIGMA = 1.0 - math.exp(-0.5)
GAUSSIAN_2D_WITHIN_2SIGMA = 1.0 - math.exp(-2.0)
GAUSSIAN_2D_WITHIN_3SIGMA = 1.0 - math.exp(-4.5)
# Share inside 2 sigma that `estimate.calibrate_scale` aims the covariance scale at.
CALIBRATION_TARGET = 0.95


@dataclasses.dataclass
class FrameResult:
    """
    One frame: ground truth at its time and the localizer's answer.

    truth_* are NaN when no ground truth lies near the frame's time; est_* are NaN when the
    frame failed (then `failure` says why). covariance_en is the estimate's 2x2 (east, north)
    covariance in m^2, NaN-filled when unknown. retrieved holds the (latitude, longitude) of the
    retrieved database entries in the localizer's ranking, best first (empty for a recorded
    estimate); retrieval_only the same for the ranking by the image's embedding alone, before
    geometric verification and the motion prior (empty when unknown).
    """

    index: int
    stamp_ns: int
    truth_lat: float = math.nan
    truth_lon: float = math.nan
    truth_heading: float = math.nan
    est_lat: float = math.nan
    est_lon: float = math.nan
    est_heading: float = math.nan
    fix: bool = False
    covariance_en: np.ndarray = dataclasses.field(
        default_factory=lambda: np.full((2, 2), np.nan))
    confidence: float = math.nan
    latency_s: float = math.nan
    retrieved: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))
    retrieved_ids: List[str] = dataclasses.field(default_factory=list)
    retrieval_only: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))
    failure: Optional[str] = None
    image: str = ''   # the query image file, when the frame is one (dataset evaluation)
    checked: Optional[int] = None   # places verified geometrically (None: no verification)
    no_fix_reason: str = ''         # why the localizer gave no fix ('' for a fix or unknown)

    @property
    def has_truth(self) -> bool:
        """Return whether a ground-truth position is known at this frame's time."""
        return math.isfinite(self.truth_lat) and math.isfinite(self.truth_lon)

    @property
    def scored(self) -> bool:
        """Return whether the frame counts in the metrics (ground truth and an answer)."""
        return self.has_truth and self.failure is None and math.isfinite(self.est_lat)


@dataclasses.dataclass
class FrameTable:
    """Per-frame figures of a list of frames, as arrays of equal length (NaN where undefined)."""

    scored: np.ndarray         # bool
    fix: np.ndarray            # bool
    error_m: np.ndarray        # geodesic distance estimate - truth
    error_en: np.ndarray       # N x 2, estimate - truth in ENU at the true point, metres
    mahalanobis: np.ndarray    # Mahalanobis distance of error_en under covariance_en
    heading_error_deg: np.ndarray
    first_hit_rank: np.ndarray  # 1-based rank of the first entry within threshold; 0: none
    retrieval_first_hit_rank: np.ndarray  # the same in the embedding-only ranking


def position_errors_m(est_lat, est_lon, truth_lat, truth_lon) -> np.ndarray:
    """Return the geodesic distances (m) between estimates and truths (NaN where either is)."""
    est_lat, est_lon, truth_lat, truth_lon = (np.asarray(v, dtype=float).reshape(-1)
                                              for v in (est_lat, est_lon, truth_lat, truth_lon))
    out = np.full(est_lat.shape, np.nan)
    ok = np.isfinite(est_lat) & np.isfinite(est_lon) & np.isfinite(truth_lat) \
        & np.isfinite(truth_lon)
    if ok.any():
        out[ok] = distance_m(truth_lat[ok], truth_lon[ok], est_lat[ok], est_lon[ok])
    return out


def enu_errors_m(est_lat, est_lon, truth_lat, truth_lon) -> np.ndarray:
    """Return N x 2 (east, north) metres of each estimate relative to its true point."""
    est_lat, est_lon, truth_lat, truth_lon = (np.asarray(v, dtype=float).reshape(-1)
                                              for v in (est_lat, est_lon, truth_lat, truth_lon))
    out = np.full((len(est_lat), 2), np.nan)
    ok = np.isfinite(est_lat) & np.isfinite(est_lon) & np.isfinite(truth_lat) \
        & np.isfinite(truth_lon)
    if ok.any():
        out[ok] = to_enu(truth_lat[ok], truth_lon[ok], est_lat[ok], est_lon[ok])
    return out


def usable_covariances(covariances: np.ndarray) -> np.ndarray:
    """Return a bool per 2x2 covariance: finite and positive definite."""
    cov = np.asarray(covariances, dtype=float).reshape(-1, 2, 2)
    finite = np.isfinite(cov).all(axis=(1, 2))
    det = np.where(finite, cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0], -1.0)
    return finite & (cov[:, 0, 0] > 0) & (det > 0)


def mahalanobis_distances(errors_en: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """Return sqrt(e^T C^-1 e) per frame; NaN where the error or the covariance is unusable."""
    errors = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    cov = np.asarray(covariances, dtype=float).reshape(-1, 2, 2)
    out = np.full(len(errors), np.nan)
    ok = usable_covariances(cov) & np.isfinite(errors).all(axis=1)
    if ok.any():
        out[ok] = np.sqrt(mahalanobis_sq(errors[ok], cov[ok]))
    return out


def heading_errors_deg(est_heading, truth_heading) -> np.ndarray:
    """Return the smallest absolute angle (deg, 0..180) between headings; NaN where unknown."""
    est = np.asarray(est_heading, dtype=float).reshape(-1)
    truth = np.asarray(truth_heading, dtype=float).reshape(-1)
    with np.errstate(invalid='ignore'):
        return np.abs(angle_difference_deg(est, truth))


def first_hit_ranks(retrieved: Sequence[np.ndarray], truth_lat, truth_lon,
                    threshold_m: float) -> np.ndarray:
    """
    Return per frame the 1-based rank of the first retrieved entry within threshold_m.

    0 when none of them is (or nothing was retrieved), -1 where the truth is unknown.
    """
    truth_lat = np.asarray(truth_lat, dtype=float).reshape(-1)
    truth_lon = np.asarray(truth_lon, dtype=float).reshape(-1)
    ranks = np.full(len(truth_lat), -1, dtype=int)
    for i, positions in enumerate(retrieved):
        if not (math.isfinite(truth_lat[i]) and math.isfinite(truth_lon[i])):
            continue
        positions = np.asarray(positions, dtype=float).reshape(1, -1, 2)
        hits = hits_within(positions, np.array([[truth_lat[i], truth_lon[i]]]),
                           threshold_m)[0]
        ranks[i] = int(np.argmax(hits)) + 1 if hits.any() else 0
    return ranks


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
    """Return {k: share of frames whose first hit rank is in 1..k} (ranks as first_hit_ranks)."""
    ranks = np.asarray(ranks, dtype=int).reshape(-1)
    if len(ranks) == 0:
        raise InputError('no frames to compute Recall@k on')
    return {int(k): float(np.mean((ranks >= 1) & (ranks <= k))) for k in ks}


def error_stats(values) -> Dict[str, Any]:
    """
    Return count, median, p90, max and mean of the finite values (None when there are none).

    p90 is numpy's default (linear interpolation between order statistics).
    """
    values = np.asarray(values, dtype=float).reshape(-1)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {'count': 0, 'median': None, 'p90': None, 'max': None, 'mean': None}
    return {'count': int(len(values)), 'median': float(np.median(values)),
            'p90': float(np.percentile(values, 90)), 'max': float(values.max()),
            'mean': float(values.mean())}


def calibration_summary(errors_en: np.ndarray, covariances: np.ndarray) -> Dict[str, Any]:
    """
    Return the shares of errors inside the 1-, 2- and 3-sigma ellipses and the 95 % scale.

    Only pairs with a finite error and a usable (finite, positive definite) covariance count;
    `excluded` says how many did not.
    """
    errors = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    cov = np.asarray(covariances, dtype=float).reshape(-1, 2, 2)
    ok = usable_covariances(cov) & np.isfinite(errors).all(axis=1)
    result: Dict[str, Any] = {
        'count': int(ok.sum()), 'excluded_no_covariance': int((~ok).sum()),
        'within_1sigma': None, 'within_2sigma': None, 'within_3sigma': None,
        'expected_gaussian_within_1sigma': GAUSSIAN_2D_WITHIN_1SIGMA,
        'expected_gaussian_within_2sigma': GAUSSIAN_2D_WITHIN_2SIGMA,
        'expected_gaussian_within_3sigma': GAUSSIAN_2D_WITHIN_3SIGMA,
        'scale_for_95pct_within_2sigma': None,
    }
    if ok.any():
        d2 = mahalanobis_sq(errors[ok], cov[ok])
        result['within_1sigma'] = float(np.mean(d2 <= 1.0))
        result['within_2sigma'] = float(np.mean(d2 <= 4.0))
        result['within_3sigma'] = float(np.mean(d2 <= 9.0))
        result['scale_for_95pct_within_2sigma'] = calibrate_scale(
            errors[ok], cov[ok], target=CALIBRATION_TARGET, sigmas=2.0)
    return result


def average_precision(scores, labels) -> Optional[float]:
    """
    Return the average precision (area under the precision-recall curve) of ranking by score.

    Items are ranked by descending score; the result is the mean, over the positive items, of
    the precision among the items ranked at or above each. Tied scores form one rank: every
    item of a tie counts as ranked at the tie's end (the precision once the whole tie is
    taken), so the result never depends on the order the items come in. NaN ranks below every
    number, -inf included, and NaNs tie with each other. None when no label is positive.
    """
    scores = np.asarray(scores, dtype=float).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    if len(scores) != len(labels):
        raise InputError(f'average_precision: {len(scores)} scores but {len(labels)} labels')
    positives = int(labels.sum())
    if positives == 0:
        return None
    missing = np.isnan(scores)
    value = np.where(missing, 0.0, scores)
    order = np.lexsort((-value, missing))  # numbers first, each part by descending score
    value, missing, hits = value[order], missing[order], labels[order]
    # The last item of each run of equal scores closes a rank.
    closes = np.ones(len(value), dtype=bool)
    closes[:-1] = (value[1:] != value[:-1]) | (missing[1:] != missing[:-1])
    ends = np.flatnonzero(closes)
    true_up_to = np.cumsum(hits)[ends]
    in_rank = np.diff(np.concatenate([[0], true_up_to]))
    precision = true_up_to / (ends + 1.0)
    return float(np.sum(in_rank * precision) / positives)


def interpolate_headings(stamps_ns, headings_deg, query_ns, max_gap_s: float = 1.0
                         ) -> np.ndarray:
    """
    Interpolate compass headings (deg) at query times along the shorter arc; NaN off-track.

    A query is answered when it lies within the stamps and both neighbouring samples are at most
    max_gap_s away (an exact stamp is always answered), as GpsTrack.interpolate_many does.
    """
    stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
    headings = np.asarray(headings_deg, dtype=float).reshape(-1)
    order = np.argsort(stamps, kind='stable')
    stamps, headings = stamps[order], headings[order]
    t = np.asarray(query_ns, dtype=np.int64).reshape(-1)
    out = np.full(t.shape, np.nan)
    if len(stamps) == 0:
        return out
    upper = np.searchsorted(stamps, t, side='right')
    lo = np.clip(upper - 1, 0, len(stamps) - 1)
    hi = np.clip(upper, 0, len(stamps) - 1)
    exact = stamps[lo] == t
    gap = max_gap_s * 1e9
    valid = (t >= stamps[0]) & (t <= stamps[-1]) & (
        exact | ((t - stamps[lo] <= gap) & (stamps[hi] - t <= gap)))
    span = (stamps[hi] - stamps[lo]).astype(float)
    frac = np.where(exact | (span <= 0), 0.0, (t - stamps[lo]) / np.where(span > 0, span, 1.0))
    step = angle_difference_deg(headings[hi], headings[lo])
    value = np.mod(headings[lo] + frac * step, 360.0)
    out[valid] = value[valid]
    return out


def frame_table(frames: Sequence[FrameResult], threshold_m: float = 25.0) -> FrameTable:
    """Compute every per-frame figure of the frames (see FrameTable)."""
    def column(name):
        return np.array([getattr(f, name) for f in frames], dtype=float)

    truth_lat, truth_lon = column('truth_lat'), column('truth_lon')
    est_lat, est_lon = column('est_lat'), column('est_lon')
    scored = np.array([f.scored for f in frames], dtype=bool)
    # Frames without truth or without an answer get NaN everywhere.
    truth_lat = np.where(scored, truth_lat, np.nan)
    error_m = position_errors_m(est_lat, est_lon, truth_lat, truth_lon)
    error_en = enu_errors_m(est_lat, est_lon, truth_lat, truth_lon)
    cov = np.array([np.asarray(f.covariance_en, dtype=float).reshape(2, 2) for f in frames])
    mahalanobis = mahalanobis_distances(error_en, cov.reshape(-1, 2, 2))
    heading = heading_errors_deg(column('est_heading'), column('truth_heading'))
    heading = np.where(scored, heading, np.nan)
    ranks = first_hit_ranks([f.retrieved for f in frames], truth_lat, truth_lon, threshold_m)
    retrieval_ranks = first_hit_ranks([f.retrieval_only for f in frames], truth_lat, truth_lon,
                                      threshold_m)
    return FrameTable(scored=scored, fix=np.array([bool(f.fix) for f in frames], dtype=bool),
                      error_m=error_m, error_en=error_en, mahalanobis=mahalanobis,
                      heading_error_deg=heading, first_hit_rank=ranks,
                      retrieval_first_hit_rank=retrieval_ranks)


def definitions(threshold_m: float, fix_threshold_m: float, max_gt_gap_s: float) -> Dict[str, str]:
    """Return the words that say how each figure of metrics.json is computed."""
    return {
        'ground_truth': f"the ground-truth position at a frame's header stamp, interpolated "
                        f'linearly in time between the two nearest ground-truth fixes; frames '
                        f'further than {max_gt_gap_s} s from a fix on either side, or outside '
                        f'the ground-truth time range, count as no_ground_truth and are left '
                        f'out of every metric',
        'scored': 'frames with ground truth and an estimate; every metric is over them',
        'recall_at_k': f'share of scored frames with any of the first k retrieved database '
                       f'entries within {threshold_m} m (geodesic) of the true position, in '
                       f"the localizer's ranking (the geometrically verified place first; with "
                       f'the motion prior, the rest by similarity combined with the predicted '
                       f'position)',
        'recall_retrieval_only': "the same over the ranking by the image's embedding alone "
                                 '(nearest neighbours in the database, before geometric '
                                 'verification and the motion prior): what one image says on '
                                 'its own',
        'position_error_m': 'geodesic distance between the estimate and the true position; '
                            '"all" over every scored frame (with or without a fix), "fixes" '
                            'over those the localizer published as a fix',
        'p90': '90th percentile, linear interpolation between order statistics',
        'fix_share': 'fixes among scored frames divided by frames with ground truth (for a '
                     "recorded bag: published fixes with ground truth divided by the bag's "
                     'images with ground truth)',
        'fix_precision': f'share of fixes whose position error is <= {fix_threshold_m} m',
        'calibration': 'over fixes with a covariance: error vector estimate - truth in ENU '
                       "metres at the true point, Mahalanobis distance under the fix's 2x2 "
                       'east/north covariance; shares within distance 1, 2 and 3, beside what '
                       'a 2-D Gaussian would give (39.3 %, 86.5 %, 98.9 %). '
                       'scale_for_95pct_within_2sigma is the factor to multiply the covariance '
                       'by (estimator covariance_scale) so that 95 % fall within 2 sigma',
        'heading_error_deg': 'smallest absolute angle between estimated and true heading '
                             '(degrees), over scored frames where both are known',
        'verification': 'database places checked geometrically per scored frame (retrieved '
                        'candidates plus those around the motion prediction), over the frames '
                        'that were verified at all',
        'no_fix_reasons': "scored frames without a fix, by the localizer's reason",
        'confidence': confidence_definition(fix_threshold_m),
        'latency_s': "the localizer's own time per frame (embedding + search + estimate), "
                     'seconds',
    }


def confidence_definition(fix_threshold_m: float) -> str:
    """Return the words for the confidence block (how well the confidence ranks the frames)."""
    return (f"over scored frames: each frame's confidence as the localizer gave it (frames "
            f'without a fix included, with their confidence; none counts as the lowest) '
            f'ranks the frames; a frame is right when its estimate lies within '
            f'{fix_threshold_m:g} m of the true position. auc_pr is the average precision of '
            f'that ranking: the mean over the right frames of the share of right frames among '
            f'those ranked at or above it (equal confidences share the rank of the last of '
            f'them); the share of right frames (positives / count) is what a confidence that '
            f'knows nothing would get, 1.0 is a perfect ranking')


def summarize(frames: Sequence[FrameResult], threshold_m: float = 25.0,
              fix_threshold_m: Optional[float] = None, ks: Sequence[int] = DEFAULT_KS,
              database_size: Optional[int] = None, recall_unavailable: Optional[str] = None,
              images_with_truth: Optional[int] = None, max_gt_gap_s: float = 1.0,
              table: Optional[FrameTable] = None) -> Dict[str, Any]:
    """
    Return the metrics dictionary of a list of frames (the body of metrics.json).

    database_size: entries in the database; when a frame retrieved all of them, Recall@k for a
    k beyond that count equals Recall@(count). recall_unavailable: a reason that replaces
    Recall@k (a recorded bag carries no retrieval). images_with_truth: the fix share's
    denominator when the frames are not the images themselves (a recorded bag's estimates);
    None means the frames are the images.
    """
    if threshold_m <= 0:
        raise InputError(f'threshold_m must be positive, got {threshold_m}')
    fix_threshold_m = threshold_m if fix_threshold_m is None else fix_threshold_m
    if fix_threshold_m <= 0:
        raise InputError(f'fix_threshold_m must be positive, got {fix_threshold_m}')
    table = table if table is not None else frame_table(frames, threshold_m)
    has_truth = np.array([f.has_truth for f in frames], dtype=bool)
    failed = np.array([f.failure is not None for f in frames], dtype=bool)
    scored = table.scored
    fixes = scored & table.fix
    cov = np.array([np.asarray(f.covariance_en, dtype=float).reshape(2, 2) for f in frames])
    cov = cov.reshape(-1, 2, 2)

    metrics: Dict[str, Any] = {
        'frames': {'total': len(frames), 'scored': int(scored.sum()),
                   'no_ground_truth': int((~has_truth).sum()),
                   'failed': int((failed & has_truth).sum())},
        'threshold_m': float(threshold_m),
        'fix_threshold_m': float(fix_threshold_m),
        'recall': _recall(table.first_hit_rank, scored, [f.retrieved for f in frames], ks,
                          threshold_m, database_size, recall_unavailable),
        'recall_retrieval_only': _recall(
            table.retrieval_first_hit_rank, scored, [f.retrieval_only for f in frames], ks,
            threshold_m, database_size, recall_unavailable or (
                None if any(len(f.retrieval_only) for f in frames)
                else 'the ranking by the embedding alone was not recorded')),
        'position_error_m': {'all': error_stats(table.error_m[scored]),
                             'fixes': error_stats(table.error_m[fixes])},
        'fixes': {**_fix_summary(table, scored, fixes, fix_threshold_m, images_with_truth),
                  'no_fix_reasons': _no_fix_reasons(frames, scored & ~table.fix)},
        'verification': _verification(frames, scored),
        'calibration': calibration_summary(table.error_en[fixes], cov[fixes]),
        'confidence': _confidence(frames, table, scored, fix_threshold_m),
        'heading_error_deg': _heading(table, scored, frames),
        'latency_s': _latency(frames),
        'definitions': definitions(threshold_m, fix_threshold_m, max_gt_gap_s),
    }
    return metrics


def _recall(first_hit_rank: np.ndarray, scored: np.ndarray, retrieved: Sequence[np.ndarray],
            ks: Sequence[int], threshold_m: float, database_size: Optional[int],
            unavailable: Optional[str]) -> Dict[str, Any]:
    """Return the Recall@k block of the metrics."""
    if unavailable:
        return {'available': False, 'reason': unavailable}
    if not scored.any():
        return {'available': False, 'reason': 'no frame with ground truth was scored'}
    counts = [len(np.asarray(retrieved[i]).reshape(-1, 2)) for i in np.flatnonzero(scored)]
    depth = min(counts)
    everything = database_size is not None and depth >= database_size
    block: Dict[str, Any] = {'available': True, 'threshold_m': float(threshold_m),
                             'retrieved_per_frame': int(depth)}
    ranks = first_hit_rank[scored]
    values = recall_from_ranks(ranks, ks)
    notes = []
    for k in ks:
        if k <= depth or everything:
            block[f'at_{k}'] = values[k]
            if k > depth:
                notes.append(f'at_{k}: the database holds only {database_size} entries, all '
                             f'retrieved, so this equals Recall@{depth}')
        else:
            block[f'at_{k}'] = None
            notes.append(f'at_{k}: only {depth} entries were retrieved per frame (top_k); '
                         f'raise top_k to measure it')
    if notes:
        block['notes'] = notes
    return block


def _fix_summary(table: FrameTable, scored: np.ndarray, fixes: np.ndarray,
                 fix_threshold_m: float, images_with_truth: Optional[int]) -> Dict[str, Any]:
    """Return the fix share and precision block."""
    count = int(fixes.sum())
    if images_with_truth is None:
        denominator = int(scored.sum())
        denominator_is = 'scored frames'
    else:
        denominator = int(images_with_truth)
        denominator_is = 'images with ground truth'
    good = int((table.error_m[fixes] <= fix_threshold_m).sum())
    return {
        'count': count,
        'share': count / denominator if denominator > 0 else None,
        'share_denominator': denominator,
        'share_of': denominator_is,
        'precise': good,
        'precision': good / count if count else None,
        'threshold_m': float(fix_threshold_m),
    }


def _no_fix_reasons(frames: Sequence[FrameResult], no_fix: np.ndarray) -> Dict[str, int]:
    """Count the scored frames without a fix by the localizer's reason."""
    reasons: Dict[str, int] = {}
    for frame, missing in zip(frames, no_fix):
        if missing:
            reason = frame.no_fix_reason or 'not recorded'
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items()))


def _confidence(frames: Sequence[FrameResult], table: FrameTable, scored: np.ndarray,
                fix_threshold_m: float) -> Dict[str, Any]:
    """Return how well the frames' confidences rank right estimates above wrong ones."""
    scores = np.array([f.confidence for f in frames], dtype=float).reshape(-1)[scored]
    right = table.error_m[scored] <= fix_threshold_m
    block: Dict[str, Any] = {'auc_pr': average_precision(scores, right),
                             'positives': int(right.sum()), 'count': int(scored.sum()),
                             'definition': confidence_definition(fix_threshold_m)}
    if len(scores) and np.isnan(scores).all():
        block.update(auc_pr=None, reason='no scored frame carries a confidence')
    return block


def _verification(frames: Sequence[FrameResult], scored: np.ndarray) -> Dict[str, Any]:
    """Return how many database places were verified per scored frame (None: no check)."""
    counts = [f.checked for f, s in zip(frames, scored) if s and f.checked is not None]
    return {'frames': len(counts),
            'candidates_per_frame_mean': float(np.mean(counts)) if counts else None,
            'candidates_per_frame_max': int(max(counts)) if counts else None}


def _heading(table: FrameTable, scored: np.ndarray, frames: Sequence[FrameResult]
             ) -> Dict[str, Any]:
    """Return the heading error block, or why it is not available."""
    errors = table.heading_error_deg[scored]
    if np.isfinite(errors).any():
        return {'available': True, **error_stats(errors)}
    truth = any(math.isfinite(f.truth_heading) for f in frames)
    est = any(math.isfinite(f.est_heading) for f in frames)
    if not truth:
        reason = 'no ground-truth heading (give --gt-heading-topic)'
    elif not est:
        reason = 'the estimates carry no heading (database without headings?)'
    else:
        reason = 'no scored frame has both an estimated and a true heading'
    return {'available': False, 'reason': reason}


def _latency(frames: Sequence[FrameResult]) -> Dict[str, Any]:
    """Return the latency block over every frame that has a measured latency."""
    values = np.array([f.latency_s for f in frames], dtype=float)
    if not np.isfinite(values).any():
        return {'available': False,
                'reason': 'the frames carry no measured latency (recorded estimates)'}
    stats = error_stats(values)
    return {'available': True, 'count': stats['count'], 'median': stats['median'],
            'p90': stats['p90'], 'max': stats['max']}


# ---------------------------------------------------------------------------------------------
# Retrieval evaluation on a dataset: database images and query images, each with a position

# Metres per degree of latitude, rounded down (110.57 km at the equator): a window this wide
# in degrees holds every point within the distance.
_MIN_METRES_PER_DEGREE = 110_000.0


def positives_within(query_latlon, db_latlon, threshold_m: float) -> np.ndarray:
    """
    Return a bool per query: whether a database position lies within threshold_m (geodesic).

    Only the database entries inside a latitude and longitude window around each query are
    measured, so a dataset of millions of images is checked query by query without an N x M
    distance matrix.
    """
    queries = np.asarray(query_latlon, dtype=float).reshape(-1, 2)
    db = np.asarray(db_latlon, dtype=float).reshape(-1, 2)
    order = np.argsort(db[:, 0], kind='stable')
    lat_sorted, db_sorted = db[order, 0], db[order]
    window = threshold_m / _MIN_METRES_PER_DEGREE
    found = np.zeros(len(queries), dtype=bool)
    for i, (lat, lon) in enumerate(queries):
        lo, hi = np.searchsorted(lat_sorted, [lat - window, lat + window], side='left')
        near = db_sorted[lo:hi]
        cos_lat = math.cos(math.radians(min(abs(lat) + window, 90.0)))
        if cos_lat > 1e-6:      # else every longitude is near: the query is at a pole
            dlon = np.abs((near[:, 1] - lon + 180.0) % 360.0 - 180.0)
            near = near[dlon <= window / cos_lat]
        if len(near):
            found[i] = bool((distance_m(lat, lon, near[:, 0], near[:, 1]) <= threshold_m).any())
    return found


def retrieval_frames(query_latlon, query_heading, query_images: Sequence[str], db_latlon,
                     db_heading, db_images: Sequence[str], ranking) -> List[FrameResult]:
    """
    Return one frame per query of a retrieval run: its truth, and its ranked database entries.

    ranking is Q x K database indices, best first; the top-1 entry's position and heading are
    the frame's estimate (no fix: nothing is published), and the ranking is both the retrieved
    and the embedding-only one.
    """
    queries = np.asarray(query_latlon, dtype=float).reshape(-1, 2)
    q_heading = np.asarray(query_heading, dtype=float).reshape(-1)
    db = np.asarray(db_latlon, dtype=float).reshape(-1, 2)
    db_heading = np.asarray(db_heading, dtype=float).reshape(-1)
    ranking = np.asarray(ranking, dtype=np.int64).reshape(len(queries), -1)
    frames = []
    for i, ranked in enumerate(ranking):
        positions = db[ranked]
        top = ranked[0] if len(ranked) else None
        frames.append(FrameResult(
            index=i, stamp_ns=0, truth_lat=queries[i, 0], truth_lon=queries[i, 1],
            truth_heading=q_heading[i],
            est_lat=db[top, 0] if top is not None else math.nan,
            est_lon=db[top, 1] if top is not None else math.nan,
            est_heading=db_heading[top] if top is not None else math.nan,
            retrieved=positions, retrieved_ids=[str(db_images[j]) for j in ranked],
            retrieval_only=positions, image=str(query_images[i])))
    return frames


def retrieval_summary(frames: Sequence[FrameResult], has_positive: np.ndarray,
                      threshold_m: float, ks: Sequence[int], database_size: int,
                      table: Optional[FrameTable] = None) -> Dict[str, Any]:
    """
    Return the metrics of a retrieval run, shaped as `summarize` shapes them.

    Recall@N counts, as the VPR benchmarks do, only the queries with at least one database
    image within threshold_m (the others could not be found by any ranking); they are counted
    apart, and recall_all_queries gives the share over every query (those counting as misses).
    """
    table = table if table is not None else frame_table(frames, threshold_m)
    has_positive = np.asarray(has_positive, dtype=bool).reshape(-1)
    metrics = summarize(frames, threshold_m, ks=ks, database_size=database_size, table=table)
    retrieved = [f.retrieved for f in frames]
    metrics['recall_all_queries'] = metrics['recall']
    metrics['recall'] = _recall(table.first_hit_rank, table.scored & has_positive, retrieved,
                                ks, threshold_m, database_size, None)
    if not has_positive.any():
        metrics['recall']['reason'] = (f'no query has a database image within {threshold_m:g} m'
                                       f' (are the two sides of the same area?)')
    metrics['recall_retrieval_only'] = metrics['recall']
    metrics['frames'].update(with_positive=int(has_positive.sum()),
                             without_positive=int((~has_positive).sum()))
    metrics['fixes'] = {**dict.fromkeys(metrics['fixes']), 'threshold_m': float(threshold_m),
                        'unavailable': 'retrieval evaluation: no localizer runs, nothing is '
                                       'published as a fix'}
    metrics['latency_s'] = {'available': False,
                            'reason': 'queries are embedded in batches; see timing_s'}
    metrics['definitions'].update(retrieval_definitions(threshold_m))
    return metrics


def retrieval_definitions(threshold_m: float) -> Dict[str, str]:
    """Return the words for the figures of a retrieval run that differ from a bag's."""
    return {
        'ground_truth': "each query image's position: from its file name (VPR convention: "
                        'latitude and longitude, else UTM east, north, zone) or its CSV row',
        'scored': 'every query: it has a position and a ranking',
        'recall_at_k': f'share of the queries with at least one database image within '
                       f'{threshold_m:g} m (geodesic) whose first k database images ranked by '
                       f'embedding similarity (exact search) hold one within {threshold_m:g} m; '
                       f'queries without any are counted apart (frames.without_positive)',
        'recall_all_queries': 'the same over every query, those without a database image '
                              'within the threshold counting as misses',
        'recall_retrieval_only': 'equal to recall: the ranking is by the embedding alone',
        'position_error_m': 'geodesic distance between the query and its top-1 database image',
        'heading_error_deg': "angle between the query's heading and its top-1 database "
                             "image's heading, where both are known",
    }
