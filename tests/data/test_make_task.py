"""``emo-data make-task``: the next-passage task follows its definition, is seeded, and refuses bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from data_tools.cli import main
from data_tools.errors import UserError
from data_tools.tasks import TaskSpec, make_task


def _run(*argv: str) -> None:
    main(list(argv))


def _items(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_items_follow_the_definition(tmp_path: Path, corpus) -> None:
    paths, records = corpus
    text = {r["id"]: r["text"] for r in records}
    domain = {r["id"]: r["domain"] for r in records}
    _run("make-task", "--input", *map(str, paths), "--out", str(tmp_path / "t"), "--context-words", "20",
         "--passage-words", "6", "--max-items", "15")  # fmt: skip
    summary = json.loads((tmp_path / "t" / "make_task.json").read_text())
    assert summary["tasks"] == [f"nextpassage_{d}" for d in ("code", "literature", "math", "science")]
    for task in summary["tasks"]:
        items = _items(tmp_path / "t", task)
        assert 0 < len(items) <= 15
        for it in items:
            words = list(re.finditer(r"\S+", text[it["doc_id"]]))
            doc = text[it["doc_id"]]
            assert it["context"] == doc[: words[19].end()]  # the first 20 words, as written
            assert it["choices"][it["label"]] == doc[words[20].start() : words[25].end()]  # the next 6
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            others = [c for i, c in enumerate(it["choices"]) if i != it["label"]]
            for did, choice in zip(it["distractor_ids"], others, strict=True):
                w = list(re.finditer(r"\S+", text[did]))
                assert did != it["doc_id"] and domain[did] == it["domain"]  # another document, same domain
                assert choice == text[did][w[20].start() : w[25].end()]  # the same place in it
        labels = [it["label"] for it in items]
        assert len(set(labels)) > 1  # the true passage is not always at one position
    config = yaml.safe_load((tmp_path / "t" / "nextpassage_code.yaml").read_text())
    assert config["output_type"] == "multiple_choice" and config["metadata"]["domain"] == "code"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()
    group = yaml.safe_load((tmp_path / "t" / "nextpassage.yaml").read_text())
    assert group["task"] == summary["tasks"]


def test_seeded_and_domains_independent(tmp_path: Path, corpus) -> None:
    paths, _ = corpus
    spec = TaskSpec(context_words=20, passage_words=6, max_items=10)
    make_task(paths, tmp_path / "a", spec)
    make_task(paths, tmp_path / "b", spec)
    make_task(paths[:2], tmp_path / "c", spec)  # two domains fewer
    make_task(paths, tmp_path / "d", TaskSpec(context_words=20, passage_words=6, max_items=10, seed=1))
    code = "nextpassage_code.jsonl"
    assert (tmp_path / "a" / code).read_bytes() == (tmp_path / "b" / code).read_bytes()
    assert (tmp_path / "a" / code).read_bytes() == (tmp_path / "c" / code).read_bytes()
    assert (tmp_path / "a" / code).read_bytes() != (tmp_path / "d" / code).read_bytes()


def test_short_documents_and_small_domains(tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    rows = [
        {"id": f"a{i}", "domain": "a", "text": " ".join(f"w{i}.{j}" for j in range(10 + i))} for i in range(5)
    ]
    rows += [{"id": f"b{i}", "domain": "b", "text": "x y z " * 10} for i in range(3)]  # only 3 documents
    rows += [{"id": "a-short", "domain": "a", "text": "too short"}]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = make_task([docs], tmp_path / "t", TaskSpec(context_words=6, passage_words=4))
    assert summary["tasks"] == ["nextpassage_a"]
    assert summary["domains"]["a"] == {"documents": 6, "usable": 5, "items": 5}
    assert summary["domains"]["b"]["items"] == 0  # fewer documents than choices: no task
    rows = [
        {"id": f"c{i}", "domain": "c", "text": f"doc {i} " * 4 + "same boilerplate passage here"}
        for i in range(5)
    ]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        UserError, match="no item"
    ):  # every passage is the same: no item has 4 different choices
        make_task([docs], tmp_path / "t2", TaskSpec(context_words=8, passage_words=4))


def test_refusals_are_one_line(tmp_path: Path, corpus, capsys) -> None:
    paths, _ = corpus
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "just a few words", "domain": "x"}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    cases = (
        (["--input", str(short), "--out", str(tmp_path / "o")], "a domain needs 4 documents"),
        (["--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such file"),
        (["--input", str(paths[0]), "--out", str(tmp_path / "full")], "exists and is not empty"),
        (["--input", str(paths[0]), "--out", str(tmp_path / "o"), "--choices", "1"], "at least 2"),
    )
    for args, message in cases:
        with pytest.raises(SystemExit) as err:
            _run("make-task", *args)
        assert err.value.code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("emo-data: ") and message in line and "\n" not in line
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"  # nothing replaced without --overwrite
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
