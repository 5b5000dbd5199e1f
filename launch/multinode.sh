#!/usr/bin/env bash
# Start one process of a multi-node scas-jax run, without a scheduler. Run it on every
# node with the same coordinator and count and that node's rank:
#
#   node 0:  bash launch/multinode.sh --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0 -- \
#                scas-jax train --student /data/qwen3-1.7b --data sel.jsonl --output-dir /shared/run
#   node 1:  bash launch/multinode.sh --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 1 -- \
#                scas-jax train ... (the same command)
#
# The coordinator is node 0's address and a free port that every node can reach.
# Output paths must be on storage every node sees (a shared filesystem or gs://):
# checkpoints are written collectively, other files by process 0 only.
set -euo pipefail
coordinator="" count="" rank=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --coordinator) coordinator=$2; shift 2 ;;
    --num-processes) count=$2; shift 2 ;;
    --process-id) rank=$2; shift 2 ;;
    *) echo "multinode.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -n "$coordinator" && -n "$count" && -n "$rank" ]] ||
  { echo "multinode.sh: give --coordinator HOST:PORT --num-processes N --process-id I -- CMD" >&2; exit 2; }
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "multinode.sh: no command after --" >&2; exit 2; }
export SCAS_JAX_COORDINATOR="$coordinator" SCAS_JAX_NUM_PROCESSES="$count" SCAS_JAX_PROCESS_ID="$rank"
exec "$@"
