"""Per-document routes: for every document and layer, its pool(s) and each token's experts and weights."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from emo_lightning.experts.causal_pool import forced_pools, prefix_pools
from emo_lightning.experts.documents import DocBatch, Document
from emo_lightning.experts.routing import FULL, Routing, eval_routing
from emo_lightning.model import EMOTransformer, pool_mask, segment_ids


def _pool_members(
    model: EMOTransformer, probs: torch.Tensor, doc_ids: torch.Tensor, pool: int
) -> torch.Tensor:
    """The router's own pool membership (B,S,E') from its unmasked probabilities (same function and inputs)."""
    b, s, e = probs.shape
    pool = max(model.cfg.router.routed_k, min(pool, e))
    sizes = torch.full((b * s,), pool, dtype=torch.long)
    return pool_mask(probs.reshape(b * s, e), segment_ids(doc_ids), sizes, pool).view(b, s, e)


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
    weights}]}``. ``pools`` is ``null`` without pool, else ``[{from, experts}]``: one entry per segment of
    the document (a document cut at a row end continues as a new segment with a pool of its own; causal
    pools are one per document). ``running:P`` pools change token by token and are not written (``null``):
    each token's experts lie in its own running pool."""
    n_layers = len(model.blocks)
    experts, weights, pools, index, pos, starts = [], [], [], [], [], []
    doc_pools = None
    with eval_routing(model, routing):
        if routing.kind == "causal":
            doc_pools = prefix_pools(model, docs, routing.prefix, routing.pool, pad_id)
        for b in tqdm(batches, desc="routes", unit="batch", disable=not progress):
            if doc_pools is not None:
                with forced_pools(model, doc_pools, b):
                    out = model(b.input_ids, b.doc_ids, return_routes=True)
            else:
                out = model(b.input_ids, b.doc_ids, return_routes=True)
            keep = (b.doc_index >= 0).flatten()
            experts.append(torch.stack([lr.experts for lr in out.layers], 2).flatten(0, 1)[keep])  # (T,L,k)
            weights.append(torch.stack([lr.weights for lr in out.layers], 2).flatten(0, 1)[keep])
            if routing.kind == "pool":
                members = [_pool_members(model, lr.probs, b.doc_ids, routing.pool) for lr in out.layers]
                pools.append(torch.stack(members, 2).flatten(0, 1)[keep])  # (T,L,E')
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
            if doc_pools is not None:
                entry = [{"from": 0, "experts": doc_pools[layer][i].nonzero().flatten().tolist()}]
            elif pool_t is not None:
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
    """Write JSON Lines; returns the number of documents."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n
