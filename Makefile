# emo-lightning: `make train` trains the tiny EMO model on the bundled corpus; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= conf/experiment/emo_tiny.yaml
BASELINE_CONFIG ?= conf/experiment/stdmoe_tiny.yaml
ARGS ?=
PYTEST_ARGS ?=
TORCH_VERSION := 2.13.0
SHARDS := data/shards
TOKENIZER := data/tokenizer.json
CORPUS := data/corpus
SHARED_CORPUS ?= ../shared/corpus
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install browser data data-shared train train-baseline test lint format tensorboard bench clean help \
	smoke-distributed gpu-check gpu-scale-probe gpu-prepare gpu-scale-probe-prepare

help:
	@echo "make install         create $(VENV) (torch pinned to $(TORCH_VERSION)) and install emo-lightning"
	@echo "make train           tiny EMO model on the bundled corpus (CONFIG=..., ARGS='--trainer.max_steps 10')"
	@echo "make train-baseline  the same with the standard top-k router"
	@echo "make test            the test suite (no GPU and no ../shared needed);  make lint;  make format"
	@echo "make browser         Chromium for the explorer's browser tests (apt-get install chromium, when absent)"
	@echo "make data            shards of the bundled corpus;  make data-shared: the eight domains of ../shared"
	@echo "make tensorboard     TensorBoard over runs/"
	@echo "make modularity      emo-experts report of the two tiny runs (EMO vs standard MoE)"
	@echo "make explore         emo-experts explore of the two tiny runs: runs/explore.html (opens from disk)"
	@echo "make smoke-distributed  2 CPU processes, DeepSpeed ZeRO-2 + expert parallelism, resume, consolidate"
	@echo "make bench           CPU benchmarks (ratios side by side)"
	@echo "make gpu-check       check and measure the CUDA path in < 8 min (CPU: a short dry run)"
	@echo "make gpu-scale-probe standard MoE vs EMO at ~50M tokens each on one GPU in < 8 min (CPU: a short dry run)"
	@echo "make gpu-prepare     wheels (.whl/) and a corpus copy (.scale_probe/) to carry to a bare GPU node"

install: $(VENV)/.installed

# torch is installed first and pinned: this resolves to the local CPU wheel on CPU-only machines and to the
# CUDA build of the same release on GPU machines, and keeps DeepSpeed's build from pulling another torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev,export,eval]"
	@touch $@

# The explorer's browser tests (tests/experts/test_explore.py) drive a headless Chromium with Playwright for Python
# (installed by `make install`), pointed at the system's browser: Playwright's own download (`playwright install`)
# is never needed. Installs Debian's chromium package when no Chromium is on PATH (as root, or through sudo);
# elsewhere install Chromium or Chrome yourself, or set EMO_CHROMIUM. Without one the tests skip (CI=true: fail).
CHROMIUM_NAMES := chromium chromium-browser google-chrome

browser:
	@for b in $$EMO_CHROMIUM $(CHROMIUM_NAMES); do command -v $$b >/dev/null && { echo "browser: $$(command -v $$b)"; exit 0; }; done; \
	command -v apt-get >/dev/null || { echo "make browser: no Chromium and no apt-get: install Chromium or set EMO_CHROMIUM"; exit 1; }; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null && \
	echo "browser: $$(command -v chromium)"

# Tokenised WebDataset shards of the bundled corpus (the tokenizer is committed: data/tokenizer.json).
data: $(SHARDS)/train/manifest.json $(SHARDS)/val/manifest.json

$(SHARDS)/%/manifest.json: | install
	$(BIN)/emo-data build-shards --input $(CORPUS)/$*/*.jsonl.gz --tokenizer $(TOKENIZER) \
		--out $(SHARDS)/$*

# All eight domains of ../shared/corpus (research-only: stays outside git).
data-shared: | install
	$(BIN)/emo-data build-shards --input $(SHARED_CORPUS)/train/*.jsonl.gz --tokenizer $(TOKENIZER) \
		--out $(SHARDS)/shared_train
	$(BIN)/emo-data build-shards --input $(SHARED_CORPUS)/val/*.jsonl.gz --tokenizer $(TOKENIZER) \
		--out $(SHARDS)/shared_val

# Multi-node: `make train NODES=2 GPUS=8 CONFIG=conf/experiment/emo_1b14b.yaml`, run on every node under
# torchrun or srun (scripts/launch/); Lightning's environment detection supplies ranks and the rendezvous.
NODES ?= 1
GPUS ?=
SCALE_ARGS := $(if $(GPUS),--trainer.num_nodes $(NODES) --trainer.devices $(GPUS),)

train: install data
	$(BIN)/emo fit --config $(CONFIG) $(SCALE_ARGS) $(ARGS)

train-baseline: install data
	$(BIN)/emo fit --config $(BASELINE_CONFIG) $(SCALE_ARGS) $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check emo_lightning data_tools tests benchmarks scripts
	$(BIN)/ruff format --check emo_lightning data_tools tests benchmarks scripts

format: install
	$(BIN)/ruff format emo_lightning data_tools tests benchmarks scripts
	$(BIN)/ruff check --fix emo_lightning data_tools tests benchmarks scripts

tensorboard: install
	$(BIN)/tensorboard --logdir runs

bench: install data
	$(BIN)/python -m benchmarks.run

# The CUDA path checked and measured in one run (< 8 min on one GPU; a short dry run on a CPU); exits non-zero on
# a failed check. No install step: on an air-gapped GPU node it runs with the node's python3 and torch plus the
# wheels of `make gpu-prepare` (GPU_CHECK_PYTHON=python3; docs/performance.md). GPU_CHECK_ARGS='--out DIR', '--dry',
# '--only correctness'.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=

gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# The scale question (issue 18): the standard MoE and EMO (running pools, each at its best LR) trained at d 512,
# 8 layers, 64 experts, ~50M tokens each, then the full-model gap, keep 25% / 12.5% rises and NMI, all in < 8 min
# on one GPU (a dry run on a CPU); results under benchmarks/results/scale_probe-*. Shards are built from the corpus
# when absent. SCALE_PROBE_ARGS='--tokens 1e8', '--lr-emo 6e-3', '--balance bias', '--dry' (docs/performance.md).
SCALE_PROBE_ARGS ?=

gpu-scale-probe:
	$(GPU_CHECK_PYTHON) -m benchmarks.scale_probe $(SCALE_PROBE_ARGS)

# What a bare GPU node (torch, lightning, torchmetrics, tensorboard, tokenizers; no network) needs besides the
# repository: the pure-Python wheels of the presets' parser (jsonargparse, its docstring/typeshed helpers, omegaconf)
# and of webdataset and braceexpand, and (scale probe) a copy of the research-only corpus inside the tree, ignored by
# git. Both are carried to the node (docs/performance.md, "Running on a GPU node").
GPU_WHEELS := jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 omegaconf==2.4.0 \
	webdataset==1.0.2 braceexpand==0.1.7

gpu-prepare: | install
	mkdir -p .whl
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)
	chmod -R u+w .scale_probe 2>/dev/null; rm -rf .scale_probe/corpus && mkdir -p .scale_probe/corpus
	cp -r $(SHARED_CORPUS)/train $(SHARED_CORPUS)/val .scale_probe/corpus/ && chmod -R u+w .scale_probe
	@du -sh .whl .scale_probe/corpus

gpu-scale-probe-prepare: gpu-prepare

clean:
	rm -rf $(SHARDS) runs .pytest_cache

# Install check of the distributed path: 2 CPU processes (gloo), DeepSpeed ZeRO-2, ep_size=2, 5 steps; resume for
# 2 more; consolidate the checkpoint and verify it (non-zero exit on any failure).
SMOKE := runs/smoke_distributed
SMOKE_ARGS := --config conf/experiment/emo_tiny.yaml --trainer conf/trainer/deepspeed_cpu.yaml \
	--experiment smoke_distributed --runs_dir runs --checkpoint.every_n_train_steps 5 \
	--trainer.val_check_interval 5 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 1 \
	--trainer.enable_progress_bar false

smoke-distributed: install data
	rm -rf $(SMOKE)
	$(BIN)/emo fit $(SMOKE_ARGS) --trainer.max_steps 5
	$(BIN)/emo fit $(SMOKE_ARGS) --trainer.max_steps 7 --ckpt_path last
	$(BIN)/python -m emo_lightning.checkpoint.deepspeed $(SMOKE)/checkpoints/last.ckpt $(SMOKE)/consolidated.ckpt \
		--expect-step 7
	@echo "smoke-distributed: OK"

# Modularity report (emo-experts): the tiny EMO and standard-MoE runs (trained by `make train` /
# `make train-baseline` unless they have a checkpoint; the newest last*.ckpt is used: a resumed run may write
# last-v1.ckpt), expert subsets chosen from 1 and 8 documents per domain of the bundled val split, evaluated on
# 50 others. Writes $(MODULARITY_OUT)/report.md, report.json and *.png.
.PHONY: modularity
MODULARITY_OUT ?= runs/modularity
EMO_RUN ?= runs/emo_tiny
STDMOE_RUN ?= runs/stdmoe_tiny
newest_ckpt = ls -t $(1)/checkpoints/last*.ckpt 2>/dev/null | head -n 1

modularity: install
	@test -n "$$($(call newest_ckpt,$(EMO_RUN)))" || $(MAKE) train
	@test -n "$$($(call newest_ckpt,$(STDMOE_RUN)))" || $(MAKE) train-baseline
	$(BIN)/emo-experts report --emo "$$($(call newest_ckpt,$(EMO_RUN)))" \
		--baseline "$$($(call newest_ckpt,$(STDMOE_RUN)))" --data $(CORPUS)/val \
		--keep 0.0625,0.125,0.25,0.5,1 --shots 1,8 --calib-docs 8 --eval-docs 50 --out $(MODULARITY_OUT)

# The expert explorer (emo-experts explore) of the same two runs: one self-contained HTML page (opens from disk, no
# network) of 100 documents of the bundled val split; with the loss rises `make modularity` measured, if it ran.
.PHONY: explore
EXPLORE_OUT ?= runs/explore.html

explore: install
	@test -n "$$($(call newest_ckpt,$(EMO_RUN)))" || $(MAKE) train
	@test -n "$$($(call newest_ckpt,$(STDMOE_RUN)))" || $(MAKE) train-baseline
	$(BIN)/emo-experts explore --emo "$$($(call newest_ckpt,$(EMO_RUN)))" \
		--baseline "$$($(call newest_ckpt,$(STDMOE_RUN)))" --data $(CORPUS)/val \
		$(if $(wildcard $(MODULARITY_OUT)/report.json),--report $(MODULARITY_OUT)) --out $(EXPLORE_OUT)
