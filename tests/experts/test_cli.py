"""The ``emo-experts`` commands end to end on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from emo_lightning.checkpoint import load_model
from emo_lightning.experts.cli import build_parser, main
from emo_lightning.experts.documents import Document, DocumentTokenizer, load_documents
from emo_lightning.experts.evaluate import evaluate
from emo_lightning.model import EMOTransformer, prune_model
from tests.experts.conftest import TOKENIZER, WORDS, tiny_model, write_checkpoint


def _run(*argv: str) -> None:
    main([*argv, "--no-progress"])


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("routes", "select", "prune", "merge", "eval", "report"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "usage: emo-experts" in capsys.readouterr().out


def test_select_prune_eval_routes(tmp_path: Path, jsonl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    tok = ["--tokenizer", str(TOKENIZER)]
    _run(
        "select",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--keep",
        "0.34",
        "--out",
        str(tmp_path / "s.json"),
        *tok,
    )
    subset = json.loads((tmp_path / "s.json").read_text())
    assert subset["keep"] == 3 and all(len(layer) == 2 for layer in subset["layers"])
    _run(
        "prune",
        "--ckpt",
        str(ckpt),
        "--subset",
        str(tmp_path / "s.json"),
        "--out",
        str(tmp_path / "small.ckpt"),
    )
    assert "routed experts" in capsys.readouterr().out
    small = load_model(tmp_path / "small.ckpt")
    assert small.config.router.num_experts == 3

    _run(
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--subset",
        str(tmp_path / "s.json"),
        "--out",
        str(tmp_path / "a.json"),
        *tok,
    )
    _run(
        "eval",
        "--ckpt",
        str(tmp_path / "small.ckpt"),
        "--data",
        str(jsonl),
        "--out",
        str(tmp_path / "b.json"),
        *tok,
    )
    a = json.loads((tmp_path / "a.json").read_text())["results"]["full"]
    b = json.loads((tmp_path / "b.json").read_text())["results"]["full"]
    assert a == b and set(a) == {"code", "literature", "math", "all"}
    assert "domain" in capsys.readouterr().out

    _run(
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(jsonl),
        "--routing",
        "causal:3:4",
        "--out",
        str(tmp_path / "c.json"),
        *tok,
    )
    c = json.loads((tmp_path / "c.json").read_text())["results"]
    assert c["causal:3:4"]["all"]["tokens"] == c["full (same targets)"]["all"]["tokens"]

    for routing in ("full", "pool:3", "running:3", "causal:3:4"):
        out = tmp_path / f"routes_{routing.replace(':', '_')}.jsonl"
        _run(
            "routes", "--ckpt", str(ckpt), "--data", str(jsonl), "--out", str(out), "--routing", routing, *tok
        )
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 9 and len(recs[0]["layers"]) == 3
        layer = recs[0]["layers"][0]
        assert len(layer["experts"]) == recs[0]["tokens"] and len(layer["experts"][0]) == 3
        assert (layer["pools"] is None) == (routing in ("full", "running:3"))  # running pools: per token
        if layer["pools"]:
            assert len(layer["pools"][0]["experts"]) == 3
            assert all(e in layer["pools"][0]["experts"] for e in layer["experts"][0][:2])


def test_mistakes_end_in_one_line(tmp_path: Path, jsonl: Path, capsys) -> None:
    emo = write_checkpoint(tiny_model(), tmp_path / "emo.ckpt")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_subset(tmp_path, emo), "num_experts": 16}))
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
    small_vocab = write_checkpoint(tiny_model(vocab_size=64), tmp_path / "small.ckpt")
    ckpt_fix = "pass a .ckpt written by `emo fit` or `emo-experts prune` (DeepSpeed: consolidate it first)"
    cases = [
        (["report", "--emo", str(emo), "--data", str(jsonl), "--out", str(tmp_path / "r")],
         "--baseline is missing: pass a checkpoint (or --only emo)"),
        (["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--data", str(jsonl)],
         f"{tmp_path / 'none.ckpt'}: no such checkpoint: {ckpt_fix}"),
        (["eval", "--ckpt", str(tmp_path / "garbage.ckpt"), "--data", str(jsonl)],
         f"{tmp_path / 'garbage.ckpt'}: not a checkpoint (not a torch.save archive, or truncated): {ckpt_fix}"),
        (["eval", "--ckpt", str(emo), "--data", str(tmp_path / "none.jsonl")],
         f"--data {tmp_path / 'none.jsonl'}: no such file or directory: pass a JSON Lines file of documents "
         "(text, domain) or a folder of them, e.g. data/corpus/val"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--routing", "pool"],
         "--routing 'pool': unknown routing: use full, pool:P, running:P or causal:P:N (positive integers)"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--subset", str(other)],
         f"{other}: subset is for 16 experts (1 shared), the checkpoint has 9 (1 shared): select the subset "
         "from this checkpoint (`emo-experts select --ckpt ...`)"),
        (["eval", "--ckpt", str(small_vocab), "--data", str(jsonl), "--tokenizer", str(TOKENIZER)],
         f"--tokenizer {TOKENIZER}: vocabulary 4096 exceeds the model's 64: pass the tokenizer the model was "
         "trained with"),
        (["eval", "--ckpt", str(emo), "--data", str(jsonl), "--tokenizer", str(jsonl)],
         f"{jsonl}: not a tokenizer (expected `,` or `}}` at line 1 column 6): pass a Hugging Face tokenizer.json, "
         "e.g. data/tokenizer.json"),
        (["select", "--ckpt", str(emo), "--data", str(jsonl), "--keep", "12", "--out", str(tmp_path / "s.json")],
         "--keep 12: the model has 9 experts per layer: give a fraction in (0, 1] (0.25) or a count in [1, 9] (4)"),
    ]  # fmt: skip
    for argv, line in cases:
        with pytest.raises(SystemExit) as exit_info:
            _run(*argv)
        assert exit_info.value.code == 2, argv
        assert capsys.readouterr().err == f"emo-experts: {line}\n"


def _subset(tmp_path: Path, ckpt: Path) -> dict:
    out = tmp_path / "subset.json"
    _run(
        "select",
        "--ckpt",
        str(ckpt),
        "--data",
        str(out),
        "--keep",
        "4",
        "--method",
        "random",
        "--out",
        str(out),
    )
    return json.loads(out.read_text())


REPORT_ARGS = ["--shots", "1,2", "--calib-docs", "2", "--eval-docs", "1", "--random-seeds", "2", "--clusters", "3",
               "--pool-prefix", "4", "--tokenizer", str(TOKENIZER)]  # fmt: skip


def _report(out: Path, jsonl: Path, *argv: str) -> dict:
    """``emo-experts report`` into ``out``; ``report.json`` (``{}`` with ``--only``)."""
    _run("report", "--data", str(jsonl), "--out", str(out), *REPORT_ARGS, *argv)
    return json.loads((out / "report.json").read_text()) if "--only" not in argv else {}


def _eval_docs(report: dict, jsonl: Path) -> dict[str, list[Document]]:
    """Each domain's evaluation documents: the ones the report did not calibrate on."""
    docs = load_documents(jsonl, DocumentTokenizer(TOKENIZER))
    out = {
        d: [x for x in docs if x.domain == d and x.id not in v["calibration"]]
        for d, v in report["domains"].items()
    }
    assert all(len(out[d]) == v["eval_docs"] for d, v in report["domains"].items())
    return out


def _loss(model: EMOTransformer, docs: list[Document]) -> float:
    """Token-weighted loss of ``docs`` (one domain), packed as the report packs them (rows of 64, 16 rows)."""
    pad = DocumentTokenizer(TOKENIZER).pad_id
    return evaluate(model, docs, seq_len=64, batch_size=16, pad_id=pad)["all"]["loss"]


def test_report_losses_are_those_of_the_pruned_models(tmp_path: Path, jsonl: Path) -> None:
    """Every loss of the report is the loss of the model cut to the recorded subset on the held-out documents, every
    rise is loss / full loss - 1 (keep 1: the model with all experts), the summary is the mean over domains."""
    paths = {"emo": write_checkpoint(tiny_model(), tmp_path / "emo.ckpt"),
             "standard": write_checkpoint(tiny_model("standard", seed=1), tmp_path / "std.ckpt")}  # fmt: skip
    out = tmp_path / "report"
    _report(out, jsonl, "--emo", str(paths["emo"]), "--keep", "0.25,1", "--only", "emo")  # no --baseline
    assert (out / "part_emo.json").exists() and not (out / "report.md").exists()
    stamp = (out / "part_emo.json").stat().st_mtime_ns
    report = _report(
        out, jsonl, "--emo", str(paths["emo"]), "--baseline", str(paths["standard"]), "--keep", "0.25,1"
    )
    assert (out / "part_emo.json").stat().st_mtime_ns == stamp  # the full run did not measure EMO again
    evals = _eval_docs(report, jsonl)
    for name, path in paths.items():
        model = load_model(path).model
        part = report["models"][name]
        assert part["keep_counts"] == {"0.25": 2, "1": 9}
        everything = prune_model(model, [list(range(8))] * 3)  # keep 1: every routed expert of every layer
        for domain, docs in evals.items():
            dres = part["domains"][domain]
            full = _loss(model, docs)
            assert dres["full_loss"] == pytest.approx(full, rel=1e-9)
            entry = dres["keep"]["1"]
            for column in ("shots_1", "shots_2", "random"):
                assert entry[column]["rise"] == pytest.approx(_loss(everything, docs) / full - 1, abs=1e-6)
            entry = dres["keep"]["0.25"]
            for shots in (1, 2):
                cut = entry[f"shots_{shots}"]
                assert cut["loss"] == pytest.approx(_loss(prune_model(model, cut["layers"]), docs), rel=1e-9)
                assert cut["rise"] == pytest.approx(cut["loss"] / full - 1, rel=1e-9)
            rand = entry["random"]
            assert len(rand["seeds"]) == 2 and rand["loss"] == pytest.approx(sum(rand["seeds"]) / 2, rel=1e-9)
            assert rand["rise"] == pytest.approx(rand["loss"] / full - 1, rel=1e-9)
        for label, row in part["summary"].items():
            for column, value in row.items():
                rises = [dres["keep"][label][column]["rise"] for dres in part["domains"].values()]
                assert value == pytest.approx(sum(rises) / len(rises), rel=1e-9, abs=1e-12)
        assert part["summary"]["0.25"]["shots_2"] != 0.0  # the cut model does differ from the full one
    sizes = report["models"]["emo"]["pruned_params"]
    assert sizes["0.25"]["routed_experts"] * 8 == sizes["1"]["routed_experts"]
    assert (out / "loss_vs_keep.png").stat().st_size > 0 and (out / "mean_rise.png").exists()
    assert "Mean relative loss rise" in (out / "report.md").read_text()


def test_report_reuses_cached_measurements_until_the_checkpoint_changes(tmp_path: Path, jsonl: Path) -> None:
    """A run reads ``part_<model>.json`` instead of measuring again (an edit of the cache shows in the report), and
    measures again once the checkpoint is rewritten."""
    emo = write_checkpoint(tiny_model(), tmp_path / "emo.ckpt")
    argv = ["--emo", str(emo), "--baseline", str(write_checkpoint(tiny_model("standard", seed=1), tmp_path / "std.ckpt")),
            "--keep", "0.25,1"]  # fmt: skip
    out = tmp_path / "report"
    measured = _report(out, jsonl, *argv)["models"]["emo"]
    cache = json.loads((out / "part_emo.json").read_text())
    cache["part"]["summary"]["0.25"]["shots_1"] = 0.4242
    cache["part"]["domains"]["math"]["full_loss"] = 123.456
    (out / "part_emo.json").write_text(json.dumps(cache))
    reused = _report(out, jsonl, *argv)["models"]["emo"]
    assert reused["summary"]["0.25"]["shots_1"] == 0.4242
    assert reused["domains"]["math"]["full_loss"] == 123.456
    md = (out / "report.md").read_text()
    assert "+42.42%" in md and "| math | 123.4560 |" in md
    stat = emo.stat()
    os.utime(emo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the checkpoint was rewritten
    again = _report(out, jsonl, *argv)["models"]["emo"]
    del again["seconds_selection_eval"], measured["seconds_selection_eval"]
    assert again == measured  # measured anew: the edits are gone


def _domain_routed_model(token_class: dict[int, int]) -> EMOTransformer:
    """A model whose router probabilities depend only on the token's class (``token_class``; class 3 for every
    other token): attention and experts add nothing to the residual stream, which stays the embedding, one unit
    vector per class, and each class sends its tokens to two experts of its own in every layer."""
    model = tiny_model()
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, 3] = 1.0
        for token, c in token_class.items():
            model.embed.weight[token] = torch.eye(32)[c]
        for blk in model.blocks:
            blk.attn.o_proj.weight.zero_()
            blk.moe.experts.w_out.zero_()
            blk.moe.shared.w_out.zero_()
            blk.moe.router.weight.zero_()
            for c in range(4):
                blk.moe.router.weight[2 * c : 2 * c + 2, c] = 10.0
    return model


def test_report_clustering_finds_routing_that_follows_the_domain(tmp_path: Path, jsonl: Path) -> None:
    """Tokens found in one domain only route by their domain, all others alike: the clusters are these four
    groups, so the report's NMI and purity are those of the token groups against the domains (computed here)."""
    docs = load_documents(jsonl, DocumentTokenizer(TOKENIZER))
    domains = sorted({d.domain for d in docs})
    seen: dict[int, set[str]] = {}
    for d in docs:
        for token in d.tokens.tolist():
            seen.setdefault(token, set()).add(d.domain)
    token_class = {t: domains.index(next(iter(ds))) for t, ds in seen.items() if len(ds) == 1}
    emo = write_checkpoint(_domain_routed_model(token_class), tmp_path / "emo.ckpt")
    std = write_checkpoint(tiny_model("standard", seed=1), tmp_path / "std.ckpt")
    report = _report(tmp_path / "r", jsonl, "--emo", str(emo), "--baseline", str(std), "--keep", "1",
                     "--clusters", "4")  # fmt: skip
    labels, groups = [], []
    for domain, group in _eval_docs(report, jsonl).items():
        for token in (t for d in group for t in d.tokens.tolist()):
            labels.append(domain)
            groups.append(token_class.get(token, 3))
    clustering = report["models"]["emo"]["clustering"]
    assert clustering["tokens"] == len(labels)
    assert clustering["nmi"] == pytest.approx(normalized_mutual_info_score(labels, groups), rel=1e-9)
    table = Counter(zip(groups, labels, strict=True))
    majority = sum(max(n for (g, _), n in table.items() if g == group) for group in set(groups))
    assert clustering["purity"] == pytest.approx(majority / len(labels), rel=1e-9)
    assert sorted(c["size"] for c in clustering["clusters"]) == sorted(Counter(groups).values())
    assert clustering["nmi"] > 0.5 > report["models"]["standard"]["clustering"]["nmi"]


def test_commands_refuse_input_without_documents(tmp_path: Path, jsonl: Path, capsys) -> None:
    """select, eval, routes, report and explore on an input without a document, and a report whose domains are
    too small to calibrate and evaluate: one line, exit 2 (no subset from zero tokens, no NaN table)."""
    ckpt = str(write_checkpoint(tiny_model(), tmp_path / "m.ckpt"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    runs = {
        "select": ["select", "--ckpt", ckpt, "--keep", "0.5", "--out", str(tmp_path / "s.json")],
        "eval": ["eval", "--ckpt", ckpt],
        "routes": ["routes", "--ckpt", ckpt, "--out", str(tmp_path / "r.jsonl")],
        "report": ["report", "--emo", ckpt, "--baseline", ckpt, "--out", str(tmp_path / "rep"), "--shots", "1",
                   "--calib-docs", "1"],
        "explore": ["explore", "--emo", ckpt, "--out", str(tmp_path / "page.html")],
    }  # fmt: skip
    for name, argv in runs.items():
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--data", str(empty), "--tokenizer", str(TOKENIZER)])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "no documents in the input" in err and "\n" not in err, (name, err)
    with pytest.raises(SystemExit) as exc:  # 3 documents per domain cannot give 8 calibration + 1 evaluation
        main([*runs["report"][:-4], "--shots", "8", "--data", str(jsonl), "--tokenizer", str(TOKENIZER)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "too few documents in code (3), literature (3), math (3)" in err, err


def test_a_write_that_fails_is_one_line(tmp_path: Path, jsonl: Path, capsys) -> None:
    """An output that cannot be written (here its folder is a file) ends with one line naming the fault, exit 1,
    and leaves nothing behind."""
    ckpt = str(write_checkpoint(tiny_model(), tmp_path / "m.ckpt"))
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["select", "--ckpt", ckpt, "--data", str(jsonl), "--keep", "0.5", "--tokenizer", str(TOKENIZER),
              "--no-progress", "--out", str(tmp_path / "taken" / "subset.json")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("emo-experts: CheckpointWriteError: cannot write "), err
    assert "\n" not in err and (tmp_path / "taken").read_text() == "a file, not a folder"


def test_report_compares_methods_and_adds_accuracy_drops(tmp_path: Path) -> None:
    """``--methods`` adds a column per method (a global budget evaluated masked), ``--tasks`` the accuracy of every
    cut on its domain's task without the calibration documents' items, and drops beside the rises."""
    import random

    from data_tools.tasks import TaskSpec, make_task
    from emo_lightning.experts.harness import EMOHarnessLM, run_tasks

    rng = random.Random(0)
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for domain in ("x", "y"):
            for i in range(7):
                text = " ".join(rng.choice(WORDS[:16]) for _ in range(20))
                f.write(json.dumps({"id": f"{domain}{i}", "domain": domain, "text": text}) + "\n")
    make_task([docs], tmp_path / "tasks", TaskSpec(context_words=8, passage_words=4))
    paths = {"emo": write_checkpoint(tiny_model(), tmp_path / "emo.ckpt"),
             "standard": write_checkpoint(tiny_model("standard", seed=1), tmp_path / "std.ckpt")}  # fmt: skip
    out = tmp_path / "r"
    report = _report(out, docs, "--emo", str(paths["emo"]), "--baseline", str(paths["standard"]), "--keep", "0.34,1",
                     "--shots", "2", "--methods", "layerwise,easy_ep,easy_ep:global", "--tasks", str(tmp_path / "tasks"))  # fmt: skip
    tok = DocumentTokenizer(TOKENIZER)
    for name, path in paths.items():
        model = load_model(path).model
        for domain, dres in report["models"][name]["domains"].items():
            calib = set(report["domains"][domain]["calibration"])
            items = [
                json.loads(x)
                for x in (tmp_path / "tasks" / f"nextpassage_{domain}.jsonl").read_text().splitlines()
            ]
            keep_items = [i for i, it in enumerate(items) if it["doc_id"] not in calib]
            assert dres["accuracy"]["n"] == len(keep_items) < len(items)  # calibration items left out
            entry = dres["keep"]["0.34"]
            assert {"shots_2", "easy_ep_2", "easy_ep_global_2", "random"} <= set(entry)
            glob = entry["easy_ep_global_2"]
            assert sum(map(len, glob["layers"])) == 3 * 2  # the budget, spread
            ee = entry["easy_ep_2"]
            cut = prune_model(model, ee["layers"])
            lm = EMOHarnessLM(cut, tok, progress=False)
            task = f"nextpassage_{domain}"
            acc = run_tasks(lm, [task], tmp_path / "tasks", samples={task: keep_items})[task]
            assert ee["accuracy"]["acc_norm"] == pytest.approx(acc["acc_norm"])
            assert ee["accuracy"]["drop"] == pytest.approx(dres["accuracy"]["acc_norm"] - acc["acc_norm"])
            assert dres["keep"]["1"]["easy_ep_2"]["accuracy"]["drop"] == 0
        summary = report["models"][name]["summary"]["0.34"]
        drops = [
            d["keep"]["0.34"]["shots_2"]["accuracy"]["drop"]
            for d in report["models"][name]["domains"].values()
        ]
        assert summary["acc_drop/shots_2"] == pytest.approx(sum(drops) / len(drops))
    text = (out / "report.md").read_text()
    assert "Downstream accuracy" in text and "easy_ep_global 2-shot" in text
