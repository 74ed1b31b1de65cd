"""Incremental decoding: cached steps reproduce a full forward of every prefix (full routing, running pools, a
pruned model), and a right-padded batch decodes each row as it would alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emo_lightning.model import (
    ArchConfig,
    DecodeCache,
    EMOTransformer,
    ModelConfig,
    RouterConfig,
    prune_model,
)


def _model(kind: str = "emo", scope: str = "document", pool: int | None = None, qk_norm: bool = False):
    arch = ArchConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, expert_hidden=16,
                      max_seq_len=64, qk_norm=qk_norm)  # fmt: skip
    router = RouterConfig(kind=kind, num_experts=9, num_shared=1, top_k=3, pool_scope=scope, pool_eval=pool)
    torch.manual_seed(0)
    model = EMOTransformer(ModelConfig(arch, router))
    with torch.no_grad():  # sharp routers: pools and top-k choices matter
        for blk in model.blocks:
            blk.moe.router.weight.normal_(0.0, 0.7)
    return model.eval()


VARIANTS = {
    "full": lambda: _model(),  # pool_eval None = E': unrestricted
    "running:3": lambda: _model(scope="running", pool=3),
    "running:3, qk_norm": lambda: _model(scope="running", pool=3, qk_norm=True),
    "standard": lambda: _model("standard"),
    "subset": lambda: prune_model(
        _model(scope="running", pool=4), [[0, 2, 5, 7], [1, 2, 3, 4], [0, 1, 6, 7]]
    ),
}


def _decode(model: EMOTransformer, prompts: list[list[int]], feed: list[list[int]]) -> list[torch.Tensor]:
    """Prefill right-padded ``prompts``, then feed ``feed[t]`` (one token per row); logits of every step."""
    b, s = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, s, dtype=torch.long)
    doc = torch.ones(b, s, dtype=torch.long)  # padding: its own segment
    for i, p in enumerate(prompts):
        ids[i, : len(p)], doc[i, : len(p)] = torch.tensor(p), 0
    cache = DecodeCache.empty(model.cfg, b, 48, torch.device("cpu"), torch.float32)
    out = model(ids, doc, cache=cache).logits
    steps = [out[torch.arange(b), torch.tensor([len(p) - 1 for p in prompts])]]  # (B,V) at each prompt end
    for tokens in feed:
        steps.append(model(torch.tensor(tokens)[:, None], cache=cache).logits[:, -1])
    return steps


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_steps_equal_a_full_forward_of_every_prefix(variant: str) -> None:
    model = VARIANTS[variant]()
    seq = torch.randint(2, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    steps = _decode(model, [seq[0, :5].tolist()], [[t] for t in seq[0, 5:].tolist()])
    for i, got in enumerate(steps):
        prefix = seq[:, : 5 + i]
        torch.testing.assert_close(
            got, model(prefix).logits[:, -1], atol=2e-5, rtol=0, msg=f"{variant} step {i}"
        )


@torch.no_grad()
def test_running_pools_change_the_decoded_logits() -> None:
    """The running-pool check above could pass vacuously if pools never bound: they do."""
    seq = torch.randint(2, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(_model(scope="running", pool=3)(seq).logits, _model()(seq).logits, atol=1e-3)


@pytest.mark.parametrize("variant", ["full", "running:3"])
@torch.no_grad()
def test_a_padded_batch_decodes_each_row_as_alone(variant: str) -> None:
    model = VARIANTS[variant]()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (3, 11, 7)]
    feed = torch.randint(2, 97, (6, 3), generator=g).tolist()
    batched = _decode(model, prompts, feed)
    for row, prompt in enumerate(prompts):
        alone = _decode(model, [prompt], [[tokens[row]] for tokens in feed])
        for i, (a, bt) in enumerate(zip(alone, batched, strict=True)):
            torch.testing.assert_close(bt[row], a[0], atol=1e-5, rtol=0, msg=f"row {row} step {i}")


def test_document_pools_refuse_to_decode() -> None:
    model = _model(pool=3)  # document scope: a token's pool would depend on later tokens
    cache = DecodeCache.empty(model.cfg, 1, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="look ahead"):
        model(torch.tensor([[5, 6]]), cache=cache)


def test_the_cache_refuses_more_than_it_holds() -> None:
    model = _model()
    cache = DecodeCache.empty(model.cfg, 1, 4, torch.device("cpu"), torch.float32)
    model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.tensor([[9]]), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        DecodeCache.empty(model.cfg, 1, 65, torch.device("cpu"), torch.float32)
    assert dataclasses.is_dataclass(cache)
