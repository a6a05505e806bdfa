"""
taco-cvgl calibrate: fit a map's error models on a flight with ground truth and store them.

Every image of the bag with ground truth goes through the localizer the settings make (as
`taco-cvgl evaluate` runs it, one motion track for the flight). The verified fixes fit the
covariance and confidence models of the map's fixes, the frames no candidate verified the rate
at which their retrieval estimate was right anyway (localization/calibrate.py)::

    taco-cvgl calibrate --db map.npz --weights model.safetensors --bag flight.mcap
        --image-topic /camera/image_raw --gt-topic /gps/fix --orientation-topic /imu

The calibrated database replaces --db (or goes to --out), written atomically once the fit is
done: a failure leaves the map as it was. Its verification features stay valid.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Optional

from taco_cvgl.cli.common import add_settings_args, reports_errors, settings_from_args
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.runs import calibration_frames
from taco_cvgl.localization.calibrate import calibrate_map, format_report


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `taco-cvgl calibrate`."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl calibrate', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--db', type=Path, help='database built by build-db (required)')
    parser.add_argument('--weights', type=Path, help='the weights that built it (required)')
    parser.add_argument('--bag', type=Path, required=True,
                        help='the calibration flight: rosbag2 (directory, .mcap or .db3)')
    parser.add_argument('--image-topic', required=True,
                        help='camera topic of --bag (Image or CompressedImage)')
    parser.add_argument('--gt-topic', required=True,
                        help='ground-truth sensor_msgs/NavSatFix topic (interpolated in time)')
    parser.add_argument('--gt-bag', type=Path,
                        help='read the ground truth from this bag instead of --bag')
    parser.add_argument('--max-gt-gap-s', type=float, default=1.0,
                        help='largest time (s) from an image to the ground truth around it; '
                             'images further away are left out (default 1.0)')
    parser.add_argument('--orientation-topic',
                        help='heading prior: sensor_msgs/Imu or geometry_msgs/QuaternionStamped '
                             '(default: orientation_topic of --params-file; an empty string '
                             'for none)')
    parser.add_argument('--out', type=Path,
                        help='write the calibrated database here (default: replace --db)')
    add_settings_args(parser)
    return parser


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, fit the calibration on the flight, write the map, print the models."""
    args = build_parser().parse_args(argv)
    params = settings_from_args(args, args.weights, args.db)
    missing = [flag for flag, value in (('--db', params.database),
                                        ('--weights', params.weights)) if not value]
    if missing:
        raise InputError(f'calibrating a map needs {" and ".join(missing)}')
    topic = params.orientation_topic if args.orientation_topic is None else args.orientation_topic
    frames = calibration_frames(args.bag, args.image_topic, args.gt_topic, gt_bag=args.gt_bag,
                                max_gt_gap_s=args.max_gt_gap_s, orientation_topic=topic or None,
                                orientation_sigma_deg=params.orientation_sigma_deg,
                                orientation_max_age_s=params.orientation_max_age_s)
    calibration, report, written = calibrate_map(params, frames, args.out)
    print(format_report(calibration, report, args.bag))
    print(f'wrote {written}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
