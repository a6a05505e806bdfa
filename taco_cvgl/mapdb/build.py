"""
Building a map: embed GPS-tagged images into a database file, with their verification features.

`build_db` reads the images (a CSV, EXIF GPS tags or a rosbag2), embeds them (in one process or
several, mapdb.distributed_db), saves the database with the calibration it was given (ground
pixel size, grid spacing, covariance scale: `MapCalibration`) and writes the images'
verification features beside it (mapdb.map_features), one file per point matcher asked for
(`feature_matchers`: SIFT by default, ALIKED or DISK for the learned matchers); `add_features`
writes the features of a database built before.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import sys
from typing import Iterable, List, Optional, Sequence, Tuple, TYPE_CHECKING

from taco_cvgl.errors import InputError
from taco_cvgl.localization.rerank import MATCHERS, RerankConfig
from taco_cvgl.mapdb.map_calibration import MapCalibration

if TYPE_CHECKING:   # torch loads in seconds: not before it is needed
    from taco_cvgl.mapdb.database import EmbeddingDatabase


def build_db(out, weights, images=None, csv=None, device: str = 'auto',
             precision: str = 'auto', batch_size: int = 32, dtype: str = 'fp16',
             skip_bad: bool = False, progress: bool = True, bag=None,
             image_topic: Optional[str] = None, gps_topic: Optional[str] = None,
             every: int = 1, devices: int = 1, accelerator: str = 'auto', num_nodes: int = 1,
             strategy: str = 'auto', workers: Optional[int] = None, features: bool = True,
             max_features: int = RerankConfig.max_features,
             calibration: Optional[MapCalibration] = None,
             matchers: Sequence[str] = ('sift',)) -> Optional[EmbeddingDatabase]:
    """
    Build and save a database from images + CSV, images with EXIF GPS, or a rosbag2.

    A bag's images (image_topic, raw or compressed) are tagged with the GPS position
    interpolated from gps_topic (NavSatFix) and kept as JPEG files in OUT.images/. Returns the
    database as written. Nothing is written at `out` unless the whole build succeeds, and an
    `out` that is one of the inputs, a folder or not writable is refused before any work.

    devices (per machine) x num_nodes > 1 spreads the embedding over that many processes with
    Lightning DDP (taco_cvgl.mapdb.distributed_db): accelerator 'cpu' or 'gpu' ('auto' follows
    `device`), strategy 'ddp' (the further processes run this same program again, as torchrun
    does) or 'ddp_spawn' (started from Python: notebooks, tests); workers: data-loading
    processes per process. The merged database is the single-process one; only the process that
    wrote it gets it back, the others get None.

    features: then write the images' features beside the database, one file per matcher of
    `matchers` (map_features.features_path; SIFT keeps max_features per image, a learned
    matcher its own number); the features files of the database replaced are removed either way.

    calibration: the map's record to store (build_calibration: --gsd-m, --grid-spacing-m,
    --covariance-scale); without a grid spacing the places' own is measured and recorded.
    """
    from taco_cvgl.mapdb.database import build_database
    from taco_cvgl.mapdb.distributed_db import check_count, leads_launch, plan_processes
    from taco_cvgl.model.embedder import ImageRetrievalModel
    out = Path(out)
    check_count('--batch-size', batch_size)
    check_count('--every', every)
    check_features(max_features)
    matchers = feature_matchers(matchers)
    _check_out(out, (weights, csv, bag), bag is not None)
    device, plan = plan_processes(device, precision, devices, accelerator, num_nodes, strategy,
                                  workers)
    if plan is None or leads_launch():
        records = _read_records(out, images, csv, bag, image_topic, gps_topic, every, progress)
        _refuse_input(out, (r.path for r in records))
    else:   # a further process of a multi-process build: rank 0 sends it the records
        records = None

    def report_skip(path, why):
        print(f'skipping {path}: {why}', file=sys.stderr)

    if plan is not None:
        from taco_cvgl.mapdb.distributed_db import build_database_parallel
        db = build_database_parallel(out, weights, records, plan, batch_size, dtype, skip_bad,
                                     progress, str(csv or images), report_skip)
        if db is not None and calibration is not None:   # merged and saved: add it
            _save(db, out, dtype, weights, calibration)
    else:
        model = ImageRetrievalModel.load(weights, device, precision)
        db = build_database(model, records, batch_size=batch_size, skip_bad=skip_bad,
                            progress=progress, source=str(csv or images), on_skip=report_skip)
        _save(db, out, dtype, weights, calibration)
    if db is not None:
        _replace_features(db, out, matchers if features else (), max_features, progress)
    return db


def build_calibration(gsd_m: Optional[float] = None, grid_spacing_m: Optional[float] = None,
                      covariance_scale: Optional[float] = None) -> Optional[MapCalibration]:
    """
    Return the calibration record of build-db's options (None: none given).

    Each given value must be a positive number of metres (a factor for covariance_scale);
    InputError names the flag otherwise.
    """
    given = {'gsd_m': gsd_m, 'grid_spacing_m': grid_spacing_m,
             'covariance_scale': covariance_scale}
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and value > 0)):
            raise InputError(f'--{name.replace("_", "-")} must be a positive number, got '
                             f'{value!r}')
    if all(value is None for value in given.values()):
        return None
    return MapCalibration(**{name: value for name, value in given.items() if value is not None})


def _save(db: EmbeddingDatabase, out: Path, dtype: str, weights,
          calibration: Optional[MapCalibration]) -> None:
    """Store the calibration in the database's meta and write it (InputError if it cannot)."""
    if calibration is not None:
        calibration.apply_to(db.meta)
    try:
        db.save(out, dtype=dtype, weights=weights)
    except OSError as exc:
        raise InputError(f'cannot write --out {out}: {exc.strerror or exc}; nothing was '
                         f'written there') from None


def add_features(db_path, max_features: int = RerankConfig.max_features,
                 progress: bool = True, matchers: Sequence[str] = ('sift',)
                 ) -> Tuple[List[Path], int]:
    """
    Write the verification features of the database at db_path beside it, from its images.

    One file per matcher of `matchers` (feature_matchers); the others' files are left as they
    are. Returns the paths written and the number of database entries they cover.
    """
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    check_features(max_features)
    matchers = feature_matchers(matchers)
    db = EmbeddingDatabase.load(db_path)
    return [_write_features(db, Path(db_path), max_features, progress, matcher)
            for matcher in matchers], len(db)


def check_features(max_features) -> None:
    """Refuse a --max-features that is not a whole number >= 0 (0: SIFT keeps every feature)."""
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 0:
        raise InputError(f'--max-features must be a whole number of 0 or more, got '
                         f'{max_features!r}')


def feature_matchers(values: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """
    Return the matchers whose features files to write, from --matcher's values (default sift).

    Each value is a matcher or a comma-separated list of them; repeats count once. A learned
    matcher must be installed (InputError saying how, before any work).
    """
    values = ['sift'] if values is None else [values] if isinstance(values, str) else values
    names = [name.strip() for value in values for name in str(value).split(',')]
    unknown = [name for name in names if name not in MATCHERS]
    if unknown or not names:
        raise InputError(f'--matcher takes {", ".join(MATCHERS)} (repeated or comma-separated), '
                         f'got {", ".join(map(repr, unknown or names)) or "nothing"}')
    from taco_cvgl.mapdb.map_features import detector_name
    for name in names:
        detector_name(name)
    return tuple(dict.fromkeys(names))


def _replace_features(db: EmbeddingDatabase, out: Path, matchers: Sequence[str],
                      max_features: int, progress: bool) -> None:
    """Remove the features files of the database just replaced; write those of `matchers`."""
    from taco_cvgl.mapdb.map_features import features_path
    for stale in (features_path(out, matcher) for matcher in MATCHERS):
        if stale.exists():  # it belongs to the previous database: the localizer would refuse it
            try:
                stale.unlink()
            except OSError as exc:
                raise InputError(f'wrote {out}, but cannot remove {stale}, the features of the '
                                 f'database it replaced: {exc.strerror or exc}; remove '
                                 f'it') from None
    for matcher in matchers:
        _write_features(db, out, max_features, progress, matcher)


def _write_features(db: EmbeddingDatabase, db_path: Path, max_features: int,
                    progress: bool, matcher: str) -> Path:
    """Write matcher's features file of a saved database, naming both files in any failure."""
    from taco_cvgl.mapdb.map_features import features_path, write_features
    try:
        return write_features(db, db_path, max_features, progress, matcher=matcher)
    except (InputError, OSError) as exc:
        why = exc if isinstance(exc, InputError) else (exc.strerror or exc)
        raise InputError(f'cannot write the {matcher} features of {db_path} to '
                         f'{features_path(db_path, matcher)}: {why}; {db_path} itself is '
                         f'complete') from None


def _check_out(out: Path, inputs: Iterable, from_bag: bool) -> None:
    """Refuse, before any work, an --out that would destroy an input or cannot be written."""
    if out.is_dir():
        raise InputError(f'--out {out} is a folder; give the database file to write, e.g. '
                         f'{out / "map.npz"}')
    _refuse_input(out, inputs)
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f'--out {out} cannot be written: {folder} is a file, not a folder')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f'--out {out} cannot be written: no permission to write in {folder}')
    images = Path(f'{out}.images')
    if from_bag and images.exists() and not images.is_dir():
        raise InputError(f'--out {out}: the images of the bag go to {images}, a file; '
                         f'move it or give another --out')


def _refuse_input(out: Path, inputs: Iterable) -> None:
    """Refuse an --out that is one of the inputs (the same file, however its path is spelt)."""
    try:
        target = os.stat(out)
    except OSError:
        return      # nothing there yet, so nothing to destroy
    for path in inputs:
        try:
            same = path is not None and os.path.samestat(os.stat(path), target)
        except OSError:
            continue
        if same:
            raise InputError(f'--out {out} is the input {path}: writing the database there '
                             f'would destroy it; give another --out')


def _read_records(out, images, csv, bag, image_topic, gps_topic, every, progress):
    """Return the image records of whichever source was given."""
    from taco_cvgl.mapdb.database import read_csv, records_from_bag, records_from_exif
    if bag is not None:
        if not (image_topic and gps_topic):
            raise InputError('a bag source needs --image-topic and --gps-topic')
        return records_from_bag(bag, image_topic, gps_topic, Path(str(out) + '.images'), every,
                                progress=progress)
    if csv is None and images is None:
        raise InputError('give --images DIR (EXIF GPS), --csv FILE or --bag BAG')
    return read_csv(csv, images) if csv else records_from_exif(images)
