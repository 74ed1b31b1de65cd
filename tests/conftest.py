"""Shared fixtures: small shards of the bundled corpus, the research-only corpus when present, one thread.

The bundled corpus (``data/corpus``: math, code, literature, science) is in every clone, so every test that only
needs text uses it. Tests that need the eight research-only domains of ``../shared/corpus`` take the
``shared_corpus`` fixture: without ``../shared`` (a user's clone) they skip with the reason printed; under
``CI=true`` a missing shared corpus is an error, so CI always runs every test.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMO_SHARED", ROOT.parent / "shared"))
TOKENIZER = ROOT / "data" / "tokenizer.json"
BUNDLED = ROOT / "data" / "corpus"
DOMAINS = ("code", "literature", "math", "science")
# characters of text per domain in the tiny test corpus (~1 MB of training text in all), documents cut to
# DOC_CHARS (like the shared tiny corpus: many short documents, so that small shards hold whole documents)
TINY_CHARS = {"train": 250_000, "val": 40_000}
DOC_CHARS = 1500


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test: the tensors are tiny, and on a shared 2-core machine two OpenMP threads
    contending with other processes made some tests ~100x slower. The previous setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _require_shared_corpus() -> Path:
    corpus = SHARED / "corpus"
    if not (corpus / "tiny" / "val.jsonl").exists():
        reason = f"needs the research-only corpus at {corpus} (set EMO_SHARED to the folder holding corpus/)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs every test: {reason}")
        pytest.skip(reason)
    return corpus


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``shared_corpus`` skip (with the reason) where ``../shared`` is absent."""
    if item.get_closest_marker("shared_corpus"):
        _require_shared_corpus()


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """``../shared/corpus`` (all eight domains, research-only: read in place, never copied into the repo)."""
    return _require_shared_corpus()


def build_shards(inputs: list[Path], out: Path, shard_size: int = 200) -> Path:
    """Run ``emo-data build-shards`` (the real command line) and return the shard folder."""
    cmd = [
        sys.executable, "-m", "data_tools.cli", "build-shards",
        "--input", *map(str, inputs),
        "--tokenizer", str(TOKENIZER),
        "--out", str(out),
        "--shard-size", str(shard_size),
        "--workers", "1",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return out


def cut_corpus(split: str, out: Path, chars: int) -> Path:
    """The first documents (cut to ``DOC_CHARS``) of each bundled domain of ``split`` up to ``chars``
    characters, as one JSONL file."""
    with open(out, "w", encoding="utf-8") as f:
        for domain in DOMAINS:
            budget = chars
            with gzip.open(BUNDLED / split / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as src:
                for line in src:
                    if budget <= 0:
                        break
                    record = json.loads(line)
                    record["text"] = record["text"][:DOC_CHARS]
                    budget -= len(record["text"])
                    f.write(json.dumps(record) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train and validation shards of a ~1 MB cut of the bundled corpus (four domains)."""
    root = tmp_path_factory.mktemp("tiny_shards")
    return {
        split: build_shards([cut_corpus(split, root / f"{split}.jsonl", chars)], root / split)
        for split, chars in TINY_CHARS.items()
    }
