"""
Retrieval on a dataset in the VPR benchmarks' layout: each query ranks the database images.

Both sides are embedded with the same weights (in build-db's format, so the database side
serves the node as it is) and ranked exactly; Recall@N counts the queries with a database image
within the threshold (evaluation.scoring.retrieval_summary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, TYPE_CHECKING

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.evaluation.ground_truth import dataset_records
from taco_cvgl.evaluation.report import EvaluationResult, grid_picks, grid_rows_of, write_outputs
from taco_cvgl.evaluation.runs import check_recall_values, check_thresholds
from taco_cvgl.evaluation.scoring import (frame_table, FrameResult, FrameTable,
                                          positives_within, retrieval_frames, retrieval_summary,
                                          SCHEMA)

if TYPE_CHECKING:   # torch loads in seconds: not before it is needed
    from taco_cvgl.mapdb.database import ImageRecord

DEFAULT_RECALL_VALUES = (1, 5, 10, 20)


def evaluate_folders(weights, out_dir, database=None, queries=None, *, database_csv=None,
                     queries_csv=None, threshold_m: float = 25.0,
                     recall_values: Sequence[int] = DEFAULT_RECALL_VALUES,
                     device: str = 'auto', precision: str = 'auto', batch_size: int = 32,
                     grid_rows: int = 6, progress: bool = True,
                     plots: bool = True) -> EvaluationResult:
    """
    Score image retrieval on a dataset: every query ranks the database images by embedding.

    Each side is a folder of images named in the VPR convention (VPR_NAME) or a CSV; the
    ranking is exact (inner product of the embeddings). Recall@N counts the queries with a
    database image within threshold_m; those without one are counted apart (see
    evaluation.retrieval_summary). Writes database.npz and queries.npz (the embeddings, fp32,
    in build-db's format: the database one serves the node as it is), frames.csv (one row per
    query), the error CDF and retrieval grid pictures (unless plots is False) and last
    metrics.json into out_dir.
    """
    check_thresholds(threshold_m, None, 1.0)
    ks = check_recall_values(recall_values)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f'--out {out} is a file; give the folder to write metrics.json into')
    sources = {'database': (database, database_csv), 'queries': (queries, queries_csv)}
    records = {side: dataset_records(*where, side) for side, where in sources.items()}
    db, q, ranking, timing = _embed_and_rank(weights, records, sources, max(ks), device,
                                             precision, batch_size, progress)
    db_latlon = np.stack([db.latitude, db.longitude], axis=1)
    q_latlon = np.stack([q.latitude, q.longitude], axis=1)
    frames = retrieval_frames(q_latlon, q.heading, q.image_ids, db_latlon, db.heading,
                              db.image_ids, ranking)
    table = frame_table(frames, threshold_m)
    positive = positives_within(q_latlon, db_latlon, threshold_m)
    inputs = {'database_folder': database, 'database_csv': database_csv,
              'queries_folder': queries, 'queries_csv': queries_csv, 'weights': str(weights),
              'database_images': len(db), 'query_images': len(q),
              'model_fingerprint': db.model_fingerprint, 'search': 'exact',
              'recall_values': list(ks)}
    metrics = {'schema': SCHEMA, 'mode': 'retrieval', 'complete': True, 'stopped': None,
               'inputs': {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()},
               **retrieval_summary(frames, positive, threshold_m, ks, len(db), table),
               'timing_s': timing, 'warnings': []}
    if not positive.any():
        metrics['warnings'].append(f'no query has a database image within {threshold_m:g} m')
    saved = {f'{name}_embeddings': _save_embeddings(part, out / f'{name}.npz', weights)
             for name, part in (('database', db), ('queries', q))}
    grid = _query_grid(frames, table, threshold_m, grid_rows) if plots else []
    paths = write_outputs(out, metrics, frames, table, threshold_m, (db.latitude, db.longitude),
                          None, grid, plots, saved)
    return EvaluationResult(metrics, paths)


def _query_grid(frames: Sequence[FrameResult], table: FrameTable, threshold_m: float,
                rows: int) -> list:
    """Return the retrieval grid's rows of queries spread over the dataset (files read here)."""
    from taco_cvgl.evaluation.plots import thumbnail
    from taco_cvgl.files.image_codec import load_image_file
    thumbs = {i: thumbnail(load_image_file(frames[i].image))
              for i in grid_picks(len(frames), rows)}
    return grid_rows_of(frames, thumbs, table, threshold_m, rows)


def _embed_and_rank(weights, records: Dict[str, List[ImageRecord]], sources: Dict[str, tuple],
                    k: int, device: str, precision: str, batch_size: int, progress: bool):
    """Return (database, queries, Q x k ranking, timing_s): both sides embedded, then ranked."""
    import time
    from taco_cvgl.mapdb.database import build_database
    from taco_cvgl.mapdb.search import ExactIndex
    from taco_cvgl.model.embedder import ImageRetrievalModel
    model = ImageRetrievalModel.load(weights, device, precision)
    timing: Dict[str, float] = {}
    sides = {}
    for side, (folder, csv_file) in sources.items():
        start = time.perf_counter()
        sides[side] = build_database(model, records[side], batch_size=batch_size,
                                     progress=progress, source=str(csv_file or folder))
        timing[f'embed_{side}'] = time.perf_counter() - start
    db, q = sides['database'], sides['queries']
    start = time.perf_counter()
    ranking, _ = ExactIndex(db.embeddings, str(model.device)).search(q.embeddings, k)
    timing['search'] = time.perf_counter() - start
    return db, q, ranking, timing


def _save_embeddings(part, path: Path, weights) -> Path:
    """Write one side's embeddings (fp32: exactly what was ranked) in build-db's format."""
    try:
        return part.save(path, dtype='fp32', weights=weights)
    except OSError as exc:
        raise InputError(f'cannot write {path}: {exc.strerror or exc}') from None
