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
# Layout of a 1T-token build (numbers from `make bench`, data_build, docs/performance.md):
#   * rate: one process tokenises ~0.5M tokens/s from compressed files to shards (measured: 0.49M with this
#     project's 4k-vocabulary BPE on a 2-core EPYC; a 128k-vocabulary BPE is of the same order per token);
#     2 processes give ~1.9x one, and tasks share nothing, so the rate adds up over processes and nodes.
#   * 1T tokens = 2.0M process-seconds = 560 process-hours.
#   * TASKS=2000 (fewer tasks than input files: FineWeb, Dolma and RedPajama come in thousands of files):
#     500M tokens per task, ~17 min each; auto shard size gives 4 shards of 128M tokens per task (8000 shards,
#     256 MB each with uint16 ids, 512 MB with uint32), >> ranks x loader workers of any run.
#   * WORKERS=1600 array tasks at once (8 nodes x 200 cores, as the EMO authors tokenise): 2 waves,
#     ~35-40 min wall time plus queueing; 4 nodes x 100 cores: 5 waves, ~1.5 h.
#   * per task: 1 CPU, 2 GB of memory, ~2-3 GB of node-local scratch (--tmp-dir, default /tmp for a URL
#     output, or $OUT/.build for a shared-filesystem output).
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
