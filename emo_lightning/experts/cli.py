"""``emo-experts``: routes, expert selection, pruning, merging back, evaluation (loss, downstream tasks), the report.

Mistakes (a missing checkpoint, a subset of another model, a tokenizer that does not fit...) end with one line
``emo-experts: ...`` and exit status 2 (``--debug`` or ``EMO_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emo_lightning.checkpoint import (
    CheckpointWriteError,
    LoadedModel,
    atomic_write_text,
    check_out_folder,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from emo_lightning.errors import ArgumentParser, UserError, run_cli
from emo_lightning.experts.documents import (
    DEFAULT_TOKENIZER,
    DocumentTokenizer,
    by_domain,
    load_documents,
    pack_documents,
)
from emo_lightning.experts.evaluate import document_losses, domain_table, format_table
from emo_lightning.experts.merge import DENSE, ROUTER, merge_checkpoints
from emo_lightning.experts.routes import iter_routes, write_routes
from emo_lightning.experts.selection import (
    BUDGETS,
    METHODS,
    Subset,
    compose_subsets,
    parse_keep,
    select_subset,
)
from emo_lightning.model import FULL, expert_parameter_counts, parse_routing, prune_model


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="the run's tokenizer.json (default: %(default)s)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens per row (default: the model's max_seq_len)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _routing_arg(p: argparse.ArgumentParser, choices: str = "full | pool:P | running:P | causal:P:N") -> None:
    p.add_argument(
        "--routing",
        type=parse_routing,
        default=FULL,
        help=f"{choices} (default: full). pool:P = EMO document pools of P routable experts (chosen from the "
        "whole document); running:P = each token's pool of P experts chosen from its document's tokens so far "
        "(causal); causal:P:N = each document's pool of P experts chosen from its first N tokens only",
    )


def _counts(text: str) -> list[int]:
    """``"1,8"`` -> [1, 8] (positive integers)."""
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (1,8), got {text!r}")
    return counts


def _methods(text: str) -> list[str]:
    """``"layerwise,easy_ep:global"`` -> the report's selection methods (random is always measured)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    ok = {f"{m}{b}" for m in METHODS if m != "random" for b in ("", ":global", ":layer")}
    bad = [m for m in names if m not in ok]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected some of {sorted(ok)}, got {text!r}")
    return [m.removesuffix(":layer") for m in names]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="emo-experts",
        description="Pick a few experts for a domain, cut the model down to them, and measure what is left.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("routes", help="per-document pools and per-token experts and weights (JSON Lines)")
    p.add_argument("--ckpt", required=True, help="checkpoint (trained or pruned)")
    p.add_argument("--data", required=True, help="JSONL file (or directory) of documents")
    p.add_argument("--out", required=True, help="output routes.jsonl")
    _routing_arg(p)
    _common(p)

    p = sub.add_parser("select", help="choose K experts per layer from a few calibration documents")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="calibration documents (JSONL file or directory)")
    p.add_argument(
        "--keep", required=True, help="experts per layer, shared included: a count (4) or a fraction (0.25)"
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="layerwise",
        help="layerwise: greedy layer by layer on the mean router probability (the paper's); easy_ep: one "
        "forward, gate x expert output norm x the token's direction change (arXiv 2504.06792); random",
    )
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default="layer",
        help="layer: --keep experts in every layer (prunable); global: the same total spread over the layers by "
        "score, a variable keep per layer (evaluated masked, not prunable) (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random method: seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output subset.json")
    _routing_arg(p, "full | pool:P | running:P")
    _common(p)

    p = sub.add_parser(
        "compose", help="per layer, the union of several subsets (one model for several domains)"
    )
    p.add_argument("subsets", nargs="+", help="subset.json files selected from the same checkpoint")
    p.add_argument("--out", required=True, help="output subset.json (prune it like any other)")

    p = sub.add_parser("prune", help="write a standalone smaller checkpoint holding only the kept experts")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--subset", required=True, help="subset.json from `emo-experts select`")
    p.add_argument(
        "--out", required=True, help="output checkpoint (loadable by `emo validate` and `emo-experts eval`)"
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "merge", help="write a (fine-tuned) part's experts back into the full model at their original ids"
    )
    p.add_argument("--full", required=True, help="the full checkpoint the part was pruned from")
    p.add_argument("--part", required=True, help="the part: pruned, usually fine-tuned (emo fit --init_from)")
    p.add_argument("--out", required=True, help="output checkpoint, the full model's size")
    p.add_argument(
        "--subset",
        default=None,
        help="the part's subset.json (default: recorded in the part or its init_from)",
    )
    p.add_argument(
        "--dense",
        choices=DENSE,
        default="full",
        help="embeddings, attention, norms, LM head, shared experts: the full model's (default: only the part's "
        "experts change), the part's, or their average",
    )
    p.add_argument(
        "--router",
        choices=ROUTER,
        default="full",
        help="router rows of the merged experts: the full model's (default) or the part's",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "export", help="a Hugging Face model folder (stock Qwen2-MoE / Qwen3-MoE, no remote code)"
    )
    p.add_argument("--ckpt", required=True)
    p.add_argument(
        "--subset", default=None, help="export the checkpoint cut to this subset.json (a smaller model)"
    )
    p.add_argument(
        "--out", required=True, help="output folder (config.json, model.safetensors, tokenizer...)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder whole")
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="the run's tokenizer.json (default: %(default)s)"
    )

    p = sub.add_parser(
        "eval",
        help="per-domain loss and perplexity (--data), or downstream accuracy through lm-eval (--tasks)",
    )
    p.add_argument("--ckpt", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="JSONL file or directory: per-domain loss and perplexity")
    what.add_argument(
        "--tasks",
        help="lm-evaluation-harness tasks: a folder of task YAMLs (every task in it, e.g. from `emo-data "
        "make-task`) or comma-separated names; accuracy and its standard error per task",
    )
    p.add_argument(
        "--subset",
        default=None,
        help="evaluate the checkpoint cut to this subset.json (a variable keep per layer: masked, not pruned)",
    )
    p.add_argument(
        "--max-docs", type=int, default=None, help="at most this many documents per domain (first ones)"
    )
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many items per task")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it after the table)")
    _routing_arg(p)
    _common(p)

    p = sub.add_parser("report", help="the modularity report: EMO vs standard MoE under expert subsets")
    p.add_argument("--emo", default=None, help="EMO checkpoint (required unless --only standard)")
    p.add_argument("--baseline", default=None, help="standard-MoE checkpoint (required unless --only emo)")
    p.add_argument("--data", required=True, help="directory (or file) of JSONL documents with domains")
    p.add_argument(
        "--keep", default="0.0625,0.125,0.25,0.5,1", help="comma-separated keep fractions or counts"
    )
    p.add_argument("--shots", type=_counts, default="1,8", help="comma-separated calibration document counts")
    p.add_argument(
        "--methods",
        type=_methods,
        default="layerwise",
        help="comma-separated selection methods compared beside random: layerwise, easy_ep, and either with "
        ":global (a variable keep per layer) (default: %(default)s)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="an `emo-data make-task` folder: also each cut's accuracy on its domain's task (the accuracy drop)",
    )
    p.add_argument("--calib-docs", type=int, default=8, help="calibration documents per domain")
    p.add_argument("--eval-docs", type=int, default=50, help="evaluation documents per domain (disjoint)")
    p.add_argument("--random-seeds", type=int, default=3, help="random subsets per domain and keep")
    p.add_argument("--clusters", type=int, default=32, help="k of the spherical k-means")
    p.add_argument("--cluster-tokens", type=int, default=40_000, help="tokens sampled for clustering")
    p.add_argument("--pool-prefix", type=int, default=64, help="causal-pool demo: prefix tokens N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (report.md, report.json, *.png)")
    p.add_argument(
        "--only",
        choices=["emo", "standard"],
        default=None,
        help="measure and cache one model only (out/part_<name>.json, reused by a later full run); no report",
    )
    _common(p)

    p = sub.add_parser(
        "explore", help="one self-contained HTML page: documents, clusters and experts (EMO vs a baseline)"
    )
    p.add_argument("--emo", required=True, help="checkpoint to explore (EMO, or any)")
    p.add_argument(
        "--baseline", default=None, help="a second checkpoint shown beside it (e.g. a standard MoE)"
    )
    p.add_argument("--data", required=True, help="JSONL file (or directory) of documents with domains")
    p.add_argument("--out", required=True, help="output page.html (opens from disk, no network needed)")
    p.add_argument(
        "--docs",
        type=int,
        default=100,
        help="documents shown, spread over the domains (default: %(default)s)",
    )
    p.add_argument(
        "--clusters", type=int, default=32, help="k of each layer's spherical k-means (default: %(default)s)"
    )
    p.add_argument(
        "--keep",
        default="0.125,0.25,0.5",
        help="keep fractions (or counts) to select for (default: %(default)s)",
    )
    p.add_argument(
        "--calib-docs",
        type=int,
        default=8,
        help="per domain, the shown documents `select` is calibrated on (default: %(default)s)",
    )
    p.add_argument(
        "--report", default=None, help="an `emo-experts report` folder: show its measured loss rises"
    )
    p.add_argument("--seed", type=int, default=0)
    _routing_arg(p, "full | pool:P | running:P")
    _common(p)
    return parser


def _load_subset(path: str, lm: LoadedModel, prunable: bool = False) -> Subset:
    """A subset of this checkpoint's experts; ``prunable``: refuse a variable keep per layer."""
    subset = Subset.from_dict(_read_json(path), path)
    rc = lm.config.router
    if (subset.num_experts, subset.num_shared) != (rc.num_experts, rc.num_shared):
        raise UserError(
            f"{path}: subset is for {subset.num_experts} experts ({subset.num_shared} shared), the checkpoint "
            f"has {rc.num_experts} ({rc.num_shared} shared)",
            "select the subset from this checkpoint (`emo-experts select --ckpt ...`)",
        )
    if prunable and not subset.uniform:
        raise UserError(
            f"{path}: a variable keep per layer ({[len(layer) for layer in subset.layers]} routable experts) "
            "cannot become one smaller model (one expert count per layer is an architecture constant)",
            "evaluate it on the full checkpoint (`emo-experts eval --subset`), or select with --budget layer",
        )
    return subset


def _docs(args: argparse.Namespace, lm: LoadedModel):
    tok = _tokenizer(args, lm)
    docs = load_documents(args.data, tok)
    if getattr(args, "max_docs", None):
        docs = [d for group in by_domain(docs).values() for d in group[: args.max_docs]]
    if not docs:
        raise UserError(f"--data {args.data}: no documents", "pass JSON Lines records with a non-empty text")
    seq = min(args.seq_len or lm.config.arch.max_seq_len, lm.config.arch.max_seq_len)
    return tok, docs, pack_documents(docs, seq, args.batch_size, tok.pad_id)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_routes(args: argparse.Namespace) -> None:
    lm = load_model(args.ckpt)
    tok, docs, batches = _docs(args, lm)
    n = write_routes(
        iter_routes(lm.model, docs, batches, args.routing, tok.pad_id, not args.no_progress), args.out
    )
    print(
        f"wrote routes of {n} documents ({len(lm.model.blocks)} layers, routing {args.routing}) to {args.out}"
    )


def cmd_select(args: argparse.Namespace) -> None:
    lm = load_model(args.ckpt)
    rc = lm.config.router
    keep = parse_keep(args.keep, rc)
    if args.method == "random":
        subset = select_subset(lm.model, [], keep, "random", budget=args.budget, seed=args.seed)
    else:
        _, docs, batches = _docs(args, lm)
        subset = select_subset(
            lm.model, batches, keep, args.method, args.routing, args.budget, progress=not args.no_progress
        )
        subset.info["calibration"] = {"data": args.data, "documents": [d.id for d in docs]}
    subset.info["checkpoint"] = args.ckpt
    atomic_write_text(args.out, json.dumps(subset.to_dict(), indent=1))
    per = "per layer" if subset.uniform else "per layer on average (a global budget: variable keep)"
    print(
        f"{args.method}: keep {keep}/{rc.num_experts} experts {per} ({subset.keep_routed} routable + "
        f"{rc.num_shared} shared) -> {args.out}"
    )
    for i, layer in enumerate(subset.layers):
        print(f"  layer {i}: {len(layer)} routable {layer}")


def cmd_compose(args: argparse.Namespace) -> None:
    subsets = [Subset.from_dict(_read_json(path), path) for path in args.subsets]
    result = compose_subsets(subsets, args.subsets)
    atomic_write_text(args.out, json.dumps(result.to_dict(), indent=1))
    inputs = " + ".join(str(s.keep) for s in subsets)
    print(f"compose: {inputs} experts per layer -> {result.keep}/{result.num_experts} ({args.out})")
    for i, (layer, union) in enumerate(zip(result.layers, result.info["union_sizes"], strict=True)):
        fill = result.info["filled"][i]
        note = f", filled with {fill} to {len(layer)}" if fill else ""
        print(f"  layer {i}: union of {union} routable experts{note}")


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path}: no such file", "pass a subset.json written by `emo-experts select`"
        ) from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not JSON ({err})", "pass a subset.json written by `emo-experts select`"
        ) from None


def cmd_prune(args: argparse.Namespace) -> None:
    with tqdm(total=3, desc="prune", disable=args.no_progress) as bar:
        lm = load_model(args.ckpt)
        subset = _load_subset(args.subset, lm, prunable=True)
        bar.update()
        small = prune_model(lm.model, subset.layers)
        bar.update()
        source = read_checkpoint(args.ckpt)
        meta = {"source": args.ckpt, "subset": subset.to_dict()}
        size = save_checkpoint(small, lm.hparams, args.out, source, emo_pruned=meta)
        bar.update()
    before, after = expert_parameter_counts(lm.model), expert_parameter_counts(small)
    src_size = Path(args.ckpt).stat().st_size
    print(f"kept {subset.keep}/{subset.num_experts} experts per layer -> {args.out}")
    print(
        f"  parameters      {before['total']:>12,} -> {after['total']:>12,} ({after['total'] / before['total']:.1%})"
    )
    print(
        f"  routed experts  {before['routed_experts']:>12,} -> {after['routed_experts']:>12,} "
        f"({after['routed_experts'] / before['routed_experts']:.1%})"
    )
    print(f"  file            {_size(src_size):>12} -> {_size(size):>12} (source includes optimizer state)")


def cmd_merge(args: argparse.Namespace) -> None:
    with tqdm(total=2, desc="merge", disable=args.no_progress) as bar:
        subset = Subset.from_dict(_read_json(args.subset), args.subset) if args.subset else None
        model, hparams, source, meta = merge_checkpoints(
            args.full, args.part, subset, args.dense, args.router
        )
        bar.update()
        size = save_checkpoint(model, hparams, args.out, source, emo_merged=meta)
        bar.update()
    counts = [len(layer) for layer in meta["layers"]]
    print(
        f"merged {sum(counts)} experts ({'/'.join(map(str, counts))} per layer of "
        f"{model.cfg.router.num_routed}) of {args.part} into {args.full} -> {args.out} ({_size(size)})"
    )
    print(f"  dense weights: {args.dense}; router rows: {args.router}")


def cmd_export(args: argparse.Namespace) -> None:
    from emo_lightning.experts.export import export_hf, hf_architecture

    check_out_folder(args.out, args.overwrite)  # before any work
    lm = load_model(args.ckpt)
    model = lm.model
    if args.subset:
        model = prune_model(model, _load_subset(args.subset, lm, prunable=True).layers)
    arch = hf_architecture(model.cfg)
    sizes = export_hf(model, args.tokenizer, args.out, args.overwrite)
    rc = model.cfg.router
    print(f"exported {args.ckpt}{f' cut to {args.subset}' if args.subset else ''} as {arch} -> {args.out}")
    print(
        f"  {expert_parameter_counts(model)['total']:,} parameters, {rc.num_experts} experts per layer "
        f"({rc.num_shared} shared), top-{rc.top_k}; routing: every token over all of its experts (no pools)"
    )
    for name, size in sizes.items():
        print(f"  {name:<24} {_size(size):>12}")


def cmd_eval(args: argparse.Namespace) -> None:
    lm = load_model(args.ckpt)
    model, allowed = lm.model, None
    if args.subset:
        model, allowed = _load_subset(args.subset, lm).apply(model)
        if allowed is not None and args.routing.kind == "causal":
            raise UserError(
                f"--subset {args.subset}: a variable-keep subset with --routing causal:P:N",
                "use full, pool:P or running:P",
            )
    start = time.perf_counter()
    payload: dict[str, Any] = {"checkpoint": args.ckpt, "subset": args.subset}
    if args.tasks:
        results = _eval_tasks(args, lm, model, allowed)
        payload["tasks"] = args.tasks
    else:
        results = _eval_losses(args, lm, model, allowed)
        payload["data"] = args.data
    payload |= {
        "routing": str(args.routing),
        "num_experts": model.cfg.router.num_experts,
        "experts_per_layer": None if allowed is None else allowed.sum((1, 2, 3)).tolist(),
        "parameters": expert_parameter_counts(model)["total"],
        "seconds": round(time.perf_counter() - start, 2),
        "results": results,
    }
    text = json.dumps(payload, indent=1)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)


def _eval_losses(args: argparse.Namespace, lm: LoadedModel, model, allowed) -> dict[str, Any]:
    tok, docs, batches = _docs(args, lm)
    progress = not args.no_progress
    results: dict[str, Any] = {}
    dl = document_losses(model, docs, batches, args.routing, tok.pad_id, progress, allowed=allowed)
    results[str(args.routing)] = domain_table(docs, dl)
    if args.routing.kind == "causal":  # the same targets with all experts and no pool
        ref = document_losses(
            model, docs, batches, FULL, tok.pad_id, progress, score_from=args.routing.prefix - 1
        )
        results["full (same targets)"] = domain_table(docs, ref)
    print(format_table(results))
    return results


def _tokenizer(args: argparse.Namespace, lm: LoadedModel) -> DocumentTokenizer:
    tok = DocumentTokenizer(args.tokenizer)
    if tok.vocab_size > lm.config.arch.vocab_size:
        raise UserError(
            f"--tokenizer {args.tokenizer}: vocabulary {tok.vocab_size} exceeds the model's "
            f"{lm.config.arch.vocab_size}",
            "pass the tokenizer the model was trained with",
        )
    return tok


def _harness():
    """The lm-eval adapter module (an optional dependency: the ``eval`` extra)."""
    try:
        from emo_lightning.experts import harness
    except ImportError as err:
        raise UserError(
            f"--tasks needs lm-evaluation-harness ({err.name} is not installed)",
            "pip install 'emo-lightning[eval]' (make install does)",
        ) from None
    return harness


def _eval_tasks(args: argparse.Namespace, lm: LoadedModel, model, allowed) -> dict[str, Any]:
    h = _harness()
    names, folder = h.resolve_tasks(args.tasks)
    tok = _tokenizer(args, lm)
    harness = h.EMOHarnessLM(model, tok, args.routing, allowed, args.batch_size, not args.no_progress)
    results = h.run_tasks(harness, names, folder, limit=args.limit)
    print(h.format_accuracy(results))
    return results


def cmd_report(args: argparse.Namespace) -> None:
    from emo_lightning.experts.report import ReportConfig, run_report  # scikit-learn, matplotlib: only here

    cfg = ReportConfig(
        keep=[k.strip() for k in args.keep.split(",") if k.strip()],
        shots=args.shots,
        n_calib=args.calib_docs,
        n_eval=args.eval_docs,
        random_seeds=args.random_seeds,
        clusters=args.clusters,
        cluster_tokens=args.cluster_tokens,
        pool_prefix=args.pool_prefix,
        seq_len=args.seq_len or 256,
        batch_size=args.batch_size,
        seed=args.seed,
        methods=args.methods,
        tasks=args.tasks,
    )
    if args.tasks and _harness().resolve_tasks(args.tasks)[1] is None:  # a usable folder, before any work
        raise UserError(f"--tasks {args.tasks}: not a folder", "pass the folder `emo-data make-task` wrote")
    if max(cfg.shots) > cfg.n_calib:
        raise UserError(f"--shots {max(cfg.shots)} exceeds --calib-docs {cfg.n_calib}", "raise --calib-docs")
    for flag, other in (("emo", "standard"), ("baseline", "emo")):
        if getattr(args, flag) is None and args.only != other:
            raise UserError(f"--{flag} is missing", f"pass a checkpoint (or --only {other})")
    run_report(
        args.emo, args.baseline, args.data, args.out, cfg, args.tokenizer, not args.no_progress, args.only
    )
    if args.only:
        print(f"cached the {args.only} measurements in {Path(args.out) / f'part_{args.only}.json'}")
    else:
        print((Path(args.out) / "report.md").read_text())


def cmd_explore(args: argparse.Namespace) -> None:
    from emo_lightning.experts.explore import ExploreConfig, explore  # plotly: only here

    for flag in ("docs", "clusters", "calib_docs"):
        if getattr(args, flag) < 1:
            raise UserError(
                f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1", "pass a positive count"
            )
    cfg = ExploreConfig(
        docs=args.docs,
        clusters=args.clusters,
        keep=[k.strip() for k in args.keep.split(",") if k.strip()],
        calib_docs=args.calib_docs,
        routing=args.routing,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    done = explore(
        args.emo, args.data, args.out, args.baseline, cfg, args.tokenizer, args.report, not args.no_progress
    )
    print(f"wrote {args.out}: {done['docs']} documents, {done['tokens']:,} tokens, {_size(done['bytes'])}")


COMMANDS = {
    "routes": cmd_routes,
    "select": cmd_select,
    "compose": cmd_compose,
    "export": cmd_export,
    "prune": cmd_prune,
    "merge": cmd_merge,
    "eval": cmd_eval,
    "report": cmd_report,
    "explore": cmd_explore,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``emo-experts`` (user errors: one line, exit 2)."""

    def run(args: list[str]) -> None:
        parsed = build_parser().parse_args(args)
        COMMANDS[parsed.command](parsed)

    run_cli("emo-experts", run, argv, faults=(CheckpointWriteError,))


if __name__ == "__main__":
    main()
