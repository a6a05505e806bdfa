"""
Recall@k at a distance threshold: the place-recognition score, pure numpy.

A query counts as found at k when any of its first k retrieved database entries lies within
`threshold_m` metres (geodesic, WGS84) of the query's true position. This is the score of the
place-recognition literature (Recall@N at 25 m on Pittsburgh, Tokyo 24/7, MSLS), used by the
training's validation and by the evaluation tool alike.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np

from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import distance_m


def retrieved_positions(retrieved, db_latlon: Optional[np.ndarray] = None) -> np.ndarray:
    """
    Return Q x K x 2 (latitude, longitude) degrees of retrieved entries.

    retrieved is either Q x K x 2 positions already, or Q x K integer indices into db_latlon
    (N x 2). Negative indices (an approximate index that found fewer than K) give NaN, a miss.
    """
    retrieved = np.asarray(retrieved)
    if retrieved.ndim == 3 and retrieved.shape[2] == 2:
        return retrieved.astype(float)
    if retrieved.ndim != 2:
        raise InputError(f'retrieved must be Q x K indices or Q x K x 2 positions, got shape '
                         f'{retrieved.shape}')
    if not np.issubdtype(retrieved.dtype, np.integer):
        raise InputError(f'retrieved indices must be integers, got {retrieved.dtype}')
    if db_latlon is None:
        raise InputError('retrieved indices need db_latlon, the N x 2 database positions')
    db_latlon = np.asarray(db_latlon, dtype=float)
    if db_latlon.ndim != 2 or db_latlon.shape[1] != 2:
        raise InputError(f'db_latlon must be N x 2, got shape {db_latlon.shape}')
    if retrieved.size and retrieved.max() >= len(db_latlon):
        raise InputError(f'retrieved index {retrieved.max()} is beyond the {len(db_latlon)} '
                         f'database entries')
    out = np.full(retrieved.shape + (2,), np.nan)
    found = retrieved >= 0
    out[found] = db_latlon[retrieved[found]]
    return out


def hits_within(retrieved, true_latlon: np.ndarray, threshold_m: float = 25.0,
                db_latlon: Optional[np.ndarray] = None) -> np.ndarray:
    """Return a Q x K bool matrix: is retrieved entry j of query i within threshold_m metres."""
    positions = retrieved_positions(retrieved, db_latlon)
    truth = np.asarray(true_latlon, dtype=float)
    if truth.shape != (positions.shape[0], 2):
        raise InputError(f'true_latlon must be Q x 2 with Q = {positions.shape[0]} queries, got '
                         f'shape {truth.shape}')
    if not np.isfinite(truth).all():
        raise InputError('true_latlon holds NaN or infinite positions')
    if threshold_m <= 0:
        raise InputError(f'threshold_m must be positive, got {threshold_m}')
    if positions.shape[1] == 0:
        return np.zeros(positions.shape[:2], bool)
    known = np.isfinite(positions).all(axis=2)
    dist = np.full(positions.shape[:2], np.inf)
    lat = np.broadcast_to(truth[:, None, 0], known.shape)[known]
    lon = np.broadcast_to(truth[:, None, 1], known.shape)[known]
    dist[known] = distance_m(lat, lon, positions[..., 0][known], positions[..., 1][known])
    return dist <= threshold_m


def recall_at_k(retrieved, true_latlon: np.ndarray, ks: Iterable[int] = (1, 5, 10),
                threshold_m: float = 25.0, db_latlon: Optional[np.ndarray] = None
                ) -> Dict[int, float]:
    """
    Return {k: share of queries with a retrieved entry within threshold_m among the first k}.

    retrieved: Q x K indices into db_latlon (N x 2) or Q x K x 2 retrieved positions, best
    first; true_latlon: Q x 2 true query positions, degrees. Every k must be <= K.
    """
    hits = hits_within(retrieved, true_latlon, threshold_m, db_latlon)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > hits.shape[1]:
        raise InputError(f'ks {ks} must lie in 1..{hits.shape[1]} (the number retrieved)')
    if hits.shape[0] == 0:
        raise InputError('no queries to score')
    first_k = np.cumsum(hits, axis=1) > 0
    return {k: float(first_k[:, k - 1].mean()) for k in ks}


def top1_errors_m(retrieved, true_latlon: np.ndarray,
                  db_latlon: Optional[np.ndarray] = None) -> np.ndarray:
    """Return each query's distance in metres to its first retrieved entry (inf if none)."""
    positions = retrieved_positions(retrieved, db_latlon)[:, 0]
    truth = np.asarray(true_latlon, dtype=float)
    known = np.isfinite(positions).all(axis=1)
    errors = np.full(len(positions), np.inf)
    errors[known] = distance_m(truth[known, 0], truth[known, 1], positions[known, 0],
                               positions[known, 1])
    return errors
