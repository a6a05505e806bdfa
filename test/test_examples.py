"""The design's examples run as a user runs them."""

from pathlib import Path
import subprocess
import sys

from taco_cvgl.geo.geodesy import distance_m
from taco_cvgl.mapdb.database import EmbeddingDatabase

ROOT = Path(__file__).resolve().parents[1]


def test_build_and_query_example(small_map):
    queries = [small_map.images_dir / 'place_02.png', small_map.images_dir / 'place_06.png']
    run = subprocess.run([sys.executable, str(ROOT / 'examples' / 'build_and_query.py'),
                          str(small_map.weights), str(small_map.images_dir),
                          str(small_map.csv), *map(str, queries)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2
    for line, query in zip(lines, queries):
        _, lat, lon = small_map.places[int(query.stem[-2:])]
        assert line.startswith(f'{query}: ') and f'best={query.name}' in line
        fields = dict(item.split('=') for item in line.split(': ', 1)[1].split())
        # A sparse map: the estimate blends the nearby places but stays within their spacing.
        spacing = EmbeddingDatabase.load(small_map.db).grid_spacing_m
        assert distance_m(float(fields['lat']), float(fields['lon']), lat, lon) < spacing
