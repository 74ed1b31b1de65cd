"""Router-probability clustering (the paper's analysis): do tokens group by domain or by surface form?

Token features: the unmasked routable softmax of every layer, concatenated (L*E'). Centre, PCA to 95% of
the variance, L2-normalise, k-means (on the unit sphere: scikit-learn's k-means on normalised vectors, the
usual spherical k-means approximation). Scored against the documents' domains by purity and NMI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_lightning.experts.documents import DocBatch
from emo_lightning.model import FULL, EMOTransformer, Routing


@torch.no_grad()
def router_features(
    model: EMOTransformer, batches: Sequence[DocBatch], routing: Routing = FULL, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, L*E') float32 router probabilities of every non-padding token, its document index and token id."""
    feats, index, ids = [], [], []
    with model.routing(routing):
        for b in tqdm(batches, desc="features", unit="batch", disable=not progress, leave=False):
            out = model(b.input_ids, b.doc_ids, return_routes=True)
            keep = (b.doc_index >= 0).flatten()
            feats.append(torch.cat([lr.probs for lr in out.layers], -1).flatten(0, 1)[keep])
            index.append(b.doc_index.flatten()[keep])
            ids.append(b.input_ids.flatten()[keep])
    return torch.cat(feats).numpy(), torch.cat(index).numpy(), torch.cat(ids).numpy()


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of tokens whose cluster's majority label is their own label."""
    _, lab = np.unique(labels, return_inverse=True)
    table = np.zeros((clusters.max() + 1, lab.max() + 1), dtype=np.int64)
    np.add.at(table, (clusters, lab), 1)
    return float(table.max(1).sum() / len(labels))


def cluster_tokens(
    features: np.ndarray,
    labels: np.ndarray,
    k: int = 32,
    variance: float = 0.95,
    max_tokens: int = 40_000,
    seed: int = 0,
    token_ids: np.ndarray | None = None,
    decode: Any = None,
) -> dict[str, Any]:
    """Spherical k-means of router features; purity / NMI against ``labels`` (e.g. domain names).

    At most ``max_tokens`` tokens (a seeded sample) are clustered. With ``token_ids`` and ``decode`` every
    cluster lists its most frequent tokens.
    """
    from sklearn.cluster import KMeans  # imported here: the rest of the module (purity) works without sklearn
    from sklearn.decomposition import PCA
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(features), size=min(max_tokens, len(features)), replace=False))
    x = features[pick].astype(np.float64)
    x -= x.mean(0, keepdims=True)
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed)
    z = pca.fit_transform(x)
    z /= np.linalg.norm(z, axis=1, keepdims=True).clip(min=1e-12)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    assign = km.labels_
    lab = np.asarray(labels)[pick]
    clusters = []
    for c in range(k):
        members = assign == c
        counts = Counter(lab[members].tolist())
        majority, top = counts.most_common(1)[0] if counts else ("", 0)
        entry: dict[str, Any] = {
            "size": int(members.sum()),
            "majority": majority,
            "purity": round(top / max(int(members.sum()), 1), 4),
        }
        if token_ids is not None and decode is not None:
            common = Counter(token_ids[pick][members].tolist()).most_common(8)
            entry["top_tokens"] = [decode([t]) for t, _ in common]
        clusters.append(entry)
    return {
        "k": k,
        "tokens": len(pick),
        "pca_dims": int(pca.n_components_),
        "nmi": float(normalized_mutual_info_score(lab, assign)),
        "purity": purity(lab, assign),
        "majority_baseline": float(Counter(lab.tolist()).most_common(1)[0][1] / len(lab)),
        "clusters": sorted(clusters, key=lambda c: -c["size"]),
    }
