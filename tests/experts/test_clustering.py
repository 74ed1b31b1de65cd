"""Router clustering: torch spherical k-means and the NMI / purity scores, against scikit-learn as reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from emo_lightning.experts.clustering import cluster_tokens, nmi, purity


def test_nmi_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for n, a, b in ((500, 4, 7), (50, 2, 2), (300, 8, 32)):
        x, y = rng.integers(0, a, n), rng.integers(0, b, n)
        assert nmi(x, y) == pytest.approx(normalized_mutual_info_score(x, y), abs=1e-12)
        assert nmi(x, x) == pytest.approx(1.0)
    labels = np.array(["a", "a", "b", "b"])
    assert nmi(labels, np.zeros(4)) == normalized_mutual_info_score(labels, np.zeros(4)) == 0.0


def test_purity() -> None:
    labels = np.array(["a", "a", "a", "b", "b", "c"])
    assert purity(labels, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx((2 + 2) / 6)


def _groups(seed: int = 1, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four well-separated groups of router-like features (labels a..d), and their true group."""
    rng = np.random.default_rng(seed)
    centres = rng.dirichlet(np.ones(16), size=4) * 4
    group = np.repeat(np.arange(4), n)
    feats = (centres[group] + rng.normal(0, 0.02, (4 * n, 16))).astype(np.float32)
    return feats, np.array(list("abcd"))[group], group


def test_clustering_recovers_separated_groups_like_scikit_learn() -> None:
    feats, labels, _ = _groups()
    res = cluster_tokens(feats, labels, k=4, max_tokens=1000, seed=0)
    assert res["tokens"] == 1000 and res["nmi"] > 0.99 and res["purity"] > 0.99
    assert sorted(c["majority"] for c in res["clusters"]) == list("abcd")
    assert sum(c["size"] for c in res["clusters"]) == 1000
    # scikit-learn's k-means on the same normalised PCA features finds the same partition
    x = feats - feats.mean(0)
    km = KMeans(4, n_init=4, random_state=0).fit(x / np.linalg.norm(x, axis=1, keepdims=True))
    assert normalized_mutual_info_score(labels, km.labels_) == pytest.approx(res["nmi"], abs=0.02)


def test_unrelated_labels_score_near_zero() -> None:
    feats, _, _ = _groups(2)
    labels = np.random.default_rng(3).choice(list("xy"), len(feats))
    res = cluster_tokens(feats, labels, k=4, max_tokens=1000, seed=0)
    assert res["nmi"] < 0.05 and res["purity"] < 0.6
