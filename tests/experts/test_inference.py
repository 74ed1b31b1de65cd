"""Documents through the model under a routing: causal pools are chosen from the first N tokens only (later
tokens never change earlier routing), and every reported pool is the one the router used, bias included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_lightning.experts.documents import Document, pack_documents
from emo_lightning.experts.evaluate import document_losses
from emo_lightning.experts.inference import forward_documents, prefix_pools
from emo_lightning.experts.routes import iter_routes
from emo_lightning.model import Routing
from tests.experts.conftest import tiny_model

N, P = 12, 3


def _docs(seed: int) -> list[Document]:
    g = np.random.default_rng(seed)
    return [Document(f"d{i}", "x", g.integers(2, 4096, n)) for i, n in enumerate((40, 75, 9, 30))]


def _routes(model, docs):
    batches = pack_documents(docs, 32, 3, pad_id=1)
    pools = prefix_pools(model, docs, N, P, pad_id=1)
    per_token = []
    for b, out in forward_documents(model, docs, batches, Routing("causal", P, N), 1, return_routes=True):
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
        outs = forward_documents(model, ds, batches, Routing("running", P), 1)
        logits.append([(b.doc_index, b.doc_pos, out.logits) for b, out in outs])
    for (ia, pa, la), (_, _, lb) in zip(*logits, strict=True):
        early = (ia >= 0) & (pa < cut)
        torch.testing.assert_close(la[early], lb[early], rtol=0, atol=1e-5)
        assert not torch.allclose(la[(ia >= 0) & (pa > cut)], lb[(ia >= 0) & (pa > cut)])


@pytest.mark.parametrize("routing", [Routing("pool", 3), Routing("causal", 3, N)])
def test_routes_report_the_pools_the_router_used_with_a_selection_bias(routing: Routing) -> None:
    """The pools ``emo-experts routes`` writes hold every routed expert of every token, for a model whose large
    selection bias decides its pools (the toolkit once reported the unbiased top-P: 60% of tokens outside)."""
    model = tiny_model(bias=3.0)
    docs = _docs(4)
    records = list(iter_routes(model, docs, pack_documents(docs, 32, 3, pad_id=1), routing, pad_id=1))
    checked = 0
    for rec in records:
        for layer in rec["layers"]:
            starts = [p["from"] for p in layer["pools"]]
            for t, experts in enumerate(layer["experts"]):
                pool = layer["pools"][sum(s <= t for s in starts) - 1]["experts"]
                assert len(pool) == 3 and set(experts[:2]) <= set(pool)  # routed ids first, shared id 8 last
                checked += 1
    assert checked == 3 * sum(len(d.tokens) for d in docs)
