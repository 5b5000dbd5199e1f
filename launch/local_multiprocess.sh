#!/usr/bin/env bash
# Run one command as N processes of one multi-process JAX job on this machine (what the
# tests use; also a quick way to try a pod's code path on a laptop).
#
#   bash launch/local_multiprocess.sh N [--devices-per-process D] [--port P] -- CMD ARGS...
#   e.g. bash launch/local_multiprocess.sh 2 -- scas-jax score --student smollm2 ...
#
# Every process gets SCAS_JAX_COORDINATOR=localhost:P, SCAS_JAX_NUM_PROCESSES=N and its
# SCAS_JAX_PROCESS_ID; on CPU each gets D devices (JAX_NUM_CPU_DEVICES, default 2).
# Output is prefixed with "[i] ". If one process fails, the others are stopped; the exit
# status is the first failure's (0 when all succeed).
set -uo pipefail
n=${1:?usage: local_multiprocess.sh N [--devices-per-process D] [--port P] -- CMD...}
shift
per=2
port=$(( 20000 + RANDOM % 20000 ))
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices-per-process) per=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "local_multiprocess.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "${1:-}" == "--" ]] || { echo "local_multiprocess.sh: expected -- before the command" >&2; exit 2; }
shift
[[ $# -gt 0 ]] || { echo "local_multiprocess.sh: no command" >&2; exit 2; }

pids=()
for ((i = 0; i < n; i++)); do
  SCAS_JAX_COORDINATOR="localhost:${port}" SCAS_JAX_NUM_PROCESSES="$n" SCAS_JAX_PROCESS_ID="$i" \
    JAX_NUM_CPU_DEVICES="$per" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

status=0
active=("${pids[@]}")
while (( ${#active[@]} > 0 )); do
  finished=""
  wait -n -p finished "${active[@]}"
  rc=$?
  [[ -n "$finished" ]] || break
  rest=()
  for p in "${active[@]}"; do [[ "$p" == "$finished" ]] || rest+=("$p"); done
  active=("${rest[@]}")
  if (( rc != 0 && status == 0 )); then
    status=$rc
    for p in "${active[@]}"; do kill "$p" 2>/dev/null; done
  fi
done
wait
exit "$status"
