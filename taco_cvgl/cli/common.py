"""What every command shares: error reporting, runtime flags and the localizer settings."""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path
import signal
import sys
import threading

from taco_cvgl.errors import TacoError
from taco_cvgl.localization import settings
from taco_cvgl.training.options import LIGHTNING_PRECISION

EXIT_USER_ERROR = 2
PRECISIONS = settings.PRECISIONS
PRECISION_METAVAR = '{auto,fp32,fp16,bf16}'
PRECISION_HELP = ('autocast precision (auto: fp16 on CUDA, fp32 on CPU); the Lightning names '
                  '32-true, 16-mixed and bf16-mixed are taken too')


def reports_errors(main):
    """
    Wrap a `main(argv)` so a TacoError prints `taco-cvgl: error: ...` and exits with 2.

    While it runs, SIGTERM and SIGHUP (at their default, which ends the process on the spot)
    raise SystemExit(128 + signal) instead, so `finally` blocks run: a command stopped mid-save
    removes its temporary file (atomic_path) and the file it was replacing stays intact.
    """
    @functools.wraps(main)
    def wrapper(argv=None):
        with _stop_signals_raise():
            try:
                return main(argv)
            except TacoError as exc:
                print(f'taco-cvgl: error: {exc}', file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print('taco-cvgl: interrupted', file=sys.stderr)
                return 130
    return wrapper


def _raise_exit(signum, frame):
    print(f'taco-cvgl: stopped by {signal.Signals(signum).name}', file=sys.stderr)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _stop_signals_raise():
    """Turn SIGTERM/SIGHUP left at their default into SystemExit while the block runs."""
    changed = {}
    if threading.current_thread() is threading.main_thread():
        for name in ('SIGTERM', 'SIGHUP'):
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:
                changed[signum] = signal.signal(signum, _raise_exit)
    try:
        yield
    finally:
        for signum, previous in changed.items():
            if signal.getsignal(signum) is _raise_exit:
                signal.signal(signum, previous)


def device_name(text: str) -> str:
    """Return a --device value checked as the node checks its device parameter."""
    pattern, words = settings.DEVICE_PATTERN
    if not pattern.fullmatch(text):
        raise argparse.ArgumentTypeError(f'must be {words}, got {text!r}')
    return text


def precision_name(text: str) -> str:
    """Return a --precision value as fp32/fp16/bf16/auto, Lightning's names mapped over."""
    names = {v: k for k, v in LIGHTNING_PRECISION.items()}
    value = names.get(text, text)
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f'must be one of {", ".join(PRECISIONS + tuple(names))}, got {text!r}')
    return value


def add_runtime_args(parser) -> None:
    """Add --device and --precision, shared by every command that runs the model."""
    parser.add_argument('--device', default='auto', type=device_name,
                        help='where the model runs: auto (CUDA when present), cpu, cuda or '
                             'cuda:N')
    parser.add_argument('--precision', default='auto', type=precision_name,
                        metavar=PRECISION_METAVAR, help=PRECISION_HELP)


def add_settings_args(parser) -> None:
    """
    Add --params-file and the localizer flags that override it (see `settings_from_args`).

    Each flag left out keeps the file's value, or the node's default without a file, so a CLI
    run with the node's params file localizes exactly as the node does.
    """
    group = parser.add_argument_group(
        'localizer settings', "the node's parameters (config/cvgl.yaml); flags override the file")
    group.add_argument('--params-file', type=Path, metavar='FILE',
                       help="the node's params file (ROS 2 YAML, '/**: ros__parameters:')")
    group.add_argument('--top-k', type=int, help='neighbours to retrieve (default 10)')
    group.add_argument('--min-confidence', type=float,
                       help='below this confidence a frame gets no fix (default 0.5)')
    group.add_argument('--index', choices=('auto', 'exact', 'hnsw', 'ivfpq'),
                       help='search index (auto: exact, approximate above 200k entries on CPU)')
    group.add_argument('--rerank', action=argparse.BooleanOptionalAction, default=None,
                       help='verify candidates geometrically and report only verified fixes '
                            '(default on; --no-rerank reports retrieval-only fixes)')
    group.add_argument('--fast-path', choices=settings.FAST_PATHS,
                       help='inference fast path, as the node parameter fast_path (default off)')
    group.add_argument('--device', type=device_name,
                       help='auto, cpu, cuda or cuda:N (default auto)')
    group.add_argument('--precision', type=precision_name, metavar=PRECISION_METAVAR,
                       help=PRECISION_HELP)


def settings_from_args(args, weights, database):
    """Return the NodeParams of --params-file with the given flags, weights and database."""
    return settings.settings(
        args.params_file, weights=str(weights) if weights else None,
        database=str(database) if database else None, top_k=args.top_k,
        min_confidence=args.min_confidence, index=args.index, rerank=args.rerank,
        fast_path=args.fast_path, device=args.device, precision=args.precision)
