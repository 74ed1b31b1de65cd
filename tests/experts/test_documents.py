"""Documents: tokenisation like the shards, packing with document index and position, disjoint splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools.records import InputError
from emo_lightning.errors import UserError
from emo_lightning.experts.documents import (
    Document,
    DocumentTokenizer,
    load_documents,
    pack_documents,
    split_documents,
)
from emo_lightning.model import Routing, parse_routing
from tests.experts.conftest import TOKENIZER


def test_tokenise_appends_eos(jsonl: Path) -> None:
    tok = DocumentTokenizer(TOKENIZER)
    docs = load_documents(jsonl, tok)
    assert len(docs) == 9 and docs[0].domain == "math"
    assert all(d.tokens[-1] == tok.eos_id for d in docs)


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2"):
        load_documents(bad, DocumentTokenizer(TOKENIZER))


def test_pack_positions_and_index() -> None:
    docs = [Document(str(i), "x", np.arange(n) + 10) for i, n in enumerate((5, 13, 3, 9))]
    batches = pack_documents(docs, 8, 2, pad_id=1)
    index = np.concatenate([b.doc_index.numpy().ravel() for b in batches])
    pos = np.concatenate([b.doc_pos.numpy().ravel() for b in batches])
    ids = np.concatenate([b.input_ids.numpy().ravel() for b in batches])
    for i, d in enumerate(docs):
        assert (pos[index == i] == np.arange(len(d.tokens))).all()
        assert (ids[index == i] == d.tokens).all()
    assert (pos[index < 0] == -1).all()


def test_split_is_disjoint_and_nested() -> None:
    docs = [Document(f"{dom}{i}", dom, np.array([i])) for dom in "ab" for i in range(20)]
    calib, evals = split_documents(docs, 4, 10, seed=0)
    for dom in "ab":
        assert not {d.id for d in calib[dom]} & {d.id for d in evals[dom]}
        assert len(calib[dom]) == 4 and len(evals[dom]) == 10
    assert split_documents(docs, 4, 10, seed=0)[0]["a"] == calib["a"]


def test_parse_routing() -> None:
    assert parse_routing("full") == Routing()
    assert parse_routing("pool:4") == Routing("pool", 4)
    assert parse_routing("running:4") == Routing("running", 4) and str(Routing("running", 4)) == "running:4"
    assert parse_routing("causal:4:32") == Routing("causal", 4, 32)
    for bad in ("pool", "pool:0", "running:4:2", "causal:4", "x"):
        with pytest.raises(UserError, match="unknown routing"):
            parse_routing(bad)
