"""``data.mix``: documents sampled by domain weight; realised token shares within a stated tolerance of the
weights; exact resume kept; mistakes named by their key."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_tools.manifest import Manifest
from emo_lightning.data import ShardDataModule
from emo_lightning.errors import ConfigError

from .helpers import check_batch

S, B = 64, 4
MIX = {
    "code": 0.1,
    "literature": 0.2,
    "math": 0.3,
    "science": 0.4,
}  # the corpus's own: 0.54, 0.33, 0.05, 0.09
#: Stated tolerance: once a stream (one rank x DataLoader worker) has delivered 800 batches of 4 x 64 tokens
#: (205k tokens, 1.5x this corpus; shards of ~4k tokens, documents up to ~4k tokens), every domain's share of its
#: training tokens is within 0.025 (absolute) of its weight. The deviation is about one shard's tokens of a
#: domain over the tokens streamed so far: ~0.1 after 25k tokens, ~0.02 after 100k, ~0.005 after 400k here.
TOLERANCE, BATCHES = 0.025, 800


def make_dm(shards: Path, **kw) -> ShardDataModule:
    args = dict(seq_len=S, batch_size=B, num_workers=0, shuffle_buffer=50, seed=0, mix=MIX)
    args.update(kw)
    dm = ShardDataModule(str(shards), **args)
    dm.setup("fit")
    return dm


def shares(batches: list[dict[str, torch.Tensor]], n_domains: int) -> np.ndarray:
    ids = torch.cat([b["domain_ids"].flatten() for b in batches])
    counts = torch.bincount(ids[ids >= 0], minlength=n_domains).double()
    return (counts / counts.sum()).numpy()


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(("workers", "seed"), [(0, 0), (2, 3)])
def test_token_shares_follow_the_weights(shards: Path, workers: int, seed: int) -> None:
    m = Manifest.load(shards)
    natural = np.array([m.per_domain[d]["tokens"] for d in MIX]) / m.totals["tokens"]
    want = np.array(list(MIX.values()))
    assert np.abs(natural - want).max() > 0.3  # the mix is far from the corpus's own
    batches = take(
        make_dm(shards, num_workers=workers, seed=seed).train_dataloader(), BATCHES * max(workers, 1)
    )
    for b in batches[:20]:
        check_batch(b, pad_id=1)
        assert (b["domain_ids"] >= 0).all()  # full batches, as without a mix
    got = shares(batches, len(MIX))
    assert np.abs(got - want).max() < TOLERANCE, got


def test_a_domain_without_weight_is_not_trained_on(shards: Path) -> None:
    with pytest.warns(UserWarning, match=r"data.mix: domains math have no weight"):
        dm = make_dm(shards, mix={"code": 1, "literature": 1, "science": 2})
    got = shares(take(dm.train_dataloader(), BATCHES), 4)
    assert got[2] == 0 and np.abs(got - [0.25, 0.25, 0, 0.5]).max() < TOLERANCE


@pytest.mark.parametrize(("workers", "skips"), [(0, (5, 21, 33, 50)), (2, (4, 27, 45))])
def test_resume_stays_exact(shards: Path, workers: int, skips: tuple[int, ...]) -> None:
    """Skipping k batches gives the uninterrupted stream's tail (the mixture's running totals are replayed
    from the manifest counts), also across chunk boundaries and DataLoader workers."""
    ds = make_dm(shards).train_dataset()
    ds.chunk_batches = 3
    n = 60
    plans = ds.chunk_plans(0)
    sizes = [next(plans)[1] for _ in range(4)]
    assert sum(sizes[:2]) < n // max(workers, 1)  # the window spans 3+ chunks of each worker's stream
    assert any(
        keep is not None and len(keep) < 4
        for picks, _ in [next(plans) for _ in range(8)]
        for _, keep in picks
    )
    full = take(DataLoader(ds, batch_size=None, num_workers=workers), n)
    for k in skips:
        resumed = copy.copy(ds)
        resumed.skip_batches = k
        tail = take(DataLoader(resumed, batch_size=None, num_workers=workers), n - k)
        for x, y in zip(tail, full[k:], strict=True):
            assert all(torch.equal(x[key], y[key]) for key in x)


def test_datamodule_state_fast_forwards_with_a_mix(shards: Path) -> None:
    full = take(make_dm(shards).train_dataloader(), 9)
    dm = make_dm(shards)
    dm.load_state_dict({"train_batches": 6})
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(take(dm.train_dataloader(), 3), full[6:], strict=True)
    )


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"code": -1.0}, r"^data.mix.code: must be a finite weight >= 0, got -1.0$"),
        ({"code": float("nan")}, r"^data.mix.code: must be a finite weight >= 0, got nan$"),
        ({"code": "lots"}, r"^data.mix.code: must be a number, got 'lots'$"),
        ({"code": 0, "math": 0}, r"^data.mix: weights sum to 0: give at least one domain a positive weight$"),
        ({}, r"^data.mix: must map domain names to weights"),
    ],
)
def test_bad_weights_name_the_key(shards: Path, mix: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardDataModule(str(shards), mix=mix)


def test_unknown_domain_names_the_known_ones(shards: Path) -> None:
    dm = ShardDataModule(str(shards), mix={"code": 1.0, "news": 1.0})
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "data.mix: unknown domain 'news': the training shards have code, literature, math, science"
    )
