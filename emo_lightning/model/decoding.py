"""Incremental decoding state: the key/value cache and the running router preference of every sequence.

A generation batch holds one document per row. The prefill forward takes the right-padded prompts with
``doc_ids`` 0 on the prompt and 1 on the padding (the row's first segment is its document); every later forward
takes one new token per row. Each row's document starts at cache index 0, so a row decodes exactly as it would
alone, whatever the other rows' lengths.

* Attention: keys and values of layer ``l`` live in ``layers[l].k / .v`` ``(B, Hkv, T, hd)``; the new token of
  row ``b`` is written at index ``lengths[b]`` (RoPE position ``lengths[b]``) and attends to indices
  ``<= lengths[b]``; a prompt's padding is overwritten by the generated tokens.
* Running pools (``pool_scope="running"``): ``layers[l].pref`` ``(B, E')`` fp64 is the sum of the router softmax
  over the row's document so far, the per-sequence twin of the training-time segmented cumulative sum (the same
  additions in the same order), so a token's pool is the one a full forward of the prefix would choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from emo_lightning.model.attention import AttentionMask
from emo_lightning.model.config import ModelConfig


@dataclass
class LayerCache:
    """One layer's keys and values (B, Hkv, T, hd) and its running router preference (B, E') fp64."""

    k: Tensor
    v: Tensor
    pref: Tensor | None = None


@dataclass
class DecodeCache:
    """The state of a batch of sequences being decoded (see the module docstring)."""

    layers: list[LayerCache]
    lengths: Tensor  # (B,) long: tokens of each row's document in the cache
    size: int = 0  # host-side: cache indices in use (0 before the prefill)

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> DecodeCache:
        """A cache for ``batch`` rows of up to ``capacity`` tokens (prompt + generated)."""
        a = cfg.arch
        if capacity > a.max_seq_len:
            raise ValueError(f"capacity {capacity} exceeds arch.max_seq_len={a.max_seq_len} (the RoPE table)")
        shape = (batch, a.kv_heads, capacity, a.head_dim)
        layers = [
            LayerCache(
                torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
            )
            for _ in range(a.n_layers)
        ]
        return cls(layers, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def prefilled(self) -> bool:
        return self.size > 0

    def start(self, doc_ids: Tensor) -> AttentionMask | None:
        """Before a forward: for the prefill (``doc_ids`` (B,S)) set each row's document length and return
        ``None`` (the forward builds its usual mask); for a decode step return its mask over the cache."""
        s = doc_ids.shape[1]
        if not self.prefilled:
            if s > self.capacity:
                raise ValueError(f"prompt of {s} tokens exceeds the cache capacity {self.capacity}")
            self.lengths = (doc_ids == doc_ids[:, :1]).long().cumprod(1).sum(1)  # (B,) first segment
            return None
        if s != 1:
            raise ValueError("after the prefill, decode one token per row")
        if self.size >= self.capacity:
            raise ValueError(f"the cache is full ({self.capacity} tokens)")
        width = self.size + 1  # indices a new token may attend to (its own write included)
        visible = torch.arange(width, device=self.lengths.device) <= self.lengths[:, None]  # (B,T)
        return AttentionMask(self.lengths[:, None], "sdpa", dense=visible[:, None, None, :], decode=True)

    def finish(self, s: int) -> None:
        """After a forward of ``s`` tokens per row."""
        if self.prefilled:
            self.lengths = self.lengths + 1
            self.size += 1
        else:
            self.size = s
