"""Synthetic training batches that follow the batch contract (docs/architecture.md), for the benchmarks.

Rows are packed with documents of log-normal lengths (median ``median``, sigma 1, at least 8 tokens; a row's last
document is cut at S, as the packer does). With ``domains`` > 0 every document gets one of that many domains
(``domain_ids``) and draws its tokens from the domain's slice of the vocabulary, so routing can specialise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from emo_lightning.model import IGNORE_INDEX


def packed_doc_ids(b: int, s: int, median: int, gen: torch.Generator) -> Tensor:
    """(B,S) long packer-style segment ids 0,0,1,1,1,2,..."""
    n = s // 8 + 1  # enough documents to fill a row
    lengths = torch.empty(b, n).log_normal_(math.log(median), 1.0, generator=gen).clamp_(8, s).long()  # (B,n)
    ends = lengths.cumsum(1)  # (B,n)
    return torch.searchsorted(ends, torch.arange(s).expand(b, s).contiguous(), right=True)  # (B,S)


def synthetic_batches(
    n: int,
    b: int,
    s: int,
    vocab: int,
    median: int = 256,
    dev: torch.device | str = "cpu",
    seed: int = 0,
    domains: int = 0,
) -> list[dict[str, Tensor]]:
    """``n`` batches of ``input_ids``, ``labels`` (-100 across document boundaries), ``doc_ids`` (B,S) and, with
    ``domains``, ``domain_ids`` (B,S)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        doc_ids = packed_doc_ids(b, s, median, gen)  # (B,S)
        batch = {"doc_ids": doc_ids}
        if domains:
            per_doc = torch.randint(
                0, domains, (b, s // 8 + 2), generator=gen
            )  # (B,n) domain of each document
            dom = per_doc.gather(1, doc_ids)  # (B,S)
            width = vocab // domains
            ids = dom * width + torch.randint(0, width, (b, s), generator=gen)
            batch["domain_ids"] = dom
        else:
            ids = torch.randint(0, vocab, (b, s), generator=gen)
        same = doc_ids[:, 1:] == doc_ids[:, :-1]  # (B,S-1) next token in the same document
        labels = torch.cat([torch.where(same, ids[:, 1:], IGNORE_INDEX), torch.full((b, 1), IGNORE_INDEX)], 1)
        batch.update(input_ids=ids, labels=labels)
        out.append({k: v.to(dev) for k, v in batch.items()})
    return out
