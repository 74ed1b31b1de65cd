"""Tiny random models and checkpoints for the modularity toolkit tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emo_lightning.checkpoint import PREFIX
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig
from emo_lightning.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizer.json"


def tiny_config(
    kind: str = "emo", num_shared: int = 1, top_k: int = 3, vocab_size: int = 4096, **router: object
) -> ModelConfig:
    arch = ArchConfig(
        vocab_size=vocab_size, d_model=32, n_layers=3, n_heads=2, expert_hidden=16, max_seq_len=64
    )
    rc = RouterConfig(
        kind=kind, num_experts=9, num_shared=num_shared, top_k=top_k, pool_min=top_k - num_shared,
        pool_max=9 - num_shared, pool_eval=4, seed=3, **router,
    )  # fmt: skip
    return ModelConfig(arch=arch, router=rc)


def tiny_model(
    kind: str = "emo",
    num_shared: int = 1,
    top_k: int = 3,
    seed: int = 0,
    vocab_size: int = 4096,
    bias: float = 0.0,
    **router: object,
) -> EMOTransformer:
    """Sharper routers than the 0.02 init, so that experts differ in preference; ``bias`` > 0: a selection bias
    (``balance: both``) of that scale, large enough to decide pools."""
    torch.manual_seed(seed)
    if bias:
        router.setdefault("balance", "both")
    model = EMOTransformer(tiny_config(kind, num_shared, top_k, vocab_size, **router))
    with torch.no_grad():
        for r in model.routers():
            r.weight.normal_(0.0, 0.5)
            if bias:
                r.expert_bias.copy_(bias * torch.randn(r.num_routed))
    return model.eval()


def write_checkpoint(model: EMOTransformer, path: Path) -> Path:
    """A checkpoint laid out like Lightning's (``hyper_parameters`` dataclasses, ``model.`` prefixed)."""
    torch.save(
        {
            "epoch": 0,
            "global_step": 7,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {PREFIX + k: v for k, v in model.state_dict().items()},
            "hyper_parameters": {"arch": model.cfg.arch, "router": model.cfg.router, "optim": OptimConfig()},
        },
        path,
    )
    return path


# random-word documents (tasks and harness tests): every word a few tokens of the bundled tokenizer
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


TEXTS = {
    "math": ["Tom has 3 apples and buys 4 more. How many apples? 3 + 4 = 7. #### 7",
             "A train goes 60 miles per hour for 2 hours: 60 * 2 = 120 miles. #### 120",
             "She saves 5 dollars a week for 10 weeks, 5 * 10 = 50. #### 50"],
    "code": ["def add(a, b):\n    return a + b\n", "import os\n\nclass Config:\n    debug = False\n",
             "for i in range(10):\n    print(i * i)\n"],
    "literature": ["It was the best of times, it was the worst of times, it was the age of wisdom.",
                   "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
                   "The sun shone, having no alternative, on the nothing new."],
}  # fmt: skip


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    """Nine short documents of three domains."""
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for domain, texts in TEXTS.items():
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"{domain}-{i}", "domain": domain, "text": t}) + "\n")
    return path
