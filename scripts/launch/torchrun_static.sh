#!/usr/bin/env bash
# Static torchrun launch: run this on EVERY node with the same MASTER_ADDR and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 CONFIG=conf/experiment/emo_1b14b.yaml scripts/launch/torchrun_static.sh
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; Lightning's TorchElasticEnvironment picks them up (no
# home-made rendezvous). --trainer.num_nodes/--trainer.devices must match NNODES/GPUS (Lightning checks it).
set -euo pipefail
: "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
GPUS=${GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-conf/experiment/emo_1b14b.yaml}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
exec .venv/bin/torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m emo_lightning.cli fit --config "$CONFIG" --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" "$@"
