"""
taco-cvgl build-db: embed a folder of GPS-tagged images into a database file.

Beside the database it writes the images' verification features, one file per --matcher (sift:
OUT stem + .features.npz; aliked_lightglue or disk_lightglue: OUT stem + .MATCHER.features.npz;
mapdb/map_features.py), so that the map verifies fixes with that matcher without its images;
--features-only adds them to a database built before. --gsd-m, --grid-spacing-m and
--covariance-scale are stored as the map's calibration (mapdb/map_calibration.py); `taco-cvgl
calibrate` adds the error models fitted on a flight.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Optional

from taco_cvgl.cli.common import add_runtime_args, reports_errors
from taco_cvgl.localization.rerank import MATCHERS, RerankConfig
from taco_cvgl.mapdb.build import add_features, build_calibration, build_db, feature_matchers


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
        'verification features', "the images' local features, written beside the database "
        '(one file per matcher) so that geometric verification needs no images')
    features.add_argument('--no-features', action='store_true',
                          help='write the database only (verification then reads the images)')
    features.add_argument('--matcher', action='append', metavar='M',
                          help=f'whose features to write: {", ".join(MATCHERS)}; repeat it or '
                               'give a comma list for several files (default sift); the '
                               'localizer reads the file of its rerank_matcher')
    features.add_argument('--max-features', type=int, default=RerankConfig.max_features,
                          help="SIFT features kept per image; must equal the localizer's "
                               'max_features (0: all)')
    features.add_argument('--features-only', action='store_true',
                          help='embed nothing: write the features files (--matcher) of the '
                               'existing --db')
    features.add_argument('--db', type=Path, help='with --features-only: the database file')
    calibration = parser.add_argument_group(
        'map calibration', 'stored with the map (its meta); taco-cvgl calibrate fits the error '
        'models on a flight')
    calibration.add_argument('--gsd-m', type=float, metavar='M',
                             help='ground size of one map-image pixel, metres: places a verified '
                                  "fix within its tile (without it, at the tile's centre)")
    calibration.add_argument('--grid-spacing-m', type=float, metavar='M',
                             help='typical distance between neighbouring places, metres '
                                  '(default: measured from the positions and recorded)')
    calibration.add_argument('--covariance-scale', type=float, metavar='F',
                             help="factor on the retrieval estimate's covariance (default 1)")
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
    if args.no_features and args.matcher:
        parser.error('--matcher chooses the features files to write, and --no-features writes '
                     'none')
    matchers = feature_matchers(args.matcher)
    calibration = build_calibration(args.gsd_m, args.grid_spacing_m, args.covariance_scale)
    db = build_db(args.out, args.weights, args.images, args.csv, args.device, args.precision,
                  args.batch_size, args.dtype, args.skip_bad, not args.no_progress, args.bag,
                  args.image_topic, args.gps_topic, args.every, devices=args.devices,
                  accelerator=args.accelerator, num_nodes=args.num_nodes,
                  strategy=args.strategy, workers=args.workers,
                  features=not args.no_features, max_features=args.max_features,
                  calibration=calibration, matchers=matchers)
    if db is None:      # a further process of a multi-process build; rank 0 reports
        return 0
    gsd = db.calibration.gsd_m
    print(f'wrote {args.out}: {len(db)} images, {db.dim}-D, model {db.model_fingerprint}, '
          f'grid spacing {db.grid_spacing_m:.1f} m'
          + ('' if gsd is None else f', ground pixel {gsd:g} m')
          + f', {db.meta.get("skipped", 0)} skipped')
    if not args.no_features:
        _report_features(args.out, len(db), 'with its verification features', matchers)
    return 0


def _features_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run `build-db --features-only --db DB`: refuse the options of a build, then write."""
    building = [flag for flag, value in (('--out', args.out), ('--weights', args.weights),
                                         ('--images', args.images), ('--csv', args.csv),
                                         ('--bag', args.bag), ('--no-features', args.no_features),
                                         ('--gsd-m', args.gsd_m is not None),
                                         ('--grid-spacing-m', args.grid_spacing_m is not None),
                                         ('--covariance-scale',
                                          args.covariance_scale is not None))
                if value]
    if building:
        parser.error(f'--features-only writes the features of --db and builds nothing: '
                     f'{", ".join(building)} cannot go with it')
    if args.db is None:
        parser.error('--features-only needs --db, the database file')
    matchers = feature_matchers(args.matcher)
    _, entries = add_features(args.db, args.max_features, not args.no_progress, matchers)
    _report_features(args.db, entries, 'wrote', matchers)
    return 0


def _report_features(db_path: Path, entries: int, what: str, matchers) -> None:
    """Print the size of each matcher's features file of db_path, in all and per entry."""
    from taco_cvgl.mapdb.map_features import features_path
    for matcher in matchers:
        path = features_path(db_path, matcher)
        size = path.stat().st_size
        print(f'{what} {path}: {size / 1e6:.1f} MB, {size / max(entries, 1) / 1e3:.0f} kB per '
              f'image')


if __name__ == '__main__':
    sys.exit(main())
