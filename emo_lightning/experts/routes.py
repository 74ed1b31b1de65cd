"""Per-document routes: for every document and layer, its pool(s) and each token's experts and weights."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from emo_lightning.checkpoint import atomic_write_lines
from emo_lightning.experts.documents import DocBatch, Document
from emo_lightning.experts.inference import forward_documents
from emo_lightning.model import FULL, EMOTransformer, Routing, segment_index


@torch.no_grad()
def iter_routes(
    model: EMOTransformer,
    docs: Sequence[Document],
    batches: Sequence[DocBatch],
    routing: Routing = FULL,
    pad_id: int = 1,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One record per document (in order): ``{id, domain, tokens, routing, layers: [{pools, experts,
    weights}]}``. ``pools`` is ``null`` without a pool, else ``[{from, experts}]``: the pool the router used
    for each segment of the document (a document cut at a row end continues as a new segment with a pool of its
    own under ``pool:P``; under ``causal:P:N`` every segment has the document's pool). ``running:P`` pools change
    token by token and are not written (``null``): each token's experts lie in its own running pool."""
    n_layers = len(model.blocks)
    experts, weights, pools, index, pos, starts = [], [], [], [], [], []
    with_pools = routing.kind in ("pool", "causal") and model.cfg.router.kind == "emo"
    for b, out in forward_documents(
        model, docs, batches, routing, pad_id, progress, "routes", return_routes=True
    ):
        keep = (b.doc_index >= 0).flatten()
        experts.append(torch.stack([lr.experts for lr in out.layers], 2).flatten(0, 1)[keep])  # (T,L,k)
        weights.append(torch.stack([lr.weights for lr in out.layers], 2).flatten(0, 1)[keep])
        if with_pools:  # each token's segment pool, as the router used it: (T,L,E')
            seg = (
                segment_index(b.doc_ids).unsqueeze(-1).expand(-1, -1, model.cfg.router.num_routed)
            )  # (B,S,E')
            used = [lr.pool_mask.gather(1, seg) for lr in out.layers]  # (B,S,E') the token's segment's pool
            pools.append(torch.stack(used, 2).flatten(0, 1)[keep])
        index.append(b.doc_index.flatten()[keep])
        pos.append(b.doc_pos.flatten()[keep])
        col = torch.arange(b.doc_ids.shape[1]).expand_as(b.doc_ids)
        starts.append(((b.doc_pos == 0) | (col == 0)).flatten()[keep])  # a new segment of the document
    index_t = torch.cat(index)
    counts = torch.bincount(index_t, minlength=len(docs)).tolist()  # tokens are in document order
    per_doc = {
        "experts": torch.cat(experts).split(counts),
        "weights": torch.cat(weights).split(counts),
        "pos": torch.cat(pos).split(counts),
        "starts": torch.cat(starts).split(counts),
    }
    pool_t = torch.cat(pools).split(counts) if pools else None
    for i, d in enumerate(docs):
        ex, wt = per_doc["experts"][i], per_doc["weights"][i]
        first = per_doc["starts"][i].nonzero().flatten()
        layers = []
        for layer in range(n_layers):
            if pool_t is not None:
                entry = [
                    {
                        "from": int(per_doc["pos"][i][j]),
                        "experts": pool_t[i][j, layer].nonzero().flatten().tolist(),
                    }
                    for j in first.tolist()
                ]
            else:
                entry = None
            layers.append(
                {
                    "pools": entry,
                    "experts": ex[:, layer].tolist(),
                    "weights": [[round(w, 5) for w in row] for row in wt[:, layer].tolist()],
                }
            )
        yield {
            "id": d.id,
            "domain": d.domain,
            "tokens": len(d.tokens),
            "routing": str(routing),
            "layers": layers,
        }


def write_routes(records: Iterator[dict[str, Any]], out: str | Path) -> int:
    """Write JSON Lines atomically (the file appears whole, or the previous one stays); returns the number of
    documents."""
    n = 0

    def lines() -> Iterator[str]:
        nonlocal n
        for rec in records:
            n += 1
            yield json.dumps(rec, separators=(",", ":")) + "\n"

    atomic_write_lines(out, lines())
    return n
