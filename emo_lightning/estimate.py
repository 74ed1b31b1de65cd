"""``emo estimate``: per-GPU memory, all-to-all volume and FLOPs of an experiment on a layout, without weights.

``emo estimate --config conf/experiment/emo_1b14b.yaml [--nodes 16 --gpus-per-node 8 --ep-size 8 --micro-batch 2
--seq 4096 --accumulate 4 --precision bf16-mixed --zero-stage 2] [--model.router.num_experts 64 ...] [--json]``

The config is composed by ``emo``'s own parser (``config:`` includes, dotted keys, relative files, ``--model.*``
overrides), nothing is instantiated; every layout flag defaults to the config's value (trainer, strategy, data).
The figures come from :mod:`emo_lightning.parallel.cost` (the rank's model built on the meta device).
"""

from __future__ import annotations

from typing import Any

from emo_lightning.errors import ArgumentParser, UserError
from emo_lightning.parallel.cost import PRECISIONS, Layout, estimate, estimate_json, format_estimate
from emo_lightning.presets import compose, model_config

DEEPSPEED_DEFAULTS = {"stage": 2, "ep_size": 1, "reduce_bucket_size": 200_000_000, "overlap_comm": True}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="emo estimate",
        description="Per-GPU memory, all-to-all bytes and FLOPs of an experiment on a layout (no weights "
        "allocated). Layout flags default to the config's trainer / strategy / data values.",
    )
    p.add_argument("--config", required=True, help="experiment YAML, e.g. conf/experiment/emo_1b14b.yaml")
    p.add_argument("--nodes", type=int, help="trainer.num_nodes")
    p.add_argument("--gpus-per-node", type=int, help="trainer.devices")
    p.add_argument("--ep-size", type=int, help="trainer.strategy.init_args.ep_size")
    p.add_argument("--micro-batch", type=int, help="data.batch_size (sequences per GPU per micro-batch)")
    p.add_argument("--seq", type=int, help="data.seq_len")
    p.add_argument("--accumulate", type=int, help="trainer.accumulate_grad_batches")
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="trainer.precision")
    p.add_argument("--zero-stage", type=int, help="trainer.strategy.init_args.stage (0, 1, 2)")
    p.add_argument("--exchange", choices=("variable", "padded"), help="trainer.strategy.init_args.exchange")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def layout_from(config: Any, args: Any) -> Layout:
    """Flags over the config's values."""
    trainer, data = config.trainer, config.data
    strategy = trainer.get("strategy")
    init = dict(DEEPSPEED_DEFAULTS)
    deepspeed = getattr(strategy, "class_path", None) is not None and "DeepSpeed" in strategy.class_path
    if deepspeed:
        init.update({k: v for k, v in vars(strategy.init_args).items() if v is not None})
    else:
        init["stage"] = 0  # no ZeRO: every rank holds all its gradients and optimizer state
    devices = trainer.get("devices")
    pick = {
        "nodes": (args.nodes, trainer.get("num_nodes") or 1),
        "gpus_per_node": (args.gpus_per_node, devices if isinstance(devices, int) else None),
        "ep_size": (args.ep_size, init["ep_size"]),
        "micro_batch": (args.micro_batch, data.get("batch_size")),
        "seq": (args.seq, data.get("seq_len")),
        "accumulate": (args.accumulate, trainer.get("accumulate_grad_batches") or 1),
        "precision": (args.precision, str(trainer.get("precision") or "32-true")),
        "zero_stage": (args.zero_stage, init["stage"]),
        "exchange": (args.exchange, init.get("exchange", "variable")),
    }
    values = {}
    for name, (flag, default) in pick.items():
        value = flag if flag is not None else default
        if value is None:
            raise UserError(
                f"--{name.replace('_', '-')}: the config does not fix it", "pass it on the command line"
            )
        values[name] = value
    return Layout(
        **values,
        reduce_bucket_size=int(init["reduce_bucket_size"]),
        overlap_comm=bool(init["overlap_comm"]),
    )


def main(argv: list[str]) -> None:
    """``emo estimate`` (run under ``run_cli``: user errors are one line)."""
    args, overrides = build_parser().parse_known_args(argv)
    bad = [
        a for a in overrides if a.startswith("-") and not a.startswith(("--model.", "--data.", "--trainer."))
    ]
    if bad:
        raise UserError(f"unknown option {bad[0]}", "`emo estimate --help` lists the options")
    config = compose(args.config, overrides)
    cfg = model_config(config)
    est = estimate(cfg, layout_from(config, args))
    print(estimate_json(est) if args.json else format_estimate(est, args.config))
