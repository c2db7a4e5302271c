"""Facts read off a compiled kernel (its TTGIR and PTX) for kernels/compile_check.py: what a performance review
looks for first, without a GPU.

- ``mma_kind``: "wgmma" (sm_90 warpgroup MMA), "mma.sync" (sm_80-style per-warp MMA), "fma" (a dot on CUDA
  cores) or "-" (no dot).
- ``widest_load``: the widest global read per thread in bytes and how (``ld`` / ``cp.async`` / ``tma``); 16 is
  a full 128-bit access.
- ``dot_rows``: per dot, its rows (M) and the rows its warps along M compute (warpsPerCTA[0] x 16: a warp's
  mma.sync and a warpgroup's wgmma each cover 16 rows per warp). More warp rows than M means warps compute the
  same rows: on sm_90 a 64-row tile with 8 warps had both warpgroups run the whole QK^T and softmax.
- ``programs_per_sm``: resident programs per SM from registers, shared memory and warps (the CUDA occupancy
  rules: registers allocated per warp in units of 256, 1 KB of shared memory reserved per block).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Per-SM limits (CUDA programming guide, "Technical Specifications per Compute Capability").
SM_LIMITS = {  # cap: (registers, shared bytes, max warps, max blocks)
    80: (65536, 167936, 64, 32), 86: (65536, 102400, 48, 16), 87: (65536, 167936, 48, 16),
    89: (65536, 102400, 48, 24), 90: (65536, 233472, 64, 32),
}
_RESERVED_SHARED = 1024


def programs_per_sm(cap: int, regs: int, shared: int, num_warps: int) -> int:
    reg_file, smem, max_warps, max_blocks = SM_LIMITS.get(cap, SM_LIMITS[86])
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = reg_file // (per_warp * num_warps)
    by_smem = smem // (shared + _RESERVED_SHARED)
    return max(0, min(max_blocks, max_warps // num_warps, by_regs, by_smem))


def mma_kind(ptx: str, ttgir: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    if re.search(r"\b(tt\.dot|ttng\.warp_group_dot)\b", ttgir):
        return "fma"
    return "-"


_LD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*"
                       r"(0x[0-9a-fA-F]+|\d+)")


def widest_load(ptx: str) -> tuple[int, str]:
    """(bytes, how) of the widest global read per thread, ``how`` naming every way it is read at that width
    ("ld", "cp.async", "tma", joined by "+"); (0, "-") when the kernel reads nothing."""
    widths: dict[str, int] = {}
    for m in _LD.finditer(ptx):
        mods = m.group(1).split(".")
        vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
        bits = next((int(x[1:]) for x in reversed(mods) if re.fullmatch(r"[bfsu]\d+", x)), 0)
        widths["ld"] = max(widths.get("ld", 0), vec * bits // 8)
    for m in _CP_ASYNC.finditer(ptx):
        widths["cp.async"] = max(widths.get("cp.async", 0), int(m.group(1), 0))
    if "cp.async.bulk.tensor" in ptx:
        widths["tma"] = 16
    if not widths:
        return 0, "-"
    top = max(widths.values())
    return top, "+".join(k for k, w in widths.items() if w == top)


@dataclass(frozen=True)
class DotRows:
    rows: int  # M of the dot's result
    warp_rows: int  # rows the warps along M compute: warpsPerCTA[0] x 16
    version: int  # 3: wgmma, 2: mma.sync

    @property
    def duplicated(self) -> bool:
        return self.warp_rows > self.rows

    def describe(self) -> str:
        """Useful rows per warpgroup (wgmma) or per warp (mma.sync)."""
        if self.version == 3:
            groups = max(1, self.warp_rows // 64)
            return f"{min(self.rows, 64 * groups) // groups}/wg"
        warps = max(1, self.warp_rows // 16)
        return f"{min(self.rows, 16 * warps) // warps}/w"


_LAYOUT = re.compile(r"^#(\w+)\s*=\s*#ttg\.nvidia_mma<\{([^}]*)\}>", re.M)
_DOT = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b[^\n]*->\s*tensor<(\d+)x(\d+)x\w+,\s*#(\w+)>")


def dot_rows(ttgir: str) -> list[DotRows]:
    """One entry per tensor-core dot in the TTGIR (dots on CUDA cores have no mma layout and are skipped)."""
    layouts = {}
    for m in _LAYOUT.finditer(ttgir):
        body = m.group(2)
        wpc = re.search(r"warpsPerCTA\s*=\s*\[(\d+)", body)
        ver = re.search(r"versionMajor\s*=\s*(\d+)", body)
        if wpc and ver:
            layouts[m.group(1)] = (int(wpc.group(1)), int(ver.group(1)))
    out = []
    for m in _DOT.finditer(ttgir):
        if m.group(3) in layouts:
            wm, ver = layouts[m.group(3)]
            out.append(DotRows(int(m.group(1)), wm * 16, ver))
    return out
