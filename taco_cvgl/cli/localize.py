"""
taco-cvgl localize: print the GPS estimate of each image file.

--heading-deg gives every image the robot's heading (degrees clockwise from true north) as a
prior, with --heading-sigma-deg (default: orientation_sigma_deg of the settings), as the node
takes one from orientation_topic.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import sys
from typing import Iterator, List, Optional, TYPE_CHECKING

from taco_cvgl.cli.common import add_settings_args, reports_errors, settings_from_args
from taco_cvgl.errors import InputError
from taco_cvgl.files.image_codec import load_image_file, MAX_IMAGE_PIXELS
from taco_cvgl.localization.heading import HeadingPrior
from taco_cvgl.localization.orientation import MAX_SIGMA_DEG
from taco_cvgl.localization.settings import defaults

if TYPE_CHECKING:   # torch loads in seconds: not before the arguments are parsed
    from taco_cvgl.localization.localizer import CVGLLocalizer, Measurement


def localize_files(localizer: CVGLLocalizer, images: List[Path],
                   max_pixels: int = MAX_IMAGE_PIXELS,
                   heading: Optional[HeadingPrior] = None) -> Iterator[tuple]:
    """
    Yield (path, Measurement or InputError) for each image; one bad file stops nothing.

    heading: the prior every image gets (None: none). The images are unrelated photos, so each
    is localized alone (track=None): no motion track carries a position or a heading from one
    to the next.

    Whatever fails on one file (a decoder's or the model's own exception included) becomes that
    file's InputError; only KeyboardInterrupt and the like stop the run.
    """
    for path in images:
        try:
            yield path, localizer.localize(load_image_file(path, max_pixels), heading=heading,
                                           track=None)
        except InputError as exc:
            yield path, exc
        except Exception as exc:  # noqa: B902 - the next file must still be localized
            yield path, InputError(f'{path}: cannot localize it: {type(exc).__name__}: {exc}')


def format_text(path: Path, m: Measurement) -> str:
    """Return one human-readable line for a measurement."""
    sigma = math.sqrt(max(m.position_covariance[0, 0], m.position_covariance[1, 1]))
    state = 'FIX' if m.fix else 'no fix'
    heading = '' if not math.isfinite(m.heading) else f' heading {m.heading:.1f} deg'
    return (f'{path}: {state} {m.latitude:.6f}, {m.longitude:.6f} (sigma {sigma:.0f} m)'
            f'{heading} confidence {m.confidence:.2f} best {m.matches[0].image_id}')


def heading_prior(heading_deg: Optional[float], sigma_deg: Optional[float],
                  default_sigma_deg: float) -> Optional[HeadingPrior]:
    """Return the prior of --heading-deg and --heading-sigma-deg; InputError naming the flag."""
    if heading_deg is None:
        if sigma_deg is not None:
            raise InputError('--heading-sigma-deg needs --heading-deg (the heading it is the '
                             'uncertainty of)')
        return None
    sigma = default_sigma_deg if sigma_deg is None else sigma_deg
    if not math.isfinite(heading_deg):
        raise InputError(f'--heading-deg must be a finite number of degrees clockwise from '
                         f'north, got {heading_deg}')
    if not (math.isfinite(sigma) and 0 < sigma <= MAX_SIGMA_DEG):
        raise InputError(f'--heading-sigma-deg must be a number of degrees in (0, '
                         f'{MAX_SIGMA_DEG:g}], got {sigma}')
    return HeadingPrior(float(heading_deg), float(sigma))


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, localize each image, print a line (or JSON object) per image."""
    parser = argparse.ArgumentParser(prog='taco-cvgl localize', description=__doc__)
    parser.add_argument('images', nargs='+', type=Path, help='image files')
    parser.add_argument('--db', type=Path, required=True, help='database built by build-db')
    parser.add_argument('--weights', type=Path, required=True, help='the weights that built it')
    parser.add_argument('--json', action='store_true', help='one JSON object per line')
    parser.add_argument('--heading-deg', type=float, metavar='H',
                        help="the robot's heading, degrees clockwise from true north: a prior "
                             'for every image (default: none)')
    parser.add_argument('--heading-sigma-deg', type=float, metavar='S',
                        help='1-sigma uncertainty of --heading-deg in degrees (default: '
                             'orientation_sigma_deg of the settings, '
                             f'{defaults()["orientation_sigma_deg"]:g})')
    add_settings_args(parser)
    args = parser.parse_args(argv)
    params = settings_from_args(args, args.weights, args.db)
    heading = heading_prior(args.heading_deg, args.heading_sigma_deg,
                            params.orientation_sigma_deg)
    from taco_cvgl.localization.localizer import CVGLLocalizer
    localizer = CVGLLocalizer.from_settings(params)
    failures = 0
    for path, result in localize_files(localizer, args.images, params.max_image_pixels,
                                       heading):
        if isinstance(result, InputError):
            failures += 1
            print(f'taco-cvgl: error: {result}', file=sys.stderr)
            if args.json:
                print(json.dumps({'image': str(path), 'error': str(result)}), flush=True)
            continue
        if args.json:  # strict JSON: to_dict gives null for every missing number
            print(json.dumps({'image': str(path), **result.to_dict()}, allow_nan=False),
                  flush=True)
        else:
            print(format_text(path, result), flush=True)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
