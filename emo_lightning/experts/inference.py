"""Packed documents through the model under an inference routing (``--routing``), causal pools included.

Causal document pools (``causal:P:N``): each document's pool is chosen from its first N tokens only. The model
chooses the pools (:meth:`EMOTransformer.prefix_pools`: its own ``pool:P`` routing, selection bias included, on
rows holding each document's first ``N`` tokens); they then stay fixed for the whole document (``allowed`` of
every forward, :func:`causal_allowed`): tokens after the prefix never influence any pool, and with causal
attention a token's routing depends only on the prefix and the tokens before it. This is how pooled routing is
used for generation: choose the pool from the prompt, then decode inside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from emo_lightning.experts.documents import DocBatch, Document
from emo_lightning.model import FULL, EMOTransformer, ModelOutput, Routing


@torch.no_grad()
def prefix_pools(
    model: EMOTransformer, docs: Sequence[Document], prefix: int, pool: int, pad_id: int, batch_size: int = 64
) -> Tensor:
    """(L,D,E') bool: every layer's pool of every document, chosen from its first ``prefix`` tokens."""
    seq = min(prefix, model.cfg.arch.max_seq_len)
    device = model.lm_head.weight.device
    out = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        ids = torch.full((len(chunk), seq), pad_id, dtype=torch.long)
        lengths = torch.tensor([min(seq, len(d.tokens)) for d in chunk])
        for i, d in enumerate(chunk):
            ids[i, : lengths[i]] = torch.from_numpy(d.tokens[: lengths[i]])
        out.append(model.prefix_pools(ids.to(device), lengths.to(device), pool).cpu())
    return torch.cat(out, dim=1)


def causal_allowed(pools: Tensor, batch: DocBatch) -> Tensor:
    """``allowed`` (L,B,S,E') of a packed batch: each token's document pool; padding unrestricted."""
    index = batch.doc_index.clamp(min=0)  # (B,S)
    pad = (batch.doc_index < 0).unsqueeze(-1)  # (B,S,1)
    return pools[:, index] | pad


@torch.no_grad()
def forward_documents(
    model: EMOTransformer,
    docs: Sequence[Document],
    batches: Sequence[DocBatch],
    routing: Routing = FULL,
    pad_id: int = 1,
    progress: bool = False,
    desc: str = "forward",
    allowed: Tensor | None = None,
    **kwargs: Any,
) -> Iterator[tuple[DocBatch, ModelOutput]]:
    """Every packed batch of ``docs`` through ``model`` on its device under ``routing`` (``kwargs``: of the model's
    forward, e.g. ``return_routes``). The model decides every pool; causal pools come from :func:`prefix_pools`.
    ``allowed``: (L,1,1,E') experts every token may use (a variable-keep subset, ``Subset.apply``); not with
    ``causal`` routing, whose prefix pools are chosen over all experts."""
    dev = model.lm_head.weight.device
    causal = routing.kind == "causal"
    if causal and allowed is not None:
        raise ValueError("causal pools are chosen over all experts: not with a fixed `allowed` subset")
    with model.routing(routing):
        pools = prefix_pools(model, docs, routing.prefix, routing.pool, pad_id) if causal else None
        for b in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            mask = allowed if pools is None else causal_allowed(pools, b).to(dev)
            yield b, model(b.input_ids.to(dev), b.doc_ids.to(dev), allowed=mask, **kwargs)
