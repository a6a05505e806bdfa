"""Losses and in-batch masks: known answers, masking, and that a gradient step lowers the loss."""

import math

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import distance_m, from_enu
from taco_cvgl.training.losses import (batch_hard_triplet_loss, batch_masks, info_nce_loss,
                                       multi_similarity_loss, pairwise_distance_m,
                                       RetrievalLoss, triplet_loss)
import torch
import torch.nn.functional as F

LAT0, LON0 = -25.4, -54.5    # the demo scene's area


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def _points(east_north):
    lat, lon = from_enu(LAT0, LON0, *np.asarray(east_north, float).T)
    return torch.tensor(np.stack([lat, lon], 1))


def test_pairwise_distance_agrees_with_the_geodesic():
    east_north = [(0, 0), (10, 0), (0, 30), (70, -80), (900, 400), (-3000, 2500)]
    latlon = _points(east_north).numpy()
    ours = pairwise_distance_m(torch.tensor(latlon)).numpy()
    i, j = np.triu_indices(len(latlon), 1)
    geodesic = distance_m(latlon[i, 0], latlon[i, 1], latlon[j, 0], latlon[j, 1])
    np.testing.assert_allclose(ours[i, j], geodesic, rtol=5e-3)
    assert np.all(np.diag(ours) == 0)


def test_masks_from_gps_labels_and_triplet_structure():
    # Rows 0..5 as two triplets (anchors 0,1; positives 2,3; negatives 4,5), plus a GPS-less
    # case below. Anchor 0 and anchor 1 are 10 m apart: the GPS says they are one place even
    # though their labels differ; negative 5 is 60 m from anchor 0: neither pos nor neg.
    east_north = [(0, 0), (10, 0), (3, 0), (12, 0), (500, 0), (60, 0)]
    labels = torch.tensor([0, 1, 0, 1, 2, 3])
    pos, neg = batch_masks(labels, _points(east_north), 25.0, 100.0, triplets=2)
    assert pos[0, 1] and pos[1, 0] and pos[0, 2] and pos[0, 3]
    assert not neg[0, 1]
    assert not pos[0, 5] and not neg[0, 5]           # 60 m: in the ignored band
    assert neg[0, 4] and neg[4, 0] and neg[2, 4]
    # The triplet structure wins over GPS: triplet 1's negative (row 5) is 50 m from its anchor.
    assert neg[1, 5] and not pos[1, 5] and neg[3, 5]
    assert not pos.diagonal().any() and not neg.diagonal().any()
    # Without GPS, labels decide.
    nan = torch.full((6, 2), math.nan, dtype=torch.float64)
    pos, neg = batch_masks(labels, nan, 25.0, 100.0)
    assert pos[0, 2] and not pos[0, 1] and neg[0, 1] and neg[0, 4]


def test_triplet_loss_known_answers():
    a = _unit([[1, 0], [1, 0]])
    p = _unit([[1, 0], [0, 1]])
    n = _unit([[0, 1], [1, 0]])
    # Triplet 0 is satisfied (d_ap = 0, d_an = sqrt 2); triplet 1 is reversed.
    expected = (0.0 + (math.sqrt(2) - 0.0 + 0.1)) / 2
    assert triplet_loss(a, p, n, 0.1).item() == pytest.approx(expected, abs=1e-4)


def test_batch_hard_takes_farthest_positive_and_closest_negative():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(8, 16), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pos = (labels[:, None] == labels[None]) & ~torch.eye(8, dtype=torch.bool)
    neg = labels[:, None] != labels[None]
    dist = torch.cdist(emb, emb)
    expected = []
    for i in range(8):
        hardest_pos = dist[i][pos[i]].max()
        hardest_neg = dist[i][neg[i]].min()
        expected.append(F.relu(hardest_pos - hardest_neg + 0.3))
    loss = batch_hard_triplet_loss(emb, pos, neg, 0.3)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)


def test_info_nce_ignores_masked_keys():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(3, 8), dim=1)
    keys = F.normalize(torch.randn(6, 8), dim=1)
    targets = torch.tensor([0, 1, 2])
    negatives = torch.ones(3, 6, dtype=torch.bool)
    negatives[0, 3] = False                         # key 3 is not a negative of query 0
    loss = info_nce_loss(q, keys, targets, negatives, 0.1)
    logits = q @ keys.T / 0.1
    logits[0, 3] = -float('inf')
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-5)
    # Moving the masked key onto query 0 changes nothing for query 0.
    keys2 = keys.clone()
    keys2[3] = q[0]
    row0 = info_nce_loss(q[:1], keys2, targets[:1], negatives[:1], 0.1)
    assert row0.item() == pytest.approx(info_nce_loss(q[:1], keys, targets[:1],
                                                      negatives[:1], 0.1).item(), abs=1e-5)


def test_multi_similarity_is_zero_when_easy_and_positive_when_confused():
    easy = _unit([[1, 0], [1, 0], [0, 1], [0, 1]])
    labels = torch.tensor([0, 0, 1, 1])
    pos = (labels[:, None] == labels[None]) & ~torch.eye(4, dtype=torch.bool)
    neg = labels[:, None] != labels[None]
    assert multi_similarity_loss(easy, pos, neg).item() == pytest.approx(0.0, abs=1e-6)
    confused = _unit([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert multi_similarity_loss(confused, pos, neg).item() > 0.1


def test_combined_loss_weights_and_a_gradient_step_lowers_it():
    torch.manual_seed(2)
    b = 6
    emb = torch.randn(3 * b, 32, requires_grad=True)
    labels = torch.cat([torch.arange(b), torch.arange(b), torch.arange(b) + 100])
    nan = torch.full((3 * b, 2), math.nan, dtype=torch.float64)
    loss_fn = RetrievalLoss(triplet_weight=1.0, infonce_weight=0.5, ms_weight=0.25)
    parts = loss_fn(F.normalize(emb, dim=1), labels, nan)
    expected = parts['triplet'] + 0.5 * parts['infonce'] + 0.25 * parts['ms']
    assert parts['loss'].item() == pytest.approx(expected.item(), rel=1e-6)
    optimiser = torch.optim.SGD([emb], lr=0.5)
    first = parts['loss'].item()
    for _ in range(20):
        optimiser.zero_grad()
        loss = loss_fn(F.normalize(emb, dim=1), labels, nan)['loss']
        loss.backward()
        optimiser.step()
    assert loss_fn(F.normalize(emb, dim=1), labels, nan)['loss'].item() < 0.5 * first
    given = RetrievalLoss(mining='none')(F.normalize(emb, dim=1), labels, nan)['triplet']
    a, p, n = F.normalize(emb, dim=1).split(b)
    assert given.item() == pytest.approx(triplet_loss(a, p, n, 0.1).item(), abs=1e-6)


@pytest.mark.parametrize('kwargs', [{'mining': 'semi'}, {'temperature': 0.0},
                                    {'triplet_weight': 0.0, 'infonce_weight': 0.0},
                                    {'margin': -1.0}])
def test_bad_loss_settings_are_refused(kwargs):
    with pytest.raises(InputError):
        RetrievalLoss(**kwargs)
