"""Hugging Face export: a checkpoint (full or cut to a subset) as a stock ``transformers`` model folder.

The folder (``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``) loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` without ``trust_remote_code``,
and vLLM serves it. The target is chosen by configuration (facts in ``ECOSYSTEM_NOTES``, "Hugging Face export"):

* ``arch.qk_norm`` off (any number of shared experts) -> ``Qwen2MoeForCausalLM``;
* ``arch.qk_norm`` on, no shared experts -> ``Qwen3MoeForCausalLM`` (per-head q/k RMSNorm before RoPE, as ours);
* ``arch.qk_norm`` on with shared experts has no stock class: refused, naming the options; so is a router with
  an auxiliary-loss-free selection bias (``router.balance`` bias or both): no stock class adds a bias to the
  softmax router's choice, and it cannot be folded into the weights exactly (pruned checkpoints carry it).

Weight mapping (ours -> Hugging Face, per layer ``l``): ``attn_norm`` -> ``input_layernorm``, ``attn.{q,k,v,o}_proj``
-> ``self_attn.{q,k,v,o}_proj`` (Qwen2-MoE: zero q/k/v biases, which vLLM always creates), ``ffn_norm`` ->
``post_attention_layernorm``, ``moe.router.weight`` -> ``mlp.gate.weight``, routed expert ``e``'s ``w_in[e]``
``(d, 2h) = [gate | up]`` and ``w_out[e]`` ``(h, d)`` -> ``mlp.experts.e.{gate,up,down}_proj.weight`` (transposed).
The n_sh shared experts are already one SwiGLU of hidden ``n_sh * h``; Qwen2-MoE scales its shared expert by
``sigmoid(shared_expert_gate(x))``: a zero gate weight gives exactly 0.5, so the down projection is doubled to
keep our gate of exactly 1.0. The router softmax, top-k' and ``normalize_weights`` (``norm_topk_prob``) are the
same arithmetic. What the export cannot express: document pools (EMO's training-time routing; the exported model
routes every token over all its experts, i.e. ``--routing full``, over the kept experts of a subset) and packed
rows with document masks (one document per row).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_tools.tokenizer import load_tokenizer, special_ids
from emo_lightning.checkpoint import atomic_folder
from emo_lightning.errors import UserError
from emo_lightning.model import EMOTransformer, ModelConfig

FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def hf_architecture(cfg: ModelConfig) -> str:
    """``Qwen2MoeForCausalLM`` or ``Qwen3MoeForCausalLM`` for ``cfg``; a ``UserError`` naming the options if none."""
    if cfg.router.uses_bias:
        raise UserError(
            f"router.balance={cfg.router.balance}: the selection bias of auxiliary-loss-free balancing has no "
            "stock Qwen2/Qwen3-MoE equivalent (it changes which experts are chosen, so it cannot be folded into "
            "the gate weights exactly)",
            "serve it with `emo generate`, or export a model trained with router.balance=aux_loss",
        )
    if not cfg.arch.qk_norm:
        return "Qwen2MoeForCausalLM"
    if cfg.router.num_shared == 0:
        return "Qwen3MoeForCausalLM"
    raise UserError(
        f"arch.qk_norm=true with router.num_shared={cfg.router.num_shared}: no stock Hugging Face architecture "
        "has per-head q/k norms and shared experts",
        "export a model trained with qk_norm off (Qwen2-MoE) or without shared experts (Qwen3-MoE)",
    )


def hf_config(cfg: ModelConfig, eos_id: int, pad_id: int) -> dict[str, Any]:
    """``config.json`` of the stock architecture (every field written: defaults differ between versions)."""
    a, r = cfg.arch, cfg.router
    arch = hf_architecture(cfg)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "qwen2_moe" if arch.startswith("Qwen2") else "qwen3_moe",
        "vocab_size": a.vocab_size,
        "hidden_size": a.d_model,
        "intermediate_size": a.expert_hidden,  # dense MLP size: unused (every layer is sparse)
        "moe_intermediate_size": a.expert_hidden,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.max_seq_len,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "tie_word_embeddings": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": r.num_routed,
        "num_experts_per_tok": r.routed_k,
        "norm_topk_prob": r.normalize_weights,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": a.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    if arch.startswith("Qwen2"):
        out |= {"qkv_bias": True, "shared_expert_intermediate_size": r.num_shared * a.expert_hidden}
    else:
        out |= {"attention_bias": False}
    return out


def hf_state_dict(model: EMOTransformer) -> dict[str, Tensor]:
    """Our weights under the stock architecture's names (contiguous fp32 copies)."""
    cfg = model.cfg
    qwen2 = hf_architecture(cfg).startswith("Qwen2")
    h = cfg.arch.expert_hidden
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = blk.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = blk.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(blk.attn, name).weight
            out[f"{p}self_attn.{name}.weight"] = w
            if qwen2 and name != "o_proj":
                out[f"{p}self_attn.{name}.bias"] = w.new_zeros(w.shape[0])
        if blk.attn.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = blk.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = blk.attn.k_norm.weight
        moe = blk.moe
        out[p + "mlp.gate.weight"] = moe.router.weight
        w_in, w_out = moe.experts.w_in, moe.experts.w_out  # (E',d,2h), (E',h,d)
        for e in range(w_in.shape[0]):
            q = f"{p}mlp.experts.{e}."
            out[q + "gate_proj.weight"] = w_in[e, :, :h].T
            out[q + "up_proj.weight"] = w_in[e, :, h:].T
            out[q + "down_proj.weight"] = w_out[e].T
        if qwen2:  # without shared experts: zero-width tensors (the shared branch then adds exactly 0)
            d = cfg.arch.d_model
            w_in_sh = moe.shared.w_in if moe.shared is not None else w_in.new_zeros(d, 0)  # (d, 2*n_sh*h)
            w_out_sh = moe.shared.w_out if moe.shared is not None else w_in.new_zeros(0, d)  # (n_sh*h, d)
            hs = w_out_sh.shape[0]
            out[p + "mlp.shared_expert.gate_proj.weight"] = w_in_sh[:, :hs].T
            out[p + "mlp.shared_expert.up_proj.weight"] = w_in_sh[:, hs:].T
            # sigmoid(0) = 0.5 times twice the down projection = our gate weight of exactly 1.0
            out[p + "mlp.shared_expert.down_proj.weight"] = 2.0 * w_out_sh.T
            out[p + "mlp.shared_expert_gate.weight"] = w_in.new_zeros(1, d)
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(
    model: EMOTransformer, tokenizer_path: str | Path, out: str | Path, overwrite: bool = False
) -> dict[str, int]:
    """Write the model folder (built beside ``out`` and renamed into place: a non-empty ``out`` is refused unless
    ``overwrite``, which replaces it whole); returns each file's size in bytes."""
    try:
        from safetensors.torch import save_file
    except ModuleNotFoundError:
        raise UserError(
            "export needs safetensors", "pip install 'emo-lightning[export]' (make install does)"
        ) from None

    cfg = model.cfg
    tokenizer = load_tokenizer(tokenizer_path)
    eos_tok, eos_id, pad_tok, pad_id = special_ids(tokenizer, source=str(tokenizer_path))
    if tokenizer.get_vocab_size(with_added_tokens=True) > cfg.arch.vocab_size:
        raise UserError(
            f"--tokenizer {tokenizer_path}: vocabulary larger than the model's {cfg.arch.vocab_size}",
            "pass the tokenizer the model was trained with",
        )
    config = hf_config(cfg, eos_id, pad_id)  # refuses unsupported configurations before writing anything
    generation = {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # readable by transformers 4.x and 5.x
        "eos_token": eos_tok,
        "pad_token": pad_tok,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": cfg.arch.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    with atomic_folder(out, overwrite) as tmp:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in (
            ("config.json", config),
            ("generation_config.json", generation),
            ("tokenizer_config.json", tokenizer_config),
        ):
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    return {name: (Path(out) / name).stat().st_size for name in FILES}


@torch.no_grad()
def load_hf(path: str | Path) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` in fp32 eval mode (for checks; needs ``transformers``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
