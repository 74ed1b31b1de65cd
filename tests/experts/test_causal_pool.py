"""Causal pools: chosen from the first N tokens only; later tokens never change earlier routing."""

from __future__ import annotations

import numpy as np
import torch

from emo_lightning.experts.causal_pool import forced_pools, prefix_pools
from emo_lightning.experts.documents import Document, pack_documents
from emo_lightning.experts.evaluate import document_losses
from emo_lightning.experts.routing import Routing, eval_routing
from tests.experts.conftest import tiny_model

N, P = 12, 3


def _docs(seed: int) -> list[Document]:
    g = np.random.default_rng(seed)
    return [Document(f"d{i}", "x", g.integers(2, 4096, n)) for i, n in enumerate((40, 75, 9, 30))]


def _routes(model, docs):
    batches = pack_documents(docs, 32, 3, pad_id=1)
    pools = prefix_pools(model, docs, N, P, pad_id=1)
    per_token = []
    with torch.no_grad(), eval_routing(model, Routing("causal", P, N)):
        for b in batches:
            with forced_pools(model, pools, b):
                out = model(b.input_ids, b.doc_ids, return_routes=True)
            for lr in out.layers:
                per_token.append((b.doc_index, b.doc_pos, lr.experts, lr.weights))
    return pools, per_token


def test_later_tokens_leave_pools_and_earlier_routing_unchanged() -> None:
    model = tiny_model()
    docs = _docs(0)
    cut = 20  # change every token from position 20 on (>= N) in every document
    changed = [
        Document(d.id, d.domain, np.concatenate([d.tokens[:cut], (d.tokens[cut:] * 7 + 3) % 4094 + 2]))
        for d in docs
    ]
    pools_a, routes_a = _routes(model, docs)
    pools_b, routes_b = _routes(model, changed)
    for a, b in zip(pools_a, pools_b, strict=True):
        assert torch.equal(a, b) and a.shape == (4, 8) and (a.sum(-1) == P).all()
    for (ia, pa, ea, wa), (ib, pb, eb, wb) in zip(routes_a, routes_b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(pa, pb)
        early = (ia >= 0) & (pa < cut)
        assert torch.equal(ea[early], eb[early])
        torch.testing.assert_close(wa[early], wb[early], rtol=0, atol=1e-6)
    assert any(
        not torch.equal(ea, eb) for (_, _, ea, _), (_, _, eb, _) in zip(routes_a, routes_b, strict=True)
    )


def test_routing_stays_inside_the_pool() -> None:
    model = tiny_model()
    docs = _docs(1)
    pools, routes = _routes(model, docs)
    n_layers = len(model.blocks)
    for j, (index, _, experts, _) in enumerate(routes):
        layer = j % n_layers
        valid = index >= 0
        routed = experts[..., :2][valid]  # routed experts (the shared expert id 8 comes last)
        allowed = pools[layer][index[valid]]
        assert allowed.gather(1, routed).all()


def test_pool_depends_only_on_the_prefix_not_the_document_length() -> None:
    model = tiny_model()
    docs = _docs(2)
    short = [Document(d.id, d.domain, d.tokens[:N]) for d in docs]
    for a, b in zip(prefix_pools(model, docs, N, P, 1), prefix_pools(model, short, N, P, 1), strict=True):
        assert torch.equal(a, b)


def test_causal_eval_scores_only_after_the_prefix() -> None:
    model = tiny_model()
    docs = _docs(3)
    batches = pack_documents(docs, 32, 3, pad_id=1)
    dl = document_losses(model, docs, batches, Routing("causal", P, N), pad_id=1)
    expected = [max(len(d.tokens) - 1 - (N - 1), 0) for d in docs]  # targets at positions N-1 .. T-2
    assert dl.tokens.tolist() == expected


def test_running_pools_make_the_whole_model_causal() -> None:
    """routing running:P (each token's pool from its document's tokens so far): changing a document's later
    tokens leaves the logits of its earlier tokens unchanged, in every layer's routing and the output."""
    model = tiny_model()
    docs = _docs(2)
    cut = 20
    changed = [
        Document(d.id, d.domain, np.concatenate([d.tokens[:cut], (d.tokens[cut:] * 5 + 1) % 4094 + 2]))
        for d in docs
    ]
    logits = []
    for ds in (docs, changed):
        batches = pack_documents(ds, 32, 3, pad_id=1)
        with torch.no_grad(), eval_routing(model, Routing("running", P)):
            logits.append([(b.doc_index, b.doc_pos, model(b.input_ids, b.doc_ids).logits) for b in batches])
    for (ia, pa, la), (_, _, lb) in zip(*logits, strict=True):
        early = (ia >= 0) & (pa < cut)
        torch.testing.assert_close(la[early], lb[early], rtol=0, atol=1e-5)
        assert not torch.allclose(la[(ia >= 0) & (pa > cut)], lb[(ia >= 0) & (pa > cut)])
