"""Standard and EMO document-pool routers against a per-document loop reference and the spec's invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from emo_lightning.model import Router, RouterConfig

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
# (E, n_sh, k): E' = E - n_sh routable experts, k' = k - n_sh routed per token
SHAPES = [(8, 1, 3), (12, 0, 2), (10, 2, 4), (6, 1, 2), (16, 1, 4)]
# router shape, batch rows, documents per row, seed, training mode (the sequence length is drawn per test)
BATCH_CASES = {
    "shape": st.sampled_from(SHAPES),
    "b": st.integers(1, 3),
    "max_docs": st.integers(1, 6),
    "seed": st.integers(0, 10_000),
    "train": st.booleans(),
}


def random_doc_ids(gen: torch.Generator, b: int, s: int, max_docs: int) -> torch.Tensor:
    """(B,S) packer-style segment ids 0,0,1,1,1,2,... with 1..max_docs documents per row."""
    rows = []
    for _ in range(b):
        n = int(torch.randint(1, min(max_docs, s) + 1, (1,), generator=gen))
        cuts = torch.randperm(s - 1, generator=gen)[: n - 1] + 1  # boundaries in [1, S-1]
        start = torch.zeros(s, dtype=torch.long)
        start[cuts] = 1
        rows.append(start.cumsum(0))
    return torch.stack(rows)


def make_router(
    shape: tuple[int, int, int] = (12, 1, 3),
    *,
    kind: str = "emo",
    pool: tuple[int, int] | None = None,
    pool_eval: int | None = None,
    d: int = 16,
    seed: int = 0,
    layer: int = 0,
    weight_seed: int = 0,
    normalize: bool = False,
    scope: str = "document",
) -> Router:
    e, n_sh, k = shape
    kr, er = k - n_sh, e - n_sh
    lo, hi = pool or (kr, er)
    cfg = RouterConfig(
        kind=kind,
        num_experts=e,
        num_shared=n_sh,
        top_k=k,
        pool_min=lo,
        pool_max=hi,
        pool_eval=pool_eval or kr,
        normalize_weights=normalize,
        pool_scope=scope,
        seed=seed,
    )
    r = Router(cfg, d, layer)
    with torch.no_grad():
        r.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(weight_seed))
    return r


def loop_reference(router: Router, h: torch.Tensor, doc_ids: torch.Tensor, pool_sizes: torch.Tensor):
    """The paper's code path: Python loop over rows and documents, fp64, pool chosen without gradient.

    Returns scores (B,S,E') fp64 (grad to the returned weight copy), experts (B,S,k'), weights (B,S,k'),
    the z-loss (mean logsumexp(z_m)^2),
    pools {(b, g): set of experts}, the smallest ranking gap (pool and top-k' boundaries) and the weight.
    """
    w_ref = router.weight.detach().double().clone().requires_grad_()
    b_, s_, _ = h.shape
    er, kr = router.num_routed, router.routed_k
    scores = torch.zeros(b_, s_, er, dtype=torch.float64)
    experts = torch.zeros(b_, s_, kr, dtype=torch.long)
    weights = torch.zeros(b_, s_, kr, dtype=torch.float64)
    pools, gap, zsq = {}, float("inf"), torch.zeros((), dtype=torch.float64)
    for b in range(b_):
        for g in doc_ids[b].unique().tolist():
            tok = (doc_ids[b] == g).nonzero().squeeze(1)
            z = h[b, tok].double() @ w_ref.T  # (T,E')
            with torch.no_grad():
                a = z.softmax(-1).sum(0)  # summed unmasked preference
                p = int(pool_sizes[b, g])
                srt = a.sort(descending=True).values
                if p < er:
                    gap = min(gap, float(srt[p - 1] - srt[p]))
                pool = a.topk(p).indices
            mask = torch.zeros(er, dtype=torch.bool)
            mask[pool] = True
            zm = z.masked_fill(~mask, float("-inf"))
            s = zm.softmax(-1)
            zsq = zsq + torch.logsumexp(zm, -1).square().sum()
            w, idx = s.topk(kr, dim=-1)
            if kr < er:
                ss = s.detach().sort(-1, descending=True).values
                gap = min(gap, float((ss[:, kr - 1] - ss[:, kr]).min()))
            scores[b, tok], experts[b, tok], weights[b, tok] = s, idx, w
            pools[(b, g)] = set(pool.tolist())
    return scores, experts, weights, zsq / (b_ * s_), pools, gap, w_ref


@SETTINGS
@given(s=st.integers(4, 24), **BATCH_CASES)
def test_vectorised_router_matches_per_document_loop(shape, b, s, max_docs, seed, train) -> None:
    gen = torch.Generator().manual_seed(seed)
    doc_ids = random_doc_ids(gen, b, s, max_docs)
    h = torch.randn(b, s, 16, generator=gen)
    r = make_router(shape, seed=seed, weight_seed=seed, pool_eval=shape[2] - shape[1] + 1).train(train)
    out = r(h, doc_ids)
    ref_s, ref_e, ref_w, ref_z, pools, gap, w_ref = loop_reference(r, h, doc_ids, out.pool_sizes)
    assume(gap > 1e-4)  # a near-tie may legitimately rank differently in fp32 vs fp64
    er, kr = r.num_routed, r.routed_k
    torch.testing.assert_close(out.scores.view(b, s, er).double(), ref_s.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.weights.view(b, s, kr).double(), ref_w.detach(), atol=1e-5, rtol=1e-4)
    assert torch.equal(out.experts.view(b, s, kr), ref_e)
    torch.testing.assert_close(out.z_loss.double(), ref_z.detach(), atol=1e-5, rtol=1e-4)
    for (bb, g), pool in pools.items():  # the pool is the top-P of the summed unmasked softmax
        support = (out.scores.view(b, s, er)[bb][doc_ids[bb] == g] > 0).any(0)
        assert set(support.nonzero().squeeze(1).tolist()) == pool
    # gradients: same loss on both sides, no gradient through the pool choice in either
    cot_s, cot_w = torch.randn(b, s, er, generator=gen), torch.randn(b, s, kr, generator=gen)
    loss = (out.scores.view(b, s, er) * cot_s).sum() + (out.weights.view(b, s, kr) * cot_w).sum() + out.z_loss
    (g_vec,) = torch.autograd.grad(loss, r.weight)
    ref_loss = (ref_s * cot_s.double()).sum() + (ref_w * cot_w.double()).sum() + ref_z
    (g_ref,) = torch.autograd.grad(ref_loss, w_ref)
    torch.testing.assert_close(g_vec.double(), g_ref, atol=1e-4, rtol=1e-3)


@SETTINGS
@given(
    shape=st.sampled_from(SHAPES),
    b=st.integers(1, 3),
    s=st.integers(2, 32),
    max_docs=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_pool_invariants(shape, b, s, max_docs, seed) -> None:
    """Routed experts lie in the pool; one pool per document; |pool| = min(P, E'); masked scores: 0 outside,
    sum 1 inside; the pool is the top-P of the document's summed unmasked softmax."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = random_doc_ids(gen, b, s, max_docs)
    r = make_router(shape, seed=seed, weight_seed=seed + 1).train()
    out = r(torch.randn(b, s, 16, generator=gen), doc_ids)
    er, kr = r.num_routed, r.routed_k
    scores, experts = out.scores.view(b, s, er), out.experts.view(b, s, kr)
    support = scores > 0  # (B,S,E'): masked softmax is exactly 0 outside the pool
    torch.testing.assert_close(scores.sum(-1), torch.ones(b, s))
    assert support.gather(-1, experts).all(), "a routed expert lies outside its document's pool"
    q = out.logits.detach().softmax(-1).view(b, s, er)
    for bb in range(b):
        for g in doc_ids[bb].unique().tolist():
            sup = support[bb][doc_ids[bb] == g]  # (T,E')
            assert (sup == sup[0]).all(), "tokens of one document use different pools"
            p = int(out.pool_sizes[bb, g])
            assert r.pool_min <= p <= min(r.pool_max, er) and int(sup[0].sum()) == p
            a = q[bb][doc_ids[bb] == g].sum(0)
            if (~sup[0]).any():
                assert a[sup[0]].min() >= a[~sup[0]].max() - 1e-6
    absent = torch.ones(b, s, dtype=torch.bool)
    for bb in range(b):
        absent[bb, doc_ids[bb].unique()] = False
    assert (out.pool_sizes[absent] == -1).all() and (out.pool_sizes[~absent] > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_full_pool_equals_standard_router(shape) -> None:
    e, n_sh, k = shape
    er = e - n_sh
    gen = torch.Generator().manual_seed(1)
    doc_ids = random_doc_ids(gen, 2, 20, 5)
    h = torch.randn(2, 20, 16, generator=gen)
    std = make_router(shape, kind="standard")
    for train in (True, False):
        emo = make_router(shape, pool=(er, er), pool_eval=er).train(train)
        a, b = emo(h, doc_ids), std.train(train)(h, doc_ids)
        for name in ("experts", "weights", "scores", "z_loss", "counts"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    emo = make_router(shape, pool=(k - n_sh, k - n_sh)).eval()
    emo.pool_eval = None  # unrestricted eval routing
    assert torch.equal(emo(h, doc_ids).experts, std(h, doc_ids).experts)


def test_small_pools_differ_from_standard_router() -> None:
    """Sanity check that the equivalence above is not vacuous."""
    gen = torch.Generator().manual_seed(2)
    doc_ids, h = random_doc_ids(gen, 2, 40, 3), torch.randn(2, 40, 16, generator=gen)
    emo, std = make_router(pool=(2, 2)), make_router(kind="standard")
    assert not torch.equal(emo(h, doc_ids).experts, std(h, doc_ids).experts)


@pytest.mark.parametrize("kind", ["emo", "standard"])
def test_normalized_weights_sum_to_one_and_keep_the_routing(kind: str) -> None:
    """normalize_weights rescales the gate weights only: same experts, same scores, same z-loss."""
    gen = torch.Generator().manual_seed(5)
    doc_ids, h = random_doc_ids(gen, 2, 40, 3), torch.randn(2, 40, 16, generator=gen)
    raw = make_router((12, 1, 4), kind=kind, pool=(3, 11))(h, doc_ids)
    norm = make_router((12, 1, 4), kind=kind, pool=(3, 11), normalize=True)(h, doc_ids)
    for name in ("experts", "scores", "z_loss", "counts", "pool_sizes"):
        assert torch.equal(getattr(raw, name), getattr(norm, name)), name
    torch.testing.assert_close(norm.weights.sum(-1), torch.ones(80))
    torch.testing.assert_close(norm.weights, raw.weights / raw.weights.sum(-1, keepdim=True))
    assert (raw.weights.sum(-1) < 1 - 1e-3).any()  # not vacuous: raw weights of pools > k' sum below 1


def test_no_gradient_to_out_of_pool_logits_and_no_shared_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    doc_ids, h = random_doc_ids(gen, 2, 32, 4), torch.randn(2, 32, 16, generator=gen)
    r = make_router((12, 2, 4), pool=(2, 4))
    assert r.weight.shape == (10, 16), "shared experts must not have router rows"
    out = r(h, doc_ids)
    loss = (out.weights * torch.randn(out.weights.shape, generator=gen)).sum() + out.z_loss
    loss = loss + (out.scores.mean(0) * torch.randn(10, generator=gen)).sum()
    (g,) = torch.autograd.grad(loss, out.logits)
    in_pool = out.scores > 0
    assert (g[~in_pool] == 0).all() and (~in_pool).any()
    assert (g[in_pool] != 0).any()


def test_pool_sizes_random_per_document_layer_forward_and_reproducible() -> None:
    gen = torch.Generator().manual_seed(4)
    doc_ids = torch.arange(64).div(4, rounding_mode="floor").expand(4, 64)  # 16 documents per row
    h = torch.randn(4, 64, 16, generator=gen)
    r0, r1 = make_router((16, 1, 3), pool=(2, 15), layer=0), make_router((16, 1, 3), pool=(2, 15), layer=1)
    p0, p1 = r0(h, doc_ids).pool_sizes, r1(h, doc_ids).pool_sizes
    present = p0[:, :16]
    assert (p0[:, 16:] == -1).all()
    assert ((present >= 2) & (present <= 15)).all()
    assert present.unique().numel() > 4, "pool sizes should vary across documents"
    assert not torch.equal(p0, p1), "pool sizes should vary across layers"
    assert not torch.equal(p0, r0(h, doc_ids).pool_sizes), "pool sizes should vary across forwards"
    # reproducible: same (seed, layer) -> same sequence; reseeding restarts it (the resume mechanism), and the
    # generator is not part of the state_dict (nothing to restore: a resumed run reseeds from its step)
    again = make_router((16, 1, 3), pool=(2, 15), layer=0)
    assert torch.equal(again(h, doc_ids).pool_sizes, p0)
    nxt = again(h, doc_ids).pool_sizes
    other = make_router((16, 1, 3), pool=(2, 15), layer=0, seed=99)
    other.reseed(0)
    assert torch.equal(other(h, doc_ids).pool_sizes, p0)
    assert torch.equal(other(h, doc_ids).pool_sizes, nxt)
    assert list(again.state_dict()) == ["weight"]
    # another seed gives another sequence
    assert not torch.equal(make_router((16, 1, 3), pool=(2, 15), seed=5)(h, doc_ids).pool_sizes, p0)


def test_pool_eval() -> None:
    gen = torch.Generator().manual_seed(5)
    doc_ids, h = random_doc_ids(gen, 3, 30, 5), torch.randn(3, 30, 16, generator=gen)
    r = make_router((16, 1, 3), pool=(2, 15), pool_eval=6).eval()
    p = r(h, doc_ids).pool_sizes
    assert ((p == 6) | (p == -1)).all() and (p == 6).any()
    assert ((r(h, doc_ids).scores > 0).sum(-1) == 6).all()
    r.pool_eval = None
    assert (r(h, doc_ids).scores > 0).all()
    r.pool_eval = 40  # P > E' = 15: the pool is min(P, E'), i.e. unrestricted
    out = r(h, doc_ids)
    assert (out.scores > 0).all() and ((out.pool_sizes == 15) | (out.pool_sizes == -1)).all()


@pytest.mark.parametrize("mode", ["eval", "fixed_train"])
def test_permuting_documents_permutes_routing(mode: str) -> None:
    """No cross-document leakage: reorder whole documents within a row (relabelled 0..n-1 like the packer)."""
    lengths = [5, 9, 3, 7, 8]
    s = sum(lengths)
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(1, s, 16, generator=gen)
    doc_ids = torch.repeat_interleave(torch.arange(5), torch.tensor(lengths)).unsqueeze(0)
    perm = [3, 0, 4, 2, 1]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    src = torch.cat([torch.arange(starts[d], starts[d + 1]) for d in perm])  # new position -> old position
    new_doc = torch.repeat_interleave(torch.arange(5), torch.tensor([lengths[d] for d in perm])).unsqueeze(0)
    r = make_router((16, 1, 3), pool=(5, 5), pool_eval=5)
    r.train(mode == "fixed_train")
    a, b = r(h, doc_ids), r(h[:, src], new_doc)
    assert torch.equal(a.experts[src], b.experts)
    torch.testing.assert_close(a.scores[src], b.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.weights[src], b.weights, atol=1e-6, rtol=1e-5)
    # and the pools really are per document: one document on its own routes identically
    solo = r(h[:, starts[2] : starts[3]], torch.zeros(1, lengths[2], dtype=torch.long))
    assert torch.equal(solo.experts, a.experts[starts[2] : starts[3]])


@SETTINGS
@given(s=st.integers(2, 24), **BATCH_CASES)
def test_running_pools_are_causal_prefix_pools(shape, b, s, max_docs, seed, train) -> None:
    """pool_scope="running": token t routes inside the top-P of its document's summed unmasked softmax over
    tokens up to t (same P as its document), so later tokens never change it; at a document's last token the
    running pool is the document pool."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = random_doc_ids(gen, b, s, max_docs)
    h = torch.randn(b, s, 16, generator=gen)
    er = shape[0] - shape[1]
    kw = {"seed": seed, "weight_seed": seed + 1, "pool_eval": er - 1}
    running = make_router(shape, scope="running", **kw).train(train)
    document = make_router(shape, **kw).train(train)
    out, ref = running(h, doc_ids), document(h, doc_ids)  # same generator seeds: the same pool sizes
    assert torch.equal(out.pool_sizes, ref.pool_sizes)
    support = out.scores.view(b, s, er) > 0
    assert support.gather(-1, out.experts.view(b, s, -1)).all(), "routed outside the running pool"
    q = out.logits.detach().softmax(-1).view(b, s, er).double()
    ref_support = ref.scores.view(b, s, er) > 0
    for bb in range(b):
        for g in doc_ids[bb].unique().tolist():
            tok = (doc_ids[bb] == g).nonzero().flatten()
            size = int(out.pool_sizes[bb, g])
            pref = q[bb, tok].cumsum(0)  # (T,E') preference of each prefix
            for j, t in enumerate(tok.tolist()):
                sup = support[bb, t]
                assert int(sup.sum()) == min(size, er)
                if (~sup).any():
                    assert pref[j][sup].min() >= pref[j][~sup].max() - 1e-9
            if (ref_support[bb, tok[-1]] != support[bb, tok[-1]]).any():  # only under a tie of the preference
                a = q[bb, tok].sum(0)
                assert a[ref_support[bb, tok[-1]]].min() <= a[~ref_support[bb, tok[-1]]].max() + 1e-6
    # causality: replacing the hidden states from position c on leaves the routing of positions < c unchanged
    c = s // 2
    h2 = h.clone()
    h2[:, c:] = torch.randn(b, s - c, 16, generator=gen)
    early = (torch.arange(s) < c).expand(b, s).reshape(-1)
    running.reseed(seed)
    a = running(h, doc_ids)
    running.reseed(seed)  # the same pool-size draws in training mode
    a2 = running(h2, doc_ids)
    assert torch.equal(a.experts[early], a2.experts[early])
    assert torch.equal(a.weights[early], a2.weights[early])


def test_document_pools_look_ahead_and_running_pools_do_not() -> None:
    """The contrast that motivates pool_scope="running": with document pools, later tokens can change the
    routing of earlier ones."""
    gen = torch.Generator().manual_seed(7)
    doc_ids = torch.zeros(1, 40, dtype=torch.long)  # one document
    h = torch.randn(1, 40, 16, generator=gen)
    routes = {}
    for scope in ("document", "running"):
        r = make_router((16, 1, 3), pool_eval=3, scope=scope).eval()
        out = r(h, doc_ids)
        outsider = int((out.scores[-1] == 0).nonzero()[0])  # an expert outside the whole document's pool
        h2 = h.clone()
        h2[:, 20:] = 5 * r.weight[outsider].detach()  # later tokens that all want that expert
        routes[scope] = (out.experts[:20], r(h2, doc_ids).experts[:20])
    assert not torch.equal(*routes["document"])
    assert torch.equal(*routes["running"])


# ---------------------------------------------------------------------------------------------------------------
# The pool ranking against the implementation it replaced (argsort of every row, gather-based running sums):
# the same pools on random inputs, including exact ties (integer-valued preferences, equal rows).


def _argsort_members(pref: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The previous ranking: full argsort of every row, its first ``size`` experts."""
    top = pref.argsort(dim=-1, descending=True)
    keep = torch.arange(pref.shape[1]) < sizes.unsqueeze(1)
    return torch.zeros_like(pref, dtype=torch.bool).scatter_(1, top, keep)


def _gather_running_preference(probs: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The previous segmented running sum (B,S,E') -> (N,E')."""
    from emo_lightning.model import segment_positions

    b, s = doc_ids.shape
    q = probs.view(b, s, -1).double()
    cum = q.cumsum(1)
    first = torch.arange(s) - segment_positions(doc_ids)
    before = (cum - q).gather(1, first.unsqueeze(-1).expand_as(q))
    return (cum - before).reshape(b * s, -1)


@pytest.mark.parametrize("ties", ["none", "integer", "equal_rows"])
@pytest.mark.parametrize("seed", range(4))
def test_pool_ranking_matches_the_argsort_implementation(ties: str, seed: int) -> None:
    from emo_lightning.model.router import _top_members, running_pools, running_preference, segment_ids

    gen = torch.Generator().manual_seed(seed)
    b, s, e = 3, 64, 15
    doc_ids = random_doc_ids(gen, b, s, 6)
    if ties == "none":
        logits = torch.randn(b * s, e, generator=gen)
    elif ties == "integer":  # few distinct values: many exact ties of summed probabilities
        logits = torch.randint(0, 3, (b * s, e), generator=gen).float()
    else:  # whole rows of equal logits (uniform probabilities): every boundary ties
        logits = torch.randint(0, 2, (b * s, 1), generator=gen).float() * torch.randn(b * s, e, generator=gen)
    probs = logits.softmax(-1)
    sizes = torch.randint(1, e + 1, (b * s,), generator=gen)
    pref = running_preference(probs, doc_ids)
    assert torch.equal(pref, _gather_running_preference(probs, doc_ids))  # bit for bit
    seg = segment_ids(doc_ids)
    token_sizes = sizes.index_select(0, seg)
    assert torch.equal(running_pools(pref, seg, sizes, e), _argsort_members(pref, token_sizes))
    assert torch.equal(
        _top_members(pref.float(), token_sizes, e), _argsort_members(pref.float(), token_sizes)
    )
    assert (running_pools(pref, seg, sizes, e).sum(-1) == token_sizes).all()
