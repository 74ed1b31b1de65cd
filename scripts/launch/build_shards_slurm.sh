#!/usr/bin/env bash
# Tokenise a pretraining corpus into WebDataset shards on a Slurm cluster. Run it on a login node, in the
# project's virtualenv: datatrove submits a job array of TASKS tasks (one CPU each) and, after them, one job that
# writes manifest.json, then this script returns. Logs: $OUT/.build/tokenize/logs/ and slurm_logs/.
# A task that fails (or a job that is preempted) is rerun by running the same command again: finished tasks are
# kept. Progress: `squeue -u $USER`; the build is done when $OUT/manifest.json exists.
#
#   scripts/launch/build_shards_slurm.sh 's3://bucket/dolma/**/*.json.gz' s3://bucket/shards/dolma tokenizer.json \
#       --domain-field metadata.source
#   TASKS=200 PARTITION=cpu scripts/launch/build_shards_slurm.sh /lustre/fineweb/data /lustre/shards/fineweb \
#       tokenizer.json --domain-from-path '/data/(?P<domain>[^/]+)/'
#
# Layout of a 1T-token build (rates from `make bench`, data_build; docs/performance.md):
#   * rate: one process turns 0.79M tokens per CPU-second from files into shards (this project's 4k-vocabulary
#     BPE, one core of a Xeon VM; 0.84x a bare tokenizers encode_batch_fast of the same text). Tasks share
#     nothing, so the rate adds up over processes and nodes. It depends on the tokenizer: time one task of your
#     corpus first (--tasks 1 on a sample) and scale the numbers below.
#   * 1T tokens = 1.27M process-seconds = 350 process-hours.
#   * TASKS=2000 (fewer tasks than input files: FineWeb, Dolma and RedPajama come in thousands of files, shared out
#     by size): 500M tokens per task, ~11 min each; --shard-size auto gives 4 shards of <= 128M tokens per task,
#     8000 shards in all (256 MB each with uint16 ids, 512 MB with uint32), >> ranks x loader workers of any run.
#   * WORKERS=1600 array tasks at once (8 nodes x 200 cores, as the EMO authors tokenise): 2 waves, ~25 min of
#     wall time plus queueing, then the manifest job (seconds); 4 nodes x 100 cores: 5 waves, ~1 h.
#   * per task: 1 CPU, 2 GB of memory, 1-2 GB of node-local scratch (--tmp-dir; 2-4 bytes per token of the task).
set -euo pipefail
INPUT=${1:?usage: $0 INPUT OUT [TOKENIZER] [more emo-data build-shards options]}
OUT=${2:?usage: $0 INPUT OUT [TOKENIZER] [more emo-data build-shards options]}
TOKENIZER=${3:-data/tokenizer.json}
shift $(($# < 3 ? $# : 3))
TASKS=${TASKS:-2000}
WORKERS=${WORKERS:-1600}
PARTITION=${PARTITION:-cpu}
TIME=${TIME:-04:00:00}
emo-data build-shards --input "$INPUT" --tokenizer "$TOKENIZER" --out "$OUT" \
  --tasks "$TASKS" --executor slurm --partition "$PARTITION" --workers "$WORKERS" --time "$TIME" \
  --cpus-per-task 1 --mem-per-cpu-gb 2 --tmp-dir "${TMPDIR:-/tmp}" --job-name emo-data "$@"
