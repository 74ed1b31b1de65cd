"""Causal self-attention with RoPE and optional intra-document masking.

One ``AttentionMask`` is built per forward from ``doc_ids`` and shared by all layers. Backends:

* ``sdpa``: ``F.scaled_dot_product_attention`` with a boolean ``(B, 1, S, S)`` mask (``is_causal`` when
  document masking is off). Used on CPU.
* ``flex``: FlexAttention with a block mask (``create_block_mask``), compiled; the intended CUDA path.
  Same interface.

With document masking on, RoPE positions restart at 0 in every document, so a document is processed exactly
as if it were alone in its row (RoPE is relative: this only changes rounding, and keeps positions small).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emo_lightning.model.config import ArchConfig

if TYPE_CHECKING:
    from emo_lightning.model.decoding import LayerCache

_compiled_flex: Any = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, enable_gqa: bool) -> Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _segment_starts(doc_ids: Tensor) -> Tensor:
    """(B,S) bool: True where a new segment starts (first token of a row, or doc_ids changes)."""
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return start


def segment_index(doc_ids: Tensor) -> Tensor:
    """Index of every token's contiguous segment within its row: 0,0,1,1,1,2,... (B,S) -> (B,S) long.

    Equals the packer's ``doc_ids``; derived from boundaries only, so any labelling (global ids, -1 padding)
    yields the same segments for the router and the attention mask.
    """
    return _segment_starts(doc_ids).cumsum(dim=1) - 1


def segment_positions(doc_ids: Tensor) -> Tensor:
    """Position of every token within its document segment. doc_ids: (B, S) -> (B, S) long."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)  # (B,S)
    seg_start = (
        torch.where(_segment_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    )  # (B,S)
    return idx - seg_start


@dataclass
class AttentionMask:
    """What every attention layer of one forward needs: positions and the mask in the backend's format."""

    positions: Tensor  # (B,S) or (S,) long, RoPE positions
    backend: str  # "sdpa" | "flex"
    dense: Tensor | None = None  # (B,1,S,S) bool, True = may attend (sdpa with document masking)
    block_mask: Any = None  # FlexAttention BlockMask
    causal_only: bool = False  # no document masking: plain causal
    decode: bool = (
        False  # one new token per row attending to a DecodeCache (positions (B,1), dense (B,1,1,T))
    )

    @staticmethod
    def build(doc_ids: Tensor, cfg: ArchConfig) -> AttentionMask:
        """doc_ids: (B,S) long segment ids."""
        b, s = doc_ids.shape
        backend = cfg.attention_backend
        if backend == "auto":
            backend = "flex" if doc_ids.is_cuda else "sdpa"
        if not cfg.doc_attention_mask:
            pos = torch.arange(s, device=doc_ids.device)
            if backend == "flex":
                from torch.nn.attention.flex_attention import create_block_mask

                def causal(b_, h_, q_idx, kv_idx):
                    return q_idx >= kv_idx

                bm = create_block_mask(causal, None, None, s, s, device=doc_ids.device)
                return AttentionMask(pos, backend, block_mask=bm)
            return AttentionMask(pos, backend, causal_only=True)
        pos = segment_positions(doc_ids)
        seg = segment_index(doc_ids)  # (B,S)
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def doc_causal(b_, h_, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (seg[b_, q_idx] == seg[b_, kv_idx])

            bm = create_block_mask(doc_causal, b, None, s, s, device=doc_ids.device)
            return AttentionMask(pos, backend, block_mask=bm)
        causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()  # (S,S)
        same_doc = seg[:, :, None] == seg[:, None, :]  # (B,S,S)
        return AttentionMask(pos, backend, dense=(same_doc & causal).unsqueeze(1))


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """RoPE tables (non-persistent buffers) and their application to (B, H, S, hd) tensors."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.get_default_device())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) fp32 (T, hd/2), computed in fp64."""
        hd = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
        ang = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)[:, None] * inv[None, :]
        return ang.cos().float(), ang.sin().float()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the tables in place (after ``to_empty``: a model built on the meta device)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B,H,S,hd); positions: (B,S) or (S,)."""
        cos = self.cos[positions].unsqueeze(-3).to(x.dtype)  # (B,1,S,hd/2) or (1,S,hd/2)
        sin = self.sin[positions].unsqueeze(-3).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (no biases)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rope = Rotary(self.hd, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: Tensor, mask: AttentionMask, cache: LayerCache | None = None) -> Tensor:
        """x: (B,S,d) -> (B,S,d). With ``cache`` the keys and values are stored for incremental decoding:
        a prefill writes indices 0..S-1, a decode step (``mask.decode``) row b's one token at its position."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.hd).transpose(1, 2)  # (B,H,S,hd)
        k = self.k_proj(x).view(b, s, self.n_kv, self.hd).transpose(1, 2)  # (B,Hkv,S,hd)
        v = self.v_proj(x).view(b, s, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, mask.positions), self.rope(k, mask.positions)
        if cache is not None and mask.decode:
            at = mask.positions.view(b, 1, 1, 1).expand(b, self.n_kv, 1, self.hd)  # (B,Hkv,1,hd)
            cache.k.scatter_(2, at, k.to(cache.k.dtype))
            cache.v.scatter_(2, at, v.to(cache.v.dtype))
            width = mask.dense.shape[-1]
            k, v = cache.k[:, :, :width].to(q.dtype), cache.v[:, :, :width].to(q.dtype)  # (B,Hkv,T,hd)
        elif cache is not None:
            cache.k[:, :, :s] = k
            cache.v[:, :, :s] = v
        gqa = self.n_kv != self.n_heads
        if mask.backend == "flex":
            o = _flex_attention(q, k, v, mask.block_mask, gqa)
        elif mask.causal_only:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.hd))
