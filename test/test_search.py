"""Exact and approximate search against a numpy brute force."""

from conftest import brute_force_topk
import faiss
import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.mapdb.search import ExactIndex, FaissIndex, make_index
import torch


def recall_at_k(found, truth, k):
    """Return the share of rows whose exact top-1 appears among the first k found indices."""
    return float(np.mean([truth[i, 0] in found[i, :k] for i in range(len(found))]))


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_index_equals_brute_force_across_chunks():
    db = unit_rows(3000, 64, 0)
    queries = unit_rows(40, 64, 1)
    index = ExactIndex(db, 'cpu')
    found, sims = index.search(queries, 10)
    truth, truth_sims = brute_force_topk(queries, db, 10)
    assert np.array_equal(found, truth)
    assert np.allclose(sims, truth_sims, atol=1e-5)
    # Force many small blocks: merging the top-k across blocks must give the same answer.
    index.max_block = 40 * 7
    found_small, sims_small = index.search(queries, 10)
    assert np.array_equal(found_small, truth)
    assert np.allclose(sims_small, truth_sims, atol=1e-5)


def test_the_bfloat16_first_pass_gives_the_fp32_answer_among_near_copies():
    # 300 places, each with 20 near-copies (cosine about 0.995 to their place): their scores
    # differ by less than bfloat16's rounding, so a bfloat16 ranking alone gets them wrong.
    rng = np.random.default_rng(11)
    places = unit_rows(300, 128, 9)
    copies = np.repeat(places, 20, axis=0) + 0.01 * rng.normal(size=(6000, 128))
    db = (copies / np.linalg.norm(copies, axis=1, keepdims=True)).astype(np.float32)
    queries = db[rng.choice(6000, 30, replace=False)] + 0.02 * unit_rows(30, 128, 10)
    truth, truth_sims = brute_force_topk(queries, db, 10)
    rounded = torch.tensor(db).bfloat16().double().numpy() @ \
        torch.tensor(queries).bfloat16().double().numpy().T
    assert not np.array_equal(np.argsort(-rounded.T, axis=1)[:, :10], truth)
    for kind in (torch.bfloat16, torch.float16):
        index = ExactIndex(db, 'cpu', coarse=kind)
        assert index.first_pass['one'].dtype == index.first_pass['many'].dtype == kind
        assert index.nbytes == 6000 * 128 * (4 + 2)       # one copy serves both
        for max_block in (ExactIndex.max_block, 30 * 700):     # one block, then nine
            index.max_block = max_block
            found, sims = index.search(queries, 10)
            assert np.array_equal(found, truth), kind
            assert np.allclose(sims, truth_sims, atol=1e-5)
            for row in (0, 17):                             # one query: the 'one' copy
                alone, _ = index.search(queries[row], 10)
                assert np.array_equal(alone[0], truth[row])
    # Small maps skip it: their fp32 search takes microseconds.
    assert ExactIndex(db, 'cpu').first_pass == {}


def test_hnsw_recall_is_high():
    db = unit_rows(5000, 64, 2)
    queries = db[:200] + 0.05 * unit_rows(200, 64, 3)
    truth, _ = brute_force_topk(queries, db, 10)
    found, sims = FaissIndex(db, 'hnsw').search(queries, 10)
    assert recall_at_k(found, truth, 1) >= 0.98
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # sorted by decreasing similarity


def test_ivfpq_finds_the_true_neighbour_among_its_candidates():
    db = unit_rows(10000, 64, 4)
    queries = db[:300] + 0.1 * unit_rows(300, 64, 5)
    truth, _ = brute_force_topk(queries, db, 1)
    index = FaissIndex(db, 'ivfpq', pq_bytes=16, nprobe=32)
    found, _ = index.search(queries, 10)
    assert recall_at_k(found, truth, 10) >= 0.9
    # The codes are taken after a learned rotation (OPQ), and nprobe reaches the lists.
    rotation = faiss.downcast_VectorTransform(faiss.downcast_index(index.index).chain.at(0))
    assert isinstance(rotation, faiss.OPQMatrix) and rotation.M == 16
    assert faiss.extract_index_ivf(index.index).nprobe == 32


def test_make_index_choices_and_errors():
    db = unit_rows(100, 16, 6)
    assert isinstance(make_index(db, 'auto'), ExactIndex)
    assert isinstance(make_index(db, 'hnsw'), FaissIndex)
    with pytest.raises(InputError, match='empty'):
        make_index(db[:0], 'exact')
    with pytest.raises(InputError, match='index kind'):
        make_index(db, 'lsh')
    with pytest.raises(InputError, match='at least'):
        make_index(db, 'ivfpq', pq_bytes=8)


def test_approximate_index_is_kept_beside_the_database_and_rebuilt_when_stale(tmp_path, caplog):
    db = unit_rows(4000, 64, 7)
    queries = db[:50] + 0.05 * unit_rows(50, 64, 8)
    prefix = str(tmp_path / 'map.npz')
    built = make_index(db, 'hnsw', cache_prefix=prefix)
    assert built.loaded_from is None and (tmp_path / 'map.npz.hnsw.faiss').is_file()
    again = make_index(db, 'hnsw', cache_prefix=prefix)
    assert again.loaded_from == tmp_path / 'map.npz.hnsw.faiss'
    for a, b in zip(built.search(queries, 10), again.search(queries, 10)):
        assert np.array_equal(a, b)
    # Other embeddings (the database was rebuilt) or other options: built again, not reused.
    changed = db.copy()
    changed[1234] = unit_rows(1, 64, 9)[0]
    assert make_index(changed, 'hnsw', cache_prefix=prefix).loaded_from is None
    assert make_index(changed, 'hnsw', cache_prefix=prefix, ef_search=64).loaded_from is None
    # A damaged cache file is a warning and a rebuild, never an error.
    (tmp_path / 'map.npz.hnsw.faiss').write_bytes(b'not an index')
    index = make_index(changed, 'hnsw', cache_prefix=prefix, ef_search=64)
    assert index.loaded_from is None and 'unreadable' in caplog.text
    # Where the database's folder cannot be written, the index still works.
    blocked = tmp_path / 'file_not_folder'
    blocked.write_text('')
    index = make_index(db, 'hnsw', cache_prefix=str(blocked / 'map.npz'))
    assert index.loaded_from is None and 'could not keep' in caplog.text
    truth, _ = brute_force_topk(queries, db, 1)
    assert recall_at_k(index.search(queries, 10)[0], truth, 1) >= 0.98
