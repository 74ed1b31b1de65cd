"""Data faults met during training: truncated and garbage shards, too many of them, documents with token ids
beyond the vocabulary, an empty document at the end of a shard, a domain the manifest does not know."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_lightning.data.dataset import PackedShardDataset, ShardFailureError
from emo_lightning.data.shard_reader import read_shard

CONTRACT = {"input_ids", "labels", "doc_ids", "domain_ids"}


def damage(shards: Path, index: int, how: str) -> str:
    path = shards / f"shard-{index:06d}.tar"
    data = path.read_bytes()
    if how == "truncate":  # a copy or a write that stopped in the middle of the last token array
        with tarfile.open(path) as tar:
            last = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")][-1]
        path.write_bytes(data[: last.offset_data + 100])
    else:  # garbage from the start
        path.write_bytes(np.random.default_rng(index).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    return str(path)


def take(dataset: PackedShardDataset, n: int) -> list[dict[str, torch.Tensor]]:
    stream = iter(dataset)
    return [next(stream) for _ in range(n)]


def test_corrupt_shards_are_skipped_counted_and_resume_stays_exact(make_shards, tiny, caplog) -> None:
    _, tiny_data, _ = tiny
    train = make_shards(8)
    bad = [damage(train, 2, "truncate"), damage(train, 5, "garbage")]
    data = tiny_data(train, max_bad_shard_fraction=0.3)
    data.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = take(data.train_dataset(), 60)
    for url in bad:
        assert f"skipping shard {url}: " in caplog.text
    assert caplog.text.count("skipping shard ") == 2  # warned once per shard, counted at every failed read
    assert sum(int(b.get("skipped_shards", 0)) for b in batches) >= 2
    for b in batches:  # the stream goes on with valid batches; the counter is an optional extra key
        assert CONTRACT <= set(b) <= CONTRACT | {"skipped_shards", "skipped_docs"}
        assert b["input_ids"].shape == (4, 64)
    # every chunk still yields the batches the manifest predicts, so a resumed stream continues exactly
    resumed = tiny_data(train, max_bad_shard_fraction=0.3)
    resumed.setup("fit")
    dataset = resumed.train_dataset()
    dataset.skip_batches = 45
    for got, ref in zip(take(dataset, 15), batches[45:], strict=True):
        assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["labels"], ref["labels"])


def test_too_many_bad_shards_stop_with_a_clear_error(make_shards, tiny) -> None:
    _, tiny_data, _ = tiny
    train = make_shards(8)
    for i in (1, 4, 6):
        damage(train, i, "truncate")
    data = tiny_data(train, max_bad_shard_fraction=0.25)  # 2 of 8 tolerated
    data.setup("fit")
    with pytest.raises(
        ShardFailureError, match=r"3 of 8 shards failed to read, more than max_bad_shard_fraction=0.25"
    ):
        take(data.train_dataset(), 200)


def test_training_with_a_corrupt_shard_logs_the_count_and_finishes(make_shards, tiny) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    train = make_shards(4)
    damage(train, 1, "truncate")
    trainer = tiny_trainer(4, [])
    trainer.fit(tiny_module(), datamodule=tiny_data(train, max_bad_shard_fraction=0.5))
    assert trainer.global_step == 4
    assert trainer.callback_metrics["data/skipped_shards"] >= 1


def write_shard(path: Path, docs: list[tuple[str, np.ndarray, str]]) -> int:
    """A WebDataset shard in the emo-shards format; returns its token count."""
    with tarfile.open(path, "w") as tar:
        for key, tokens, domain in docs:
            buf = io.BytesIO()
            np.save(buf, tokens.astype(np.uint16))
            for ext, payload in (
                ("tokens.npy", buf.getvalue()),
                ("domain.txt", domain.encode()),
                ("id.txt", key.encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return sum(len(t) for _, t, _ in docs)


def test_out_of_vocabulary_empty_and_unknown_domain_documents(make_shards, tiny, caplog) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    train = make_shards(3)
    real = [tokens for _, tokens, _ in read_shard(str(train / "shard-000000.tar"))]
    path = train / "shard-000002.tar"
    rng = np.random.default_rng(0)
    tokens = write_shard(
        path,
        [
            ("ok", real[0], "math"),
            (
                "too_big",
                np.append(rng.integers(2, 4096, 50), [5000, 0]),
                "math",
            ),  # id 5000 >= vocabulary 4096
            ("klingon", np.append(rng.integers(2, 4096, 300), 0), "klingon"),  # not in the manifest's domains
            ("empty", np.zeros(0, dtype=np.uint16), "math"),  # an empty sequence at the end of the shard
        ],
    )
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["shards"][2]["tokens"] = tokens
    (train / "manifest.json").write_text(json.dumps(manifest))

    data = tiny_data(train)
    data.setup("fit")
    single = PackedShardDataset(
        [str(path)], domains=data.domain_vocab, seq_len=64, batch_size=4, pad_id=data.pad_id, train=False,
        shard_tokens=[tokens], vocab_size=data.vocab_size,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        batches = list(single)
    assert f"{path}: document 'too_big' skipped: token id 5000 >= vocabulary size 4096" in caplog.text
    assert f"{path}: document 'klingon' has domain 'klingon', not in the manifest's domains" in caplog.text
    assert "skipping shard" not in caplog.text  # the shard itself is fine (token count matches)
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    domains = torch.cat([b["domain_ids"].flatten() for b in batches])
    assert int(ids.max()) < 4096
    assert (
        domains == -1
    ).sum() >= 300  # klingon tokens: no domain, like padding (no 'unknown' in the manifest)
    assert sum(int(b.get("skipped_docs", 0)) for b in batches) == 1

    trainer = tiny_trainer(3, [])  # and a real training run over these shards does not crash
    trainer.fit(tiny_module(), datamodule=tiny_data(train))
    assert trainer.global_step == 3
