"""What one GPU of a layout holds and moves (``emo estimate``), from the rank's constructed meta model.

:func:`estimate` builds the fullest rank's model exactly as training does (:func:`build_expert_parallel_model`,
expert-parallel rank 0: the most routable experts) on the meta device (shapes and dtypes, no memory), in the
weight dtype of the precision, and counts its parameters and bytes; DeepSpeed's own markers on that model
(``allreduce=False``) decide which bytes are partitioned over the expert-data-parallel group (world / ep_size)
and which over the data-parallel group (the world). Nothing is allocated: the 1b14b model on 128 GPUs answers
in seconds.

Per GPU (DeepSpeed 0.19 ZeRO-1/2 semantics, checked in its ``stage_1_and_2.py``):

* parameters: the local model in the weight dtype (bf16 under ``bf16-mixed``: DeepSpeed casts the module);
* gradients: model dtype; ZeRO-2 keeps only the rank's partition, ZeRO-0/1 every local gradient; plus the
  reduction buckets (``reduce_bucket_size`` elements, two of them with ``overlap_comm``; ZeRO-1/2);
* optimizer state: fp32 master copy + Adam m, v = 12 B per parameter (8 B for fp32 weights without ZeRO),
  partitioned with ZeRO-1/2, and the fp32 gradient partition of the step (4 B, transient);
* activations: what autograd saves for backward, per token, from this implementation's forward (RMSNorm in fp32,
  rotary tables, attention q/k/v/out + log-sum-exp with FlexAttention, i.e. no S x S matrix, router in fp32,
  dispatch indices, k' token copies, SwiGLU internals, combine, shared experts, the LM head's fp32 log-softmax and
  the logits the step keeps; see :func:`activation_bytes_per_token`, checked against autograd's saved tensors by
  the tests), times micro-batch x sequence; activation checkpointing is not used. Not included: allocator
  fragmentation, CUDA context and library workspaces, the transient gradients of backward.

All-to-all: every token sends its k' routed copies of d values in the activation dtype (shared experts are
local); dispatch and combine move the same rows, forward and backward (4 exchanges per layer per micro-batch);
a fraction 1/ep_size stays on the rank under uniform routing; the per-layer count exchange is ep x E/ep integers.
``exchange=padded`` moves more (ep x E/ep x the global max count rows; the skew of EMO's pools sets it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from emo_lightning.errors import ConfigError
from emo_lightning.model import ModelConfig, ParameterSummary, flops_per_token
from emo_lightning.parallel.expert_parallel import (
    DeepSpeedExperts,
    Exchange,
    build_expert_parallel_model,
    validate_expert_parallel,
)

GB, MB = 1e9, 1e6
# precision -> (weight / gradient dtype, activation bytes)
PRECISIONS: dict[str, tuple[torch.dtype, int]] = {
    "32-true": (torch.float32, 4),
    "32": (torch.float32, 4),
    "bf16-mixed": (torch.bfloat16, 2),
    "bf16-true": (torch.bfloat16, 2),
    "bf16": (torch.bfloat16, 2),
    "16-mixed": (torch.float16, 2),
    "16-true": (torch.float16, 2),
}


@dataclass(frozen=True)
class Layout:
    """Where and how the model trains (``emo estimate`` flags; defaults from the experiment config)."""

    nodes: int = 1
    gpus_per_node: int = 1
    ep_size: int = 1
    micro_batch: int = 1  # sequences per GPU per micro-batch (data.batch_size)
    seq: int = 1024  # tokens per sequence (data.seq_len)
    accumulate: int = 1  # micro-batches per optimizer step (trainer.accumulate_grad_batches)
    precision: str = "bf16-mixed"
    zero_stage: int = 2
    exchange: Exchange = "variable"
    reduce_bucket_size: int = 200_000_000  # Lightning's DeepSpeedStrategy default
    overlap_comm: bool = True
    dense_attention_mask: bool = False  # SDPA with a dense document mask (the CPU path): + S floats per token

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self, cfg: ModelConfig) -> None:
        """User mistakes as one-line ``ConfigError`` naming the flag."""
        for name in ("nodes", "gpus_per_node", "micro_batch", "seq", "accumulate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "--precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(
                "--zero-stage", f"must be 0, 1 or 2 (ZeRO-3 is refused with MoE), got {self.zero_stage}"
            )
        if self.seq > cfg.arch.max_seq_len:
            raise ConfigError("--seq", f"{self.seq} exceeds model.arch.max_seq_len={cfg.arch.max_seq_len}")
        validate_expert_parallel(self.ep_size, self.world, cfg.router.num_experts, cfg.router.num_shared)


@dataclass
class Estimate:
    """Per-GPU figures of one layout (bytes unless named otherwise)."""

    layout: Layout
    config: ModelConfig
    rank: ParameterSummary  # the fullest rank's model (expert-parallel rank 0)
    expert_params: int  # parameters partitioned over the expert-data-parallel group (routed experts)
    replicated_params: int  # dense + shared experts, partitioned over the world
    memory: dict[str, float] = field(default_factory=dict)  # component -> bytes
    activation_per_token: dict[str, float] = field(default_factory=dict)  # "layer", "head" -> bytes
    tokens_micro: int = 0  # per GPU per micro-batch
    tokens_step: int = 0  # per GPU per optimizer step
    a2a_exchange: float = 0.0  # one all-to-all (dispatch or combine) of one layer, one micro-batch
    a2a_layer_micro: float = 0.0  # 4 exchanges: forward dispatch + combine, and their backward
    a2a_offrank_layer_micro: float = 0.0  # the part that leaves the GPU (uniform routing)
    a2a_step: float = 0.0  # all layers, all micro-batches of one optimizer step
    a2a_counts_layer: int = 0  # count exchange of one layer (int64 values)
    flops_per_token: float = 0.0  # training (forward + backward)
    optimizer_bytes_per_param: int = 12  # fp32 master + Adam m, v (8: fp32 weights without ZeRO, no master)

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rank"]["total"] = self.rank.total
        out["total_memory"] = self.total_memory
        return out


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def activation_bytes_per_token(
    cfg: ModelConfig, act_bytes: int, dense_mask_seq: int | None = None
) -> dict[str, float]:
    """Bytes autograd keeps per token: ``layer`` (one transformer block) and ``head`` (final norm, LM head, loss,
    and the logits the step keeps). ``act_bytes``: the residual stream's element size; ``dense_mask_seq``: the
    sequence length when attention gets a dense (B,1,S,S) additive mask (SDPA with document masking, the CPU
    path).
    """
    a, r = cfg.arch, cfg.router
    d, hd, h = a.d_model, a.head_dim, a.expert_hidden
    kr, ns = r.routed_k, r.num_shared
    f = 4  # fp32
    # RMSNorm: fp32 input, rsqrt, normalised fp32, output in the activation dtype (the next matmul's input)
    norm = f * d + f + f * d + act_bytes * d
    attention = (
        norm
        + 2 * hd * act_bytes  # rotary cos / sin rows for q and k
        + (2 * a.n_heads + 2 * a.kv_heads) * hd * act_bytes  # q, k, v, attention output
        + f * a.n_heads  # log-sum-exp
        + a.n_heads * hd * act_bytes  # attention output reshaped (o_proj input)
        + (act_bytes * dense_mask_seq if dense_mask_seq else 0)  # additive mask row
    )
    moe = (
        norm
        + (f * d if act_bytes < f else 0)  # router input in fp32
        + 2 * f * r.num_routed  # router softmax (masked) and its logits
        + 8 * kr
        + f * kr
        + f  # top-k ids, gate weights, log-sum-exp
        + 2 * 8 * kr  # dispatch order and combine inverse (int64 per routed copy)
        + kr * d * act_bytes  # routed token copies (expert input)
        + kr * 4 * h * act_bytes  # SwiGLU: gate|up, silu(gate), product
        + kr * d * act_bytes  # combine: expert outputs
        + (act_bytes * kr if act_bytes < f else 0)  # ... and the gate weights in their dtype
        + ns * 4 * h * act_bytes  # shared experts' SwiGLU
    )
    head = norm + f * a.vocab_size + act_bytes * a.vocab_size  # fp32 log-softmax; the kept logits
    return {"layer": float(attention + moe), "head": float(head)}


def estimate(cfg: ModelConfig, layout: Layout) -> Estimate:
    """Per-GPU memory, all-to-all volume and FLOPs of ``cfg`` trained on ``layout`` (module docstring)."""
    layout.check(cfg)
    weight_dtype, act = PRECISIONS[layout.precision]
    with _default_dtype(weight_dtype):
        model = build_expert_parallel_model(
            cfg, layout.ep_size, layout.exchange, ep_rank=0, materialize=False
        )
    summary = model.parameter_summary()
    expert_params = sum(
        p.numel() for m in model.modules() if isinstance(m, DeepSpeedExperts) for p in m.parameters()
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elt = torch.empty((), dtype=weight_dtype).element_size()
    replicated = summary.total - expert_params
    world, edp = layout.world, layout.world // layout.ep_size
    zero = layout.zero_stage
    # elements of this rank's optimizer partition (ZeRO-1/2) or of all its parameters (ZeRO-0)
    partition = replicated / world + expert_params / edp if zero >= 1 else float(summary.total)
    grads = partition if zero >= 2 else float(summary.total)
    optim_per_param = 12 if (zero >= 1 or elt < 4) else 8
    buckets = (2 if layout.overlap_comm else 1) * layout.reduce_bucket_size * elt if zero >= 1 else 0
    per_token = activation_bytes_per_token(cfg, act, layout.seq if layout.dense_attention_mask else None)
    tokens = layout.micro_batch * layout.seq
    r = cfg.router
    exchange = tokens * r.routed_k * cfg.arch.d_model * act
    est = Estimate(
        layout=layout,
        config=cfg,
        rank=summary,
        expert_params=expert_params,
        replicated_params=replicated,
        activation_per_token=per_token,
        tokens_micro=tokens,
        tokens_step=tokens * layout.accumulate,
        a2a_exchange=float(exchange),
        a2a_layer_micro=4.0 * exchange,
        a2a_offrank_layer_micro=4.0 * exchange * (layout.ep_size - 1) / layout.ep_size,
        a2a_step=4.0 * exchange * cfg.arch.n_layers * layout.accumulate,
        a2a_counts_layer=r.num_experts * 8,
        flops_per_token=flops_per_token(cfg, layout.seq),
        optimizer_bytes_per_param=optim_per_param,
    )
    est.memory = {
        "parameters": float(weight_bytes),
        "gradients": grads * elt,
        "reduce buckets": float(buckets),
        "optimizer state": optim_per_param * partition,
        "optimizer step": 4 * partition if zero >= 1 else 0.0,
        "activations": tokens * (cfg.arch.n_layers * per_token["layer"] + per_token["head"]),
    }
    return est


def format_estimate(est: Estimate, source: str = "") -> str:
    """The human-readable report of ``emo estimate``."""
    lo, s = est.layout, est.rank
    zero = f"ZeRO-{lo.zero_stage}"
    edp = lo.world // lo.ep_size
    part = (
        f"partitioned over {lo.world} (dense) / {edp} (experts) ranks"
        if lo.zero_stage >= 1
        else "not partitioned"
    )
    elt = "fp32" if PRECISIONS[lo.precision][0] == torch.float32 else "bf16/fp16"
    a, r = est.config.arch, est.config.router
    lines = [
        f"emo estimate{': ' + source if source else ''}: {lo.nodes} x {lo.gpus_per_node} GPUs (world {lo.world}), "
        f"ep_size {lo.ep_size}, {zero}, {lo.precision}, exchange {lo.exchange}",
        f"model: {a.n_layers} layers, d_model {a.d_model}, {r.num_experts} experts ({r.num_shared} shared) of "
        f"hidden {a.expert_hidden}, top-{r.top_k}, {r.kind} router, vocabulary {a.vocab_size:,}",
        f"tokens per GPU: {lo.micro_batch} x {lo.seq} = {est.tokens_micro:,} per micro-batch, x {lo.accumulate} = "
        f"{est.tokens_step:,} per optimizer step (global {est.tokens_step * lo.world:,})",
        f"fullest GPU (expert-parallel rank 0): {s.line(0, lo.world).split(': ', 1)[1]}",
        f"  replicated {est.replicated_params:,} (dense + shared experts), expert-parallel {est.expert_params:,}",
        "memory per GPU:",
    ]
    master = "fp32 master + " if est.optimizer_bytes_per_param == 12 else ""
    notes = {
        "parameters": f"{elt} weights",
        "gradients": f"{elt}, " + ("partition (ZeRO-2)" if lo.zero_stage >= 2 else "every local gradient"),
        "reduce buckets": (
            f"{2 if lo.overlap_comm else 1} x reduce_bucket_size {lo.reduce_bucket_size:,.0f} ({elt})"
            if lo.zero_stage >= 1
            else "none (no ZeRO)"
        ),
        "optimizer state": f"{master}Adam m, v, {part}",
        "optimizer step": "fp32 gradient partition during the step" if lo.zero_stage >= 1 else "none",
        "activations": (
            f"saved for backward: {est.activation_per_token['layer'] / 1e3:,.1f} kB/token/layer, "
            f"head {est.activation_per_token['head'] / 1e3:,.1f} kB/token"
        ),
    }
    for name, value in est.memory.items():
        lines.append(f"  {name:<16} {value / GB:>9.2f} GB   {notes[name]}")
    lines.append(
        f"  {'total':<16} {est.total_memory / GB:>9.2f} GB   (no fragmentation, CUDA context, workspaces)"
    )
    lines += [
        "all-to-all per layer and micro-batch: "
        f"{est.a2a_exchange / MB:,.0f} MB per exchange (dispatch; combine the same), "
        f"{est.a2a_layer_micro / MB:,.0f} MB forward + backward, {est.a2a_offrank_layer_micro / MB:,.0f} MB off-GPU; "
        f"counts {est.a2a_counts_layer:,} B",
        f"all-to-all per optimizer step: {est.a2a_step / GB:,.1f} GB per GPU "
        f"({lo.accumulate} micro-batches x {est.a2a_step / est.a2a_layer_micro / lo.accumulate:.0f} layers)"
        if lo.ep_size > 1
        else "all-to-all: none (ep_size 1: experts replicated)",
        f"FLOPs per token (training): {est.flops_per_token / 1e9:,.2f} GFLOP; per GPU per optimizer step "
        f"{est.flops_per_token * est.tokens_step / 1e12:,.1f} TFLOP",
    ]
    return "\n".join(lines)


def estimate_json(est: Estimate) -> str:
    return json.dumps(est.to_dict(), indent=2, default=str)
