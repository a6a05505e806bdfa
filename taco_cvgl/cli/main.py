"""taco-cvgl: one entry point that dispatches to each tool's `main`."""

from __future__ import annotations

import importlib
from pathlib import Path
import sys
from typing import Optional

# command -> module under taco_cvgl.cli (imported only when used: torch loads slowly)
COMMANDS = {
    'build-db': ('build_db', 'embed GPS-tagged images into a database'),
    'localize': ('localize', 'estimate the GPS position of image files'),
    'train': ('train', 'train the embedder (PyTorch Lightning)'),
    'evaluate': ('evaluate', 'score the localizer on a rosbag2, or retrieval on a dataset'),
    'calibrate': ('calibrate', "fit a map's error models on a flight with ground truth"),
    'replay': ('replay', 'play a rosbag2 into live ROS topics, optionally recording'),
    'demo': ('demo', 'run the built-in demo on real Landsat-8 imagery'),
}
# Commands that left the package: each says where it went (scripts may still call it).
MOVED = {
    'bench': 'run python benchmarks/bench.py from a source checkout',
}


def version() -> str:
    """Return the installed release: package metadata, else the package.xml beside the code."""
    from importlib import metadata
    try:
        return metadata.version('taco_cvgl')
    except metadata.PackageNotFoundError:   # run from a source tree that was never installed
        import xml.etree.ElementTree as ElementTree
        package_xml = Path(__file__).resolve().parents[2] / 'package.xml'
        try:
            return ElementTree.parse(package_xml).findtext('version', 'unknown').strip()
        except (OSError, ElementTree.ParseError):
            return 'unknown'


def usage() -> str:
    """Return the top-level help text."""
    lines = ['usage: taco-cvgl COMMAND [options]   (taco-cvgl COMMAND --help for options)',
             '       taco-cvgl --version', '', 'commands:']
    lines += [f'  {name:<10} {help_}' for name, (_, help_) in COMMANDS.items()]
    return '\n'.join(lines)


def main(argv: Optional[list] = None) -> int:
    """Run `taco-cvgl COMMAND ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(usage())
        return 0 if argv else 2
    if argv[0] == '--version':
        print(f'taco-cvgl {version()}')
        return 0
    command, rest = argv[0], argv[1:]
    if command in MOVED:
        print(f'taco-cvgl: {command} moved: {MOVED[command]}', file=sys.stderr)
        return 2
    if command not in COMMANDS:
        print(f'taco-cvgl: unknown command {command!r}\n\n{usage()}', file=sys.stderr)
        return 2
    module = importlib.import_module(f'taco_cvgl.cli.{COMMANDS[command][0]}')
    return module.main(rest)


if __name__ == '__main__':
    sys.exit(main())
