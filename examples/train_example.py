#!/usr/bin/env python3
"""
Train the embedder on a small data folder, then localise its validation queries with it.

DATA_DIR holds two folders of images, each with an images.csv
(image_path,latitude,longitude[,heading][,altitude], paths relative to the folder):
  DATA_DIR/train/  several images per place (at least two within 25 m of each other)
  DATA_DIR/val/    held-out places: per place, the first image is the map (database) entry and
                   the others, at the same coordinates, are queries

Steps, each a plain function call you can reuse:
1. make_triplets: GPS -> anchor,positive,negative,place_label triplets (positives within 25 m,
   negatives beyond 100 m);
2. train: Lightning training with validation Recall@1/5/10 at 25 m; writes checkpoints,
   TensorBoard logs and OUT/weights.safetensors;
3. build a database of the validation map with the exported weights and score the queries.

    python examples/train_example.py DATA_DIR --out /tmp/taco_train --epochs 10
    tensorboard --logdir /tmp/taco_train/tb
"""

import argparse
from pathlib import Path
import sys

import numpy as np

from taco_cvgl.evaluation.recall import recall_at_k
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.mapdb.database import build_database, read_csv
from taco_cvgl.mapdb.search import make_index
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.training.data import make_triplets, split_database_queries
from taco_cvgl.training.run import train, TrainOptions


def run(data_dir: Path, out: Path, epochs: int, input_px: int, backbone: str,
        batch_size: int, resume: bool) -> dict:
    """Train on data_dir/train, validate on data_dir/val; return Recall@1/5 of the result."""
    train_dir, val_dir = data_dir / 'train', data_dir / 'val'
    # 1. Triplets from GPS (train() would also do this itself when given only --train-csv).
    summary = make_triplets(train_dir / 'images.csv', out / 'example_triplets.csv',
                            pos_radius_m=25.0, neg_radius_m=100.0, per_anchor=1, seed=0)
    print(f'{summary.triplets} triplets at {summary.places} places -> {summary.path}')
    # 2. Train. per_image normalisation suits training from scratch; with ImageNet weights
    # (--backbone imagenet) keep the default 'imagenet' normalisation.
    result = train(TrainOptions(
        out_dir=str(out / 'run'), train_dir=str(train_dir), train_triplets=str(summary.path),
        train_csv=str(train_dir / 'images.csv'), val_dir=str(val_dir),
        val_csv=str(val_dir / 'images.csv'), input_size=(input_px, input_px),
        normalization='per_image' if backbone == 'none' else 'imagenet',
        backbone_weights=backbone, batch_size=batch_size, max_epochs=epochs, lr=1e-3,
        warmup_epochs=1.0, rotate=True, seed=0, resume=resume))
    print(f'trained {result.epochs} epochs; untrained {result.initial_metrics}; '
          f'best {result.metrics}')
    # 3. The exported weights, as build-db and the node load them.
    model = ImageRetrievalModel.load(result.weights, device='cpu', precision='fp32')
    database, queries = split_database_queries(read_csv(val_dir / 'images.csv'))
    db = build_database(model, database, progress=False, source=str(val_dir))
    query_emb = model.encode_batch([load_image_file(q.path) for q in queries]).numpy()
    indices, _ = make_index(db.embeddings, 'exact').search(query_emb, 5)
    truth = np.array([[q.latitude, q.longitude] for q in queries])
    db_latlon = np.stack([db.latitude, db.longitude], axis=1)
    recall = recall_at_k(indices, truth, ks=(1, 5), threshold_m=25.0, db_latlon=db_latlon)
    print(f'{len(queries)} queries against {len(db)} map images: Recall@1 {recall[1]:.2f}, '
          f'Recall@5 {recall[5]:.2f} (weights {result.weights})')
    return recall


def main(argv=None) -> int:
    """Parse arguments and run the example."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data_dir', type=Path, help='folder with train/ and val/ (see above)')
    parser.add_argument('--out', type=Path, default=Path('taco_train_example'),
                        help='where the triplets and the run directory go')
    parser.add_argument('--epochs', type=int, default=10, help='training epochs')
    parser.add_argument('--input-px', type=int, default=64,
                        help='network input size (64 px trains fastest on a CPU)')
    parser.add_argument('--backbone', default='none',
                        help="initial backbone weights: 'none' (random), 'imagenet' or a file")
    parser.add_argument('--batch-size', type=int, default=16, help='triplets per step')
    parser.add_argument('--resume', action='store_true', help='continue a run in --out')
    args = parser.parse_args(argv)
    run(args.data_dir, args.out, args.epochs, args.input_px, args.backbone, args.batch_size,
        args.resume)
    return 0


if __name__ == '__main__':
    sys.exit(main())
