"""Router-probability clustering (the paper's analysis): do tokens group by domain or by surface form?

Token features: the unmasked routable softmax of every layer, concatenated (L*E'). Centre, PCA to 95% of the
variance, L2-normalise, k-means (on the unit sphere: Lloyd's k-means of normalised vectors, the usual spherical
k-means approximation; k-means++ seeding, best of 4 by inertia, scikit-learn's defaults). Scored against the
documents' domains by purity and NMI (``metrics.routing_stats``). Pure torch: it runs on the model's device, a
GPU node needs nothing else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from emo_lightning.experts.documents import DocBatch
from emo_lightning.metrics.routing_stats import normalized_mutual_information
from emo_lightning.model import FULL, EMOTransformer, Routing


@torch.no_grad()
def router_features(
    model: EMOTransformer, batches: Sequence[DocBatch], routing: Routing = FULL, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, L*E') float32 router probabilities of every non-padding token, its document index and token id."""
    from tqdm.auto import tqdm

    dev = model.lm_head.weight.device
    feats, index, ids = [], [], []
    with model.routing(routing):
        for b in tqdm(batches, desc="features", unit="batch", disable=not progress, leave=False):
            out = model(b.input_ids.to(dev), b.doc_ids.to(dev), return_routes=True)
            keep = (b.doc_index >= 0).flatten()
            feats.append(
                torch.cat([lr.probs for lr in out.layers], -1).flatten(0, 1)[keep.to(dev)].float().cpu()
            )
            index.append(b.doc_index.flatten()[keep])
            ids.append(b.input_ids.flatten()[keep])
    return torch.cat(feats).numpy(), torch.cat(index).numpy(), torch.cat(ids).numpy()


def contingency(labels: np.ndarray, clusters: np.ndarray) -> Tensor:
    """(C, K) int64 counts of (label, cluster) pairs."""
    _, lab = np.unique(labels, return_inverse=True)
    _, clu = np.unique(clusters, return_inverse=True)
    table = np.zeros((lab.max(initial=0) + 1, clu.max(initial=0) + 1), dtype=np.int64)
    np.add.at(table, (lab, clu), 1)
    return torch.from_numpy(table)


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of tokens whose cluster's majority label is their own label."""
    table = contingency(labels, clusters)
    return int(table.max(0).values.sum()) / int(table.sum())


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information of two labelings (arithmetic normalisation, as scikit-learn)."""
    return float(normalized_mutual_information(contingency(labels, clusters)))


def kmeans(z: Tensor, k: int, seed: int, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` by inertia: labels (N,) long."""
    gen = torch.Generator(device=z.device).manual_seed(seed)
    threshold = tol * float(z.var(0).mean())
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = z[torch.randint(len(z), (1,), generator=gen, device=z.device)]  # (1,D)
        d2 = ((z - centres) ** 2).sum(1)  # (N,) squared distance to the nearest centre
        for _ in range(1, k):
            pick = torch.multinomial(d2.clamp_min(0) + 1e-30, 1, generator=gen)
            centres = torch.cat([centres, z[pick]])
            d2 = torch.minimum(d2, ((z - z[pick]) ** 2).sum(1))
        for _ in range(max_iter):
            assign = torch.cdist(z, centres).argmin(1)  # (N,)
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            n = torch.bincount(assign, minlength=k).unsqueeze(1)
            new = torch.where(n > 0, sums / n.clamp_min(1), centres)  # an empty cluster keeps its centre
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        assign = torch.cdist(z, centres).argmin(1)
        inertia = float(((z - centres[assign]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def cluster_tokens(
    features: np.ndarray,
    labels: np.ndarray,
    k: int = 32,
    variance: float = 0.95,
    max_tokens: int = 40_000,
    seed: int = 0,
    token_ids: np.ndarray | None = None,
    decode: Any = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Spherical k-means of router features; purity / NMI against ``labels`` (e.g. domain names).

    At most ``max_tokens`` tokens (a seeded sample) are clustered, on ``device``. With ``token_ids`` and
    ``decode`` every cluster lists its most frequent tokens.
    """
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(features), size=min(max_tokens, len(features)), replace=False))
    x = torch.from_numpy(features[pick]).to(device, torch.float64)
    x = x - x.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    ratio = (evals.cumsum(0) / evals.sum().clamp_min(1e-300)).cpu().numpy()
    dims = min(int(np.searchsorted(ratio, variance, side="right") + 1), x.shape[1])  # PCA to ``variance``
    z = x @ evecs[:, :dims]
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assign = kmeans(z, k, seed).cpu().numpy()
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
            entry["top_tokens"] = [decode([t]) for t in (tok for tok, _ in common)]
        clusters.append(entry)
    return {
        "method": "spherical k-means (torch)",
        "k": k,
        "tokens": len(pick),
        "pca_dims": dims,
        "nmi": nmi(lab, assign),
        "purity": purity(lab, assign),
        "majority_baseline": float(Counter(lab.tolist()).most_common(1)[0][1] / len(lab)),
        "clusters": sorted(clusters, key=lambda c: -c["size"]),
    }
