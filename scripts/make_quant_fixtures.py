"""Regenerate tests/data/quant/: tiny GPTQ and AWQ checkpoints packed by GPTQModel, and the prompt log-probs that
HF transformers computes reading them through GPTQModel's torch kernels (an independent reader of both formats).

    pip install --no-deps --target /tmp/gptq_site gptqmodel==7.7.0 optimum==2.3.0 pypcre device-smi logbar \\
        tokenicer defuser threadpoolctl pillow protobuf
    PYTHONPATH=/tmp/gptq_site python scripts/make_quant_fixtures.py

gptqmodel 7.7 pins torch >= 2.14, newer than the project's 2.13, so it cannot be a test dependency; --no-deps
with the few light packages it imports runs its CPU paths on torch 2.13. What this script writes itself is only
the float model, the per-group scales and zeros (plain min-max) and config.json; GPTQModel turns them into the
files' integer codes and packing (``TorchLinear.pack`` for GPTQ, then its own v2 -> v1 zero conversion for format
"gptq"; ``AwqTorchLinear.pack`` for AWQ GEMM), and transformers + GPTQModel read them back for the references.

Shapes: the head layout of a seed model (heads, KV heads, head_dim, tying, rope_theta) with hidden the smallest
multiple of both the head count and 128 (group 128 must divide every input dim), intermediate 256, two layers and
a 512-row vocabulary, so four checkpoints stay ~12 MB. Random weights N(0, 0.08), biases N(0, 0.5), norms
1 + N(0, 0.3) (tests/checkpoints.py) so a mis-read code or zero moves the log-probs far past the tolerance.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "quant")
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

VOCAB = 512
PROMPT_LEN = 48
# name: (seed, quantization_config); seeds from tests/checkpoints.py
FIXTURES = {
    "gptq-int4-g128-sym": ("qwen2-0.5b", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                          "sym": True, "checkpoint_format": "gptq"}),
    "gptq-int8-g128-v2": ("qwen2-1.5b", {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False,
                                         "sym": False, "checkpoint_format": "gptq_v2"}),
    # act-order: each linear's rows are ranked by a random "Hessian diagonal" of its own, so q, k and v carry
    # different g_idx (real GPTQ gives the parts of a fused projection one order: they share the input)
    "gptq-int4-g128-descact": ("qwen2-1.5b", {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                              "desc_act": True, "sym": False, "checkpoint_format": "gptq"}),
    "awq-int4-g128": ("qwen2-0.5b", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                     "version": "gemm"}),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(seed: str, qcfg: dict):
    from checkpoints import SEEDS
    from transformers import Qwen2Config

    heads, kv, head_dim, _, tied, theta = SEEDS[seed]
    hidden = heads * 128 // math.gcd(heads, 128)
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": theta},
        use_sliding_window=False, sliding_window=131072, bos_token_id=151643, eos_token_id=151643,
        architectures=["Qwen2ForCausalLM"], dtype="float16")


def group_params(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool, v1: bool):
    """Min-max scales and integer zeros per (group, output): (scales, zeros) [out, groups] as GPTQModel's pack
    takes them. v1 zeros are kept >= 1: format "gptq" stores zero - 1, and GPTQModel reads it back by adding 1 to
    every packed field at once, which carries into the neighbour field for a stored -1 (its own comment: ~13% of
    asymmetric v1 checkpoints overflow); the runtime reads each field + 1, the format's definition."""
    maxq = 2 ** bits - 1
    wt = w.t()  # [in, out]
    lo = torch.stack([wt[g_idx == g].min(0).values for g in range(groups)], 1).clamp(max=0)  # [out, G]
    hi = torch.stack([wt[g_idx == g].max(0).values for g in range(groups)], 1).clamp(min=0)
    if sym:
        scales = torch.maximum(hi, -lo) * 2 / maxq
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        scales = (hi - lo) / maxq
        zeros = torch.round(-lo / scales).clamp(1 if v1 else 0, maxq)
    return scales.half().float(), zeros


def quantize_linear(linear: torch.nn.Linear, qcfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear, packed by GPTQModel; the Linear's weight is replaced by
    nothing: only the files matter."""
    bits, gs = qcfg["bits"], qcfg["group_size"]
    k, n = linear.in_features, linear.out_features
    groups = k // gs
    if qcfg["quant_method"] == "awq":
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

        g_idx = torch.arange(k) // gs
        scales, zeros = group_params(linear.weight.data, g_idx, groups, bits, sym=False, v1=False)
        q = AwqTorchLinear(bits=bits, group_size=gs, sym=False, desc_act=False, in_features=k, out_features=n,
                           bias=linear.bias is not None, register_buffers=True)
        q.pack(linear, scales, zeros.int())
        out = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales.half()}
    else:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.quantization import QuantizeConfig
        from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

        if qcfg["desc_act"]:  # act-order: row i belongs to the group of its rank in a random order
            rank = torch.empty(k, dtype=torch.long)
            rank[torch.randperm(k, generator=gen)] = torch.arange(k)
            g_idx = (rank // gs).int()
        else:
            g_idx = (torch.arange(k) // gs).int()
        v1 = qcfg["checkpoint_format"] == "gptq"
        scales, zeros = group_params(linear.weight.data, g_idx, groups, bits, qcfg["sym"], v1)
        q = TorchLinear(bits=bits, group_size=gs, sym=qcfg["sym"], desc_act=qcfg["desc_act"], in_features=k,
                        out_features=n, bias=linear.bias is not None)
        q.pack(linear, scales, zeros, g_idx)
        if v1:
            convert_gptq_v2_to_v1_format_module(q, QuantizeConfig(bits=bits, group_size=gs))
        out = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales.half(), "g_idx": q.g_idx.int()}
    if linear.bias is not None:
        out["bias"] = linear.bias.data.half()
    return {name: t.contiguous().clone() for name, t in out.items()}


def make(name: str, seed: str, qcfg: dict, rng_seed: int) -> None:
    from checkpoints import randomize
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    cfg = hf_config(seed, qcfg)
    model = Qwen2ForCausalLM(cfg).eval()
    randomize(model, rng_seed)
    gen = torch.Generator().manual_seed(rng_seed)
    tensors = {}
    for pname, p in model.state_dict().items():
        if cfg.tie_word_embeddings and pname == "lm_head.weight":
            continue
        if not any(f".{proj}." in pname for proj in PROJ):
            tensors[pname] = p.half().contiguous()
    for mname, mod in model.named_modules():
        if mname.rpartition(".")[2] in PROJ:
            for leaf, t in quantize_linear(mod, qcfg, gen).items():
                tensors[f"{mname}.{leaf}"] = t
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    raw = cfg.to_dict()
    raw["quantization_config"] = qcfg
    raw.pop("transformers_version", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


def reference_logprobs(name: str, qcfg: dict, ids: list[int], exact: bool) -> list[float]:
    """transformers + GPTQModel (torch kernels on CPU) reading the files just written, in float32; ``exact``:
    with ``exact_products``."""
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    path = os.path.join(OUT, name)
    if qcfg["quant_method"] == "awq":
        qc = AwqConfig(bits=4, group_size=128, zero_point=True, version="gemm", backend="torch_awq")
    else:
        qc = GPTQConfig(bits=qcfg["bits"], group_size=qcfg["group_size"], desc_act=qcfg["desc_act"],
                        sym=qcfg["sym"], format=qcfg["checkpoint_format"], backend="torch")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=qc).eval()
    if exact:
        exact_products(model)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return lp.tolist()


def exact_products(model) -> None:
    """The reader's kernels compute in fp16: GPTQ's TorchLinear forms s * (q - z) in the scales' dtype (each
    weight rounded to fp16 before the float32 matmul: 1e-2 on these log-probs); AWQ's AwqTorchLinear also casts
    the activations to fp16 and multiplies in fp16 (3e-2). The format defines the exact product, which our
    float32 path computes, so the reader's own dequantization runs here in float32: GPTQ's TorchLinear with its
    scales buffer upcast; AWQ through GPTQModel's ``dequantize_gemm`` (the function AwqTorchLinear calls) on
    upcast scales, then a float32 matmul and bias. Unpacking, zero conventions, nibble order and g_idx stay
    GPTQModel's; refs.json keeps the log-probs of the kernels as shipped too."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    def awq_forward(self, x):
        w = dequantize_gemm(self.qweight, self.qzeros, self.scales.float(), self.bits, self.group_size)
        out = x.float() @ w
        return out + self.bias.float() if self.bias is not None else out

    n = 0
    for m in model.modules():
        if isinstance(m, TorchLinear):
            m.scales = m.scales.float()
        if isinstance(m, AwqTorchLinear):
            m.forward = awq_forward.__get__(m)
        n += isinstance(m, (TorchLinear, AwqTorchLinear))
    assert n > 0, "no GPTQModel kernel in the model: transformers did not read it as quantized"


def main() -> int:
    import gptqmodel
    import transformers

    os.makedirs(OUT, exist_ok=True)
    ids = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()
    refs = {"prompt_ids": ids, "dtype": "float32", "reader": f"transformers {transformers.__version__} + "
            f"gptqmodel {gptqmodel.__version__} (backend torch / torch_awq), torch {torch.__version__}, CPU; "
            "prompt_logprobs: its dequantization on float32 scales (exact products, scripts/make_quant_fixtures.py "
            "exact_products); prompt_logprobs_fp16_products: its kernels as shipped",
            "fixtures": {}}
    for i, (name, (seed, qcfg)) in enumerate(FIXTURES.items()):
        make(name, seed, qcfg, rng_seed=100 + i)
        as_is = reference_logprobs(name, qcfg, ids, exact=False)
        lp = reference_logprobs(name, qcfg, ids, exact=True)
        refs["fixtures"][name] = {"seed": seed, "quantization_config": qcfg, "prompt_logprobs": lp,
                                  "prompt_logprobs_fp16_products": as_is}
        diff = (torch.tensor(lp) - torch.tensor(as_is)).abs().max()
        print(f"{name}: {len(lp)} log-probs, std {torch.tensor(lp).std():.3f}; fp16 products move them by "
              f"{diff:.2e}", file=sys.stderr)
    with open(os.path.join(OUT, "refs.json"), "w") as f:
        json.dump(refs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
