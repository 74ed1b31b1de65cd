"""Hugging Face export: stock transformers classes reproduce our logits and greedy text; what cannot be exported
is refused naming the option."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from emo_lightning.errors import UserError
from emo_lightning.experts.cli import main
from emo_lightning.experts.documents import DocumentTokenizer, load_documents
from emo_lightning.experts.export import FILES, export_hf, hf_architecture
from emo_lightning.generate import Sampling, generate
from emo_lightning.model import FULL, EMOTransformer, prune_model
from tests.experts.conftest import TOKENIZER, tiny_config, tiny_model, write_checkpoint

transformers = pytest.importorskip("transformers")


def _model(variant: str) -> EMOTransformer:
    if variant == "pruned":
        return prune_model(tiny_model(), [[0, 3], [1, 2], [5, 7]])
    kind, shared = (
        ("standard", 1) if variant == "standard" else ("emo", {"shared1": 1, "shared2": 2}.get(variant, 0))
    )
    cfg = tiny_config(kind, num_shared=shared, top_k=3)
    if variant == "qk_norm_gqa":
        cfg.arch = dataclasses.replace(cfg.arch, qk_norm=True, n_kv_heads=1)
    if variant == "normalized":
        cfg.router = dataclasses.replace(cfg.router, normalize_weights=True)
    torch.manual_seed(0)
    model = EMOTransformer(cfg)
    with torch.no_grad():  # sharp routers: the top-k choice matters
        for blk in model.blocks:
            blk.moe.router.weight.normal_(0.0, 0.5)
    return model.eval()


def _documents(jsonl: Path) -> list[torch.Tensor]:
    return [torch.as_tensor(d.tokens[None, :-1]) for d in load_documents(jsonl, DocumentTokenizer(TOKENIZER))]


@pytest.mark.parametrize(
    ("variant", "arch"),
    [
        ("shared1", "Qwen2MoeForCausalLM"),
        ("shared2", "Qwen2MoeForCausalLM"),
        ("noshared", "Qwen2MoeForCausalLM"),
        ("standard", "Qwen2MoeForCausalLM"),
        ("normalized", "Qwen2MoeForCausalLM"),
        ("pruned", "Qwen2MoeForCausalLM"),
        ("qk_norm_gqa", "Qwen3MoeForCausalLM"),
    ],
)
def test_exported_model_reproduces_logits_and_greedy_text(
    variant: str, arch: str, tmp_path: Path, jsonl: Path
) -> None:
    model = _model(variant)
    with model.routing(FULL):  # the export routes every token over all its experts
        sizes = export_hf(model, TOKENIZER, tmp_path / "hf")
        assert set(sizes) == set(FILES) and all(n > 0 for n in sizes.values())
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert type(hf).__name__ == arch == hf_architecture(model.cfg)
        with torch.no_grad():
            for ids in _documents(jsonl):
                torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
            prompt = _documents(jsonl)[0][:, :8]
            theirs = hf.generate(
                prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1
            )
        ((ours, _),) = generate(model, prompt.tolist(), Sampling(max_new_tokens=12, temperature=0), eos_id=-1)
        assert theirs[0, 8:].tolist() == ours  # emo generate (KV cache) and transformers, token for token
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        text = "def add(a, b):\n    return a + b"
        assert tok(text)["input_ids"] == DocumentTokenizer(TOKENIZER).tokenizer.encode(text).ids
        assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)


def test_a_wrong_mapping_would_be_caught(tmp_path: Path, jsonl: Path) -> None:
    """Negative control: flipping ``norm_topk_prob`` in the exported config moves the logits 10x beyond 1e-4."""
    model = _model("shared1")
    with model.routing(FULL):
        export_hf(model, TOKENIZER, tmp_path / "hf")
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"norm_topk_prob": True}))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        ids = _documents(jsonl)[0]
        with torch.no_grad():
            assert (hf(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_qk_norm_with_shared_experts_is_refused_naming_the_options(tmp_path: Path) -> None:
    cfg = tiny_config("emo", num_shared=1)
    cfg.arch = dataclasses.replace(cfg.arch, qk_norm=True)
    with pytest.raises(UserError, match=r"arch\.qk_norm=true with router\.num_shared=1"):
        export_hf(EMOTransformer(cfg), TOKENIZER, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written


def test_export_command_full_and_subset(tmp_path: Path, capsys) -> None:
    ckpt = write_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    subset = tmp_path / "s.json"
    main(
        [
            "select",
            "--ckpt",
            str(ckpt),
            "--data",
            "x",
            "--method",
            "random",
            "--keep",
            "3",
            "--out",
            str(subset),
        ]
    )
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "full")])
    main(["export", "--ckpt", str(ckpt), "--subset", str(subset), "--out", str(tmp_path / "cut")])
    assert "as Qwen2MoeForCausalLM" in capsys.readouterr().out
    full, cut = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("full", "cut"))
    assert cut < full
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (
        config["num_experts"] == 2 and config["num_experts_per_tok"] == 2
    )  # 2 routable kept, top-k' clamped


def test_a_selection_bias_is_refused_naming_the_option(tmp_path: Path) -> None:
    cfg = tiny_config("emo")
    cfg.router = dataclasses.replace(cfg.router, balance="bias")
    with pytest.raises(UserError, match=r"router\.balance=bias"):
        export_hf(EMOTransformer(cfg), TOKENIZER, tmp_path / "hf")
