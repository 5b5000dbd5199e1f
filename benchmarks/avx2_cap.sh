#!/usr/bin/env bash
# Run a benchmark as if on an AVX2+FMA CPU (no AVX-512), both programs capped alike:
#   bash benchmarks/avx2_cap.sh python benchmarks/bench_score.py command --questions 50
#
# XLA (jax 0.10.2): `--xla_cpu_max_isa=AVX2` caps XLA's own code generation, but its dots
# run through YNNPACK, which picks AVX-512 kernels from the CPU whatever the cap says;
# with the YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`, empty) the dots
# go to the oneDNN GEMM inside Eigen's contraction, which obeys ONEDNN_MAX_CPU_ISA.
# Measured on the AMD EPYC Zen 5 build machine, 2048^2 float32 matmul, best of 10:
# 477 GFLOP/s uncapped, 478 with only max_isa (no cap), 433 with YNNPACK off,
# 219 with this file's settings.
# PyTorch: ATEN_CPU_CAPABILITY caps ATen's vectorised kernels, ONEDNN_MAX_CPU_ISA its
# oneDNN ones, MKL_ENABLE_INSTRUCTIONS its MKL GEMM (on AMD CPUs MKL already runs its
# AVX2 path: 224 GFLOP/s either way).
# A real AVX2 machine would run YNNPACK's AVX2 kernels, not oneDNN's: a capped row is an
# emulation and is labelled as one in docs/benchmarks.md.
set -euo pipefail
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type="
export ONEDNN_MAX_CPU_ISA=AVX2
export ATEN_CPU_CAPABILITY=avx2
export MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
