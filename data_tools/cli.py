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

from data_tools.errors import ArgumentParser, run_cli
from data_tools.jsonl import OnError, SkipLog, iter_records
from data_tools.manifest import Manifest
from data_tools.shards import build_shards, parse_size
from data_tools.tasks import TaskSpec, make_task
from data_tools.tokenizer import train_bpe


def _texts(inputs: Sequence[str], on_error: OnError, skips: SkipLog) -> Iterator[str]:
    for path in inputs:
        for record in iter_records(path, on_error, skips):
            yield record.text


def cmd_build_tokenizer(args: argparse.Namespace) -> None:
    skips = SkipLog()
    tokenizer = train_bpe(_texts(args.input, args.on_error, skips), args.vocab_size, args.min_frequency)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"wrote {args.out} (vocab {tokenizer.get_vocab_size()}, skipped {skips.total} records)")
    if skips.total:
        print(json.dumps(skips.to_dict(), indent=1), file=sys.stderr)


def cmd_build_shards(args: argparse.Namespace) -> None:
    result = build_shards(
        args.input,
        args.tokenizer,
        args.out,
        shard_size=parse_size(args.shard_size) if args.shard_size != "auto" else None,
        workers=args.workers,
        on_error=args.on_error,
        seed=args.seed,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    m = result.manifest
    secs = result.seconds_tokenize + result.seconds_write
    domains = ", ".join(f"{k} {v['tokens']}" for k, v in m.per_domain.items())
    print(
        f"wrote {len(m.shards)} shards, {m.totals['docs']} documents, {m.totals['tokens']} tokens "
        f"({domains}) to {args.out} in {secs:.1f} s; "
        f"skipped {m.skipped['total']} records"
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    m = Manifest.load(args.manifest)
    print(json.dumps({k: v for k, v in m.to_dict().items() if k != "shards"}, indent=1, ensure_ascii=False))
    print(f"{len(m.shards)} shards")


def cmd_make_task(args: argparse.Namespace) -> None:
    spec = TaskSpec(
        args.name, args.context_words, args.passage_words, args.choices, args.max_items, args.seed
    )
    summary = make_task(args.input, args.out, spec, args.overwrite)
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

    p = sub.add_parser("build-tokenizer", help="train a byte-level BPE tokenizer on JSONL documents")
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (plain or .gz)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    p.set_defaults(func=cmd_build_tokenizer)

    p = sub.add_parser("build-shards", help="tokenise JSONL documents into WebDataset shards + manifest.json")
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (plain or .gz)")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--shard-size",
        default="auto",
        help="tokens per shard, e.g. 65536, 64k, 100M; 'auto' (default): 64 shards of 16k..128M tokens",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (parallel over files)")
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad records: fail (default) with file:line, or skip and count them in the manifest",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the interleaving of documents across files")
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
    p.add_argument("--input", nargs="+", required=True, help="JSONL files or folders (text, domain, id)")
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
