#!/usr/bin/env bash
# Elastic-rendezvous torchrun launch (c10d backend): run on every node with the same RDZV_ENDPOINT and RDZV_ID;
# node ranks are assigned by the rendezvous.
#   NNODES=16 RDZV_ENDPOINT=node0:29400 RDZV_ID=emo1b14b GPUS=8 scripts/launch/torchrun_rdzv.sh
# A fixed node count (min = max) keeps the expert placement (ep_size) valid; resume after a failure with
# --ckpt_path last (the same world size and ep_size).
set -euo pipefail
: "${NNODES:?}" "${RDZV_ENDPOINT:?}"
GPUS=${GPUS:-8}
RDZV_ID=${RDZV_ID:-emo}
CONFIG=${CONFIG:-conf/experiment/emo_1b14b.yaml}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
  -m emo_lightning.cli fit --config "$CONFIG" --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" "$@"
