"""Per-document and per-domain loss / perplexity of a (possibly pruned) model under a routing mode."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emo_lightning.experts.documents import DocBatch, Document, pack_documents
from emo_lightning.experts.inference import forward_documents
from emo_lightning.model import FULL, IGNORE_INDEX, EMOTransformer, Routing, token_cross_entropy


@dataclass
class DocLosses:
    """Summed next-token cross-entropy and scored target count of every document, and the expert load."""

    loss_sum: torch.Tensor  # (D,) float64
    tokens: torch.Tensor  # (D,) long
    counts: torch.Tensor | None = None  # (L,E') float64 token-slot assignments summed over every batch


def document_losses(
    model: EMOTransformer,
    docs: Sequence[Document],
    batches: Sequence[DocBatch],
    routing: Routing = FULL,
    pad_id: int = 1,
    progress: bool = False,
    desc: str = "eval",
    score_from: int | None = None,
    allowed: torch.Tensor | None = None,
) -> DocLosses:
    """Token losses summed per document, scored from document position ``score_from`` on (default 0; with
    ``causal:P:N`` N-1: only targets whose routing is causal count, the pool comes from tokens 0..N-1).
    ``allowed``: (L,1,1,E') a variable-keep subset's experts (``Subset.apply``)."""
    if score_from is None:
        score_from = routing.prefix - 1 if routing.kind == "causal" else 0
    n_docs = len(docs)
    loss_sum = torch.zeros(n_docs, dtype=torch.float64)
    tokens = torch.zeros(n_docs, dtype=torch.long)
    counts = None
    for b, out in forward_documents(model, docs, batches, routing, pad_id, progress, desc, allowed):
        scored = (b.labels != IGNORE_INDEX) & (b.doc_index >= 0)
        if score_from > 0:
            scored &= b.doc_pos >= score_from
        ce = token_cross_entropy(out.logits, b.labels.to(out.logits.device)).double().cpu()  # (B*S,)
        flat = scored.flatten()
        index = b.doc_index.flatten()[flat]
        loss_sum.index_add_(0, index, ce[flat])
        tokens.index_add_(0, index, torch.ones_like(index))
        load = torch.stack([lr.counts for lr in out.layers]).double()  # (L,E')
        counts = load if counts is None else counts + load
    return DocLosses(loss_sum, tokens, None if counts is None else counts.cpu())


def domain_table(docs: Sequence[Document], losses: DocLosses) -> dict[str, dict[str, Any]]:
    """``{domain: {loss, ppl, tokens, docs}}`` (token-weighted), domains sorted, plus ``"all"``."""
    names = sorted({d.domain for d in docs})
    dom = torch.tensor([names.index(d.domain) for d in docs], dtype=torch.long)
    s = torch.zeros(len(names), dtype=torch.float64).index_add_(0, dom, losses.loss_sum)
    t = torch.zeros(len(names), dtype=torch.long).index_add_(0, dom, losses.tokens)
    n = torch.zeros(len(names), dtype=torch.long).index_add_(0, dom, torch.ones_like(dom))
    out: dict[str, dict[str, Any]] = {}
    rows = [*zip(names, s.tolist(), t.tolist(), n.tolist(), strict=True)]
    rows.append(("all", float(s.sum()), int(t.sum()), len(docs)))
    for name, ls, tk, nd in rows:
        loss = ls / tk if tk else float("nan")
        out[name] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tk, "docs": nd}
    return out


def evaluate(
    model: EMOTransformer,
    docs: Sequence[Document],
    routing: Routing = FULL,
    seq_len: int | None = None,
    batch_size: int = 16,
    pad_id: int = 1,
    progress: bool = False,
    batches: Sequence[DocBatch] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-domain loss / perplexity of ``docs`` (packed like training) under ``routing``."""
    if batches is None:
        seq = min(seq_len or model.cfg.arch.max_seq_len, model.cfg.arch.max_seq_len)
        batches = pack_documents(docs, seq, batch_size, pad_id)
    return domain_table(docs, document_losses(model, docs, batches, routing, pad_id, progress))


def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A plain-text table: one row per domain, one loss / ppl column pair per named result."""
    names = list(results)
    domains = list(next(iter(results.values())))
    head = (
        f"{'domain':<16}" + "".join(f"{n[:22] + ' loss':>28}{'ppl':>10}" for n in names) + f"{'tokens':>10}"
    )
    lines = [head, "-" * len(head)]
    for d in domains:
        cells = "".join(f"{results[n][d]['loss']:>28.4f}{results[n][d]['ppl']:>10.2f}" for n in names)
        lines.append(f"{d:<16}{cells}{results[names[0]][d]['tokens']:>10}")
    return "\n".join(lines)
