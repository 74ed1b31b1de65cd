"""Size and load time of an ``emo-experts explore`` page at the study models' shape (measured, never asserted).

    python -m benchmarks.explore_page [--data DIR] [--docs 100] [--loads 5] [--trained EMO.ckpt STD.ckpt]

Builds two checkpoints shaped like ``conf/studies/emo_shared8_fine64.yaml`` and its standard-MoE baseline (64
experts of 32 units, top-8, 4 layers, d_model 128, 256-token rows; random weights with sharpened routers, unless
``--trained`` gives real ones), writes the page for ``--docs`` documents of ``--data`` with both models, then
opens it ``--loads`` times in headless Chromium (Playwright, the system's browser) and prints the file size, the
time to interactive (navigation start until the page's script has drawn the first document and wired every
control: ``window.exploreReadyMs``), the load event, and the first opening of the Experts tab (which runs the
inlined Plotly.js then). Needs a Chromium (``make browser``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emo_lightning.checkpoint import save_checkpoint
from emo_lightning.experts.explore import ExploreConfig, explore
from emo_lightning.model import ArchConfig, EMOTransformer, ModelConfig, RouterConfig

STUDY_ARCH = ArchConfig(
    vocab_size=4096, d_model=128, n_layers=4, n_heads=4, expert_hidden=32, max_seq_len=256
)


def study_checkpoint(kind: str, path: Path, seed: int) -> Path:
    """A random checkpoint of the study shape (routers sharpened so that experts differ in preference)."""
    torch.manual_seed(seed)
    router = RouterConfig(kind=kind, num_experts=64, num_shared=0, top_k=8)
    model = EMOTransformer(ModelConfig(arch=STUDY_ARCH, router=router))
    with torch.no_grad():
        for blk in model.blocks:
            blk.moe.router.weight.normal_(0.0, 0.3)
    save_checkpoint(model, {}, path, {})
    return path


def measure(page: Path, loads: int) -> dict[str, float]:
    """Median milliseconds over ``loads`` fresh pages: ready, load event, first Experts tab."""
    from playwright.sync_api import sync_playwright

    executable = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    ready, loaded, experts = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        for _ in range(loads):
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            tab.goto(page.as_uri(), wait_until="load")
            tab.wait_for_selector("body[data-ready]")
            ready.append(tab.evaluate("window.exploreReadyMs"))
            loaded.append(tab.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            start = time.perf_counter()
            tab.click("#tab-experts")
            tab.wait_for_selector("#heatmap-0 .main-svg")
            experts.append(1000 * (time.perf_counter() - start))
            tab.close()
        browser.close()
    return {
        "ready": statistics.median(ready),
        "load": statistics.median(loaded),
        "experts_tab": statistics.median(experts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/corpus/val", help="documents (default: %(default)s)")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--trained", nargs=2, default=None, metavar=("EMO", "STD"), help="real checkpoints")
    parser.add_argument("--out", default=None, help="keep the page here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.trained:
            emo, std = map(Path, args.trained)
        else:
            emo = study_checkpoint("emo", Path(tmp) / "emo.ckpt", 0)
            std = study_checkpoint("standard", Path(tmp) / "std.ckpt", 1)
        page = Path(args.out or Path(tmp) / "page.html")
        start = time.perf_counter()
        done = explore(emo, args.data, page, std, ExploreConfig(docs=args.docs), progress=True)
        build = time.perf_counter() - start
        times = measure(page, args.loads)
    print(
        f"explore page, {done['docs']} documents ({done['tokens']:,} tokens) x 2 models x {STUDY_ARCH.n_layers} "
        f"layers: {done['bytes'] / 2**20:.2f} MiB, built in {build:.0f} s; headless Chromium, median of "
        f"{args.loads} loads: interactive {times['ready']:.0f} ms, load event {times['load']:.0f} ms, "
        f"first Experts tab (Plotly.js runs) {times['experts_tab']:.0f} ms"
    )


if __name__ == "__main__":
    main()
