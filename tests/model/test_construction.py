"""EMOTransformer construction: meta first, then materialised; every tensor initialised; the startup summary."""

from __future__ import annotations

import torch

from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig, param_counts


def cfg(**router: object) -> ModelConfig:
    arch = ArchConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, expert_hidden=16, max_seq_len=16)
    return ModelConfig(arch, RouterConfig(num_experts=8, num_shared=1, top_k=3, **router))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and all buffers (non-persistent ones too)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_every_tensor_is_initialised_the_same_way_twice() -> None:
    """Built on meta and materialised: nothing is left to uninitialised memory (buffers included), and the
    same global seed gives the same model, whatever was allocated before."""
    torch.manual_seed(3)
    a = EMOTransformer(cfg(balance="both"))
    garbage = torch.full((1 << 16,), float("nan"))  # leave non-zero memory behind for the allocator
    del garbage
    torch.manual_seed(3)
    b = EMOTransformer(cfg(balance="both"))
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
        assert torch.isfinite(sa[name]).all(), name
    assert all((r.expert_bias == 0).all() for r in a.routers())
    rope = a.blocks[0].attn.rope
    with torch.device("meta"):
        meta = EMOTransformer(cfg())
    assert all(t.is_meta for t in state(meta).values())
    meta.materialize("cpu")
    assert torch.equal(meta.blocks[0].attn.rope.cos, rope.cos)


def test_parameter_summary_and_line() -> None:
    c = cfg()
    with torch.device("meta"):
        model = EMOTransformer(c)
    s = model.parameter_summary()
    b = param_counts(c)
    assert (s.routed, s.shared, s.total) == (b.routed_experts, b.shared_experts, b.total)
    assert (s.local_experts, s.routable_experts) == (7, 7)
    assert s.bytes >= 4 * b.total
    line = s.line(0, 1)
    assert line.startswith(
        f"rank 0/1: {b.total:,} parameters (dense {s.dense:,}, shared {s.shared:,}, routed "
    )
    assert line.endswith(" MB") and "7 of 7 experts per layer" in line
