"""
taco-cvgl train: train the embedder with PyTorch Lightning and export weights for the node.

A run directory OUT holds: run.json (the options), train_triplets.csv (when generated from GPS),
mined_triplets.csv (after hard-negative re-mining), checkpoints/best.ckpt and last.ckpt,
tb/ (TensorBoard) and weights.safetensors (fp16, what `build-db` and the node load); with
--simulate-views, map_views/ (simulated camera views of the map's tiles, see
taco_cvgl.training.map_views).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
import sys
import typing
from typing import Optional

from taco_cvgl.cli.common import precision_name, reports_errors
from taco_cvgl.errors import InputError
from taco_cvgl.training.options import load_config_file, TrainOptions
from taco_cvgl.training.run import train


# Further names of some flags: those of the design document.
FLAG_ALIASES = {'train_dir': ('--train-data-dir',), 'val_dir': ('--val-data-dir',),
                'out_dir': ('--output-dir',)}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser, one flag per TrainOptions field."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl train', description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', type=Path,
                        help='YAML or JSON file of option: value (names as below, with '
                             'underscores or hyphens); command-line flags override it')
    parser.add_argument('--make-triplets', type=Path, metavar='FILE',
                        help='only write triplets generated from --train-csv to FILE, then exit')
    hints = typing.get_type_hints(TrainOptions)
    for field in dataclasses.fields(TrainOptions):
        meta = dict(field.metadata)
        flag = meta.pop('flag', '--' + field.name.replace('_', '-'))
        help_ = meta.pop('help')
        if _value_type(hints[field.name]) is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_)
            continue
        value_type = precision_name if field.name == 'precision' else \
            _value_type(hints[field.name])
        parser.add_argument(flag, *FLAG_ALIASES.get(field.name, ()), dest=field.name,
                            type=value_type,
                            default=field.default, help=help_, **meta)
    return parser


def _value_type(hint) -> type:
    """Return the type one command-line value converts to: int for Tuple[int, int] etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _value_type(args[0]) if args else hint


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments (config file first, flags over it) and train."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config_file(first.config))
    args = vars(parser.parse_args(argv))
    args.pop('config')
    triplets_out = args.pop('make_triplets')
    opts = TrainOptions(**args)
    if triplets_out:
        from taco_cvgl.training.data import make_triplets
        if not opts.train_csv or opts.simulate_views:
            raise InputError('--make-triplets needs --train-csv, without --simulate-views')
        summary = make_triplets(opts.train_csv, triplets_out, opts.pos_radius_m,
                                opts.neg_radius_m, opts.max_heading_diff_deg,
                                opts.triplets_per_anchor, opts.seed,
                                opts.train_dir or None)
        print(f'wrote {summary.triplets} triplets ({summary.anchors} anchors, {summary.places} '
              f'places; {summary.without_positive} images without a positive, '
              f'{summary.without_negative} without a negative) to {summary.path}')
        return 0
    result = train(opts)
    if result.weights is None:      # a further process of a multi-device run
        return 0
    print(f'done: {result.epochs} epochs, {result.global_step} steps; weights {result.weights}; '
          f'best checkpoint {result.best_checkpoint}; metrics {result.metrics}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
