"""What machine a benchmark ran on, named the same way in every JSON under benchmarks/results/."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """'AVX-512 with bfloat16', 'AVX-512', 'AVX2' or '' (the kinds the README names figures by)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    if " avx512f" in flags:
        return "AVX-512 with bfloat16" if "avx512_bf16" in flags else "AVX-512"
    return "AVX2" if " avx2" in flags else ""


if __name__ == "__main__":
    print(cpu_name(), f"({cpu_flags()})" if cpu_flags() else "")
