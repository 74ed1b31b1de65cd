"""Causal document pools: each document's pool is chosen from its first N tokens only.

Prefix pass: one row per document holding its first ``N`` tokens (fewer if the document is shorter). Layer by
layer, the pool of P routable experts is the top-P of the prefix's summed unmasked router probabilities (the
EMO rule, applied to the prefix instead of the whole document) and is forced on the prefix before the layer
runs, so later layers see the routing the document will really get. The pools then stay fixed for the whole
document (``forced_pools``): tokens after the prefix never influence any pool, and with causal attention a
token's routing depends only on the prefix and the tokens before it. This is how pooled routing is used for
generation: choose the pool from the prompt, then decode inside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from emo_lightning.experts.documents import DocBatch, Document
from emo_lightning.model import AttentionMask, EMOTransformer


def _top_pool(pref: Tensor, pool: int) -> Tensor:
    """(D,E') preference -> (D,E') bool membership of the top-``pool`` experts (stable ranking)."""
    order = torch.sort(pref, dim=-1, descending=True, stable=True).indices[:, :pool]
    return torch.zeros_like(pref, dtype=torch.bool).scatter_(1, order, True)


@torch.no_grad()
def prefix_pools(
    model: EMOTransformer, docs: Sequence[Document], prefix: int, pool: int, pad_id: int, batch_size: int = 64
) -> list[Tensor]:
    """Per layer, the (D,E') bool pool of every document, chosen from its first ``prefix`` tokens."""
    cfg = model.cfg
    pool = max(cfg.router.routed_k, min(pool, cfg.router.num_routed))
    seq = min(prefix, cfg.arch.max_seq_len)
    out: list[list[Tensor]] = [[] for _ in model.blocks]
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        ids = torch.full((len(chunk), seq), pad_id, dtype=torch.long)
        valid = torch.zeros(len(chunk), seq, dtype=torch.bool)
        for i, d in enumerate(chunk):
            n = min(seq, len(d.tokens))
            ids[i, :n] = torch.from_numpy(d.tokens[:n])
            valid[i, :n] = True
        doc_ids = (~valid).long()  # the prefix is segment 0, padding segment 1
        mask = AttentionMask.build(doc_ids, cfg.arch)
        x = model.embed(ids)
        for layer, blk in enumerate(model.blocks):
            x = x + blk.attn(blk.attn_norm(x), mask)
            h = blk.ffn_norm(x)
            router = blk.moe.router
            probs = F.linear(h.float(), router.weight.float()).softmax(-1)  # (b,s,E') as in the router
            pref = (probs * valid.unsqueeze(-1)).sum(1)  # (b,E')
            chosen = _top_pool(pref, pool)
            out[layer].append(chosen)
            forced = torch.where(valid.unsqueeze(-1), chosen.unsqueeze(1), True)  # padding: unrestricted
            router.forced_pool = forced
            try:
                y, _ = blk.moe(h, doc_ids)
            finally:
                router.forced_pool = None
            x = x + y
    return [torch.cat(p) for p in out]


@contextmanager
def forced_pools(model: EMOTransformer, pools: Sequence[Tensor], batch: DocBatch) -> Iterator[None]:
    """Force every router to the pool of each token's document for one forward of ``batch``."""
    index = batch.doc_index.clamp(min=0)
    pad = (batch.doc_index < 0).unsqueeze(-1)
    routers = model.routers()
    for r, p in zip(routers, pools, strict=True):
        r.forced_pool = p[index] | pad  # (B,S,E')
    try:
        yield
    finally:
        for r in routers:
            r.forced_pool = None
