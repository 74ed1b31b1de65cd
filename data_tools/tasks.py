"""``emo-data make-task``: a local lm-evaluation-harness multiple-choice task from any documents.

No machine of this project reaches a dataset hub, so downstream accuracy is measured on tasks generated from
documents the models did not train on (a val or test split). The task, **next passage** (per domain):

* A document is usable when it has at least ``context_words + passage_words`` words (maximal runs of
  non-whitespace). Its **context** is the text up to the end of word ``context_words``; its **true passage** the
  text of the next ``passage_words`` words (inner whitespace and newlines kept, leading whitespace dropped).
* The **distractors** are the passages at the same word positions of ``choices - 1`` other usable documents of
  the same domain, drawn without replacement. Every choice is a passage of exactly ``passage_words`` words taken
  at the same place of a same-domain document: only the continuity with the context tells the true one apart.
* The true passage's position among the choices is uniform. An item whose choices are not all different is
  dropped. At most ``max_items`` items per domain: documents in a seeded random order, the first ones kept.
* Seeded: one ``numpy`` generator per domain from (seed, CRC-32 of the domain name), so adding or removing a
  domain leaves the others' items unchanged, and the same input gives the same task.

The harness asks the model for log p(" " + choice | context) of every choice (its default ``target_delimiter``
is one space) and reports ``acc`` (highest summed log-likelihood) and ``acc_norm`` (highest log-likelihood per
byte: the choices differ in length) with their standard errors; chance is ``1 / choices``.

The output folder holds, per domain, ``<name>_<domain>.jsonl`` (``id``, ``doc_id``, ``domain``, ``context``,
``choices``, ``label``, ``distractor_ids``) and the task ``<name>_<domain>.yaml`` (``metadata.domain`` names the
domain; ``dataset_kwargs`` points at the absolute path of its JSONL: regenerate the task after moving the
folder), the group ``<name>.yaml`` of all of them, and ``make_task.json`` (the settings, inputs and counts). It is
built beside its target and renamed into place: never half written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_tools.errors import UserError
from data_tools.inputs import INPUT_FIX, expand_inputs, read_records
from data_tools.records import DEFAULT_FIELDS, Fields, Record, SkipLog

_WORD = re.compile(r"\S+")
_NAME = re.compile(r"[^A-Za-z0-9_]+")
_INPUT_FIX = f"{INPUT_FIX} of a split the models did not train on, e.g. val"


@dataclass(frozen=True)
class TaskSpec:
    """How ``make-task`` builds its items (see the module docstring)."""

    name: str = "nextpassage"
    context_words: int = 48
    passage_words: int = 16
    choices: int = 4
    max_items: int = 200  # per domain
    seed: int = 0

    def check(self) -> None:
        if not self.name or _NAME.search(self.name):
            raise UserError(f"--name {self.name!r}: letters, digits and _ only", "e.g. --name nextpassage")
        for flag, value, low in (
            ("--context-words", self.context_words, 1),
            ("--passage-words", self.passage_words, 1),
            ("--choices", self.choices, 2),
            ("--max-items", self.max_items, 1),
        ):
            if value < low:
                raise UserError(f"{flag} {value}: must be at least {low}", f"pass {flag} {low} or more")


@dataclass
class _Doc:
    id: str
    text: str
    spans: np.ndarray  # (W,2) start and end character offset of every word


def _words(record: Record) -> _Doc:
    spans = np.array([m.span() for m in _WORD.finditer(record.text)], dtype=np.int64).reshape(-1, 2)
    return _Doc(record.id, record.text, spans)


def _slug(domain: str) -> str:
    return _NAME.sub("_", domain).strip("_").lower() or "unknown"


def domain_items(domain: str, records: Sequence[Record], spec: TaskSpec) -> tuple[list[dict[str, Any]], int]:
    """The items of one domain (see the module docstring) and the number of usable documents."""
    need = spec.context_words + spec.passage_words
    docs = [d for d in map(_words, records) if len(d.spans) >= need]
    if len(docs) < spec.choices:
        return [], len(docs)
    rng = np.random.default_rng([spec.seed, zlib.crc32(domain.encode("utf-8"))])
    cw, pw = spec.context_words, spec.passage_words

    def passage(d: _Doc) -> str:
        return d.text[d.spans[cw, 0] : d.spans[cw + pw - 1, 1]]

    items: list[dict[str, Any]] = []
    for i in rng.permutation(len(docs)):
        if len(items) >= spec.max_items:
            break
        others = rng.choice(len(docs) - 1, spec.choices - 1, replace=False)
        others = others + (others >= i)  # indices of the other documents (skip i)
        label = int(rng.integers(spec.choices))
        options = [passage(docs[j]) for j in others]
        options.insert(label, passage(docs[i]))
        if len(set(options)) < spec.choices:  # a duplicated passage (boilerplate): no clean item
            continue
        doc = docs[i]
        items.append(
            {
                "id": f"{_slug(domain)}-{len(items)}",
                "doc_id": doc.id,
                "domain": domain,
                "context": doc.text[: doc.spans[cw - 1, 1]],
                "choices": options,
                "label": label,
                "distractor_ids": [docs[j].id for j in others],
            }
        )
    return items, len(docs)


def task_config(task: str, domain: str, data_file: Path, spec: TaskSpec) -> dict[str, Any]:
    """The lm-evaluation-harness YAML of one domain's task."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "domain": domain, "generator": "emo-data make-task", **asdict(spec)},
    }


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def make_task(
    inputs: Sequence[str | Path],
    out: str | Path,
    spec: TaskSpec,
    overwrite: bool = False,
    fields: Fields = DEFAULT_FIELDS,
) -> dict:
    """Write the task folder ``out`` from the documents of ``inputs`` (files, folders, globs: ``emo-data`` inputs)."""
    spec.check()
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(
            f"--out {out}: exists and is not empty", "pass --overwrite to replace it, or a new folder"
        )
    files = expand_inputs([str(i) for i in inputs])
    by_domain: dict[str, list[Record]] = {}
    for f in files:
        for r in read_records(f.path, "fail", SkipLog(), fields=fields, size=f.size):
            by_domain.setdefault(r.domain, []).append(r)
    tasks, counts = {}, {}
    for domain in sorted(by_domain):
        items, usable = domain_items(domain, by_domain[domain], spec)
        counts[domain] = {"documents": len(by_domain[domain]), "usable": usable, "items": len(items)}
        if items:
            tasks[domain] = items
    if not tasks:
        need = spec.context_words + spec.passage_words
        usable = sum(c["usable"] for c in counts.values())
        raise UserError(
            f"--input: no item: a domain needs {spec.choices} documents of at least {need} words with different "
            f"passages ({len(files)} files, {sum(len(v) for v in by_domain.values())} documents, {usable} usable)",
            f"{_INPUT_FIX}, or lower --context-words / --passage-words / --choices",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        names = []
        for domain, items in tasks.items():
            task = f"{spec.name}_{_slug(domain)}"
            names.append(task)
            _write(tmp / f"{task}.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
            config = task_config(task, domain, out / f"{task}.jsonl", spec)
            _write(tmp / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        group = {
            "group": spec.name,
            "task": names,
            "aggregate_metric_list": [
                {"metric": m, "aggregation": "mean", "weight_by_size": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": 1.0},
        }
        _write(tmp / f"{spec.name}.yaml", yaml.safe_dump(group, sort_keys=False))
        summary = {"spec": asdict(spec), "inputs": [f.path for f in files], "tasks": names, "domains": counts}
        _write(tmp / "make_task.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` into place (an old ``out`` is moved aside first, then removed)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old.{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
