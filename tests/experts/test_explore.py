"""``emo-experts explore``: the page's data is the models' (routes, pools, clusters, usage, `select`), the page is
self-contained, and in a real browser (headless Chromium driven by Playwright) it loads without errors and
reacts: layers recolour tokens, a cluster lists its documents, a focused token shows its experts.

Browser tests need Playwright for Python and a Chromium (Debian's ``chromium``: ``make browser``); without them
they skip with the reason printed, and under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from emo_lightning.checkpoint import CheckpointWriteError, load_model
from emo_lightning.experts.cli import main
from emo_lightning.experts.clustering import spherical_kmeans
from emo_lightning.experts.documents import Document, DocumentTokenizer, load_documents
from emo_lightning.experts.explore import ExploreConfig, build_payload, pick_documents, unpack_array
from emo_lightning.model import FULL, parse_routing
from tests.experts.conftest import TEXTS, TOKENIZER, tiny_model, write_checkpoint

TRICKY = 'Ça va? Déjà vu 😀 </script><script>alert(1)</script> __JS__ <b>bold</b> & "quotes"'
KEEP = "0.34"  # 3 of 9 experts (1 shared): 2 routable


def _write_docs(path: Path) -> Path:
    with open(path, "w") as f:
        for domain, texts in TEXTS.items():
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"{domain}-{i}", "domain": domain, "text": t}) + "\n")
        f.write(json.dumps({"id": "tricky", "domain": "literature", "text": TRICKY}) + "\n")
    return path


def payload_of(page: Path) -> dict[str, Any]:
    """The data a page carries (what its script reads)."""
    text = page.read_text(encoding="utf-8")
    data = re.search(r'<script id="explore-data" type="application/json">(.*?)</script>', text, re.S)
    assert data is not None
    return json.loads(data.group(1))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny EMO and standard checkpoints, a real `emo-experts report` of them and the explorer page."""
    root = tmp_path_factory.mktemp("explore")
    emo = write_checkpoint(tiny_model("emo"), root / "emo.ckpt")
    std = write_checkpoint(tiny_model("standard", seed=1), root / "std.ckpt")
    docs = _write_docs(root / "docs.jsonl")
    common = ["--tokenizer", str(TOKENIZER), "--no-progress"]
    report = ["report", "--emo", str(emo), "--baseline", str(std), "--data", str(docs), "--keep", KEEP]
    report += [
        "--shots",
        "1",
        "--calib-docs",
        "1",
        "--eval-docs",
        "2",
        "--random-seeds",
        "1",
        "--clusters",
        "2",
    ]
    main([*report, "--cluster-tokens", "100", "--out", str(root / "report"), *common])
    page = root / "page.html"
    explore = ["explore", "--emo", str(emo), "--baseline", str(std), "--data", str(docs), "--out", str(page)]
    main([*explore, "--clusters", "8", "--keep", f"{KEEP},0.67", "--report", str(root / "report"), *common])
    return {"root": root, "emo": emo, "std": std, "docs": docs, "page": page, "data": payload_of(page)}


def _arrays(model: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return unpack_array(model["experts"]), unpack_array(model["weights"]), unpack_array(model["clusters"])


def _offsets(data: dict[str, Any]) -> np.ndarray:
    return np.cumsum([0, *(len(d["tokens"]) for d in data["docs"])])


# --------------------------------------------------------------------------------------------- the data
def test_page_is_self_contained(built: dict[str, Any]) -> None:
    text = built["page"].read_text(encoding="utf-8")
    assert (
        "plotly.js v" in text and "Licensed under the MIT license" in text
    )  # inline, its licence header kept
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", text, flags=re.S)  # the page without script bodies
    assert markup.count("<script") == 3 and "src=" not in markup and "<link" not in markup
    assert "http" not in markup and "@import" not in markup  # nothing to fetch (the browser test watches too)
    assert [m["label"] for m in built["data"]["models"]] == ["EMO", "standard MoE"]
    assert {d["id"] for d in built["data"]["docs"]} == {"tricky"} | {
        f"{d}-{i}" for d in TEXTS for i in range(3)
    }


def _documents(built: dict[str, Any]) -> dict[str, Document]:
    return {d.id: d for d in load_documents(built["docs"], DocumentTokenizer(TOKENIZER))}


def test_token_texts_are_the_documents(built: dict[str, Any]) -> None:
    """One text per token; concatenated, the document (non-ASCII, markup and placeholders survive the page)."""
    tok = DocumentTokenizer(TOKENIZER)
    docs = _documents(built)
    for d in built["data"]["docs"]:
        assert len(d["tokens"]) == d["length"] == len(docs[d["id"]].tokens)  # short documents: not cut
        assert "".join(d["tokens"]) == tok.decode(docs[d["id"]].tokens)
    (tricky,) = (d["tokens"] for d in built["data"]["docs"] if d["id"] == "tricky")
    assert "".join(tricky) == TRICKY + "<|endoftext|>"
    assert "" in tricky  # a character over several tokens: the one completing it carries it


def test_routes_are_the_models_own(built: dict[str, Any]) -> None:
    """Every shown token's experts and weights in every layer are what the model routes for the document alone."""
    docs = _documents(built)
    off = _offsets(built["data"])
    for view, path in zip(built["data"]["models"], (built["emo"], built["std"]), strict=True):
        model = load_model(path).model
        experts, weights, _ = _arrays(view)  # (T,L,k) x2
        for i, d in enumerate(built["data"]["docs"]):
            with torch.no_grad(), model.routing(FULL):
                out = model(torch.from_numpy(docs[d["id"]].tokens)[None], return_routes=True)
            ref_e = torch.stack([lr.experts[0] for lr in out.layers], 1).numpy()  # (S,L,k)
            ref_w = torch.stack([lr.weights[0] for lr in out.layers], 1).numpy()
            np.testing.assert_array_equal(experts[off[i] : off[i + 1]], ref_e)
            np.testing.assert_allclose(weights[off[i] : off[i + 1]] / 255, ref_w, atol=0.5 / 255 + 1e-5)


def test_pools_are_the_models_pools(built: dict[str, Any]) -> None:
    """Under pool:P every document shows the router's own pool, and every token routes inside it."""
    cfg = ExploreConfig(clusters=2, keep=[KEEP], routing=parse_routing("pool:3"))
    lm = load_model(built["emo"])
    payload = build_payload({"emo": lm}, built["docs"], DocumentTokenizer(TOKENIZER), cfg)
    view, docs, off = payload["models"][0], _documents(built), _offsets(payload)
    experts, _, _ = _arrays(view)
    for i, pools in enumerate(view["pools"]):
        with torch.no_grad(), lm.model.routing(cfg.routing):
            out = lm.model(torch.from_numpy(docs[payload["docs"][i]["id"]].tokens)[None], return_routes=True)
        for layer, pool in enumerate(pools):
            assert pool == out.layers[layer].pool_mask[0, 0].nonzero().flatten().tolist()
            routed = experts[off[i] : off[i + 1], layer, : lm.config.router.routed_k]
            assert len(pool) == 3 and set(routed.ravel().tolist()) <= set(pool)


def test_select_is_what_the_select_command_keeps(built: dict[str, Any], tmp_path: Path) -> None:
    """The Experts tab's kept experts per domain and keep fraction are `emo-experts select`'s on the domain's
    calibration documents."""
    records = [json.loads(line) for line in built["docs"].read_text().splitlines()]
    for view, path in zip(built["data"]["models"], (built["emo"], built["std"]), strict=True):
        for domain in ("code", "math"):
            entry = view["select"][domain]  # calibrated on the domain's first shown documents
            assert (
                entry["calibration"] == [d["id"] for d in built["data"]["docs"] if d["domain"] == domain][:8]
            )
            calib = tmp_path / f"{domain}.jsonl"
            calib.write_text(
                "".join(json.dumps(r) + "\n" for r in records if r["id"] in entry["calibration"])
            )
            out = tmp_path / "subset.json"
            main(["select", "--ckpt", str(path), "--data", str(calib), "--keep", KEEP, "--out", str(out),
                  "--tokenizer", str(TOKENIZER), "--no-progress"])  # fmt: skip
            assert entry["keep"][KEEP]["layers"] == json.loads(out.read_text())["layers"]
        assert set(view["keeps"]) == {KEEP, "0.67"} and view["keeps"][KEEP] == 3


def test_measured_rise_comes_from_the_report(built: dict[str, Any]) -> None:
    report = json.loads((built["root"] / "report" / "report.json").read_text())
    for view, name in zip(built["data"]["models"], ("emo", "standard"), strict=True):
        for domain, dres in report["models"][name]["domains"].items():
            measured = view["select"][domain]["keep"][KEEP]["measured"]
            assert measured["rise"] == dres["keep"][KEEP]["shots_1"]["rise"]
            assert measured["random"] == dres["keep"][KEEP]["random"]["rise"] and measured["shots"] == 1
            ours, theirs = (
                view["select"][domain]["keep"][KEEP]["layers"],
                dres["keep"][KEEP]["shots_1"]["layers"],
            )
            assert measured["overlap"] == [len(set(a) & set(b)) for a, b in zip(ours, theirs, strict=True)]
        assert view["select"]["code"]["keep"]["0.67"]["measured"] is None  # not measured at that keep


def test_clusters_and_usage_match_the_routes(built: dict[str, Any]) -> None:
    domains = built["data"]["domains"]
    dom = np.repeat(
        [domains.index(d["domain"]) for d in built["data"]["docs"]], np.diff(_offsets(built["data"]))
    )
    for view in built["data"]["models"]:
        experts, _, clusters = _arrays(view)  # (T,L,k), (L,T)
        for layer, info in enumerate(view["cluster_layers"]):
            sizes = np.bincount(clusters[layer], minlength=view["k"])
            assert [c["size"] for c in info["clusters"]] == sizes.tolist()
            for c, entry in enumerate(info["clusters"]):
                assert (
                    entry["domains"]
                    == np.bincount(dom[clusters[layer] == c], minlength=len(domains)).tolist()
                )
            for d in range(len(domains)):  # usage: share of the domain's routed slots, counted naively
                slots = experts[dom == d, layer, : view["routed_k"]].ravel()
                share = np.bincount(slots, minlength=view["num_routed"]) / len(slots)
                np.testing.assert_allclose(view["usage"][layer][d], share, atol=1e-5)


def test_spherical_kmeans_assigns_every_token() -> None:
    """Tokens left out of the fitted sample join the cluster of their own group's sampled tokens."""
    rng = np.random.default_rng(0)
    centres = rng.dirichlet(np.ones(8), size=3) * 4
    feats = np.concatenate([c + rng.normal(0, 0.02, (40, 8)) for c in centres]).astype(np.float32)
    fit = spherical_kmeans(feats, k=3, max_tokens=30, seed=0)
    assign = fit.assign(feats)
    np.testing.assert_array_equal(assign[fit.sample], fit.labels)
    groups = assign.reshape(3, 40)
    assert all(len(set(g)) == 1 for g in groups.tolist()) and len(set(groups[:, 0])) == 3
    assert all(len(np.setdiff1d(np.arange(g * 40, g * 40 + 40), fit.sample)) for g in range(3))  # unsampled


def test_pick_documents_spreads_over_domains(built: dict[str, Any]) -> None:
    picked = pick_documents(list(_documents(built).values()), 4)
    assert sorted(d.domain for d in picked) == [
        "code",
        "code",
        "literature",
        "math",
    ]  # one per domain, then again
    assert [d.id for d in picked] == ["code-0", "code-1", "literature-0", "math-0"]  # grouped by domain


# ------------------------------------------------------------------------------------------- the command
def test_user_errors_are_one_line(
    built: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other = write_checkpoint(tiny_model("emo", num_shared=0), tmp_path / "other.ckpt")
    base = ["explore", "--emo", str(built["emo"]), "--tokenizer", str(TOKENIZER), "--no-progress"]
    out = tmp_path / "page.html"
    cases = {
        "no documents": [*base, "--data", str(empty), "--out", str(out)],
        "explore supports full, pool:P or running:P": [
            *base, "--data", str(built["docs"]), "--out", str(out), "--routing", "causal:2:4"
        ],
        "no report.json": [*base, "--data", str(built["docs"]), "--out", str(out), "--report", str(tmp_path)],
        "its emo model has 9 experts (1 shared)": [
            "explore", "--emo", str(other), "--data", str(built["docs"]), "--out", str(out), "--clusters", "2",
            "--report", str(built["root"] / "report"), "--tokenizer", str(TOKENIZER), "--no-progress",
        ],
    }  # fmt: skip
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("emo-experts: ") and expected in err
        assert "\n" not in err and "Traceback" not in err
    assert list(tmp_path.glob("*.html")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_out_is_written_atomically(
    built: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A page that cannot be renamed into place leaves the previous page whole and no temporary file; the fault is
    one line (exit 1)."""
    page = tmp_path / "page.html"
    page.write_text("old")

    def broken_replace(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    argv = ["explore", "--emo", str(built["emo"]), "--data", str(built["docs"]), "--out", str(page)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--clusters", "2", "--keep", KEEP, "--tokenizer", str(TOKENIZER), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        exc.value.code == 1
        and err.startswith(f"emo-experts: {CheckpointWriteError.__name__}: ")
        and "disk full" in err
    )
    assert page.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["page.html"]


# --------------------------------------------------------------------------------------------- the browser
def _chromium() -> str:
    """A Chromium to drive: $EMO_CHROMIUM, the system's (Debian: chromium), or one `playwright install` fetched."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "needs Playwright for Python (`make install`)"
    else:
        for name in (os.environ.get("EMO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
            if name and shutil.which(name):
                return str(shutil.which(name))
        with sync_playwright() as p:
            if Path(p.chromium.executable_path).exists():
                return p.chromium.executable_path
        reason = "needs a Chromium: `make browser` (Debian's chromium package) or set EMO_CHROMIUM"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs every test: {reason}")
    pytest.skip(reason)


class Browser(SimpleNamespace):
    """``page``: the page open in headless Chromium; ``problems``: its console errors, page errors and requests of
    anything but the page itself."""


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    """The explorer page open in headless Chromium (a :class:`Browser`)."""
    executable = _chromium()  # skips (CI: fails) before the page is built
    built = request.getfixturevalue("built")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = chrome.new_page(viewport={"width": 1280, "height": 720})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error {e}"))
        url = built["page"].as_uri()
        page.on("request", lambda r: problems.append(f"request {r.url}") if r.url != url else None)
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        yield Browser(page=page, problems=problems)
        chrome.close()


def _open(browser: Browser, tab: str) -> None:
    browser.page.click(f"#tab-{tab}")
    assert browser.page.is_visible(f"#panel-{tab}")


def test_browser_loads_without_errors(browser: Browser, built: dict[str, Any]) -> None:
    _open(browser, "experts")  # runs Plotly too
    browser.page.wait_for_selector("#heatmap-0 .main-svg")
    _open(browser, "documents")
    assert browser.problems == []
    assert browser.page.locator("#docs button").count() == len(built["data"]["docs"])
    boxes = browser.page.locator(".doc-col").evaluate_all(
        "cs => cs.map(c => c.getBoundingClientRect().toJSON())"
    )
    assert len(boxes) == 2 and boxes[0]["top"] == boxes[1]["top"] and boxes[0]["right"] <= boxes[1]["left"]


def test_browser_layer_switch_recolours_tokens(browser: Browser) -> None:
    _open(browser, "documents")
    browser.page.select_option("#colour", "expert")
    spans = browser.page.locator(".doc-text[data-model='0'] .tok")

    def colours_and_tops(layer: int) -> tuple[list[str], list[str]]:
        browser.page.select_option("#layer", str(layer))
        got = spans.evaluate_all(
            "(s, l) => s.map(x => [x.style.backgroundColor, x.dataset.experts.split(';')[l].split(',')[0]])",
            layer,
        )
        return [c for c, _ in got], [e for _, e in got]

    colours0, _ = colours_and_tops(0)
    colours1, tops1 = colours_and_tops(1)
    assert colours0 != colours1
    by_expert = {}
    for colour, top in zip(
        colours1, tops1, strict=True
    ):  # one colour per top expert, distinct experts differ
        assert by_expert.setdefault(top, colour) == colour
    assert len(set(by_expert.values())) == len(by_expert)
    browser.page.select_option("#colour", "cluster")
    browser.page.select_option("#layer", "0")


def test_browser_cluster_lists_its_documents(browser: Browser, built: dict[str, Any]) -> None:
    _open(browser, "clusters")
    view, off = built["data"]["models"][0], _offsets(built["data"])
    every = unpack_array(view["clusters"])  # (L,T)
    spread = {  # (layer, cluster) -> documents holding it
        (layer, c): sum((every[layer, off[i] : off[i + 1]] == c).any() for i in range(len(off) - 1))
        for layer in range(view["layers"])
        for c in range(view["k"])
    }
    layer, c = min(spread, key=spread.get)  # the cluster in the fewest documents
    browser.page.select_option("#layer", str(layer))
    clusters = every[layer]  # (T,)
    browser.page.click(f"#cluster-columns button.cluster[data-model='0'][data-cluster='{c}']")
    listed = browser.page.locator("#cluster-docs .cdoc").evaluate_all("cs => cs.map(x => +x.dataset.doc)")
    expected = [i for i in range(len(off) - 1) if (clusters[off[i] : off[i + 1]] == c).any()]
    assert sorted(listed) == expected and len(expected) < len(off) - 1
    counts = browser.page.locator("#cluster-docs .cdoc .n").all_inner_texts()  # "n of m tokens"
    for i, text in zip(listed, counts, strict=True):
        assert text == f"{int((clusters[off[i] : off[i + 1]] == c).sum())} of {off[i + 1] - off[i]} tokens"
    marks = browser.page.locator("#cluster-docs .tok").evaluate_all(
        "(s, l) => s.map(x => [x.classList.contains('hl'), +x.dataset.clusters.split(',')[l]])", layer
    )
    assert marks and all(hl == (cl == c) for hl, cl in marks)
    assert sum(hl for hl, _ in marks) == int((clusters == c).sum())
    browser.page.select_option("#layer", "0")


def test_browser_focused_token_shows_its_experts(browser: Browser, built: dict[str, Any]) -> None:
    _open(browser, "documents")
    browser.page.click("#docs button[data-doc='1']")
    off = _offsets(built["data"])
    t = int(off[1]) + 2
    browser.page.locator(f".doc-text[data-model='0'] .tok[data-t='{t}']").focus()
    for mi, view in enumerate(built["data"]["models"]):
        experts, _, _ = _arrays(view)
        for layer in range(view["layers"]):
            shown = browser.page.locator(
                f"#token-info .card[data-model='{mi}'] tr[data-layer='{layer}'] [data-expert]"
            ).evaluate_all("s => s.map(x => +x.dataset.expert)")
            assert shown == experts[t, layer].tolist()
    assert browser.page.locator("#token-info").inner_text().count("no document pool") == 2 * 3  # routing full


def test_browser_experts_tab_shows_the_selection(browser: Browser, built: dict[str, Any]) -> None:
    _open(browser, "experts")
    browser.page.select_option("#domain", "math")
    browser.page.select_option("#keep", KEEP)
    for mi, view in enumerate(built["data"]["models"]):
        sel = view["select"]["math"]["keep"][KEEP]
        rows = browser.page.locator(f"#kept-{mi} .kept-experts").all_inner_texts()
        assert [list(map(int, r.split())) for r in rows] == sel["layers"]
        rise = sel["measured"]["rise"]
        assert f"{'+' if rise >= 0 else '−'}{100 * abs(rise):.2f}%" in browser.page.inner_text(f"#kept-{mi}")
    assert browser.problems == []
