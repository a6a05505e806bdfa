"""What every command shares: turning a TacoError into a message and an exit code."""

from __future__ import annotations

import functools
import sys

from taco_cvgl.errors import TacoError

EXIT_USER_ERROR = 2


def reports_errors(main):
    """Wrap a `main(argv)` so a TacoError prints `taco-cvgl: error: ...` and exits with 2."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except TacoError as exc:
            print(f'taco-cvgl: error: {exc}', file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print('taco-cvgl: interrupted', file=sys.stderr)
            return 130
    return wrapper


def add_runtime_args(parser) -> None:
    """Add --device and --precision, shared by every command that runs the model."""
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='where the model runs (auto: CUDA when present)')
    parser.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'fp16', 'bf16'),
                        help='autocast precision (auto: fp16 on CUDA, fp32 on CPU)')
