"""Analytic parameter counts and training FLOPs per token, from the config alone (no instantiation)."""

from __future__ import annotations

from dataclasses import dataclass

from emo_lightning.model.config import ModelConfig


@dataclass(frozen=True)
class ParamBudget:
    """Parameter counts of an ``EMOTransformer`` (equal to ``sum(p.numel())`` of the instantiated model)."""

    embedding: int  # input embedding V*d
    lm_head: int  # untied output head V*d
    attention: int  # q,k,v,o projections (+ QK-norm scales), all layers
    norms: int  # RMSNorm scales outside attention (2 per layer + final)
    router: int  # E'*d per layer
    routed_experts: int  # E' SwiGLU experts per layer
    shared_experts: int  # n_sh SwiGLU experts per layer
    active_routed_experts: int  # k' routed experts per layer (per token)

    @property
    def experts(self) -> int:
        return self.routed_experts + self.shared_experts

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.norms + self.router + self.experts

    @property
    def non_embedding(self) -> int:
        """Total without the input embedding and the LM head."""
        return self.total - self.embedding - self.lm_head

    @property
    def active(self) -> int:
        """Parameters used by one token: everything except the routed experts it does not visit."""
        return self.total - self.routed_experts + self.active_routed_experts

    @property
    def active_non_embedding(self) -> int:
        """Active parameters without the input embedding and the LM head (the paper's "active" count)."""
        return self.active - self.embedding - self.lm_head


def param_counts(cfg: ModelConfig) -> ParamBudget:
    a, r = cfg.arch, cfg.router
    d, L, hd = a.d_model, a.n_layers, a.head_dim
    expert = 3 * d * a.expert_hidden  # gate, up, down
    attn = d * (a.n_heads * hd) * 2 + d * (a.kv_heads * hd) * 2 + (2 * hd if a.qk_norm else 0)
    return ParamBudget(
        embedding=a.vocab_size * d,
        lm_head=a.vocab_size * d,
        attention=L * attn,
        norms=L * 2 * d + d,
        router=L * r.num_routed * d,
        routed_experts=L * r.num_routed * expert,
        shared_experts=L * r.num_shared * expert,
        active_routed_experts=L * r.routed_k * expert,
    )


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, *, mean_context: float | None = None, training: bool = True
) -> float:
    """Model FLOPs per token: 2 x (matmul parameters a token touches) + attention scores/values, x3 for
    training.

    Matmul parameters: attention projections, router, k' routed + shared experts, LM head (not the embedding
    lookup, not norms). Attention: 4 * ctx * n_heads * head_dim per layer (QK^T and AV), with ctx the mean
    number of attended keys: ``mean_context`` if given (e.g. the mean document length / 2 with document
    masking), else causal (seq_len + 1) / 2 with ``seq_len`` defaulting to ``arch.max_seq_len``.
    """
    a = cfg.arch
    p = param_counts(cfg)
    dense_attn = p.attention - (a.n_layers * 2 * a.head_dim if a.qk_norm else 0)
    matmul = dense_attn + p.router + p.active_routed_experts + p.shared_experts + p.lm_head
    if mean_context is None:
        mean_context = ((seq_len or a.max_seq_len) + 1) / 2
    attn = a.n_layers * 4 * mean_context * a.n_heads * a.head_dim
    fwd = 2 * matmul + attn
    return 3 * fwd if training else fwd
