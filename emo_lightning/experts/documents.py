"""Documents for the modularity tools: JSONL reading (``data_tools`` validation), tokenisation, packing.

Tokenisation matches the shards (``add_special_tokens=False``, the EOS appended as the document's last
token). Packing reuses the training :class:`~emo_lightning.data.packing.Packer` with the document's index in
place of its domain, so every token knows its document (``doc_index``) and its position in it (``doc_pos``),
also when a document is cut at a row end and continues in the next row as a new segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data_tools.jsonl import iter_records
from data_tools.records import Record, SkipLog
from data_tools.tokenizer import load_tokenizer, special_ids
from emo_lightning.data.packing import Packer
from emo_lightning.errors import UserError

DEFAULT_TOKENIZER = "data/tokenizer.json"
DATA_FIX = "pass a JSON Lines file of documents (text, domain) or a folder of them, e.g. data/corpus/val"


@dataclass
class Document:
    """One tokenised document; ``tokens`` ends with the EOS."""

    id: str
    domain: str
    tokens: np.ndarray  # (T,) int64


@dataclass
class DocBatch:
    """A packed ``(B,S)`` batch (the batch contract) plus the document of every token."""

    input_ids: Tensor  # (B,S) long
    labels: Tensor  # (B,S) long, -100 where there is no next token of the same document
    doc_ids: Tensor  # (B,S) long, segment index within the row
    doc_index: Tensor  # (B,S) long, index of the token's document in the packed list, -1 on padding
    doc_pos: Tensor  # (B,S) long, position of the token within its document, -1 on padding


def input_files(path: str | Path) -> list[Path]:
    """A JSONL file, or every ``*.jsonl`` / ``*.jsonl.gz`` of a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.jsonl.gz")])
        if not files:
            raise UserError(f"--data {path}: no *.jsonl or *.jsonl.gz files in this folder", DATA_FIX)
        return files
    if not path.is_file():
        raise UserError(f"--data {path}: no such file or directory", DATA_FIX)
    return [path]


def read_records(path: str | Path) -> list[Record]:
    """Valid records of a file or directory; the first bad record raises ``InputError`` (file:line)."""
    return [r for f in input_files(path) for r in iter_records(f, "fail", SkipLog())]


class DocumentTokenizer:
    """The run's tokenizer (``data/tokenizer.json`` by default) with its EOS and PAD ids."""

    def __init__(self, path: str | Path = DEFAULT_TOKENIZER) -> None:
        self.tokenizer = load_tokenizer(path)
        _, self.eos_id, _, self.pad_id = special_ids(self.tokenizer, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, records: Sequence[Record]) -> list[Document]:
        encoded = self.tokenizer.encode_batch([r.text for r in records], add_special_tokens=False)
        return [
            Document(r.id, r.domain, np.asarray([*e.ids, self.eos_id], dtype=np.int64))
            for r, e in zip(records, encoded, strict=True)
        ]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_documents(path: str | Path, tokenizer: DocumentTokenizer) -> list[Document]:
    """Read and tokenise every document of a JSONL file or directory; an input without documents is refused (a
    subset, a loss or routes need at least one; a record with empty text is refused by the reader)."""
    docs = tokenizer(read_records(path))
    if not docs:
        raise UserError(f"--data {path}: no documents in the input", DATA_FIX)
    return docs


def by_domain(docs: Sequence[Document]) -> dict[str, list[Document]]:
    """Documents grouped by domain (domains sorted, documents in input order)."""
    out: dict[str, list[Document]] = {}
    for d in docs:
        out.setdefault(d.domain, []).append(d)
    return dict(sorted(out.items()))


def split_documents(
    docs: Sequence[Document], n_calib: int, n_eval: int, seed: int = 0
) -> tuple[dict[str, list[Document]], dict[str, list[Document]]]:
    """Per domain, a seeded shuffle, then ``n_calib`` calibration and the next ``n_eval`` evaluation
    documents (disjoint). Calibration lists are nested: the first s of them are the s-shot set."""
    calib, evals = {}, {}
    for i, (domain, group) in enumerate(by_domain(docs).items()):
        order = np.random.default_rng([seed, i]).permutation(len(group))
        picked = [group[j] for j in order]
        calib[domain] = picked[:n_calib]
        evals[domain] = picked[n_calib : n_calib + n_eval]
    return calib, evals


def pack_documents(docs: Sequence[Document], seq_len: int, batch_size: int, pad_id: int) -> list[DocBatch]:
    """Pack documents (in order) into ``(batch_size, seq_len)`` batches, the last one padded."""
    packer = Packer(batch_size, seq_len, pad_id)
    for i, d in enumerate(docs):
        packer.add(d.tokens, i)
    raw = packer.flush()
    if not raw:
        return []
    index = np.stack([b["domain_ids"] for b in raw])  # (nb,B,S): the document index, -1 on padding
    flat = index.reshape(-1)
    valid = flat >= 0
    # tokens of a document are contiguous in stream order: position = stream index - first stream index
    # (every document has at least its EOS, so the unique indices are exactly 0..len(docs)-1)
    _, first = np.unique(flat[valid], return_index=True)
    pos = np.full(flat.shape, -1, dtype=np.int64)
    pos[valid] = np.arange(int(valid.sum())) - first[flat[valid]]
    pos = pos.reshape(index.shape)
    return [
        DocBatch(
            torch.from_numpy(b["input_ids"]),
            torch.from_numpy(b["labels"]),
            torch.from_numpy(b["doc_ids"]),
            torch.from_numpy(index[i]),
            torch.from_numpy(pos[i]),
        )
        for i, b in enumerate(raw)
    ]
