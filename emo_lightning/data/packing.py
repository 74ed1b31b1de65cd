"""Greedy packing of documents into ``(B, S)`` batches (the batch contract of ``docs/architecture.md``).

Documents (token arrays whose last token is the EOS) are appended in stream order and cut into rows of ``S``
tokens; a document cut at a row end continues at the start of the next row as a new segment. Every appended
token is emitted as an input exactly once. ``labels[t]`` is the next token of the same document, also across
a row (and batch) boundary thanks to a one-token lookahead (a cut document's remainder stays pending); it is
``-100`` at a document's last token and on padding. Work per batch is a few numpy operations plus a loop over
its documents.
"""

from __future__ import annotations

from collections import deque

import numpy as np

IGNORE_INDEX = -100
PAD_DOMAIN = -1
Batch = dict[str, np.ndarray]


class Packer:
    """Accumulates documents and emits packed batches of ``batch_size`` rows of ``seq_len`` tokens."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.n = batch_size * seq_len
        self._docs: deque[tuple[np.ndarray, int]] = deque()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Tokens appended but not yet emitted."""
        return self._pending

    def add(self, tokens: np.ndarray, domain: int) -> None:
        """Append one document (empty documents are ignored)."""
        if len(tokens):
            self._docs.append((tokens, domain))
            self._pending += len(tokens)

    def ready(self) -> bool:
        """A full batch is available (a cut document always leaves its lookahead token pending)."""
        return self._pending >= self.n

    def pop(self) -> Batch:
        """Emit the next batch; pads only when fewer than ``B*S`` tokens remain (end of a single pass)."""
        need = min(self._pending, self.n)
        parts: list[np.ndarray] = []
        domains: list[int] = []
        got, cut = 0, False
        while got < need:
            tokens, domain = self._docs[0]
            take = min(len(tokens), need - got)
            parts.append(tokens[:take])
            domains.append(domain)
            got += take
            cut = take < len(tokens)
            if cut:
                self._docs[0] = (tokens[take:], domain)
            else:
                self._docs.popleft()
        self._pending -= got
        n = got
        lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        flat = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)
        doc = np.repeat(np.arange(len(parts), dtype=np.int64), lens)
        dom = np.repeat(np.asarray(domains, dtype=np.int64), lens)

        ids = np.full(self.n, self.pad_id, dtype=np.int64)
        ids[:n] = flat
        labels = np.full(self.n, IGNORE_INDEX, dtype=np.int64)
        if n > 1:
            labels[: n - 1] = np.where(doc[1:] == doc[:-1], flat[1:], IGNORE_INDEX)
        if cut:  # one-token lookahead: the document continues in the next batch
            labels[n - 1] = int(self._docs[0][0][0])
        seg = np.empty(self.n, dtype=np.int64)
        seg[:n] = doc
        seg[n:] = doc[-1] + 1 if n else 0  # padding is one extra segment of its own
        domain_ids = np.full(self.n, PAD_DOMAIN, dtype=np.int64)
        domain_ids[:n] = dom
        shape = (self.batch_size, self.seq_len)
        seg = seg.reshape(shape)
        return {
            "input_ids": ids.reshape(shape),
            "labels": labels.reshape(shape),
            "doc_ids": seg - seg[:, :1],
            "domain_ids": domain_ids.reshape(shape),
        }

    def flush(self) -> list[Batch]:
        """End of a single pass: all remaining batches, the last one padded."""
        out = []
        while self._pending:
            out.append(self.pop())
        return out

    def clear(self) -> None:
        """Drop what is pending (end of a training chunk)."""
        self._docs.clear()
        self._pending = 0
