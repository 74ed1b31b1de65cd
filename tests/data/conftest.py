"""Shared fixtures: a small multi-domain corpus cut from the bundled one, and its shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_tools.build import build_shards
from data_tools.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "data" / "tokenizer.json"
DOCS_PER_DOMAIN = 40


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return TOKENIZER


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict]]:
    """Four JSONL files (one domain each, gzip and plain) from the bundled val split, and their records."""
    out = tmp_path_factory.mktemp("corpus")
    paths, records = [], []
    for i, domain in enumerate(("code", "literature", "math", "science")):
        with gzip.open(REPO / "data" / "corpus" / "val" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for _, line in zip(range(DOCS_PER_DOMAIN), f, strict=False)]
        path = out / (f"{domain}.jsonl.gz" if i % 2 else f"{domain}.jsonl")
        opener = gzip.open if i % 2 else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        paths.append(path)
        records.extend(docs)
    return paths, records


@pytest.fixture(scope="session")
def shards(corpus: tuple[list[Path], list[dict]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of ``corpus`` (about 4k tokens each, so there are many more shards than ranks x workers)."""
    out = tmp_path_factory.mktemp("shards")
    build_shards(corpus[0], TOKENIZER, out, shard_size=4096, quiet=True)
    return out


@pytest.fixture(scope="session")
def expected_docs(corpus: tuple[list[Path], list[dict]]) -> list[tuple[int, ...]]:
    """Token sequences (EOS included) of every corpus document."""
    tok = load_tokenizer(TOKENIZER)
    eos = tok.token_to_id("<|endoftext|>")
    return [tuple([*tok.encode(r["text"], add_special_tokens=False).ids, eos]) for r in corpus[1]]
