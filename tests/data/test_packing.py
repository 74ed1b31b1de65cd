"""Packer: greedy packing, labels across boundaries, doc_ids restarts, padding, long documents."""

from __future__ import annotations

import numpy as np
import pytest

from emo_lightning.data.packing import IGNORE_INDEX, PAD_DOMAIN, Packer

from .helpers import check_batch, split_docs

PAD = 1


def reference(docs: list[tuple[np.ndarray, int]], b: int, s: int) -> list[dict[str, np.ndarray]]:
    """Token-by-token reference of the batch contract (slow, obviously correct)."""
    toks = [(int(t), d, i, j == len(doc) - 1) for i, (doc, d) in enumerate(docs) for j, t in enumerate(doc)]
    n = b * s
    out = []
    for start in range(0, len(toks), n):
        chunk = toks[start : start + n]
        ids, labels, seg, dom = [], [], [], []
        for k, (t, d, i, last) in enumerate(chunk):
            ids.append(t)
            dom.append(d)
            labels.append(IGNORE_INDEX if last else toks[start + k + 1][0])
            row_start = toks[start + (k // s) * s][2]
            seg.append(i - row_start)
        for k in range(len(chunk), n):  # padding: one extra segment
            ids.append(PAD)
            labels.append(IGNORE_INDEX)
            dom.append(PAD_DOMAIN)
            row_first = start + (k // s) * s
            seg.append(0 if row_first >= len(toks) else toks[-1][2] + 1 - toks[row_first][2])
        out.append(
            {
                k: np.array(v).reshape(b, s)
                for k, v in (("input_ids", ids), ("labels", labels), ("doc_ids", seg), ("domain_ids", dom))
            }
        )
    return out


def run(docs: list[tuple[np.ndarray, int]], b: int, s: int) -> list[dict[str, np.ndarray]]:
    packer = Packer(b, s, PAD)
    out = []
    for tokens, domain in docs:
        packer.add(tokens, domain)
        while packer.ready():
            out.append(packer.pop())
    return out + packer.flush()


def random_docs(rng: np.random.Generator, n: int, max_len: int) -> list[tuple[np.ndarray, int]]:
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len))
        tokens = rng.integers(2, 500, size=length).astype(np.uint16)
        tokens[-1] = 0  # EOS
        docs.append((tokens, int(rng.integers(0, 4))))
    return docs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("b", "s", "max_len"), [(2, 8, 12), (3, 16, 70), (4, 32, 20), (1, 5, 3)])
def test_matches_token_by_token_reference(seed: int, b: int, s: int, max_len: int) -> None:
    docs = random_docs(np.random.default_rng(seed), 25, max_len)
    got, want = run(docs, b, s), reference(docs, b, s)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
        check_batch(g, PAD)
    # Every token of every document exactly once, in order.
    assert split_docs(got) == [tuple(d.tolist()) for d, _ in docs]


def test_doc_ids_restart_at_every_document_and_row() -> None:
    docs = [(np.array([5, 6, 0]), 0), (np.array([7, 0]), 1), (np.array([8, 9, 10, 11, 12, 0]), 2)]
    (batch,) = run(docs, 2, 6)
    np.testing.assert_array_equal(batch["doc_ids"], [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 0, 7, 0, 8], [9, 10, 11, 12, 0, PAD]])
    # The document cut at the row end keeps its label chain: row 0's last label is row 1's first input.
    np.testing.assert_array_equal(batch["labels"], [[6, 0, -100, 0, -100, 9], [10, 11, 12, 0, -100, -100]])
    np.testing.assert_array_equal(batch["domain_ids"], [[0, 0, 0, 1, 1, 2], [2, 2, 2, 2, 2, -1]])


def test_document_longer_than_three_sequences() -> None:
    s, b = 16, 2
    long_doc = np.arange(2, 2 + 3 * s + 7, dtype=np.uint16)
    long_doc[-1] = 0
    docs = [(np.array([3, 0]), 1), (long_doc, 2), (np.array([4, 4, 0]), 3)]
    batches = run(docs, b, s)
    rows_ids = np.concatenate([x["input_ids"] for x in batches])
    rows_doc = np.concatenate([x["doc_ids"] for x in batches])
    rows_labels = np.concatenate([x["labels"] for x in batches])
    # Row 0: short doc (segment 0) then the long one (segment 1); rows 1-2: only the long doc (segment 0).
    assert rows_doc[0, 0] == 0 and (rows_doc[0, 2:] == 1).all()
    assert (rows_doc[1] == 0).all() and (rows_doc[2] == 0).all()
    # Row 3 starts with the long doc's tail as a new segment 0, then the last doc as segment 1.
    tail = len(long_doc) - (s - 2) - 2 * s
    assert (rows_doc[3, :tail] == 0).all() and rows_doc[3, tail] == 1
    # Labels chain across the three row boundaries (one of them a batch boundary).
    for r in range(3):
        assert rows_labels[r, -1] == rows_ids[r + 1, 0]
    for b_ in batches:
        check_batch(b_, PAD)
    assert split_docs(batches) == [tuple(d.tolist()) for d, _ in docs]


def test_final_batch_padding_and_all_padding_batch() -> None:
    packer = Packer(2, 4, PAD)
    packer.add(np.array([5, 6, 0]), 3)
    (batch,) = packer.flush()
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 0, PAD], [PAD] * 4])
    np.testing.assert_array_equal(batch["doc_ids"], [[0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["domain_ids"], [[3, 3, 3, -1], [-1] * 4])
    np.testing.assert_array_equal(batch["labels"], [[6, 0, -100, -100], [-100] * 4])
    empty = packer.pop()
    assert (empty["labels"] == IGNORE_INDEX).all() and (empty["domain_ids"] == PAD_DOMAIN).all()
    assert packer.flush() == []
