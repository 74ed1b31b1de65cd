"""Cost model of expert parallelism from the configuration: all-to-all volume and memory per rank.

``python -m emo_lightning.parallel.cost --arch conf/arch/1b14b.yaml --router conf/router/emo_1b14b.yaml
--world 128 --ep-size 8 --micro-batch 2 --seq 4096 --accumulate 4``

Assumptions (stated so the numbers can be checked): activations exchanged in ``act_bytes`` (bf16 = 2); every token
sends its k' routed copies (shared experts are local); the dispatch and the combine all-to-all move the same
rows, forward and backward (4 exchanges per layer per micro-batch); the fraction 1/ep_size of rows whose expert is
on the sending rank does not leave it (uniform routing). Memory: bf16 weights (2 B), bf16 gradients (2 B), fp32
master + Adam m, v (12 B) partitioned over the data-parallel group for dense parameters and over the
expert-data-parallel group (world / ep_size) for expert parameters; ZeRO-2 also partitions gradients. Activations,
buckets and fragmentation are not included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from omegaconf import OmegaConf

from emo_lightning.model import ArchConfig, ModelConfig, RouterConfig, param_counts

GB = 1e9


@dataclass
class EPCost:
    tokens_per_rank_micro: int  # tokens per rank per micro-batch
    tokens_per_rank_step: int  # per optimizer step (x accumulate)
    a2a_bytes_per_layer_exchange: int  # one all-to-all (dispatch or combine) of one layer, one micro-batch
    a2a_bytes_per_layer_micro: int  # 4 exchanges (fwd dispatch+combine, bwd of both)
    a2a_offrank_bytes_per_layer_micro: int  # the part that leaves the rank
    a2a_bytes_per_step: int  # all layers, all micro-batches of one optimizer step
    dense_params: int
    expert_params_per_rank: int
    memory_gb: dict[str, float]  # ZeRO stage -> params + grads + optimizer state per rank


def ep_cost(
    cfg: ModelConfig,
    world: int,
    ep_size: int,
    micro_batch: int,
    seq: int,
    accumulate: int = 1,
    act_bytes: int = 2,
) -> EPCost:
    a, r = cfg.arch, cfg.router
    b = param_counts(cfg)
    tokens = micro_batch * seq
    exchange = tokens * r.routed_k * a.d_model * act_bytes
    per_micro = 4 * exchange
    dense = b.total - b.routed_experts
    slots_per_rank = r.num_experts // ep_size
    expert_one = 3 * a.d_model * a.expert_hidden
    expert_local = a.n_layers * min(slots_per_rank, r.num_routed) * expert_one  # the fullest rank
    edp = world // ep_size
    weights = 2 * (dense + expert_local)
    optim = 12 * (dense / world + expert_local / edp)
    grads_full = 2 * (dense + expert_local)
    grads_part = 2 * (dense / world + expert_local / edp)
    return EPCost(
        tokens_per_rank_micro=tokens,
        tokens_per_rank_step=tokens * accumulate,
        a2a_bytes_per_layer_exchange=exchange,
        a2a_bytes_per_layer_micro=per_micro,
        a2a_offrank_bytes_per_layer_micro=int(per_micro * (ep_size - 1) / ep_size),
        a2a_bytes_per_step=per_micro * a.n_layers * accumulate,
        dense_params=dense,
        expert_params_per_rank=expert_local,
        memory_gb={
            "zero1": round((weights + grads_full + optim) / GB, 2),
            "zero2": round((weights + grads_part + optim) / GB, 2),
        },
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="EP all-to-all volume and per-rank memory from the config")
    p.add_argument("--arch", required=True)
    p.add_argument("--router", required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--ep-size", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--act-bytes", type=int, default=2)
    args = p.parse_args(argv)
    arch = OmegaConf.to_container(OmegaConf.load(args.arch), resolve=True)
    router = OmegaConf.to_container(OmegaConf.load(args.router), resolve=True)
    cfg = ModelConfig(arch=ArchConfig(**arch), router=RouterConfig(**router))
    cost = ep_cost(cfg, args.world, args.ep_size, args.micro_batch, args.seq, args.accumulate, args.act_bytes)
    print(json.dumps(asdict(cost), indent=2))


if __name__ == "__main__":
    main()
