"""
Scoring the localizer on a bag: replayed offline through it, or as the live node recorded it.

- `evaluate_bag`: every image of a camera bag goes through the same CVGLLocalizer the node runs,
  with the heading prior of the orientation topic nearest its stamp, as the node matches it;
- `evaluate_recorded`: the estimates a live node published (recorded with `ros2 bag record`)
  scored against the ground truth; no model runs;
- `open_flight` / `calibration_frames`: a camera bag's images with their ground truth and
  heading priors, as both the evaluation and the map calibration (localization.calibrate) read it.

Each writes metrics.json, frames.csv and the pictures (evaluation.report) and returns them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TYPE_CHECKING

import numpy as np
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.evaluation.ground_truth import (bag_with, count_images, heading_truth,
                                               MAX_LISTED_FAILURES, read_heading_priors,
                                               read_headings, read_truth, require_topic,
                                               truth_at)
from taco_cvgl.evaluation.report import EvaluationResult, grid_picks, grid_rows_of, write_outputs
from taco_cvgl.evaluation.scoring import (DEFAULT_KS, frame_table, FrameResult, SCHEMA,
                                          summarize)
from taco_cvgl.files import bags
from taco_cvgl.localization.orientation import OrientationBuffer
from taco_cvgl.localization.settings import defaults

if TYPE_CHECKING:   # torch loads in seconds: not before it is needed
    from taco_cvgl.localization.calibrate import CalibrationFrame
    from taco_cvgl.localization.heading import HeadingPrior
    from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig, Measurement
    from taco_cvgl.localization.settings import NodeParams

RECALL_UNAVAILABLE_RECORDED = (
    'a recorded bag holds the published estimates only, not the retrieved database entries; '
    'evaluate the camera bag with --image-topic --db --weights to measure Recall@k')


def check_orientation(sigma_deg: float, max_age_s: float) -> None:
    """Refuse a default sigma that is not positive or a max age below zero (as the node does)."""
    if not (math.isfinite(sigma_deg) and sigma_deg > 0):
        raise InputError(f'orientation_sigma_deg must be a positive number, got {sigma_deg}')
    if not (math.isfinite(max_age_s) and max_age_s >= 0):
        raise InputError(f'orientation_max_age_s must be a number >= 0, got {max_age_s}')


def check_thresholds(threshold_m: float, fix_threshold_m: Optional[float],
                     max_gt_gap_s: float) -> float:
    """Refuse non-positive thresholds; return the fix threshold (default: threshold_m)."""
    fix_threshold_m = threshold_m if fix_threshold_m is None else fix_threshold_m
    for name, value in (('threshold_m', threshold_m), ('fix_threshold_m', fix_threshold_m),
                        ('max_gt_gap_s', max_gt_gap_s)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f'{name} must be a positive number, got {value}')
    return fix_threshold_m


def _fill(frame: FrameResult, m: Measurement, database=None) -> None:
    """Copy a measurement (and, given its database, the embedding-only ranking) in."""
    frame.est_lat, frame.est_lon = float(m.latitude), float(m.longitude)
    frame.est_heading = float(m.heading)
    frame.fix = bool(m.fix)
    frame.covariance_en = np.asarray(m.position_covariance, dtype=float)[:2, :2].copy()
    frame.confidence = float(m.confidence)
    frame.latency_s = float(m.latency_s)
    frame.retrieved = np.array([(x.latitude, x.longitude) for x in m.matches],
                               dtype=float).reshape(-1, 2)
    frame.retrieved_ids = [x.image_id for x in m.matches]
    frame.checked = int(m.checked) if m.verified is not None else None
    frame.no_fix_reason = m.no_fix_reason
    if database is not None and m.retrieval:
        frame.retrieval_only = np.stack([database.latitude[m.retrieval],
                                         database.longitude[m.retrieval]], axis=1).astype(float)


def check_recall_values(values: Sequence[int]) -> Tuple[int, ...]:
    """Return the N of Recall@N sorted, refusing any below 1."""
    ks = tuple(sorted({int(v) for v in values}))
    if not ks or ks[0] < 1:
        raise InputError(f'--recall-values must be whole numbers >= 1, got {list(values)}')
    return ks


@dataclasses.dataclass
class Flight:
    """A camera bag opened for a run: its images, its ground truth and its heading priors."""

    bag: Path
    gt_path: Path
    stream: bags.ImageStream
    truth: bags.GpsTrack
    heading: Optional[Tuple[np.ndarray, np.ndarray]]   # ground-truth headings, or None
    priors: Optional[OrientationBuffer]   # the orientation topic's, or None
    prior_info: Dict[str, Any]         # what was read from the orientation topic
    max_age_s: float                   # orientation_max_age_s

    def prior_at(self, stamp_ns: int) -> Optional[HeadingPrior]:
        """Return the heading prior of an image stamp, as the node matches it (None: none)."""
        return None if self.priors is None else self.priors.prior_at(stamp_ns,
                                                                     self.max_age_s)[0]

    def frames_with_truth(self, max_gt_gap_s: float) -> Iterator[CalibrationFrame]:
        """Yield each image with ground truth within max_gt_gap_s, as a CalibrationFrame."""
        from taco_cvgl.localization.calibrate import CalibrationFrame
        for stamp, rgb in self.stream:
            lat, lon, _ = truth_at(self.truth, None, [stamp], max_gt_gap_s)
            if np.isfinite(lat[0]) and np.isfinite(lon[0]):
                yield CalibrationFrame(rgb, stamp * 1e-9, self.prior_at(stamp), float(lat[0]),
                                       float(lon[0]))


def open_flight(bag, image_topic: str, gt_topic: str, *, gt_bag=None,
                gt_heading_topic: Optional[str] = None, orientation_topic: Optional[str] = None,
                orientation_sigma_deg: float = defaults()['orientation_sigma_deg'],
                orientation_max_age_s: float = defaults()['orientation_max_age_s']) -> Flight:
    """
    Open a camera bag with ground truth, checking its topics before any image is read.

    The ground truth (and its heading topic) comes from `gt_bag` when given, else from `bag`;
    the orientation topic from `bag`, else `gt_bag` (see evaluate_bag).
    """
    check_orientation(orientation_sigma_deg, orientation_max_age_s)
    bag = Path(bag)
    gt_path = Path(gt_bag) if gt_bag else bag
    stream = bags.iter_images(bag, image_topic)  # checks the bag and the topic first
    truth = read_truth(gt_path, gt_topic)
    heading = heading_truth([gt_path, bag], gt_heading_topic)
    priors, prior_info = None, {'topic': None}
    if orientation_topic:
        priors, prior_info = read_heading_priors(
            bag_with([bag, gt_path], orientation_topic, 'orientation'), orientation_topic,
            orientation_sigma_deg)
        prior_info.update(default_sigma_deg=orientation_sigma_deg,
                          max_age_s=orientation_max_age_s)
    return Flight(bag, gt_path, stream, truth, heading, priors, prior_info,
                  orientation_max_age_s)


def calibration_frames(bag, image_topic: str, gt_topic: str, *, max_gt_gap_s: float = 1.0,
                       **flight) -> Iterator[CalibrationFrame]:
    """
    Return a calibration flight's images that have ground truth within max_gt_gap_s.

    The bag and its topics are checked now (InputError), the images read as the frames are
    taken; the others are left out, as evaluate_bag leaves them unscored. flight:
    open_flight's keywords (gt_bag, orientation_topic, ...).
    """
    if not (math.isfinite(max_gt_gap_s) and max_gt_gap_s > 0):
        raise InputError(f'max_gt_gap_s must be a positive number, got {max_gt_gap_s}')
    return open_flight(bag, image_topic, gt_topic, **flight).frames_with_truth(max_gt_gap_s)


def evaluate_bag(bag, image_topic: str, gt_topic: str, db, weights, out_dir, *,
                 gt_bag=None, gt_heading_topic: Optional[str] = None,
                 threshold_m: float = 25.0, fix_threshold_m: Optional[float] = None,
                 max_gt_gap_s: float = 1.0, config: Optional[LocalizerConfig] = None,
                 device: str = 'auto', precision: str = 'auto', camera_yaw_deg: float = 0.0,
                 max_frames: Optional[int] = None, grid_rows: int = 6,
                 background=None, progress: bool = True,
                 on_frame: Optional[Callable[[FrameResult], None]] = None,
                 localizer: Optional[CVGLLocalizer] = None,
                 plots: bool = True, ks: Sequence[int] = DEFAULT_KS,
                 orientation_topic: Optional[str] = None,
                 orientation_sigma_deg: float = defaults()['orientation_sigma_deg'],
                 orientation_max_age_s: float = defaults()['orientation_max_age_s']
                 ) -> EvaluationResult:
    """
    Localize every image of a bag and score it against the ground truth.

    The localizer is loaded from `weights` and `db` (checked against each other), unless a
    loaded one is passed as `localizer` (then config, device and precision are its own, and db
    and weights are only recorded in metrics.json). Frames without ground truth within
    max_gt_gap_s are counted and not localized. A frame that fails, a Ctrl-C
    (KeyboardInterrupt), a read error mid-bag or max_frames stop nothing already scored:
    metrics.json is written with complete false and says why. background: an optional
    plots.MapBackground for the track plot; plots False writes metrics.json and frames.csv
    only. on_frame is called with each frame once done. ks: the k of Recall@k.

    orientation_topic (sensor_msgs/Imu or geometry_msgs/QuaternionStamped, in `bag` or else
    `gt_bag`): each image gets the heading prior nearest its stamp within
    orientation_max_age_s, as the node matches it (orientation_sigma_deg where a message gives
    no sigma); metrics.json's heading_prior counts the frames with and without one, and
    (localizer_sources) which heading each localized frame used: given, track (the last
    verified fix), tta (rotations tried) or none. The bag runs on a motion track of its own
    (localizer.new_track()): a localizer passed in carries no state from what it ran before.
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
    from tqdm import tqdm

    fix_threshold_m = check_thresholds(threshold_m, fix_threshold_m, max_gt_gap_s)
    check_orientation(orientation_sigma_deg, orientation_max_age_s)
    if max_frames is not None and max_frames < 1:
        raise InputError(f'max_frames must be >= 1, got {max_frames}')
    flight = open_flight(bag, image_topic, gt_topic, gt_bag=gt_bag,
                         gt_heading_topic=gt_heading_topic, orientation_topic=orientation_topic,
                         orientation_sigma_deg=orientation_sigma_deg,
                         orientation_max_age_s=orientation_max_age_s)
    bag, gt_path, stream, truth = flight.bag, flight.gt_path, flight.stream, flight.truth
    priors, prior_info = flight.priors, flight.prior_info
    counts = {'frames_with': 0, 'frames_without': 0}
    sources: Dict[str, int] = {}   # Measurement.heading_source of each localized frame
    if localizer is None:
        if db is None or weights is None:
            raise InputError('evaluating a camera bag needs the database and the weights')
        localizer = CVGLLocalizer.from_files(weights, db, device, precision,
                                             config or LocalizerConfig())
    if localizer.database is None:
        raise InputError('the localizer passed in has no map loaded')
    config = localizer.config
    database = localizer.database
    track = localizer.new_track()   # this bag's own (see the docstring)

    total = stream.message_count if max_frames is None else min(stream.message_count,
                                                                max_frames)
    picks = grid_picks(total, grid_rows)
    thumbs: Dict[int, np.ndarray] = {}
    frames: List[FrameResult] = []
    stopped: Optional[str] = None
    bar = tqdm(total=total, desc='evaluating', unit='img', disable=not progress,
               dynamic_ncols=True)
    try:
        for index, (stamp, rgb) in enumerate(stream):
            if max_frames is not None and index >= max_frames:
                stopped = f'stopped after max_frames={max_frames} of {stream.message_count}'
                break
            prior = flight.prior_at(stamp)
            frame, source = _localize_frame(localizer, index, stamp, rgb, truth,
                                            flight.heading, max_gt_gap_s, camera_yaw_deg,
                                            prior, track)
            frames.append(frame)
            if frame.has_truth:   # localized (or tried): counted with or without a prior
                counts['frames_with' if prior is not None else 'frames_without'] += 1
            if source is not None:
                sources[source or 'none'] = sources.get(source or 'none', 0) + 1
            if plots and index in picks:
                from taco_cvgl.evaluation.plots import thumbnail
                thumbs[index] = thumbnail(rgb)
            bar.update(1)
            if on_frame is not None:
                on_frame(frames[-1])
    except KeyboardInterrupt:
        stopped = 'interrupted (KeyboardInterrupt)'
    except InputError as exc:
        stopped = f'bag read error: {exc}'
    finally:
        bar.close()

    table = frame_table(frames, threshold_m)
    summary = summarize(frames, threshold_m, fix_threshold_m, ks,
                        database_size=len(database), max_gt_gap_s=max_gt_gap_s, table=table)
    failures = [f'frame {f.index} at {f.stamp_ns} ns: {f.failure}'
                for f in frames if f.failure is not None]
    summary['frames'].update({
        'in_bag': int(stream.message_count),
        'undecodable': int(stream.skipped),
        'failures': failures[:MAX_LISTED_FAILURES],
        'decode_errors': list(stream.errors),
    })
    complete = stopped is None and not failures and stream.skipped == 0
    inputs = {'bag': str(bag), 'image_topic': image_topic, 'gt_bag': str(gt_path),
              'gt_topic': gt_topic, 'gt_heading_topic': gt_heading_topic,
              'db': None if db is None else str(db),
              'weights': None if weights is None else str(weights),
              'database_entries': len(database),
              'model_fingerprint': database.model_fingerprint, 'top_k': config.top_k,
              'index': config.index, 'min_confidence': config.estimator.min_confidence,
              'camera_yaw_deg': camera_yaw_deg, 'max_gt_gap_s': max_gt_gap_s,
              'orientation_topic': orientation_topic or None}
    metrics = {'schema': SCHEMA, 'mode': 'localizer', 'complete': complete,
               'stopped': stopped, 'inputs': inputs, **summary,
               'heading_prior': {**prior_info, **counts, 'localizer_sources': sources},
               'warnings': _clock_warnings(frames, truth)}
    if not frames and stopped is None:
        metrics['warnings'].append(f'the image topic {image_topic} holds no decodable image')
    if priors is not None and counts['frames_without'] and not counts['frames_with']:
        metrics['warnings'].append(
            f'no frame had a heading prior: none of the {len(priors)} usable message(s) of '
            f'{orientation_topic} lies within orientation_max_age_s {orientation_max_age_s:g} s '
            f'of a frame')
    grid = grid_rows_of(frames, thumbs, table, threshold_m, grid_rows) if plots else []
    paths = write_outputs(Path(out_dir), metrics, frames, table, threshold_m,
                          (database.latitude, database.longitude), background, grid, plots)
    return EvaluationResult(metrics, paths)


def _localize_frame(localizer: CVGLLocalizer, index: int, stamp: int, rgb: np.ndarray,
                    truth: bags.GpsTrack, heading, max_gt_gap_s: float,
                    camera_yaw_deg: float, prior: Optional[HeadingPrior] = None,
                    track=None) -> Tuple[FrameResult, Optional[str]]:
    """
    Return the frame of one image (its ground truth, the localizer's answer if any).

    And the heading the localizer used (Measurement.heading_source; None if not localized).
    track: the run's motion track (localizer.new_track()), which the frame continues.
    """
    lat, lon, hdg = truth_at(truth, heading, [stamp], max_gt_gap_s)
    frame = FrameResult(index=index, stamp_ns=int(stamp), truth_lat=float(lat[0]),
                        truth_lon=float(lon[0]), truth_heading=float(hdg[0]))
    if not frame.has_truth:
        return frame, None  # not localized: it could not be scored
    try:
        measurement = localizer.localize(rgb, timestamp=stamp * 1e-9,
                                         camera_yaw_deg=camera_yaw_deg, heading=prior,
                                         track=track)
    except (TacoError, RuntimeError, ValueError) as exc:
        # One frame the model cannot take (odd size, corrupt data) must not lose the others;
        # it is counted, listed and makes the result incomplete.
        frame.failure = f'{type(exc).__name__}: {exc}'
        return frame, None
    _fill(frame, measurement, localizer.database)
    return frame, measurement.heading_source


def _clock_warnings(frames: Sequence[FrameResult], truth: bags.GpsTrack) -> List[str]:
    """Warn when no frame found ground truth: stamps on different clocks are the usual cause."""
    if not frames or any(f.has_truth for f in frames):
        return []
    stamps = np.array([f.stamp_ns for f in frames], dtype=np.int64)
    return [f'no frame has ground truth within the allowed gap: the frames span '
            f'{stamps.min() * 1e-9:.3f}..{stamps.max() * 1e-9:.3f} s, the ground truth '
            f'{truth.stamps_ns[0] * 1e-9:.3f}..{truth.stamps_ns[-1] * 1e-9:.3f} s (are they '
            f'stamped on the same clock?)']


def evaluate_recorded(bag, estimate_topic: str, gt_topic: str, out_dir, *, gt_bag=None,
                      image_topic: Optional[str] = None,
                      gt_heading_topic: Optional[str] = None, threshold_m: float = 25.0,
                      fix_threshold_m: Optional[float] = None, max_gt_gap_s: float = 1.0,
                      db=None, background=None, progress: bool = True,
                      plots: bool = True) -> EvaluationResult:
    """
    Score the estimates a live node published (recorded in `bag`) against ground truth.

    The estimate topic is sensor_msgs/NavSatFix (position_covariance, ENU m^2; NO_FIX messages
    count as published without a fix) or a geographic_msgs GeoPose type (covariance read on
    east, north axes as this package's node publishes it). Ground truth comes from `gt_bag`
    when given, else from `bag`. With image_topic (searched in `bag`, then `gt_bag`), the fix
    share is published fixes over images, both counted where ground truth exists. db, when
    given, only draws the map's places under the track; plots False writes no pictures.
    """
    fix_threshold_m = check_thresholds(threshold_m, fix_threshold_m, max_gt_gap_s)
    bag = Path(bag)
    gt_path = Path(gt_bag) if gt_bag else bag
    est_type = require_topic(bag, estimate_topic, 'estimate')
    truth = read_truth(gt_path, gt_topic)
    heading = heading_truth([gt_path, bag], gt_heading_topic)
    estimates = bags.read_navsat(bag, estimate_topic)
    est_heading = np.full(len(estimates), np.nan)
    if est_type in (bags.GEOPOSE_COV_STAMPED_TYPE, bags.GEOPOSE_STAMPED_TYPE):
        stamps, values = read_headings(bag, estimate_topic)
        by_stamp = dict(zip(stamps.tolist(), values.tolist()))
        est_heading = np.array([by_stamp.get(int(s), math.nan) for s in estimates.stamps_ns])

    lat, lon, hdg = truth_at(truth, heading, estimates.stamps_ns, max_gt_gap_s)
    cov = estimates.covariance
    frames = []
    for i, stamp in enumerate(estimates.stamps_ns):
        frame = FrameResult(index=i, stamp_ns=int(stamp), truth_lat=float(lat[i]),
                            truth_lon=float(lon[i]), truth_heading=float(hdg[i]),
                            est_lat=float(estimates.lat[i]), est_lon=float(estimates.lon[i]),
                            est_heading=float(est_heading[i]), fix=True)
        if cov is not None:
            block = np.asarray(cov[i], dtype=float)[:2, :2]
            if estimates.covariance_axes.startswith('latitude'):   # GeoPose: north, east
                block = block[::-1, ::-1]
            frame.covariance_en = block.copy()
        frames.append(frame)

    images = None
    if image_topic:
        images = count_images(image_topic, [bag, gt_path], truth, max_gt_gap_s, progress)
    table = frame_table(frames, threshold_m)
    summary = summarize(frames, threshold_m, fix_threshold_m, DEFAULT_KS,
                        recall_unavailable=RECALL_UNAVAILABLE_RECORDED,
                        images_with_truth=None if images is None else images['with_ground_truth'],
                        max_gt_gap_s=max_gt_gap_s, table=table)
    summary['frames']['no_fix_messages'] = int(estimates.dropped)
    if images is None:
        summary['fixes'].update(share=None, share_of=None, share_denominator=None,
                                share_unavailable='give --image-topic to count the images '
                                                  'the fixes were made from')
    else:
        summary['images'] = images
    database = None
    if db is not None:
        from taco_cvgl.mapdb.database import EmbeddingDatabase
        database = EmbeddingDatabase.load(db)
    inputs = {'bag': str(bag), 'estimate_topic': estimate_topic, 'estimate_type': est_type,
              'gt_bag': str(gt_path), 'gt_topic': gt_topic, 'gt_heading_topic': gt_heading_topic,
              'image_topic': image_topic, 'max_gt_gap_s': max_gt_gap_s,
              'db': None if db is None else str(db)}
    metrics = {'schema': SCHEMA, 'mode': 'recorded', 'complete': True, 'stopped': None,
               'inputs': inputs, **summary, 'warnings': _clock_warnings(frames, truth)}
    if not frames:
        metrics['warnings'].append(f'the estimate topic {estimate_topic} holds no fix')
    places = None if database is None else (database.latitude, database.longitude)
    paths = write_outputs(Path(out_dir), metrics, frames, table, threshold_m, places,
                          background, [], plots)
    return EvaluationResult(metrics, paths)


def evaluate_bag_with_settings(bag, image_topic: str, gt_topic: str, params: NodeParams,
                               out_dir, *, orientation_topic: Optional[str] = None,
                               **options) -> EvaluationResult:
    """
    Run `evaluate_bag` with the localizer the node's settings make, as the node would.

    params: the node's parameters (localization.settings.NodeParams: weights, database, the
    localizer's settings, orientation_sigma_deg and orientation_max_age_s). orientation_topic
    None takes params.orientation_topic; '' means none. options: evaluate_bag's other keywords.
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer
    topic = params.orientation_topic if orientation_topic is None else orientation_topic
    return evaluate_bag(bag, image_topic, gt_topic, params.database, params.weights, out_dir,
                        localizer=CVGLLocalizer.from_settings(params), orientation_topic=topic,
                        orientation_sigma_deg=params.orientation_sigma_deg,
                        orientation_max_age_s=params.orientation_max_age_s, **options)
