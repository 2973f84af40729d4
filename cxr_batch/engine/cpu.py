"""Facts about the host CPU: how many cores this process may use, its model name and the
instruction-set flags that decide whether int8 is both exact and fast on it.

Read once per process (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, :mod:`platform` elsewhere)
and cached. Only the standard library: ``cxr-batch --help`` may import this.

Why the flags matter (measured in ``benchmarks/RESULTS.md``): onnxruntime runs U8S8 int8
convolutions with 8-bit dot-product instructions where the CPU has them (x86 AVX512_VNNI or
AVX_VNNI, AMX, ARM's dot product). Without them (AVX2, AVX-512 without VNNI) it multiplies
through ``vpmaddubsw``, whose int16 intermediate saturates, and is no faster than fp32 on a
compute-bound ResNet-18. So ``--precision auto`` takes int8 only where those instructions are.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Override the detected ISA flags (comma- or space-separated, e.g. ``avx2,avx512_vnni``; empty
#: means none): for tests, and for a machine whose flags are hidden (some VMs and containers).
CPU_FLAGS_ENV = "CXR_BATCH_CPU_FLAGS"

#: The flags reported, in this order. Linux's names (``/proc/cpuinfo``); macOS's are mapped onto them.
RELEVANT_FLAGS: tuple[str, ...] = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "asimddp",
)
#: Any one of these makes int8 exact and faster than fp32 (8-bit dot products in hardware).
INT8_FLAGS: dict[str, str] = {
    "avx512_vnni": "AVX512_VNNI",
    "avx_vnni": "AVX_VNNI",
    "amx_int8": "AMX-INT8",
    "asimddp": "the ARM dot-product instructions (asimddp)",
}
#: What ``--precision auto`` takes, in one sentence: the one text of the rule, used by ``--help`` and
#: quoted verbatim in the README's option table (a test checks both).
PRECISION_AUTO_RULE = (
    "auto = fp16 on CUDA (when installed); on a CPU, int8 only where the CPU has 8-bit dot products "
    "(VNNI, AMX, ARM dot product), fp32 elsewhere"
)
_ALIASES = {
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "dotprod": "asimddp",
    "feat_dotprod": "asimddp",
    "amx-int8": "amx_int8",
    "amx-tile": "amx_tile",
}


@dataclass(frozen=True)
class CpuFacts:
    """The host CPU as :func:`cpu_facts` found it."""

    model: str
    arch: str
    #: the :data:`RELEVANT_FLAGS` the CPU has
    flags: tuple[str, ...]
    #: where the flags came from: "/proc/cpuinfo", "sysctl", "$CXR_BATCH_CPU_FLAGS" or "unknown"
    source: str

    @property
    def int8_flag(self) -> str | None:
        """The first flag that makes int8 worth it, if any."""
        return next((f for f in INT8_FLAGS if f in self.flags), None)

    def describe(self) -> str:
        """``AMD EPYC 7B13 (x86_64; avx2)``: one line for summaries and benchmark tables."""
        flags = ", ".join(self.flags) or "none of " + "/".join(RELEVANT_FLAGS)
        where = "" if self.source in ("/proc/cpuinfo", "sysctl") else f", flags from {self.source}"
        return f"{self.model} ({self.arch}; {flags}{where})"

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "arch": self.arch, "flags": list(self.flags), "source": self.source}


def _normalise(names: list[str]) -> tuple[str, ...]:
    found = {_ALIASES.get(n.lower(), n.lower()) for n in names}
    return tuple(f for f in RELEVANT_FLAGS if f in found)


def _from_proc(text: str) -> tuple[str, list[str]]:
    """Model name and flags of the first processor in ``/proc/cpuinfo`` text (x86 or ARM)."""
    model = ""
    flags: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if flags and model:
                break  # the first processor's block is enough
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.split()
    return model, flags


def _sysctl(name: str) -> str:
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _detect() -> tuple[str, list[str], str]:
    system = platform.system()
    if system == "Linux":
        try:
            model, flags = _from_proc(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
            return model, flags, "/proc/cpuinfo"
        except OSError:
            pass
    elif system == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        if platform.machine() == "arm64":
            flags = ["asimddp"] if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else []
        else:
            # upper-case names (AVX2, AVX512F, AVX512VNNI), mapped by _normalise
            flags = (_sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")).split()
        if model:
            return model, flags, "sysctl"
    return platform.processor() or "", [], "unknown"


@functools.lru_cache(maxsize=4)
def _facts(override: str | None) -> CpuFacts:
    model, flags, source = _detect()
    if override is not None:
        flags, source = override.replace(",", " ").split(), f"${CPU_FLAGS_ENV}"
    return CpuFacts(
        model=model or platform.processor() or "unknown CPU",
        arch=platform.machine() or "unknown",
        flags=_normalise(flags),
        source=source,
    )


def cpu_facts() -> CpuFacts:
    """The host CPU (read once; ``$CXR_BATCH_CPU_FLAGS`` replaces the detected flags)."""
    return _facts(os.environ.get(CPU_FLAGS_ENV))


def int8_choice(facts: CpuFacts | None = None) -> tuple[bool, str]:
    """Whether ``--precision auto`` should take int8 on this CPU, and why (one sentence)."""
    facts = facts or cpu_facts()
    flag = facts.int8_flag
    if flag is not None:
        return True, f"int8: {facts.model} has {INT8_FLAGS[flag]} (8-bit dot products, exact and about 3x fp32)"
    return False, (
        f"fp32: {facts.model} has no VNNI, AMX or ARM dot-product instructions "
        f"(flags: {', '.join(facts.flags) or 'none relevant'}), where int8 is neither faster nor as exact"
    )


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask: a container's cpuset, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int | None:
    """Physical cores among :func:`usable_cpus` (SMT siblings counted once); None when unknown."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: onnxruntime's own default counts physical cores
        return None
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or None


def default_workers() -> int:
    """Decoder threads: one per CPU this process may use, at most 8."""
    return max(1, min(8, usable_cpus()))


def cpu_summary() -> dict[str, object]:
    """The CPU facts and the int8 decision, as recorded by exports and benchmarks."""
    facts = cpu_facts()
    use_int8, reason = int8_choice(facts)
    return {
        **facts.as_dict(),
        "cores_usable": usable_cpus(),
        "auto_cpu_precision": "int8" if use_int8 else "fp32",
        "why": reason,
    }


__all__ = [
    "CPU_FLAGS_ENV",
    "PRECISION_AUTO_RULE",
    "CpuFacts",
    "cpu_facts",
    "cpu_summary",
    "default_workers",
    "int8_choice",
    "physical_cores",
    "usable_cpus",
]
