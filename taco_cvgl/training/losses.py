"""
Metric-learning losses over L2-normalised embeddings, and the in-batch positive/negative masks.

Distances between embeddings are Euclidean on the unit sphere (0..2): d = sqrt(2 - 2 cos).
A batch holds B triplets flattened as 3B rows: anchors 0..B-1, positives B..2B-1, negatives
2B..3B-1. Which other rows count as positives or negatives comes from GPS where both rows have a
position (within pos_radius_m: positive; beyond neg_radius_m: negative; in between: neither), and
from place labels otherwise; the triplet structure itself always holds.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

from taco_cvgl.errors import InputError
import torch
import torch.nn as nn
import torch.nn.functional as F

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG); plenty for in-batch 25/100 m decisions
MINING = ('hard', 'none')


def pairwise_distance_m(latlon: torch.Tensor) -> torch.Tensor:
    """
    Return N x N metres between (latitude, longitude) degree rows; NaN where unknown.

    Equirectangular at each pair's mid-latitude: for pairs within a few kilometres (all that the
    radius decisions need) it agrees with the geodesic to well under 1 %.
    """
    rad = torch.deg2rad(latlon.double())
    lat, lon = rad[:, 0], rad[:, 1]
    dlat = lat[:, None] - lat[None, :]
    dlon = torch.remainder(lon[:, None] - lon[None, :] + math.pi, 2 * math.pi) - math.pi
    x = dlon * torch.cos((lat[:, None] + lat[None, :]) / 2)
    return (EARTH_RADIUS_M * torch.sqrt(x * x + dlat * dlat)).float()


def batch_masks(labels: torch.Tensor, latlon: torch.Tensor, pos_radius_m: float,
                neg_radius_m: float, triplets: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return (positive, negative) N x N bool masks for a batch; the diagonal is in neither.

    labels: N integer place labels; latlon: N x 2 degrees (NaN where unknown). With triplets = B
    > 0 the rows are 3B flattened triplets and anchor/positive pairs are forced positive,
    anchor/negative and positive/negative pairs forced negative.
    """
    n = labels.shape[0]
    same = labels[:, None] == labels[None, :]
    dist = pairwise_distance_m(latlon)
    known = torch.isfinite(dist)
    pos = torch.where(known, dist <= pos_radius_m, same)
    neg = torch.where(known, dist > neg_radius_m, ~same)
    if triplets:
        b = triplets
        if n != 3 * b:
            raise InputError(f'batch of {n} rows is not {b} triplets')
        idx = torch.arange(b, device=labels.device)
        a, p, q = idx, idx + b, idx + 2 * b
        for i, j in ((a, p), (p, a)):
            pos[i, j], neg[i, j] = True, False
        for i, j in ((a, q), (q, a), (p, q), (q, p)):
            pos[i, j], neg[i, j] = False, True
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    return pos & ~eye, neg & ~eye


def embedding_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the Euclidean distance matrix between rows of two L2-normalised sets."""
    sim = (x @ y.T).clamp(-1.0, 1.0)
    return torch.sqrt((2.0 - 2.0 * sim).clamp_min(1e-12))


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Return mean max(0, d(a, p) - d(a, n) + margin) over the given triplets."""
    d_ap = torch.sqrt((2.0 - 2.0 * (anchor * positive).sum(1)).clamp_min(1e-12))
    d_an = torch.sqrt((2.0 - 2.0 * (anchor * negative).sum(1)).clamp_min(1e-12))
    return F.relu(d_ap - d_an + margin).mean()


def batch_hard_triplet_loss(emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                            margin: float) -> torch.Tensor:
    """
    Return the batch-hard triplet loss (Hermans et al. 2017) under the given masks.

    Each row with at least one positive and one negative is an anchor: its farthest positive
    against its closest negative.
    """
    dist = embedding_distance(emb, emb)
    usable = pos.any(1) & neg.any(1)
    if not usable.any():
        return emb.sum() * 0.0
    hardest_pos = torch.where(pos, dist, torch.zeros_like(dist)).max(1).values
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, 4.0)).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[usable].mean()


def info_nce_loss(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                  negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """
    Return the InfoNCE loss: each query must pick its target key among its negatives.

    queries Q x D, keys K x D, targets Q indices into keys, negatives Q x K bool (which keys count
    against the query; keys that are neither target nor negative are left out of the softmax).
    """
    logits = queries @ keys.T / temperature
    keep = negatives.clone()
    keep[torch.arange(len(targets), device=targets.device), targets] = True
    logits = logits.masked_fill(~keep, float('-inf'))
    return F.cross_entropy(logits, targets)


def multi_similarity_loss(emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                          alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                          epsilon: float = 0.1) -> torch.Tensor:
    """
    Return the multi-similarity loss (Wang et al. 2019) with its pair mining.

    A negative pair is kept when its similarity exceeds the row's hardest positive minus
    epsilon; a positive pair when it falls below the row's hardest negative plus epsilon.
    """
    sim = emb @ emb.T
    big = torch.finfo(sim.dtype).max
    hardest_pos = torch.where(pos, sim, torch.full_like(sim, big)).min(1, keepdim=True).values
    hardest_neg = torch.where(neg, sim, torch.full_like(sim, -big)).max(1, keepdim=True).values
    keep_neg = neg & (sim + epsilon > hardest_pos)
    keep_pos = pos & (sim - epsilon < hardest_neg)
    zero = torch.zeros_like(sim)
    pos_term = torch.log1p(torch.where(keep_pos, torch.exp(-alpha * (sim - base)),
                                       zero).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(keep_neg, torch.exp(beta * (sim - base)),
                                       zero).sum(1)) / beta
    rows = pos.any(1) & neg.any(1)
    if not rows.any():
        return emb.sum() * 0.0
    return (pos_term + neg_term)[rows].mean()


class RetrievalLoss(nn.Module):
    """Weighted triplet + InfoNCE (+ optional multi-similarity) loss over a batch of triplets."""

    def __init__(self, triplet_weight: float = 1.0, infonce_weight: float = 0.5,
                 ms_weight: float = 0.0, margin: float = 0.1, temperature: float = 0.07,
                 mining: str = 'hard', pos_radius_m: float = 25.0, neg_radius_m: float = 100.0):
        """Keep the weights; mining 'hard' = hardest in batch, 'none' = the given triplets."""
        super().__init__()
        if mining not in MINING:
            raise InputError(f'mining must be one of {MINING}, got {mining!r}')
        if min(triplet_weight, infonce_weight, ms_weight) < 0 or \
                triplet_weight + infonce_weight + ms_weight <= 0:
            raise InputError('loss weights must be >= 0 and not all zero')
        if temperature <= 0 or margin < 0:
            raise InputError(f'temperature ({temperature}) must be > 0 and margin ({margin}) '
                             f'>= 0')
        self.triplet_weight, self.infonce_weight = triplet_weight, infonce_weight
        self.ms_weight, self.margin, self.temperature = ms_weight, margin, temperature
        self.mining, self.pos_radius_m, self.neg_radius_m = mining, pos_radius_m, neg_radius_m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                latlon: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return {'loss', 'triplet', 'infonce', 'ms'} for the 3B rows (a, p, n)."""
        b = emb.shape[0] // 3
        pos, neg = batch_masks(labels, latlon, self.pos_radius_m, self.neg_radius_m, b)
        anchors, positives, negatives = emb[:b], emb[b:2 * b], emb[2 * b:]
        parts = {}
        if self.mining == 'hard':
            parts['triplet'] = batch_hard_triplet_loss(emb, pos, neg, self.margin)
        else:
            parts['triplet'] = triplet_loss(anchors, positives, negatives, self.margin)
        # InfoNCE both ways: anchor -> {positives, negatives} and positive -> {anchors, negatives}.
        targets = torch.arange(b, device=emb.device)
        keys_a = torch.cat([positives, negatives])
        keys_p = torch.cat([anchors, negatives])
        cols_a = torch.arange(b, 3 * b, device=emb.device)
        cols_p = torch.cat([targets, cols_a[b:]])
        parts['infonce'] = 0.5 * (
            info_nce_loss(anchors, keys_a, targets, neg[:b][:, cols_a], self.temperature)
            + info_nce_loss(positives, keys_p, targets, neg[b:2 * b][:, cols_p],
                            self.temperature))
        parts['ms'] = (multi_similarity_loss(emb, pos, neg) if self.ms_weight > 0
                       else emb.sum() * 0.0)
        parts['loss'] = (self.triplet_weight * parts['triplet']
                         + self.infonce_weight * parts['infonce'] + self.ms_weight * parts['ms'])
        return parts
