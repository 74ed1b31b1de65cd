"""ShardDataModule: round trip, token conservation, rank x worker splitting, exact resume, determinism."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_tools.manifest import Manifest
from emo_lightning.data import ShardDataModule

from .helpers import check_batch, split_docs

S, B = 64, 4


def make_dm(shards: Path, **kw) -> ShardDataModule:
    args = dict(val_shards=str(shards), seq_len=S, batch_size=B, num_workers=0, shuffle_buffer=50, seed=0)
    args.update(kw)
    dm = ShardDataModule(str(shards), **args)
    dm.setup("fit")
    return dm


def domain_tokens(batches, domains: list[str]) -> dict[str, int]:
    ids = torch.cat([b["domain_ids"].flatten() for b in batches])
    counts = torch.bincount(ids[ids >= 0], minlength=len(domains))
    return dict(zip(domains, counts.tolist(), strict=True))


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_metadata(shards: Path) -> None:
    dm = make_dm(shards)
    assert dm.domains == ["code", "literature", "math", "science"]
    assert (dm.vocab_size, dm.eos_id, dm.pad_id) == (4096, 0, 1)


def test_round_trip(shards: Path, expected_docs: list[tuple[int, ...]]) -> None:
    """jsonl -> shards -> packed batches reproduces the token stream of every document, exactly once."""
    batches = list(make_dm(shards).val_dataloader())
    for b in batches:
        assert b["input_ids"].shape == (B, S) and b["input_ids"].dtype == torch.long
        check_batch(b, pad_id=1)
    assert Counter(split_docs(batches)) == Counter(expected_docs)
    # Padding only in the final batch.
    assert all((b["domain_ids"] >= 0).all() for b in batches[:-1]) and (batches[-1]["domain_ids"] < 0).any()


def test_conservation_per_domain_with_two_workers(shards: Path) -> None:
    dm = make_dm(shards, num_workers=2)
    m = Manifest.load(shards)
    batches = list(dm.val_dataloader())
    assert domain_tokens(batches, dm.domains) == {k: v["tokens"] for k, v in m.per_domain.items()}
    shard_tokens = [s.tokens for s in m.shards]
    assert len(batches) == sum(-(-sum(shard_tokens[w::2]) // (B * S)) for w in range(2))


def test_two_ranks_two_workers_cover_every_shard_once(shards: Path, expected_docs) -> None:
    m = Manifest.load(shards)
    seen: list[int] = []
    docs: Counter = Counter()
    counts = []
    for rank in range(2):
        ds = make_dm(shards, rank=rank, world_size=2).val_dataset()
        assert ds is not None and ds.even_batches
        n = 0
        for worker in range(2):
            seen.extend(ds.worker_shards(worker, 2))
            batches = list(ds.single_pass_batches(worker, 2))
            docs.update(split_docs(batches))
            n += len(batches)
        counts.append(n)
    assert sorted(seen) == list(range(len(m.shards)))  # every shard exactly once
    assert docs == Counter(expected_docs)  # every token of every document exactly once
    assert counts[0] == counts[1]  # ranks run the same number of steps (all-padding batches fill in)
    # Through real DataLoader workers: per-domain conservation over both ranks.
    total: Counter = Counter()
    for rank in range(2):
        total.update(
            domain_tokens(
                list(make_dm(shards, rank=rank, world_size=2, num_workers=2).val_dataloader()),
                list(m.domains),
            )
        )
    assert total == Counter({k: v["tokens"] for k, v in m.per_domain.items()})


@pytest.mark.parametrize(("workers", "skips"), [(0, (4, 7)), (2, (3, 6))])
def test_resume_skip_equals_uninterrupted_tail(shards: Path, workers: int, skips: tuple[int, ...]) -> None:
    ds = make_dm(shards).train_dataset()
    ds.chunk_batches = 3  # several chunks within the compared window
    n = 12
    full = take(DataLoader(ds, batch_size=None, num_workers=workers), n)
    for b in full:
        check_batch(b, pad_id=1)
        assert (b["domain_ids"] >= 0).all()  # training batches are never padded
    for k in skips:
        resumed = copy.copy(ds)
        resumed.skip_batches = k
        assert_same(take(DataLoader(resumed, batch_size=None, num_workers=workers), n - k), full[k:])


def test_datamodule_state_fast_forwards(shards: Path) -> None:
    full = take(make_dm(shards).train_dataloader(), 7)
    dm = make_dm(shards)
    dm.load_state_dict({"train_batches": 5})
    assert_same(take(dm.train_dataloader(), 2), full[5:])
    assert dm.state_dict() == {"train_batches": 0}  # no trainer attached: the restored position was used


def test_deterministic_stream(shards: Path) -> None:
    a = take(make_dm(shards).train_dataloader(), 4)
    assert_same(a, take(make_dm(shards).train_dataloader(), 4))
    other_seed = take(make_dm(shards, seed=1).train_dataloader(), 1)[0]
    other_rank = take(make_dm(shards, rank=1, world_size=2).train_dataloader(), 1)[0]
    assert not torch.equal(a[0]["input_ids"], other_seed["input_ids"])
    assert not torch.equal(a[0]["input_ids"], other_rank["input_ids"])


def test_url_specs(shards: Path) -> None:
    """Brace patterns, '::' lists and pipe: URLs (with an explicit manifest) read the same shards."""
    m = Manifest.load(shards)
    last = len(m.shards) - 1
    half = last // 2
    want = {k: v["tokens"] for k, v in m.per_domain.items()}
    specs = [
        f"{shards}/shard-{{000000..{last:06d}}}.tar",
        f"{shards}/shard-{{000000..{half:06d}}}.tar::{shards}/shard-{{{half + 1:06d}..{last:06d}}}.tar",
        f"pipe:cat {shards}/shard-{{000000..{last:06d}}}.tar",
    ]
    for spec in specs:
        dm = ShardDataModule(
            spec,
            val_shards=spec,
            manifest=str(shards / "manifest.json"),
            seq_len=S,
            batch_size=B,
            num_workers=0,
        )
        ds = dm.val_dataset()
        assert ds is not None
        if spec.startswith("pipe:"):
            ds.shard_tokens = None  # no manifest beside pipe: URLs for validation: counts are not checked
        assert domain_tokens(list(DataLoader(ds, batch_size=None)), dm.domains) == want
        assert next(iter(dm.train_dataloader()))["input_ids"].shape == (B, S)


class _Recorder(L.LightningModule):
    """Records a fingerprint of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(int(batch["input_ids"].sum()))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: ShardDataModule, max_steps: int, ckpt: str | None, root: Path) -> tuple[L.Trainer, _Recorder]:
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    model = _Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model


@pytest.mark.filterwarnings("ignore")
def test_lightning_checkpoint_resume(shards: Path, tmp_path: Path) -> None:
    """3 optimizer steps x 2 accumulated batches, checkpoint, resume to 5 steps: batches 6..9 follow 0..5."""
    stream = [int(b["input_ids"].sum()) for b in take(make_dm(shards).train_dataloader(), 10)]
    dm = make_dm(shards, val_shards=None)
    trainer, model = _fit(dm, 3, None, tmp_path)
    assert model.seen == stream[:6]
    assert dm.state_dict() == {"train_batches": 6}
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert ckpt["ShardDataModule"] == {"train_batches": 6}
    _, resumed = _fit(make_dm(shards, val_shards=None), 5, str(tmp_path / "a.ckpt"), tmp_path)
    assert resumed.seen == stream[6:10]
    assert np.isfinite(resumed.w.item())


@pytest.mark.shared_corpus
def test_shared_corpus_all_domains(shared_corpus: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    """The eight-domain research corpus (read from ../shared, never committed): per-domain conservation."""
    from data_tools.build import build_shards

    val = shared_corpus / "tiny" / "val.jsonl"
    m = build_shards([val], tokenizer_path, tmp_path / "shards", shard_size=2048, quiet=True).manifest
    assert len(m.domains) == 8
    dm = make_dm(tmp_path / "shards", rank=1, world_size=2, num_workers=2)
    other = make_dm(tmp_path / "shards", rank=0, world_size=2, num_workers=0)
    got = Counter(domain_tokens(list(dm.val_dataloader()), dm.domains))
    got.update(domain_tokens(list(other.val_dataloader()), dm.domains))
    assert dict(got) == {k: v["tokens"] for k, v in m.per_domain.items()}
