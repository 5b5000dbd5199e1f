"""The machine a benchmark ran on, described the same way by every script here:
CPU model and family, the widest vector ISA it has, any ISA cap in force
(``benchmarks/avx2_cap.sh``), cores and threads per core, and the load average."""

from __future__ import annotations

import os
import platform

# What benchmarks/avx2_cap.sh sets; any of them in the environment means a capped run.
CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip()] = v.strip()
    except OSError:
        pass
    return fields


def _threads_per_core(info: dict[str, str]) -> int | None:
    try:
        return int(info["siblings"]) // int(info["cpu cores"])
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def cap() -> str:
    """The ISA cap in force (XLA flags and the PyTorch/oneDNN/MKL variables), or ''."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "max_isa" in f or "ynn_fusion" in f]
    flags += [f"{k}={os.environ[k]}" for k in CAP_VARS if k in os.environ]
    return " ".join(flags)


def describe() -> dict:
    """``{cpu, family, isa, cap, cores, threads_per_core, load}`` of this machine."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "family": info.get("cpu family"), "isa": isa, "cap": cap(),
            "cores": os.cpu_count(), "threads_per_core": _threads_per_core(info),
            "load": list(os.getloadavg())}


def one_line() -> str:
    """``describe()`` as one line: 'AMD EPYC (family 26), AVX-512, 2 cores'."""
    d = describe()
    capped = f" capped to AVX2 ({d['cap']}; benchmarks/avx2_cap.sh)" if d["cap"] else ""
    return f"{d['cpu']} (family {d['family']}), {d['isa']}{capped}, {d['cores']} cores"
