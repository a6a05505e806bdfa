"""
Build a database from GPS-tagged images, then localize query images against it.

Usage: python examples/build_and_query.py WEIGHTS IMAGES_DIR CSV QUERY_IMAGE [QUERY_IMAGE ...]

This is the design's second example, written against the package's Python API: the same
CVGLLocalizer that the ROS node and the bag evaluation use.
"""

from pathlib import Path
import sys
import tempfile

from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.mapdb.database import build_database, read_csv
from taco_cvgl.model.embedder import ImageRetrievalModel


def main(weights, images_dir, csv_path, queries):
    """Build the database into a temporary file and print one estimate per query."""
    model = ImageRetrievalModel.load(weights, device='auto')
    database = build_database(model, read_csv(csv_path, images_dir), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / 'map.npz'
        database.save(db_path)
        localizer = CVGLLocalizer(model, LocalizerConfig(top_k=3))
        localizer.load_map(db_path)
        for query in queries:
            m = localizer.localize(load_image_file(query), timestamp=0.0)
            best = m.matches[0]
            print(f'{query}: fix={m.fix} lat={m.latitude:.6f} lon={m.longitude:.6f} '
                  f'confidence={m.confidence:.2f} best={Path(best.image_id).name} '
                  f'similarity={best.similarity:.3f}')


if __name__ == '__main__':
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
