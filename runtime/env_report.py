"""``qwen2-triton env``: the device, the library versions, and the kernel choices made for it and why."""
from __future__ import annotations

import argparse
import platform

import torch

# Shapes the report walks through when no --model is given: (name, hidden, intermediate, heads, kv heads, head_dim)
SEED_SHAPES = [("Qwen2-0.5B", 896, 4864, 14, 2, 64), ("Qwen2-1.5B", 1536, 8960, 12, 2, 128),
               ("Qwen2-7B", 3584, 18944, 28, 4, 128), ("Qwen1.5-4B", 2560, 6912, 20, 20, 128)]


def describe_device(device: torch.device) -> list[str]:
    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:  # pragma: no cover - triton is a dependency
        lines.append("triton: not installed")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.0f} GiB; bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append(f"device: CPU ({platform.machine()}, {torch.get_num_threads()} torch threads); "
                     "no CUDA device, so kernels='auto' picks the plain-torch backend")
    return lines


def describe_choices(device: torch.device, dtype: torch.dtype, shapes=SEED_SHAPES) -> list[str]:
    from qwen2_triton.kernels import launch

    sm = launch.sm_count_of(device)
    lines = [f"kernels: {'triton' if device.type == 'cuda' else 'torch (the Triton kernels need CUDA or TRITON_INTERPRET=1)'}"
             f", dtype {str(dtype).replace('torch.', '')}"]
    for name, hidden, inter, heads, kv, hd in shapes:
        pre = launch.prefill_config(hd, dtype)
        dec = launch.decode_config(hd, dtype, heads // kv)
        lines.append(
            f"  {name:11s} rmsnorm BLOCK={launch.rmsnorm_config(hidden).BLOCK} | swiglu BLOCK="
            f"{launch.swiglu_config(inter).BLOCK} | prefill {pre.BLOCK_M}x{pre.BLOCK_N} w{pre.num_warps} | decode "
            f"group {heads // kv} in {dec.BLOCK_M} rows, BLOCK_N={dec.BLOCK_N} | splits at batch 1 x 32k: "
            f"{launch.num_kv_splits(1, kv, 32768, sm)}, batch 64 x 4k: {launch.num_kv_splits(64, kv, 4096, sm)}")
    lines.append("  (why: see the docstrings of kernels/launch.py; registers and spills: qwen2-triton kernels check)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen2-triton env")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args(argv)
    from qwen2_triton.runtime.device import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    if device.type == "cpu" and a.dtype == "auto":
        dtype = torch.bfloat16  # show what a GPU serving run would use
    print("\n".join(describe_device(device) + describe_choices(device, dtype)))
    return 0
