"""Expert usage, balance and domain specialisation of the routers, logged every N optimizer steps.

Works identically for EMO and standard-MoE runs (standard routers report pool size E' and every pool Jaccard
is 1.0), so two runs compare side by side in TensorBoard. Tags (``<l>`` = model layer index):

- ``usage/{imbalance,cv,dead_fraction,entropy,pool_size,lb,z}`` (mean over monitored layers) and
  ``usage/<name>/layer<l>``; ``usage/collapse_streak`` (consecutive windows over a collapse threshold);
- ``modularity/{nmi,jaccard_within,jaccard_across}`` and ``.../layer<l>``;
  ``modularity/{experts50,experts90}`` (mean over layers and domains), ``.../<domain>`` (mean over layers),
  ``.../layer<l>`` (mean over domains);
- TensorBoard only: images ``experts/heatmap/layer<l>`` (domain x expert share of each domain's tokens) and
  ``experts/summary`` (layer x domain experts carrying 50% / 90% of the tokens); histograms
  ``experts/load/layer<l>`` (per-expert load relative to the mean); text ``usage/collapse``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from emo_lightning.errors import ConfigError
from emo_lightning.metrics.expert_usage import ExpertUsage

log = logging.getLogger(__name__)

_USAGE = ("imbalance", "cv", "dead_fraction", "entropy", "pool_size", "lb", "z")
_MODULARITY = ("nmi", "jaccard_within", "jaccard_across")


class RoutingCollapseWarning(UserWarning):
    """Dead-expert fraction or load imbalance above its threshold for several windows in a row."""


class ExpertUsageMonitor(L.Callback):
    """Accumulates (domain x expert) routing counts every training micro-batch; logs window statistics.

    Asks the LightningModule (``EMOLitModule``) to keep its per-token routes (``collect_routes``) and reads
    ``last_routing`` in ``on_train_batch_end``. Statistics are summed over all processes when logging (every
    rank takes part; rank 0 writes).

    Args:
        log_every_n_steps: window length in optimizer steps (scalars and histograms).
        layers: model layers to monitor (None = all).
        heatmap_layers: layers with a heatmap image (None = first, middle and last monitored layer).
        image_every_n_steps: interval of the matplotlib images (None = 10 x ``log_every_n_steps``; 0 = never);
            the first window always has them, so a new run shows its heatmaps after ``log_every_n_steps`` steps.
        collapse_dead_fraction: warn when a layer's dead-expert fraction exceeds this ...
        collapse_imbalance: ... or its max/mean load exceeds this ...
        collapse_windows: ... for this many consecutive windows.
        pool_overlap: measure the pool Jaccard of document pairs (one host sync per micro-batch).
        max_pool_docs: documents per micro-batch entering the pool Jaccard.
        domains: domain names (None = ``trainer.datamodule.domains``; if unknown, one domain ``all``).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        layers: Sequence[int] | None = None,
        heatmap_layers: Sequence[int] | None = None,
        image_every_n_steps: int | None = None,
        collapse_dead_fraction: float = 0.5,
        collapse_imbalance: float = 4.0,
        collapse_windows: int = 3,
        pool_overlap: bool = True,
        max_pool_docs: int = 256,
        domains: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if log_every_n_steps < 1:
            raise ConfigError("expert_usage.log_every_n_steps", f"must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.image_every_n_steps = (
            10 * log_every_n_steps if image_every_n_steps is None else image_every_n_steps
        )
        self.layers = list(layers) if layers is not None else None
        self.heatmap_layers = list(heatmap_layers) if heatmap_layers is not None else None
        self.collapse_dead_fraction = collapse_dead_fraction
        self.collapse_imbalance = collapse_imbalance
        self.collapse_windows = collapse_windows
        self.pool_overlap = pool_overlap
        self.max_pool_docs = max_pool_docs
        self.domains = list(domains) if domains is not None else None
        self.metric: ExpertUsage | None = None
        self.collapse_streak = 0
        self._one_domain = False
        self._last_logged = -1
        self._imaged = False  # the first logged window draws the images, whatever the step
        self._routed_k = 0

    # ---------------------------------------------------------------- setup
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = getattr(pl_module, "config", None)
        if config is None or not hasattr(pl_module, "collect_routes"):
            rank_zero_warn("ExpertUsageMonitor needs an EMOLitModule (config, collect_routes): disabled")
            return
        n_layers = config.arch.n_layers
        self.layers = list(range(n_layers)) if self.layers is None else self.layers
        if not self.layers or not all(0 <= i < n_layers for i in self.layers):
            raise ConfigError(f"expert_usage.layers={self.layers}", f"the model has layers 0..{n_layers - 1}")
        if self.heatmap_layers is None:
            picks = (self.layers[0], self.layers[len(self.layers) // 2], self.layers[-1])
            self.heatmap_layers = sorted(set(picks))
        if self.domains is None:
            self.domains = list(getattr(getattr(trainer, "datamodule", None), "domains", None) or [])
        if not self.domains:
            self.domains, self._one_domain = ["all"], True
        self._routed_k = config.router.routed_k
        self.metric = ExpertUsage(
            len(self.layers), len(self.domains), config.router.num_routed, max_pool_docs=self.max_pool_docs
        ).to(pl_module.device)
        pl_module.collect_routes = True
        self._last_logged = trainer.global_step  # a resumed run starts a fresh window

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "collect_routes"):
            pl_module.collect_routes = False
            pl_module.last_routing = None

    # ----------------------------------------------------------- accumulate
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.metric is None:
            return
        routing = getattr(pl_module, "last_routing", None)
        if routing is not None and isinstance(batch, dict) and "input_ids" in batch:
            self._update(routing, batch)
            pl_module.last_routing = None
        step = trainer.global_step
        if step != self._last_logged and step % self.log_every_n_steps == 0:
            self._last_logged = step
            self._log_window(trainer, step)

    @torch.no_grad()
    def _update(self, routing: Sequence[Any], batch: dict[str, Tensor]) -> None:
        layers = [routing[i] for i in self.layers]
        domain_ids = batch.get("domain_ids")
        if domain_ids is None:
            domain_ids = torch.zeros_like(batch["input_ids"])
        elif self._one_domain:
            domain_ids = torch.where(domain_ids >= 0, 0, -1)
        pool_mask = None
        if self.pool_overlap and all(r.pool_mask is not None for r in layers):
            pool_mask = torch.stack([r.pool_mask for r in layers])
        self.metric.update(
            torch.stack([r.experts[..., : self._routed_k] for r in layers]),
            domain_ids,
            doc_ids=batch.get("doc_ids"),
            pool_sizes=torch.stack([r.pool_sizes for r in layers]),
            pool_mask=pool_mask,
            lb=torch.stack([r.lb for r in layers]),
            z=torch.stack([r.z for r in layers]),
        )

    # ------------------------------------------------------------------ log
    def _log_window(self, trainer: L.Trainer, step: int) -> None:
        result = {k: v.detach().cpu() for k, v in self.metric.compute().items()}  # syncs: every rank calls it
        self.metric.reset()
        collapse_msg = self._check_collapse(result)
        if not trainer.is_global_zero:
            return
        scalars = self.scalars(result)
        scalars["usage/collapse_streak"] = float(self.collapse_streak)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for writer in writers:
            for i, layer in enumerate(self.layers):
                load = result["load"][i].to(torch.float64)
                writer.add_histogram(f"experts/load/layer{layer}", load / load.mean().clamp_min(1e-12), step)
            if collapse_msg:
                writer.add_text("usage/collapse", collapse_msg, step)
        if (
            writers
            and self.image_every_n_steps > 0
            and (step % self.image_every_n_steps == 0 or not self._imaged)
        ):
            self._imaged = True
            figures = self.figures(result)
            for writer in writers:
                for tag, fig in figures.items():
                    writer.add_figure(tag, fig, step, close=False)
        if collapse_msg:
            log.warning(collapse_msg)
            rank_zero_warn(collapse_msg, category=RoutingCollapseWarning)

    def _check_collapse(self, result: dict[str, Tensor]) -> str | None:
        """Update the streak of collapsed windows; a message when it reaches (a multiple of) the window count."""
        dead, imb = result["dead_fraction"], result["imbalance"]
        bad = (dead > self.collapse_dead_fraction) | (imb > self.collapse_imbalance)
        self.collapse_streak = self.collapse_streak + 1 if bool(bad.any()) else 0
        if self.collapse_streak == 0 or self.collapse_streak % self.collapse_windows:
            return None
        detail = ", ".join(
            f"layer {layer}: dead {d:.2f}, imbalance {m:.2f}"
            for layer, d, m, b in zip(self.layers, dead.tolist(), imb.tolist(), bad.tolist(), strict=True)
            if b
        )
        return (
            f"routing collapse for {self.collapse_streak} windows of {self.log_every_n_steps} steps "
            f"(dead fraction > {self.collapse_dead_fraction} or imbalance > {self.collapse_imbalance}): {detail}"
        )

    def scalars(self, result: dict[str, Tensor]) -> dict[str, float]:
        """Flat ``tag -> value`` dict of the window's scalars (NaN values, e.g. absent pools, are dropped)."""
        out: dict[str, float] = {}

        def put(tag: str, values: Tensor) -> None:
            values = values[~values.isnan()]
            if values.numel():
                out[tag] = float(values.mean())

        for group, names in (("usage", _USAGE), ("modularity", _MODULARITY)):
            for name in names:
                put(f"{group}/{name}", result[name])
                for i, layer in enumerate(self.layers):
                    put(f"{group}/{name}/layer{layer}", result[name][i : i + 1])
        for name in ("experts50", "experts90"):
            per = result[name]  # (L,D)
            put(f"modularity/{name}", per.flatten())
            for d, domain in enumerate(self.domains):
                put(f"modularity/{name}/{domain}", per[:, d])
            for i, layer in enumerate(self.layers):
                put(f"modularity/{name}/layer{layer}", per[i])
        return out

    def figures(self, result: dict[str, Tensor]) -> dict[str, Any]:
        """Matplotlib figures (Agg canvas, no pyplot state): per-layer heatmaps and the layer x domain summary."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figs: dict[str, Any] = {}
        n_dom, n_exp = len(self.domains), result["counts"].shape[-1]
        for layer in self.heatmap_layers:
            if layer not in self.layers:
                continue
            counts = result["counts"][self.layers.index(layer)].to(torch.float64)  # (D,E)
            share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            fig = Figure(figsize=(1.5 + 0.35 * n_exp, 1.0 + 0.35 * n_dom))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(n_dom), self.domains)
            ax.set_xticks(range(n_exp))
            ax.set_xlabel("routable expert")
            ax.set_title(f"layer {layer}: share of each domain's tokens")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            figs[f"experts/heatmap/layer{layer}"] = fig
        fig = Figure(figsize=(2.0 + 0.7 * n_dom, 1.5 + 0.8 * len(self.layers)))
        FigureCanvasAgg(fig)
        for j, name in enumerate(("experts50", "experts90")):
            ax = fig.add_subplot(1, 2, j + 1)
            values = result[name].numpy()  # (L,D)
            ax.imshow(values, aspect="auto", cmap="magma_r", vmin=0, vmax=n_exp)
            for (r, c), v in _cells(values):
                label, color = (
                    ("-", "black") if math.isnan(v) else (f"{v:.0f}", "white" if v > n_exp / 2 else "black")
                )
                ax.text(c, r, label, ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(n_dom), self.domains, rotation=60, ha="right")
            ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            ax.set_ylabel("layer")
            ax.set_title(f"experts carrying {name[-2:]}% of a domain")
        fig.tight_layout()
        figs["experts/summary"] = fig
        return figs


def _cells(values: Any) -> list[tuple[tuple[int, int], float]]:
    return [((r, c), float(values[r, c])) for r in range(values.shape[0]) for c in range(values.shape[1])]
