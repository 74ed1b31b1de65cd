"""``emo-data``: offline data preparation (``build-tokenizer``, ``build-shards``, ``inspect``, ``make-task``).

Mistakes (a missing file, a bad record, a file that is not a tokenizer...) end with one line ``emo-data: ...``
and exit status 2 (``--debug`` or ``EMO_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.errors import ArgumentParser, UserError, run_cli
from data_tools.inputs import expand_inputs, read_records
from data_tools.manifest import Manifest
from data_tools.records import Fields, OnError, SkipLog
from data_tools.shards import parse_size
from data_tools.tasks import TaskSpec, make_task
from data_tools.tokenizer import train_bpe

SLURM_ONLY = ("partition", "time", "job_name", "env_command")


def _fields(args: argparse.Namespace) -> Fields:
    return Fields(args.text_field, args.id_field, args.domain_field or "domain", args.domain_from_path)


def _texts(inputs: Sequence[str], fields: Fields, on_error: OnError, skips: SkipLog) -> Iterator[str]:
    for f in expand_inputs(inputs):
        for record in read_records(f.path, on_error, skips, fields=fields, size=f.size):
            yield record.text


def cmd_build_tokenizer(args: argparse.Namespace) -> None:
    skips = SkipLog()
    read = 0

    def texts() -> Iterator[str]:
        nonlocal read
        for text in _texts(args.input, _fields(args), args.on_error, skips):
            read += 1
            yield text

    tokenizer = train_bpe(texts(), args.vocab_size, args.min_frequency)
    if not read:  # a tokenizer of the 256 bytes alone, learned from nothing
        raise UserError(
            f"--input: no usable document in {len(args.input)} input(s) ({skips.total} records skipped)",
            "pass JSON Lines or parquet files with text",
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"wrote {args.out} (vocab {tokenizer.get_vocab_size()}, skipped {skips.total} records)")
    if skips.total:
        print(json.dumps(skips.to_dict(), indent=1), file=sys.stderr)


def cmd_build_shards(args: argparse.Namespace) -> None:
    from data_tools.build import (
        BuildResult,
        ExecutorOptions,
        describe,
        plan_build,
        run_build,
    )  # datatrove: only here

    if args.executor != "slurm":
        given = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(args, k) is not None]
        if given:
            raise UserError(f"{given[0]}: a Slurm option", "pass --executor slurm, or leave it out")
    workers = args.workers if args.workers is not None else (1 if args.executor == "local" else -1)
    slurm = {k: getattr(args, k) for k in SLURM_ONLY if getattr(args, k) is not None}
    options = ExecutorOptions(
        args.executor,
        workers=workers,
        cpus_per_task=args.cpus_per_task,
        mem_per_cpu_gb=args.mem_per_cpu_gb,
        **slurm,
    )
    config = plan_build(
        args.input,
        args.tokenizer,
        args.out,
        tasks=args.tasks,
        fields=_fields(args),
        shard_size=parse_size(args.shard_size) if args.shard_size != "auto" else None,
        on_error=args.on_error,
        seed=args.seed,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        options=options,
        tmp_dir=args.tmp_dir,
        quiet=args.quiet,
    )
    result = run_build(config, options, overwrite=args.overwrite)
    if (
        isinstance(result, BuildResult) and not result.manifest.totals["docs"]
    ):  # shards of nothing (Slurm: later)
        raise UserError(
            f"--input: no usable document in the input ({result.manifest.skipped['total']} records skipped); "
            f"{args.out} holds an empty manifest",
            "pass JSON Lines or parquet files with text (the skipped records are listed in the manifest)",
        )
    print(describe(result, args.out))


def cmd_inspect(args: argparse.Namespace) -> None:
    m = Manifest.load(args.manifest)
    print(json.dumps({k: v for k, v in m.to_dict().items() if k != "shards"}, indent=1, ensure_ascii=False))
    print(f"{len(m.shards)} shards")


INPUT_HELP = (
    "JSON Lines (plain, .gz, .zst) or parquet files, folders or globs; local paths or fsspec URLs (s3://...)"
)


def add_field_arguments(p: argparse.ArgumentParser) -> None:
    """--text-field, --id-field, --domain-field | --domain-from-path."""
    p.add_argument("--text-field", default="text", help="field of the text (dotted path into nested fields)")
    p.add_argument("--id-field", default="id", help="field of the document id (default: id)")
    domain = p.add_mutually_exclusive_group()
    domain.add_argument(
        "--domain-field", default=None, help="field of the domain, e.g. meta.source (default: domain)"
    )
    domain.add_argument(
        "--domain-from-path",
        metavar="REGEX",
        default=None,
        help="domain from each file's path: the group 'domain' (or the first group) of this regular expression",
    )


def cmd_make_task(args: argparse.Namespace) -> None:
    spec = TaskSpec(
        args.name, args.context_words, args.passage_words, args.choices, args.max_items, args.seed
    )
    summary = make_task(args.input, args.out, spec, args.overwrite, _fields(args))
    items = {d: c["items"] for d, c in summary["domains"].items()}
    print(
        f"wrote {len(summary['tasks'])} tasks ({sum(items.values())} items: "
        + ", ".join(f"{d} {n}" for d, n in items.items())
        + f") and the group {spec.name} to {args.out}"
    )
    print(f"  evaluate: emo-experts eval --ckpt CKPT --tasks {args.out} --out acc.json")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="emo-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tokenizer", help="train a byte-level BPE tokenizer on documents")
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    add_field_arguments(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    p.set_defaults(func=cmd_build_tokenizer)

    p = sub.add_parser("build-shards", help="tokenise documents into WebDataset shards + manifest.json")
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    add_field_arguments(p)
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument(
        "--shard-size",
        default="auto",
        help="tokens per shard, e.g. 65536, 64k, 100M; 'auto' (default): 64 shards (split between the tasks) "
        "of 16k..128M tokens",
    )
    p.add_argument(
        "--tasks",
        type=int,
        default=1,
        help="independent tasks, each with its share of the files and its own shards",
    )
    p.add_argument(
        "--executor",
        choices=("local", "slurm", "ray"),
        default="local",
        help="what runs the tasks: this machine (default), a Slurm job array, a Ray cluster (datatrove executors)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tasks running at once (default: 1 locally, all on Slurm / Ray)",
    )
    p.add_argument("--cpus-per-task", type=int, default=1, help="Slurm / Ray: CPUs of each task (default 1)")
    p.add_argument(
        "--mem-per-cpu-gb", type=float, default=2.0, help="Slurm / Ray: memory per CPU (default 2)"
    )
    p.add_argument("--partition", default=None, help="Slurm partition (required with --executor slurm)")
    p.add_argument("--time", default=None, help="Slurm time limit of one task (default 24:00:00)")
    p.add_argument("--job-name", default=None, help="Slurm job name (default emo-data)")
    p.add_argument(
        "--env-command",
        default=None,
        help="Slurm: command that activates the environment (default: this venv)",
    )
    p.add_argument(
        "--tmp-dir", default=None, help="scratch folder of each task (default: --out/.build, or /tmp)"
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad records: fail (default) with file:line, or skip and count them in the manifest",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the interleaving of documents across a task's files"
    )
    p.add_argument(
        "--eos-token", default=None, help="EOS token (default: detected, e.g. <|endoftext|>, </s>)"
    )
    p.add_argument("--pad-token", default=None, help="PAD token (default: detected, else the EOS token)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build_shards)

    p = sub.add_parser(
        "make-task",
        help="a local lm-evaluation-harness multiple-choice task per domain: the true next passage among others",
        description="Per domain, items of the 'next passage' task: a document's first --context-words words, "
        "then its next --passage-words words among the passages at the same place of --choices - 1 other "
        "documents of the domain (seeded). Use documents the models did not train on (a val split).",
    )
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    add_field_arguments(p)
    p.add_argument("--out", required=True, help="output folder (lm-eval task YAMLs and their data)")
    p.add_argument(
        "--name", default="nextpassage", help="task prefix: <name>_<domain> (default: %(default)s)"
    )
    p.add_argument("--context-words", type=int, default=48, help="words of context (default: %(default)s)")
    p.add_argument(
        "--passage-words",
        type=int,
        default=16,
        help="words per choice (default: %(default)s; models as small as the tiny ones are near chance there: "
        "1 or 2 words, see docs/modularity.md)",
    )
    p.add_argument("--choices", type=int, default=4, help="choices per item (default: %(default)s)")
    p.add_argument("--max-items", type=int, default=200, help="items per domain (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the items (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_make_task)

    p = sub.add_parser("inspect", help="summarise a manifest.json")
    p.add_argument("manifest", help="manifest.json or shard directory")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``emo-data``; user errors (e.g. ``file:line: reason: fix``) print one line, exit 2."""

    def run(args: list[str]) -> None:
        parsed = build_parser().parse_args(args)
        parsed.func(parsed)

    run_cli("emo-data", run, argv)


if __name__ == "__main__":
    main()
