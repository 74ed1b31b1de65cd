"""Helpers to read packed batches back into documents (shared by the data tests)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

IGNORE = -100


def as_numpy(batch: Mapping) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def check_batch(batch: Mapping, pad_id: int) -> None:
    """Invariants of one batch that need no other batch (labels inside rows, doc_ids, padding)."""
    b = as_numpy(batch)
    ids, labels, doc, dom = b["input_ids"], b["labels"], b["doc_ids"], b["domain_ids"]
    assert ids.dtype == labels.dtype == doc.dtype == dom.dtype == np.int64
    assert (doc[:, 0] == 0).all()
    step = np.diff(doc, axis=1)
    assert ((step == 0) | (step == 1)).all()
    # Inside a segment the label is the next input; a new segment starts after a -100 label.
    same = (step == 0) & (dom[:, :-1] >= 0)
    assert (labels[:, :-1][same] == ids[:, 1:][same]).all()
    assert (labels[:, :-1][step == 1] == IGNORE).all()
    pad = dom < 0
    assert (ids[pad] == pad_id).all() and (labels[pad] == IGNORE).all()


def split_docs(batches: Iterable[Mapping]) -> list[tuple[int, ...]]:
    """Documents of one worker's stream of batches, in order (a document ends at a ``-100`` label)."""
    ids, labels, dom = [], [], []
    for batch in batches:
        b = as_numpy(batch)
        ids.append(b["input_ids"].ravel())
        labels.append(b["labels"].ravel())
        dom.append(b["domain_ids"].ravel())
    if not ids:
        return []
    flat_ids, flat_labels, flat_dom = np.concatenate(ids), np.concatenate(labels), np.concatenate(dom)
    keep = flat_dom >= 0
    flat_ids, flat_labels = flat_ids[keep], flat_labels[keep]
    cont = flat_labels != IGNORE
    # Labels continue across row and batch boundaries: the label is the next token of the stream.
    assert (flat_labels[:-1][cont[:-1]] == flat_ids[1:][cont[:-1]]).all()
    assert not cont[-1] if len(cont) else True
    ends = np.flatnonzero(~cont) + 1
    return [tuple(d.tolist()) for d in np.split(flat_ids, ends[:-1])] if len(ends) else []


def shard_documents(folder: str | Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(id, domain, tokens)`` of every document of a shard folder, in manifest and shard order."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
        for parts in members.values():
            tokens = np.load(io.BytesIO(parts["tokens.npy"]))
            out.append((parts["id.txt"].decode(), parts["domain.txt"].decode(), tuple(tokens.tolist())))
    return out
