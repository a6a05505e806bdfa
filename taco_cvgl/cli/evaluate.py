"""
taco-cvgl evaluate: score the localizer on a bag, a recorded run, or retrieval on a dataset.

Three ways in, one set of metrics (see taco_cvgl.evaluation.scoring for their definitions):

- a bag with camera images and ground-truth NavSatFix: every image goes through the same
  CVGLLocalizer the node runs (needs --db and --weights), with the heading prior of the
  orientation topic nearest its stamp as the node matches it (--orientation-topic, or the
  params file's orientation_topic)::

      taco-cvgl evaluate --bag drive.mcap --image-topic /camera/image_raw --gt-topic /gps/fix
          --db map.npz --weights model.safetensors --out eval/

- a bag recorded from the live node (its estimates beside the ground truth), as `ros2 bag
  record` captures it on a robot; no model is needed, and Recall@k is not available::

      taco-cvgl evaluate --bag run1 --estimate-topic /cvgl/fix --gt-topic /gps/fix --out eval/

- a dataset in the VPR benchmarks' layout (database and query images whose file names carry
  their positions, or CSVs): retrieval alone, Recall@N at --threshold-m::

      taco-cvgl evaluate --database-folder pitts30k/test/database
          --queries-folder pitts30k/test/queries --weights model.safetensors --out eval/

Each writes metrics.json (atomically, last), frames.csv (one row per frame) and PNG pictures into
--out. A run that is interrupted, meets frames it cannot localize, or stops early writes what it
scored with "complete": false.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Optional

from taco_cvgl.cli.common import add_settings_args, reports_errors, settings_from_args
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.ground_truth import VPR_NAME
from taco_cvgl.evaluation.report import EvaluationResult, format_summary, load_background
from taco_cvgl.evaluation.retrieval import DEFAULT_RECALL_VALUES, evaluate_folders
from taco_cvgl.evaluation.runs import (check_recall_values, evaluate_bag_with_settings,
                                       evaluate_recorded)
from taco_cvgl.evaluation.scoring import DEFAULT_KS


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `taco-cvgl evaluate`."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl evaluate', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bag', type=Path,
                        help='rosbag2 (directory, .mcap or .db3; MCAP or sqlite3) to evaluate')
    parser.add_argument('--gt-topic',
                        help='ground-truth sensor_msgs/NavSatFix topic of the bag '
                             '(interpolated in time)')
    parser.add_argument('--gt-bag', type=Path,
                        help='read the ground truth from this bag instead of --bag')
    parser.add_argument('--image-topic',
                        help='camera topic (Image or CompressedImage): localize each image; '
                             'with --estimate-topic, only counted for the fix share')
    parser.add_argument('--estimate-topic',
                        help='score this recorded estimate topic (NavSatFix or '
                             'GeoPoseWithCovarianceStamped) instead of running the localizer')
    parser.add_argument('--db', type=Path, help='database built by build-db (needed to '
                        'localize; with --estimate-topic, drawn under the track)')
    parser.add_argument('--weights', type=Path, help='the weights that built the database')
    parser.add_argument('--out', type=Path, required=True,
                        help='folder for metrics.json, frames.csv and the plots')
    parser.add_argument('--threshold-m', type=float, default=25.0,
                        help='distance (m) within which a retrieved place counts as a hit '
                             '(default 25)')
    parser.add_argument('--fix-threshold-m', type=float,
                        help='distance (m) within which a fix counts as precise (default: '
                             '--threshold-m)')
    parser.add_argument('--max-gt-gap-s', type=float, default=1.0,
                        help='largest time (s) from a frame to the ground-truth fixes around '
                             'it; frames further away count as without ground truth '
                             '(default 1.0)')
    parser.add_argument('--gt-heading-topic',
                        help='ground-truth heading: geometry_msgs/QuaternionStamped or '
                             'sensor_msgs/Imu orientation (ENU); without it no heading error')
    parser.add_argument('--orientation-topic',
                        help='heading prior of the robot: sensor_msgs/Imu or '
                             'geometry_msgs/QuaternionStamped orientation (ENU), matched to '
                             'each image by time as the node does (default: orientation_topic '
                             'of --params-file; an empty string for none)')
    parser.add_argument('--camera-yaw-deg', type=float, default=0.0,
                        help='camera mounting yaw relative to the robot (deg, CCW positive)')
    parser.add_argument('--max-frames', type=int,
                        help='stop after this many images (the result is marked incomplete)')
    parser.add_argument('--grid-rows', type=int, default=6,
                        help='queries shown in the retrieval grid (0: no grid; default 6)')
    parser.add_argument('--map-image', type=Path,
                        help='image drawn under the track plot (north up), with --map-extent')
    parser.add_argument('--map-extent', type=float, nargs=4,
                        metavar=('WEST', 'EAST', 'SOUTH', 'NORTH'),
                        help='longitudes and latitudes (deg) of the --map-image edges')
    parser.add_argument('--no-plots', action='store_true',
                        help='write metrics.json and frames.csv only, no pictures')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    parser.add_argument('--recall-values', type=int, nargs='+', metavar='N',
                        help='the N of Recall@N (default 1 5 10; 1 5 10 20 on a dataset)')
    dataset = parser.add_argument_group(
        'dataset folders', 'score retrieval on a VPR dataset instead of a bag (needs --weights): '
        f'each side a folder of images named {VPR_NAME} (position from lat/lon, else UTM), or '
        'a CSV image_path,latitude,longitude[,heading] as build-db reads')
    dataset.add_argument('--database-folder', type=Path, metavar='DIR',
                         help='database images (relative --database-csv paths start here)')
    dataset.add_argument('--queries-folder', type=Path, metavar='DIR',
                         help='query images (relative --queries-csv paths start here)')
    dataset.add_argument('--database-csv', type=Path, metavar='FILE',
                         help='positions of the database images, instead of their file names')
    dataset.add_argument('--queries-csv', type=Path, metavar='FILE',
                         help='positions of the query images, instead of their file names')
    dataset.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    add_settings_args(parser)
    return parser


def _dataset(args, scoring: dict) -> EvaluationResult:
    """Run evaluate_folders with the flags (weights, device and precision as the node reads)."""
    bag_flags = [flag for flag, value in (('--bag', args.bag), ('--estimate-topic',
                                                                args.estimate_topic))
                 if value is not None]
    if bag_flags:
        raise InputError(f'{", ".join(bag_flags)} and the dataset folders are two different '
                         f'evaluations; give one')
    params = settings_from_args(args, args.weights, None)
    if not params.weights:
        raise InputError('evaluating a dataset needs --weights (the model that embeds both '
                         'sides)')
    return evaluate_folders(
        params.weights, args.out, args.database_folder, args.queries_folder,
        database_csv=args.database_csv, queries_csv=args.queries_csv,
        recall_values=args.recall_values or DEFAULT_RECALL_VALUES, device=params.device,
        precision=params.precision, batch_size=args.batch_size, grid_rows=args.grid_rows,
        **scoring)


def evaluate(args) -> EvaluationResult:
    """Run the evaluation the flags choose: dataset folders, a recorded bag or a camera bag."""
    background = load_background(args.map_image, args.map_extent)
    scoring = {'threshold_m': args.threshold_m, 'progress': not args.no_progress,
               'plots': not args.no_plots}
    dataset = (args.database_folder, args.database_csv, args.queries_folder, args.queries_csv)
    if any(value is not None for value in dataset):
        return _dataset(args, scoring)
    if args.bag is None or args.gt_topic is None:
        raise InputError('give a bag with ground truth (--bag BAG --gt-topic TOPIC) or a '
                         'dataset (--database-folder DIR --queries-folder DIR)')
    scoring.update(gt_bag=args.gt_bag, gt_heading_topic=args.gt_heading_topic,
                   fix_threshold_m=args.fix_threshold_m, max_gt_gap_s=args.max_gt_gap_s,
                   background=background)
    if args.estimate_topic:
        if args.orientation_topic:
            raise InputError('--orientation-topic feeds the localizer; a recorded bag '
                             '(--estimate-topic) is scored without running it')
        return evaluate_recorded(args.bag, args.estimate_topic, args.gt_topic, args.out,
                                 image_topic=args.image_topic, db=args.db, **scoring)
    params = settings_from_args(args, args.weights, args.db)
    missing = [flag for flag, value in (('--image-topic', args.image_topic),
                                        ('--db', params.database),
                                        ('--weights', params.weights)) if not value]
    if missing:
        raise InputError(f'evaluating a camera bag needs {", ".join(missing)} (or give '
                         f'--estimate-topic to score a bag recorded from the node)')
    return evaluate_bag_with_settings(
        args.bag, args.image_topic, args.gt_topic, params, args.out,
        orientation_topic=args.orientation_topic, camera_yaw_deg=args.camera_yaw_deg,
        max_frames=args.max_frames, grid_rows=args.grid_rows,
        ks=check_recall_values(args.recall_values or DEFAULT_KS), **scoring)


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, evaluate, print a summary; exit 0 complete, 1 incomplete, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    result = evaluate(args)
    print(format_summary(result.metrics))
    print(f'wrote {result.paths["metrics"]} and {len(result.paths) - 1} more file(s) in '
          f'{args.out}')
    return result.exit_status()


if __name__ == '__main__':
    sys.exit(main())
