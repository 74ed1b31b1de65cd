"""Shared fixtures: paths to the shared corpus and small shards built once per test session."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test: the tensors are tiny, and on a shared 2-core machine two OpenMP threads
    contending with other processes made some tests ~100x slower. The previous setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """``../shared/corpus`` (all eight domains, research-only: read in place, never copied into the repo)."""
    corpus = SHARED / "corpus"
    if not (corpus / "tiny" / "train.jsonl").exists():
        pytest.fail(f"the shared corpus is missing at {corpus}: set EMO_SHARED to the folder holding corpus/")
    return corpus


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


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory, shared_corpus: Path) -> dict[str, Path]:
    """Train and validation shards of ``corpus/tiny`` (all eight domains, ~1.7 MB of text)."""
    root = tmp_path_factory.mktemp("tiny_shards")
    return {
        split: build_shards([shared_corpus / "tiny" / f"{split}.jsonl"], root / split)
        for split in ("train", "val")
    }
