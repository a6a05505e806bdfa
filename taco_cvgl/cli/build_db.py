"""
taco-cvgl build-db: embed a folder of GPS-tagged images into a database file.

Beside the database it writes the images' verification features (OUT stem + .features.npz,
mapdb/map_features.py), so that the map verifies fixes without its images; --features-only adds
them to a database built before.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
from typing import Iterable, Optional, Tuple, TYPE_CHECKING

from taco_cvgl.cli.common import add_runtime_args, reports_errors
from taco_cvgl.errors import InputError
from taco_cvgl.localization.rerank import RerankConfig

if TYPE_CHECKING:   # torch loads in seconds: not before the arguments are parsed
    from taco_cvgl.mapdb.database import EmbeddingDatabase


def build_db(out, weights, images=None, csv=None, device: str = 'auto',
             precision: str = 'auto', batch_size: int = 32, dtype: str = 'fp16',
             skip_bad: bool = False, progress: bool = True, bag=None,
             image_topic: Optional[str] = None, gps_topic: Optional[str] = None,
             every: int = 1, devices: int = 1, accelerator: str = 'auto', num_nodes: int = 1,
             strategy: str = 'auto', workers: Optional[int] = None, features: bool = True,
             max_features: int = RerankConfig.max_features) -> Optional[EmbeddingDatabase]:
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

    features: then write the images' SIFT features (max_features per image) beside the database
    (map_features.features_path); a features file of the database replaced is removed either way.
    """
    from taco_cvgl.mapdb.database import build_database
    from taco_cvgl.mapdb.distributed_db import check_count, leads_launch, plan_processes
    from taco_cvgl.model.embedder import ImageRetrievalModel
    out = Path(out)
    check_count('--batch-size', batch_size)
    check_count('--every', every)
    check_features(max_features)
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
    else:
        model = ImageRetrievalModel.load(weights, device, precision)
        db = build_database(model, records, batch_size=batch_size, skip_bad=skip_bad,
                            progress=progress, source=str(csv or images), on_skip=report_skip)
        try:
            db.save(out, dtype=dtype, weights=weights)
        except OSError as exc:
            raise InputError(f'cannot write --out {out}: {exc.strerror or exc}; nothing was '
                             f'written there') from None
    if db is not None:
        _replace_features(db, out, features, max_features, progress)
    return db


def add_features(db_path, max_features: int = RerankConfig.max_features,
                 progress: bool = True) -> Tuple[Path, int]:
    """
    Write the verification features of the database at db_path beside it, from its images.

    Returns the path written and the number of database entries it covers.
    """
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    check_features(max_features)
    db = EmbeddingDatabase.load(db_path)
    return _write_features(db, Path(db_path), max_features, progress), len(db)


def check_features(max_features) -> None:
    """Refuse a --max-features that is not a whole number >= 0 (0: SIFT keeps every feature)."""
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 0:
        raise InputError(f'--max-features must be a whole number of 0 or more, got '
                         f'{max_features!r}')


def _replace_features(db: EmbeddingDatabase, out: Path, features: bool, max_features: int,
                      progress: bool) -> None:
    """Remove the features file of the database just replaced; write the new one if asked."""
    from taco_cvgl.mapdb.map_features import features_path
    stale = features_path(out)
    if stale.exists():      # it belongs to the previous database: the localizer would refuse it
        try:
            stale.unlink()
        except OSError as exc:
            raise InputError(f'wrote {out}, but cannot remove {stale}, the features of the '
                             f'database it replaced: {exc.strerror or exc}; remove it') from None
    if features:
        _write_features(db, out, max_features, progress)


def _write_features(db: EmbeddingDatabase, db_path: Path, max_features: int,
                    progress: bool) -> Path:
    """Write the features file of a saved database, naming both files in any failure."""
    from taco_cvgl.mapdb.map_features import features_path, write_features
    try:
        return write_features(db, db_path, max_features, progress)
    except (InputError, OSError) as exc:
        why = exc if isinstance(exc, InputError) else (exc.strerror or exc)
        raise InputError(f'cannot write the features of {db_path} to {features_path(db_path)}: '
                         f'{why}; {db_path} itself is complete') from None


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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `taco-cvgl build-db`."""
    parser = argparse.ArgumentParser(prog='taco-cvgl build-db', description=__doc__)
    parser.add_argument('--images', type=Path,
                        help='image folder (relative CSV paths are taken from here)')
    parser.add_argument('--csv', type=Path,
                        help='CSV with image_path,latitude,longitude[,heading][,altitude]; '
                             "without it, positions come from the images' EXIF GPS tags")
    parser.add_argument('--bag', type=Path,
                        help='rosbag2 (MCAP or sqlite3) source instead of image files')
    parser.add_argument('--image-topic', help='camera topic of --bag (Image or CompressedImage)')
    parser.add_argument('--gps-topic', help='sensor_msgs/NavSatFix topic of --bag')
    parser.add_argument('--every', type=int, default=1,
                        help='with --bag, keep one image in this many')
    parser.add_argument('--out', type=Path, help='database file to write (.npz); required')
    parser.add_argument('--weights', type=Path,
                        help='model weights (.safetensors from taco-cvgl train, or a .ckpt); '
                             'required')
    parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    parser.add_argument('--dtype', default='fp16', choices=('fp16', 'fp32'),
                        help='storage type of the embeddings (fp16: 1 KB per 512-D entry)')
    parser.add_argument('--skip-bad', action='store_true',
                        help='skip unreadable images (counted) instead of stopping')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    add_runtime_args(parser)
    features = parser.add_argument_group(
        'verification features', "the images' SIFT features, written beside the database "
        '(OUT stem + .features.npz) so that geometric verification needs no images')
    features.add_argument('--no-features', action='store_true',
                          help='write the database only (verification then reads the images)')
    features.add_argument('--max-features', type=int, default=RerankConfig.max_features,
                          help="features kept per image; must equal the localizer's "
                               'max_features (0: all)')
    features.add_argument('--features-only', action='store_true',
                          help='embed nothing: write the features file of the existing --db')
    features.add_argument('--db', type=Path, help='with --features-only: the database file')
    scale = parser.add_argument_group(
        'several processes', 'embed with Lightning DDP over several GPUs (or CPU processes) and '
        'machines, then merge into one database; on several machines start the same command '
        'on each (MASTER_ADDR, MASTER_PORT, NODE_RANK set, or under torchrun / SLURM) with the '
        'images, weights and --out folder on storage they all share')
    scale.add_argument('--devices', type=int, default=1,
                       help='processes per machine, one per GPU with --accelerator gpu')
    scale.add_argument('--accelerator', default='auto', choices=('auto', 'cpu', 'gpu'),
                       help='what each process runs on (auto: as --device says)')
    scale.add_argument('--num-nodes', type=int, default=1, help='machines taking part')
    scale.add_argument('--strategy', default='auto', choices=('auto', 'ddp', 'ddp_spawn'),
                       help="how processes start: 'ddp' runs this command again per process "
                            "(auto), 'ddp_spawn' starts them from Python")
    scale.add_argument('--workers', type=int, default=None,
                       help='image-decoding worker processes per process (default: the CPUs '
                            'shared out, at most 4)')
    return parser


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments and build the database."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.features_only:
        return _features_only(parser, args)
    if args.db is not None:
        parser.error('--db is read by --features-only; to build a database give --out')
    if args.out is None or args.weights is None:
        parser.error('the following arguments are required: '
                     + ', '.join(f for f, v in (('--out', args.out), ('--weights', args.weights))
                                 if v is None))
    db = build_db(args.out, args.weights, args.images, args.csv, args.device, args.precision,
                  args.batch_size, args.dtype, args.skip_bad, not args.no_progress, args.bag,
                  args.image_topic, args.gps_topic, args.every, devices=args.devices,
                  accelerator=args.accelerator, num_nodes=args.num_nodes,
                  strategy=args.strategy, workers=args.workers,
                  features=not args.no_features, max_features=args.max_features)
    if db is None:      # a further process of a multi-process build; rank 0 reports
        return 0
    print(f'wrote {args.out}: {len(db)} images, {db.dim}-D, model {db.model_fingerprint}, '
          f'grid spacing {db.grid_spacing_m:.1f} m, {db.meta.get("skipped", 0)} skipped')
    if not args.no_features:
        _report_features(args.out, len(db), 'with its verification features')
    return 0


def _features_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run `build-db --features-only --db DB`: refuse the options of a build, then write."""
    building = [flag for flag, value in (('--out', args.out), ('--weights', args.weights),
                                         ('--images', args.images), ('--csv', args.csv),
                                         ('--bag', args.bag), ('--no-features', args.no_features))
                if value]
    if building:
        parser.error(f'--features-only writes the features of --db and builds nothing: '
                     f'{", ".join(building)} cannot go with it')
    if args.db is None:
        parser.error('--features-only needs --db, the database file')
    _, entries = add_features(args.db, args.max_features, not args.no_progress)
    _report_features(args.db, entries, 'wrote')
    return 0


def _report_features(db_path: Path, entries: int, what: str) -> None:
    """Print the size of the features file of db_path, in all and per entry."""
    from taco_cvgl.mapdb.map_features import features_path
    path = features_path(db_path)
    size = path.stat().st_size
    print(f'{what} {path}: {size / 1e6:.1f} MB, {size / max(entries, 1) / 1e3:.0f} kB per image')


if __name__ == '__main__':
    sys.exit(main())
