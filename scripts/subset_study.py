"""Subset fine-tuning study (docs/modularity.md, "Serving a subset"): does a domain's expert subset fine-tune back
to the full model, does a composed subset serve two domains, does selection beat chance on an unseen domain, and
does merging a fine-tuned subset back into the full model break the other domains?

    python scripts/subset_study.py domains --emo EMO.ckpt --baseline STD.ckpt --out runs/subset_study
    python scripts/subset_study.py compose --emo EMO.ckpt --baseline STD.ckpt --out runs/subset_study
    python scripts/subset_study.py heldout --emo EMO7.ckpt --baseline STD7.ckpt --domain news --out runs/subset_study
    python scripts/subset_study.py merge --emo EMO.ckpt --baseline STD.ckpt --domains code --tasks runs/tasks_val

``merge``: the domain's 25% subset fine-tuned as in ``domains`` (the same run, reused), written back into the full
model (``emo-experts merge``, dense weights of the full model and of the part; ``--experts-only``: also a subset
fine-tuned with only its routed experts trainable, ``optim.trainable: experts``), then every domain's val loss
(without the calibration documents) and, with ``--tasks`` (an ``emo-data make-task`` folder), every domain's task
accuracy, for the full model and each merged one.

Per model and domain: the first 8 documents of the domain's val split calibrate a 25% layer-wise subset (the
rest of the split evaluates, full routing over the kept experts); the pruned model is fine-tuned with
``emo fit --init_from`` on the domain's train split (``--steps`` optimizer steps of 16 x 256 tokens, a fresh
AdamW at ``--lr`` with 20 warm-up steps) and evaluated again. Every step's JSON lands in ``--out``; a finished
step is not redone, so the script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emo_lightning.checkpoint import load_model, read_checkpoint, save_checkpoint  # noqa: E402
from emo_lightning.experts.documents import DocumentTokenizer, load_documents, pack_documents  # noqa: E402
from emo_lightning.experts.evaluate import evaluate  # noqa: E402
from emo_lightning.experts.selection import compose_subsets, layerwise_subset, random_subset  # noqa: E402
from emo_lightning.model import prune_model  # noqa: E402

CONFIGS = {
    "emo": "conf/studies/emo_shared8_fine64.yaml",
    "standard": "conf/studies/stdmoe_shared8_fine64.yaml",
}
TOKENIZER = ROOT / "data" / "tokenizer.json"
N_CALIB = 8


def cached(path: Path, compute) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def split_val(corpus: Path, domain: str, out: Path) -> tuple[Path, Path]:
    """calib (first 8 documents of the domain's val split) and eval (the rest) JSONL files."""
    calib, rest = out / f"calib_{domain}.jsonl", out / f"eval_{domain}.jsonl"
    if not rest.exists():
        out.mkdir(parents=True, exist_ok=True)
        with gzip.open(corpus / "val" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = f.readlines()
        calib.write_text("".join(lines[:N_CALIB]))
        rest.write_text("".join(lines[N_CALIB:]))
    return calib, rest


def shards(corpus: Path, domains: list[str], out: Path) -> Path:
    """Train shards of ``domains`` (built once)."""
    folder = out / "shards" / "_".join(domains)
    if not (folder / "manifest.json").exists():
        inputs = [str(corpus / "train" / f"{d}.jsonl.gz") for d in domains]
        cmd = [sys.executable, "-m", "data_tools.cli", "build-shards", "--input", *inputs,
               "--tokenizer", str(TOKENIZER), "--out", str(folder), "--quiet", "--overwrite"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
    return folder


def loss(ckpt: Path | str, docs_path: Path, model=None) -> float:
    model = model if model is not None else load_model(ckpt).model
    tok = DocumentTokenizer(TOKENIZER)
    docs = load_documents(docs_path, tok)
    return evaluate(model, docs, seq_len=256, batch_size=16, pad_id=tok.pad_id)["all"]["loss"]  # full routing


def prune_to(ckpt: str, subset, out: Path) -> Path:
    if not out.exists():
        lm = load_model(ckpt)
        small = prune_model(lm.model, subset.layers)
        save_checkpoint(
            small, lm.hparams, out, read_checkpoint(ckpt), emo_pruned={"subset": subset.to_dict()}
        )
    return out


def fine_tune(
    kind: str, small: Path, train: Path, name: str, args: argparse.Namespace, trainable: str = "all"
) -> Path:
    """``emo fit --init_from small`` on ``train``; ``trainable="experts"``: only the routed experts train."""
    run = args.out / "runs" / name
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        cmd = [sys.executable, "-m", "emo_lightning.cli", "fit", "--config", CONFIGS[kind], "--init_from", str(small),
               "--data.train_shards", str(train), "--data.val_shards", "null", "--trainer.max_steps", str(args.steps),
               "--trainer.limit_val_batches", "0", "--checkpoint.every_n_train_steps", str(args.steps),
               "--model.optim.lr", str(args.lr), "--model.optim.warmup_steps", "20", "--monitor", "false",
               "--model.optim.trainable", trainable, "--trainer.enable_progress_bar", "false",
               "--runs_dir", str(args.out / "runs"), "--experiment", name]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return ckpt


def select(ckpt: str, calib: Path, keep: float, method: str, seed: int = 0):
    lm = load_model(ckpt)
    rc = lm.config.router
    k = round(keep * rc.num_experts)
    if method == "random":
        return random_subset(rc, len(lm.model.blocks), k, seed)
    tok = DocumentTokenizer(TOKENIZER)
    batches = pack_documents(load_documents(calib, tok), 256, 16, tok.pad_id)
    return layerwise_subset(lm.model, batches, k)


def domains_phase(args: argparse.Namespace) -> None:
    for kind, ckpt in (("emo", args.emo), ("standard", args.baseline)):
        for d in args.domains:
            calib, rest = split_val(args.corpus, d, args.out / "data")

            def one(kind=kind, ckpt=ckpt, d=d, calib=calib, rest=rest) -> dict[str, float]:
                subset = select(ckpt, calib, 0.25, "layerwise")
                small = prune_to(ckpt, subset, args.out / "ckpt" / f"{kind}_{d}_25.ckpt")
                tuned = fine_tune(kind, small, shards(args.corpus, [d], args.out), f"{kind}_{d}_25_ft", args)
                full_tuned = fine_tune(
                    kind, Path(ckpt), shards(args.corpus, [d], args.out), f"{kind}_{d}_full_ft", args
                )
                return {
                    "full": loss(ckpt, rest),
                    "subset": loss(small, rest),
                    "subset_ft": loss(tuned, rest),
                    "full_ft": loss(full_tuned, rest),
                }

            row = cached(args.out / "results" / f"domains_{kind}_{d}.json", one)
            print(kind, d, {k: round(v, 4) for k, v in row.items()}, flush=True)


def compose_phase(args: argparse.Namespace) -> None:
    a, b = args.pair
    for kind, ckpt in (("emo", args.emo), ("standard", args.baseline)):

        def one(kind=kind, ckpt=ckpt) -> dict[str, Any]:
            subsets = {
                d: select(ckpt, split_val(args.corpus, d, args.out / "data")[0], 0.25, "layerwise")
                for d in (a, b)
            }
            union = compose_subsets([subsets[a], subsets[b]], [a, b])
            out: dict[str, Any] = {"union_keep": union.keep, "union_sizes": union.info["union_sizes"]}
            for d in (a, b):
                rest = split_val(args.corpus, d, args.out / "data")[1]
                out[d] = {
                    "full": loss(ckpt, rest),
                    "own_subset": loss(
                        prune_to(ckpt, subsets[d], args.out / "ckpt" / f"{kind}_{d}_25.ckpt"), rest
                    ),
                    "union": loss(prune_to(ckpt, union, args.out / "ckpt" / f"{kind}_{a}+{b}.ckpt"), rest),
                }
            return out

        print(
            kind, json.dumps(cached(args.out / "results" / f"compose_{kind}_{a}+{b}.json", one)), flush=True
        )


def heldout_phase(args: argparse.Namespace) -> None:
    d = args.domain
    calib, rest = split_val(args.corpus, d, args.out / "data")
    train = shards(args.corpus, [d], args.out)
    for kind, ckpt in (("emo", args.emo), ("standard", args.baseline)):

        def one(kind=kind, ckpt=ckpt) -> dict[str, float]:
            out = {"full": loss(ckpt, rest)}
            for method in ("layerwise", "random"):
                subset = select(ckpt, calib, 0.25, method)
                small = prune_to(ckpt, subset, args.out / "ckpt" / f"heldout_{kind}_{d}_{method}.ckpt")
                out[method] = loss(small, rest)
                out[f"{method}_ft"] = loss(
                    fine_tune(kind, small, train, f"heldout_{kind}_{d}_{method}_ft", args), rest
                )
            return out

        row = cached(args.out / "results" / f"heldout_{kind}_{d}.json", one)
        print(kind, d, {k: round(v, 4) for k, v in row.items()}, flush=True)


def _domains(corpus: Path) -> list[str]:
    return sorted(p.name.removesuffix(".jsonl.gz") for p in (corpus / "val").glob("*.jsonl.gz"))


def _accuracy(ckpt: Path | str, args: argparse.Namespace) -> dict[str, float]:
    """acc_norm per domain's task (items of calibration documents left out), ``{domain: acc_norm}``."""
    from emo_lightning.experts.harness import EMOHarnessLM, run_tasks, task_documents

    calib = {}
    for d in _domains(args.corpus):
        path = split_val(args.corpus, d, args.out / "data")[0]
        calib[d] = {json.loads(line).get("id") for line in path.read_text().split("\n") if line.strip()}
    tasks = task_documents(args.tasks)
    samples = {t: [i for i, x in enumerate(v["doc_ids"]) if x not in calib.get(v["domain"], set())]
               for t, v in tasks.items()}  # fmt: skip
    lm = EMOHarnessLM(load_model(ckpt).model, DocumentTokenizer(TOKENIZER), batch_size=32, progress=False)
    res = run_tasks(lm, sorted(tasks), args.tasks, samples=samples)
    return {tasks[t]["domain"]: res[t]["acc_norm"] for t in tasks}


def _all_losses(ckpt: Path | str, args: argparse.Namespace) -> dict[str, float]:
    model = load_model(ckpt).model
    return {
        d: loss(ckpt, split_val(args.corpus, d, args.out / "data")[1], model) for d in _domains(args.corpus)
    }


def merge_phase(args: argparse.Namespace) -> None:
    from emo_lightning.experts.merge import merge_checkpoints

    for kind, ckpt in (("emo", args.emo), ("standard", args.baseline)):

        def base(ckpt=ckpt) -> dict[str, Any]:
            return {"loss": _all_losses(ckpt, args), "acc": _accuracy(ckpt, args) if args.tasks else None}

        ref = cached(args.out / "results" / f"merge_full_{kind}.json", base)
        print(kind, "full", json.dumps(ref), flush=True)
        for d in args.domains:

            def one(kind=kind, ckpt=ckpt, d=d) -> dict[str, Any]:
                calib, rest = split_val(args.corpus, d, args.out / "data")
                subset = select(ckpt, calib, 0.25, "layerwise")
                small = prune_to(ckpt, subset, args.out / "ckpt" / f"{kind}_{d}_25.ckpt")
                tuned = fine_tune(kind, small, shards(args.corpus, [d], args.out), f"{kind}_{d}_25_ft", args)
                out: dict[str, Any] = {"part_ft": {"loss": {d: loss(tuned, rest)}}}
                for dense in ("full", "part"):
                    path = args.out / "ckpt" / f"{kind}_{d}_merged_{dense}.ckpt"
                    if not path.exists():
                        model, hparams, source, meta = merge_checkpoints(ckpt, tuned, dense=dense)
                        save_checkpoint(model, hparams, path, source, emo_merged=meta)
                    out[f"merged_{dense}"] = {
                        "loss": _all_losses(path, args),
                        "acc": _accuracy(path, args) if args.tasks else None,
                    }
                return out

            row = cached(args.out / "results" / f"merge_{kind}_{d}.json", one)
            print(kind, d, json.dumps(row), flush=True)

            def more(kind=kind, ckpt=ckpt, d=d) -> dict[str, Any]:  # the other merge options
                tuned = args.out / "runs" / f"{kind}_{d}_25_ft" / "checkpoints" / "last.ckpt"
                out: dict[str, Any] = {}
                for dense, router in (("full", "part"), ("average", "full")):
                    path = args.out / "ckpt" / f"{kind}_{d}_merged_{dense}_{router}.ckpt"
                    if not path.exists():
                        model, hparams, source, meta = merge_checkpoints(
                            ckpt, tuned, dense=dense, router=router
                        )
                        save_checkpoint(model, hparams, path, source, emo_merged=meta)
                    out[f"merged_{dense}_router_{router}"] = {
                        "loss": _all_losses(path, args),
                        "acc": _accuracy(path, args) if args.tasks else None,
                    }
                return out

            print(
                kind,
                d,
                json.dumps(cached(args.out / "results" / f"merge_{kind}_{d}_more.json", more)),
                flush=True,
            )

            def experts_only(
                kind=kind, ckpt=ckpt, d=d
            ) -> dict[str, Any]:  # a module update: only experts train
                rest = split_val(args.corpus, d, args.out / "data")[1]
                small = args.out / "ckpt" / f"{kind}_{d}_25.ckpt"
                name = f"{kind}_{d}_25_ft_experts"
                tuned = fine_tune(kind, small, shards(args.corpus, [d], args.out), name, args, "experts")
                path = args.out / "ckpt" / f"{kind}_{d}_merged_experts.ckpt"
                if not path.exists():
                    model, hparams, source, meta = merge_checkpoints(ckpt, tuned)
                    save_checkpoint(model, hparams, path, source, emo_merged=meta)
                merged = {
                    "loss": _all_losses(path, args),
                    "acc": _accuracy(path, args) if args.tasks else None,
                }
                return {"part_ft": {"loss": {d: loss(tuned, rest)}}, "merged_full": merged}

            if args.experts_only:
                row = cached(args.out / "results" / f"merge_{kind}_{d}_experts.json", experts_only)
                print(kind, d, "experts only", json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["domains", "compose", "heldout", "merge"])
    p.add_argument("--emo", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    p.add_argument("--domains", type=lambda s: s.split(","), default=["code", "math", "news", "biomedical"])
    p.add_argument("--pair", type=lambda s: s.split(","), default=["code", "math"])
    p.add_argument("--domain", default="news", help="heldout: the domain the models never saw")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "subset_study")
    p.add_argument("--tasks", type=Path, default=None, help="merge: an emo-data make-task folder (accuracy)")
    p.add_argument(
        "--experts-only",
        action="store_true",
        help="merge: also fine-tune the subset with only its experts trainable (optim.trainable experts) and merge",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    phases = {
        "domains": domains_phase,
        "compose": compose_phase,
        "heldout": heldout_phase,
        "merge": merge_phase,
    }
    phases[args.phase](args)


if __name__ == "__main__":
    main()
