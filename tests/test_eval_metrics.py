"""The evaluation's metrics on hand-computed cases: ranks and ties, CLIP-style recall, the
CIRR reference mask, BEIR's Recall/MRR/nDCG, Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest

from e5v.evaluation.metrics import (
    MASKED_SCORE,
    hit_rate,
    judged_ranks,
    mrr_at,
    ndcg_at,
    positive_ranks,
    rank_of,
    rankdata,
    recall_at,
    spearman,
    top_k,
)


def unit(*rows: list[float]) -> np.ndarray:
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_rank_counts_higher_scores_and_earlier_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.3, 0.3, 0.3]])
    assert rank_of(scores, np.array([2, 3])).tolist() == [2, 3]  # row 0: two 0.9s above; row 1: three earlier ties
    assert rank_of(scores, np.array([1, 0])).tolist() == [0, 0]
    assert rank_of(scores, np.array([3, 1])).tolist() == [1, 1]  # the second 0.9 after the first
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert top_k(scores, 9).shape == (2, 4)


def test_clip_style_recall_counts_any_correct_item() -> None:
    # Two images with two captions each; image 0's best caption is ranked 2nd, its other 4th.
    images = unit([1, 0, 0], [0, 1, 0])
    captions = unit([0.2, 1, 0], [1, 0.3, 0], [0.9, 0, 1], [0, 1, 0.1])  # captions 0, 1 -> image 0; 2, 3 -> image 1
    # image 0's scores: c1 0.958, c2 0.669, c0 0.196, c3 0: its positives c0 (rank 2) and c1 (rank 0)
    ranks = positive_ranks(images, captions, [[0, 1], [2, 3]])
    assert ranks.tolist() == [0, 0]  # image 1: c3 (0.995) first
    t2i = positive_ranks(captions, images, [[0], [0], [1], [1]])
    assert t2i.tolist() == [1, 0, 1, 0]
    assert hit_rate(t2i, 1) == 0.5 and hit_rate(t2i, 2) == 1.0
    with pytest.raises(ValueError, match="positive"):
        positive_ranks(images, captions, [[], [2]])


def test_cirr_mask_takes_the_reference_out_of_its_own_ranking() -> None:
    gallery = unit([1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1])
    queries = unit([1, 0.1, 0], [0, 0.2, 1])  # query 0's reference is gallery 0, which it is nearest
    targets = [[1], [3]]
    plain = positive_ranks(queries, gallery, targets)
    masked = positive_ranks(queries, gallery, targets, masked=[0, 2])
    assert plain.tolist() == [1, 0] and masked.tolist() == [0, 0]
    assert hit_rate(plain, 1) == 0.5 and hit_rate(masked, 1) == 1.0
    # the mask scores -1 (the official value): a target at exactly -1 ties the masked reference
    gallery = unit([1, 0], [-1, 0], [0, 1])
    assert MASKED_SCORE == -1.0
    assert positive_ranks(unit([1, 0]), gallery, [[1]], masked=[0]).tolist() == [2]  # after item 2 and the earlier tie


def test_beir_metrics_of_one_query() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.6])  # order: 0, 2, 3, 5, 4, 1
    ranks = judged_ranks(scores, [2, 5, 1])
    assert ranks.tolist() == [1, 3, 5]
    assert recall_at(ranks, 1) == 0.0 and recall_at(ranks, 2) == pytest.approx(1 / 3)
    assert recall_at(ranks, 4) == pytest.approx(2 / 3) and recall_at(ranks, 10) == 1.0
    assert mrr_at(ranks, 10) == 0.5 and mrr_at(ranks, 1) == 0.0
    gains = np.array([2.0, 1.0, 1.0])
    dcg = 2 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(7)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranks, gains, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(ranks, gains, 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert judged_ranks(scores, []).tolist() == []


def test_beir_metrics_equal_trec_eval() -> None:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    run, qrels, ours = {}, {}, {"ndcg_cut_10": [], "recall_5": [], "recip_rank": []}
    for q in range(20):
        scores = rng.permutation(40) / 40.0  # distinct scores: no tie rule involved
        relevant = {
            int(d): int(rng.integers(1, 4)) for d in rng.choice(40, size=int(rng.integers(1, 6)), replace=False)
        }
        run[f"q{q}"] = {f"d{d}": float(s) for d, s in enumerate(scores)}
        qrels[f"q{q}"] = {f"d{d}": g for d, g in relevant.items()}
        ranks = judged_ranks(scores, list(relevant))
        ours["ndcg_cut_10"].append(ndcg_at(ranks, np.array(list(relevant.values())), 10))
        ours["recall_5"].append(recall_at(ranks, 5))
        ours["recip_rank"].append(1.0 / (ranks.min() + 1))  # trec_eval's is not cut: compare below 10 only
    measured = pytrec_eval.RelevanceEvaluator(qrels, set(ours)).evaluate(run)
    for name, values in ours.items():
        theirs = [measured[f"q{q}"][name] for q in range(20)]
        assert values == pytest.approx(theirs), name


def test_spearman_by_hand_and_with_ties() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # with ties: Pearson of [2, 3.5, 3.5, 1] and [1, 2, 3, 4]
    a, b = np.array([2, 3.5, 3.5, 1]), np.array([1, 2, 3, 4.0])
    expected = np.sum((a - a.mean()) * (b - b.mean())) / np.sqrt(np.sum((a - a.mean()) ** 2) * np.sum((b - 2.5) ** 2))
    assert spearman(np.array([10, 20, 20, 5]), np.array([1, 2, 3, 4])) == pytest.approx(expected)
    assert math.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
