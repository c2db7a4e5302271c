"""``qwen2-triton env``: the device, the library versions, and the kernel choices made for it and why.

    qwen2-triton env                     # this machine's device, the seed models' shapes
    qwen2-triton env --arch sm_86        # what an sm_86 GPU (A10-like) would get, without one
    qwen2-triton env --model DIR|GGUF    # one checkpoint's shape
    qwen2-triton env --tune              # on a GPU: time the attention (and --model's quantized linear)
                                         # candidates now and cache the choices
    qwen2-triton env --tensor-parallel-size 4   # what each of 4 GPUs would hold (default: the GPUs visible)
"""
from __future__ import annotations

import argparse
import platform

import torch

from qwen2_triton.kernels import launch
from qwen2_triton.runtime.kernel_plan import AttentionShape, DeviceInfo, choose_dtype, choose_kernels, \
    attention_keys, plan_kernels
from qwen2_triton.runtime.tuning import TuningCache, config_label

# Shapes the report walks through when no --model is given: (name, hidden, intermediate, heads, kv heads, head_dim)
SEED_SHAPES = [("Qwen2-0.5B", 896, 4864, 14, 2, 64), ("Qwen2-1.5B", 1536, 8960, 12, 2, 128),
               ("Qwen2-7B", 3584, 18944, 28, 4, 128), ("Qwen1.5-4B", 2560, 6912, 20, 20, 128)]
BLOCK_SIZE = 16  # the LLM's default KV page


def versions() -> str:
    import triton

    return f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"


def describe_shapes(info: DeviceInfo, dtype: torch.dtype, shapes, cache: TuningCache, tune_now: bool,
                    device: torch.device | None = None) -> list[str]:
    """Per model shape: the row-kernel settings, the decode split counts, and the attention tiles with their
    source (tuned now, cached for this GPU, or the heuristic)."""
    lines = []
    for name, hidden, inter, heads, kv, hd in shapes:
        shape = AttentionShape(heads, kv, hd, BLOCK_SIZE)
        plan = plan_kernels(info, dtype, "triton", shape, tune_now=tune_now, cache=cache, device=device)
        candidates = plan.candidates
        tiles = []
        for kernel, key in attention_keys(info, dtype, shape).items():
            result = getattr(plan, kernel)
            cached = cache.get(key) if info.type == "cuda" and not tune_now else None
            cached = cached if cached in candidates[kernel] else None  # a stale entry: LLM would tune again
            source = (f"cached for this GPU in {cache.path}" if cached else
                      "tuned now" if result.source == "tuned" else
                      "from the cache" if result.source == "cache" else
                      "one config for float32" if dtype == torch.float32 else "heuristic until tuned for this GPU")
            tiles.append(f"{kernel} {config_label(cached or result.config)} [{source}; "
                         f"{len(candidates[kernel])} candidates]")
        sm = info.sm_count
        lines.append(f"  {name:11s} rmsnorm BLOCK={launch.rmsnorm_config(hidden).BLOCK} | swiglu BLOCK="
                     f"{launch.swiglu_config(inter).BLOCK} | " + " | ".join(tiles) +
                     f" | splits at batch 1 x 32k: {launch.num_kv_splits(1, kv, 32768, sm)}, "
                     f"batch 64 x 4k: {launch.num_kv_splits(64, kv, 4096, sm)}")
    lines.append("  (why: runtime/kernel_plan.py and the docstrings of kernels/launch.py; registers, spills and "
                 "shared memory of every candidate: qwen2-triton kernels check)")
    return lines


def describe_quant(info: DeviceInfo, dtype: torch.dtype, shapes, cache: TuningCache, tune_now: bool,
                   device: torch.device | None = None) -> list[str]:
    """Per quantized weight shape of the checkpoint (runtime/quant_tuning.py): the decode, small and prefill launch
    configs with their source, as the attention tiles above."""
    from qwen2_triton.kernels.quant_linear import QuantConfig
    from qwen2_triton.runtime.quant_tuning import plan_quant, quant_key

    results, cands = plan_quant(info, dtype, dict.fromkeys(shapes), tune_now=tune_now, cache=cache, device=device)
    lines, by_shape = [], {}
    for (shape, launch), r in results.items():
        cached = cache.get(quant_key(info, dtype, shape, launch), QuantConfig) \
            if info.type == "cuda" and not tune_now else None
        cached = cached if cached in cands[shape, launch] else None
        cfg = cached or r.config
        source = (f"cached for this GPU in {cache.path}" if cached else "tuned now" if r.source == "tuned" else
                  "from the cache" if r.source == "cache" else
                  "one config for float32" if dtype == torch.float32 else "heuristic until tuned for this GPU")
        if cfg == cands[shape, launch][0] and "heuristic" not in source:
            source += ": the heuristic's"
        by_shape.setdefault(shape, []).append(f"{launch} {config_label(cfg)} [{source}; "
                                              f"{len(cands[shape, launch])} candidates]")
    lines.append("  quantized linears (BLOCK_M x BLOCK_N x BLOCK_K / SPLIT_K, warps, stages; decode M=1 for <= 8 "
                 "rows, small M=32 for 9-32, prefill M=256; one process):")
    lines += [f"  {shape.kernel} {shape.describe()}: " + " | ".join(parts) for shape, parts in by_shape.items()]
    return lines


# vocabulary rows of the seed shapes (the report's other columns do not need them; the parallel layout does)
SEED_VOCAB = {"Qwen2-7B": 152064}


def parallel_lines(world: int, shapes, dtype: torch.dtype, model_cfg=None) -> list[str]:
    """The tensor-parallel layout at ``world`` ranks for each shape (runtime/tp_driver.py forms the group)."""
    from qwen2_triton.model.config import Qwen2Config
    from qwen2_triton.model.sharding import layout

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [f"tensor parallel at --tensor-parallel-size {world}, {str(dtype).replace('torch.', '')} ({gpus} GPU(s) "
             f"visible; NCCL between GPUs, gloo on CPU; torchrun for several machines):"]
    size = torch.empty((), dtype=dtype).element_size()
    for name, hidden, inter, heads, kv, hd in shapes:
        cfg = model_cfg or Qwen2Config(SEED_VOCAB.get(name, 151936), hidden, inter, 1, heads, kv, hd, 32768)
        lines.append(f"  {name:11s} {layout(cfg, world, size)}")
    return lines


def _model_shape(path: str):
    """[(name, hidden, intermediate, heads, kv heads, head_dim)] of a checkpoint, from its config only."""
    import os

    from qwen2_triton.model.config import Qwen2Config
    from qwen2_triton.model.loader import is_gguf_file

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        cfg = Qwen2Config.from_file(os.path.join(path, "config.json"))
    elif is_gguf_file(path):
        from qwen2_triton.model.gguf_loader import load_gguf  # tensors load lazily: this reads the metadata

        cfg = Qwen2Config.from_dict(load_gguf(path, progress=False).config, source=path)
    else:
        raise ValueError(f"{path} is neither a checkpoint directory (config.json + safetensors) nor a GGUF file")
    return [(os.path.basename(os.path.normpath(path)), cfg.hidden_size, cfg.intermediate_size,
             cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)]


def main(argv=None) -> int:
    # The module docstring is the help: its first line once as the description, its examples as the epilog.
    summary, _, examples = __doc__.partition("\n\n")
    summary = summary.split(": ", 1)[1]
    ap = argparse.ArgumentParser(prog="qwen2-triton env", description=summary[0].upper() + summary[1:],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + examples.rstrip())
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    ap.add_argument("--arch", default=None, help="report for an assumed GPU of this capability, e.g. sm_86")
    ap.add_argument("--dtype", default="auto", help="auto (default) | bfloat16 | float16 | float32")
    ap.add_argument("--model", default=None, help="checkpoint directory or GGUF file whose shape to report")
    ap.add_argument("--tune", action="store_true",
                    help="on a GPU, tune the attention tiles and --model's quantized linears now (cached on disk)")
    ap.add_argument("--tuning-cache", default=None, help="tuning cache file (default ~/.cache/qwen2_triton)")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                    help="report the layout over N GPUs (default: the GPUs visible, at least 2)")
    a = ap.parse_args(argv)
    from qwen2_triton.runtime.device import resolve_device

    device = None
    if a.arch is not None:
        if a.tune:
            ap.error("--tune times kernels on this machine's GPU; it cannot go with an assumed --arch")
        try:
            info = DeviceInfo.assume(a.arch)
        except ValueError:
            ap.error(f"--arch must look like sm_80, sm_86, sm_90; got {a.arch!r}")
    else:
        device = resolve_device(a.device)
        info = DeviceInfo.of(device)
    if a.tune and info.type != "cuda":
        ap.error("--tune needs a CUDA device")
    dtype, why_dtype = choose_dtype(a.dtype, info)
    kernels, why_kernels = choose_kernels("auto", info)
    lines = [versions(), info.describe(), why_kernels, why_dtype]
    if a.model:
        from qwen2_triton.model.quantization import describe_quantization

        lines += [line for line in (describe_quantization(a.model),) if line]
    shapes = _model_shape(a.model) if a.model else SEED_SHAPES
    world = a.tensor_parallel_size or max(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if world < 1:
        ap.error(f"--tensor-parallel-size must be >= 1, got {world}")
    from qwen2_triton.model.loader import read_config

    lines += parallel_lines(world, shapes, dtype, read_config(a.model) if a.model else None)
    if kernels != "triton":
        if info.type == "cpu":
            lines.append("(the Triton choices a GPU would get: qwen2-triton env --arch sm_90)")
        print("\n".join(lines))
        return 0
    cache = TuningCache(a.tuning_cache)
    lines += describe_shapes(info, dtype, shapes, cache, a.tune, device)
    if a.model:
        from qwen2_triton.runtime.quant_tuning import checkpoint_shapes

        quant = checkpoint_shapes(a.model)
        if quant:
            lines += describe_quant(info, dtype, quant, cache, a.tune, device)
    print("\n".join(lines))
    return 0
