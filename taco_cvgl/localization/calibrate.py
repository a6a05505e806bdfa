"""
Calibrating a map on a flight with ground truth: how far off its fixes are, how likely right.

`fit_map_calibration` localizes the frames of a calibration flight (on one motion track, as
the node would fly it) and fits the map's error models (mapdb.calibration): on the verified
fixes, the covariance model (sigma from the verification's inliers, residual and in-tile
offset) and the confidence model (P(error within RIGHT_WITHIN_M)); on the frames no candidate
verified, the share whose retrieval estimate was right anyway, which the localizer reports as
such a frame's confidence. The map's ground scale, grid spacing and covariance scale are kept.

`calibrate_map` does that with the localizer of the node's settings and writes the calibrated
database (`taco-cvgl calibrate`). The map's verification features stay valid: their file is
keyed by the database's entries (embeddings, positions, image names), not by its meta, and the
entries are written back as they were.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
import shutil
from typing import Any, Dict, Iterable, List, Optional, Tuple, TYPE_CHECKING

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.geo.geodesy import to_enu
from taco_cvgl.localization.heading import HeadingPrior
from taco_cvgl.mapdb.calibration import (fit_confidence, fit_covariance, fit_unverified,
                                         FixFeatures, MIN_FALLBACK_FIXES)
from taco_cvgl.mapdb.map_calibration import MapCalibration

if TYPE_CHECKING:   # torch loads in seconds: not before it is needed
    from taco_cvgl.localization.localizer import CVGLLocalizer
    from taco_cvgl.localization.settings import NodeParams

# A fix is "right" for the confidence model (and an unverified frame for its rate) when it is
# within this distance of the truth: the in-tile accuracy a verified fix claims, not the grid
# stride any retrieval hit reaches.
RIGHT_WITHIN_M = 40.0


@dataclasses.dataclass(frozen=True)
class CalibrationFrame:
    """One image of a calibration flight with its true position."""

    image: np.ndarray                 # H x W x 3 uint8, RGB
    stamp_s: Optional[float]          # capture time (s), for the motion track
    heading: Optional[HeadingPrior]   # the robot's heading prior, None without one
    latitude: float                   # ground truth, degrees
    longitude: float


@dataclasses.dataclass
class CalibrationReport:
    """What a calibration flight gave: frames, fixes, the unverified rate and why any fallback."""

    frames: int                       # frames localized
    fixes: int                        # verified fixes the models were fitted on
    unverified: Optional[Dict[str, Any]]   # the fit_unverified record (None: no such frame)
    notes: List[str] = dataclasses.field(default_factory=list)


def fit_map_calibration(localizer: CVGLLocalizer, frames: Iterable[CalibrationFrame],
                        right_within_m: float = RIGHT_WITHIN_M
                        ) -> Tuple[MapCalibration, CalibrationReport]:
    """
    Localize a calibration flight over the localizer's map and fit the map's error models.

    Returns the map's calibration with the fitted models (gsd_m, grid_spacing_m and the scales
    kept) and the report. With fewer than MIN_FALLBACK_FIXES verified fixes no model is fitted
    (the fixes keep their uncalibrated covariance and confidence); a map without gsd_m gets no
    covariance model (a verified fix's error in metres needs the ground scale).
    """
    if localizer.database is None:
        raise InputError('calibration: the localizer has no map loaded')
    if localizer.config.rerank is None:
        raise InputError('calibration needs verification on (rerank true): the models it fits '
                         'describe verified fixes')
    base = localizer.database.calibration
    gsd = math.nan if base.gsd_m is None else base.gsd_m
    features, errors, unverified, count = _localize_flight(localizer, frames, gsd)
    if not count:
        raise InputError('calibration: the flight has no image with ground truth')
    notes: List[str] = []
    covariance = confidence = None
    if len(errors) < MIN_FALLBACK_FIXES:
        notes.append(f'only {len(errors)} verified fixes of {count} frames, fewer than the '
                     f'{MIN_FALLBACK_FIXES} a fit needs: verified fixes keep their '
                     f'uncalibrated covariance and confidence')
    else:
        confidence = fit_confidence(features, np.hypot(errors[:, 0], errors[:, 1]),
                                    right_within_m=right_within_m,
                                    min_inliers=localizer.config.rerank.min_inliers)
        if base.gsd_m is None:
            notes.append('the map has no gsd_m (taco-cvgl build-db --gsd-m): the covariance of '
                         'verified fixes is not fitted')
        else:
            covariance = fit_covariance(features, errors)
    record = fit_unverified(unverified, right_within_m) if unverified else None
    if record is None:
        notes.append('no frame went unverified: such frames keep confidence 0')
    calibration = dataclasses.replace(
        base, covariance_model=covariance, confidence_model=confidence,
        unverified_confidence=0.0 if record is None else float(record['probability']))
    return calibration, CalibrationReport(count, len(errors), record, notes)


def _localize_flight(localizer: CVGLLocalizer, frames: Iterable[CalibrationFrame], gsd: float
                     ) -> Tuple[List[FixFeatures], np.ndarray, List[float], int]:
    """
    Localize each frame on one new track; return what the fits take.

    The verified fixes' features and (east, north) errors (m), the horizontal errors (m) of the
    frames no candidate verified, and the number of frames.
    """
    track = localizer.new_track()
    features, errors, unverified, count = [], [], [], 0
    for frame in frames:
        count += 1
        m = localizer.localize(frame.image, timestamp=frame.stamp_s, heading=frame.heading,
                               track=track)
        east, north = to_enu(frame.latitude, frame.longitude, m.latitude, m.longitude)
        if m.fix and m.verification is not None:
            features.append(FixFeatures.of(m.verification, gsd))
            errors.append((float(east), float(north)))
        elif m.verified is False:      # no candidate verified: the retrieval estimate stands
            unverified.append(float(math.hypot(east, north)))
    return features, np.array(errors, dtype=float).reshape(-1, 2), unverified, count


def calibrate_map(params: NodeParams, frames: Iterable[CalibrationFrame], out=None
                  ) -> Tuple[MapCalibration, CalibrationReport, Path]:
    """
    Fit the calibration of params.database on a flight and write the calibrated database.

    The localizer is the one the node's settings make (CVGLLocalizer.from_settings). The
    database goes to `out` (default: params.database, replaced in place); it is written
    atomically and only once the fit succeeded, so a failure leaves every file as it was.
    Returns the calibration, the report and the path written.
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer
    source = Path(params.database)
    target = _check_out(source if out is None else Path(out))
    localizer = CVGLLocalizer.from_settings(params)
    calibration, report = fit_map_calibration(localizer, frames)
    return calibration, report, write_calibration(source, calibration, report.unverified,
                                                  target)


def _check_out(out: Path) -> Path:
    """Refuse, before any work, an --out that is a folder or cannot be written."""
    if out.is_dir():
        raise InputError(f'--out {out} is a folder; give the database file to write, e.g. '
                         f'{out / "map.npz"}')
    folder = out.absolute().parent
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise InputError(f'--out {out} cannot be written: {folder} is not a folder this user '
                         f'may write in')
    return out


def write_calibration(db_path, calibration: MapCalibration,
                      unverified: Optional[Dict[str, Any]] = None, out=None) -> Path:
    """
    Write the database at db_path with `calibration` to `out` (default: db_path, in place).

    Everything but the calibration is written back as loaded (embeddings in their stored
    precision), so the verification features keep matching; a database written elsewhere gets
    a copy of them beside it. unverified: the fit_unverified record (MapCalibration.apply_to).
    """
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    db_path = Path(db_path)
    target = db_path if out is None else Path(out)
    db = EmbeddingDatabase.load(db_path)
    calibration.apply_to(db.meta, unverified=unverified)
    dtype = 'fp32' if db.embeddings.dtype == np.float32 else 'fp16'
    try:
        db.save(target, dtype=dtype)
    except OSError as exc:
        raise InputError(f'cannot write {target}: {exc.strerror or exc}; nothing was written '
                         f'there') from None
    if not _same_file(db_path, target):
        _copy_features(db_path, target)
    return target


def _same_file(a: Path, b: Path) -> bool:
    """Return whether two paths name the same file (however spelt)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _copy_features(db_path: Path, target: Path) -> None:
    """Copy every matcher's verification features of db_path beside target (stale ones removed)."""
    from taco_cvgl.localization.rerank import MATCHERS
    from taco_cvgl.mapdb.map_features import features_path
    for matcher in MATCHERS:
        source, copy = features_path(db_path, matcher), features_path(target, matcher)
        try:
            if source.is_file():
                with atomic_path(copy) as tmp:
                    shutil.copyfile(source, tmp)
            elif copy.exists():     # another database's: the localizer would refuse it
                copy.unlink()
        except OSError as exc:
            raise InputError(f'wrote {target}, but cannot put the {matcher} features of '
                             f'{db_path} beside it at {copy}: {exc.strerror or exc}; copy '
                             f'{source} there') from None


def format_report(calibration: MapCalibration, report: CalibrationReport, flight='') -> str:
    """Return the fitted models in a few lines: kind, fixes, notes and the unverified rate."""
    where = f' {flight}' if flight else ''
    lines = [f'calibration flight{where}: {report.frames} frames with ground truth, '
             f'{report.fixes} verified fixes']
    for name, model in (('covariance', calibration.covariance_model),
                        ('confidence', calibration.confidence_model)):
        if model is None:
            lines.append(f'  {name} model: none (uncalibrated)')
        else:
            lines.append(f'  {name} model: {model.kind} on {model.fixes} fixes'
                         + (f' ({model.note})' if model.note else ''))
    record = report.unverified
    if record is None:
        lines.append('  unverified frames: none')
    else:
        lines.append(f'  unverified frames: {record["right"]} of {record["frames"]} right '
                     f'within {record["right_within_m"]:g} m: confidence '
                     f'{record["probability"]:.3f}')
    lines += [f'  note: {note}' for note in report.notes]
    return '\n'.join(lines)
