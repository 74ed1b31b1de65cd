"""``DomainTokenMonitor``: per-domain training tokens and shares in TensorBoard, continued across a resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.build import build_shards
from emo_lightning.callbacks import DomainTokenMonitor
from emo_lightning.data import ShardDataModule

REPO = Path(__file__).resolve().parents[2]
MIX = {"code": 0.5, "math": 0.5}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("domain_tokens")
    paths = []
    for domain in MIX:
        with gzip.open(REPO / "data" / "corpus" / "val" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for _, line in zip(range(30), f, strict=False)]
        path = root / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        paths.append(path)
    build_shards(paths, REPO / "data" / "tokenizer.json", root / "shards", shard_size=2048, quiet=True)
    return root / "shards"


class Counting(L.LightningModule):
    """Counts the domain tokens of the batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = torch.zeros(2, dtype=torch.long)

    def training_step(self, batch, batch_idx):
        ids = batch["domain_ids"]
        self.seen += torch.bincount(ids[ids >= 0], minlength=2)
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(shards: Path, root: Path, steps: int, ckpt: str | None = None) -> tuple[L.Trainer, Counting]:
    dm = ShardDataModule(str(shards), seq_len=32, batch_size=4, num_workers=0, mix=MIX)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name="tb", version=""),
        callbacks=[DomainTokenMonitor(log_every_n_steps=5)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model = Counting()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(root / "tb")).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.filterwarnings("ignore")
def test_tokens_per_domain_logged_and_resumed(shards: Path, tmp_path: Path) -> None:
    trainer, model = fit(shards, tmp_path, 12)
    logged = scalars(tmp_path)
    for i, domain in enumerate(MIX):
        steps = [s for s, _ in logged[f"data/tokens/{domain}"]]
        assert steps == [5, 10, 12]  # every 5 steps, and the end of training
        assert logged[f"data/tokens/{domain}"][-1][1] == model.seen[i].item()  # every token counted once
        assert logged[f"data/mix/{domain}"][-1][1] == 0.5
    share = logged["data/token_share/code"][-1][1] + logged["data/token_share/math"][-1][1]
    assert share == pytest.approx(1.0)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    _, resumed = fit(shards, tmp_path, 20, str(tmp_path / "a.ckpt"))
    last = {d: scalars(tmp_path)[f"data/tokens/{d}"][-1] for d in MIX}
    assert {d: v for d, (_, v) in last.items()} == {
        d: float(model.seen[i] + resumed.seen[i]) for i, d in enumerate(MIX)
    }  # the curves continue from the checkpoint's totals
    assert all(step == 20 for step, _ in last.values())
