#!/usr/bin/env bash
# scas-jax on a Cloud TPU pod slice (TPU VM): install the project on every worker, then
# run the same command on every worker. SCAS_JAX_CLUSTER=auto lets jax find the other
# workers (and process 0, the coordinator) through the TPU VM's metadata.
#
#   bash launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a [--project P] [--setup] -- \
#       scas-jax score --student gs://bucket/qwen3-8b --candidate-dir gs://bucket/pool \
#       --output-dir /tmp/scores --mesh data=-1
#
# --setup copies this checkout to every worker and runs launch/setup.sh there first.
# Checkpoints and outputs should live on gs:// (every worker sees them); JSONL outputs
# are written by process 0 only, into its local --output-dir unless that is shared.
set -euo pipefail
tpu="" zone="" project="" setup=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --setup) setup=1; shift ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: give --tpu NAME --zone ZONE [-- CMD]" >&2; exit 2; }
[[ "${1:-}" == "--" ]] && shift
extra=(--zone "$zone")
[[ -n "$project" ]] && extra+=(--project "$project")
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" "${extra[@]}" --worker=all --command "$1"; }

if (( setup )); then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  tar -C "$here" --exclude=runs --exclude=.git -czf /tmp/scas_jax_src.tgz .
  gcloud compute tpus tpu-vm scp /tmp/scas_jax_src.tgz "$tpu":/tmp/ "${extra[@]}" --worker=all
  ssh_all "mkdir -p ~/scas_jax && tar -C ~/scas_jax -xzf /tmp/scas_jax_src.tgz && cd ~/scas_jax && \
           pip install -q 'jax[tpu]' && bash launch/setup.sh"
fi
if [[ $# -gt 0 ]]; then
  printf -v cmd '%q ' "$@"
  ssh_all "cd ~/scas_jax && export PATH=\$HOME/.local/bin:\$PATH SCAS_JAX_CLUSTER=auto && $cmd"
fi
