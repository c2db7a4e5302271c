"""GGUF loading: the demo model against transformers' own GGUF load, tiny written GGUFs for the tensor types and
metadata the demo lacks, and the errors for missing, truncated and foreign files."""
import os

import numpy as np
import pytest
import torch

from qwen2_triton.model import gguf_loader
from qwen2_triton.model.gguf_loader import hf_name, load_gguf

gguf = pytest.importorskip("gguf")
from gguf.quants import quantize  # noqa: E402

QT = gguf.GGMLQuantizationType


# ---- the demo model vs transformers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(demo_gguf):
    return load_gguf(demo_gguf, progress=False)


@pytest.fixture(scope="module")
def hf_model(demo_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(demo_gguf), gguf_file=os.path.basename(demo_gguf), dtype=torch.float32)


def test_config_matches_hf(ckpt, hf_model):
    cfg, hf = ckpt.config, hf_model.config
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (896, 24, 151936)
    assert cfg["tie_word_embeddings"] is False  # this GGUF carries output.weight
    assert cfg["rms_norm_eps"] == 1e-6 == pytest.approx(hf.rms_norm_eps, rel=1e-6)  # float32 in the file
    hf_theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta") or hf.rope_theta
    assert cfg["rope_theta"] == hf_theta == 1e6
    assert "rope_scaling" not in cfg
    assert ckpt.generation_defaults == {}
    assert ckpt.chat_template.startswith("{%- if tools %}")
    assert ckpt.tokenizer.eos_token_ids[:2] == [151645, 151643]


def test_every_tensor_equals_hf(ckpt, hf_model):
    """All 291 tensors, bit for bit, with their HF names and shapes. transformers does not permute q/k for qwen2
    (only for llama-style archs), so equality here also settles that the rows are in HF order."""
    hf_state = hf_model.state_dict()
    assert set(ckpt.tensors) == set(hf_state)
    assert set(ckpt.tensors.ggml_types.values()) == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    for name, tensor in ckpt.tensors.items():
        assert tensor.dtype == torch.float32 and tensor.shape == hf_state[name].shape == ckpt.tensors.shapes[name]
        assert torch.equal(tensor, hf_state[name]), name


def test_qk_rows_are_in_hf_order(ckpt, hf_model):
    """Functional check of the no-permutation rule: with our q/k projections the model continues a chat the way it
    generates it greedily (low NLL); with q/k rows permuted as llama.cpp does for llama, it clearly does not."""
    tok = ckpt.tokenizer
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]))
    # The model's own greedy continuation (transformers' generate on these weights, float32).
    completion = tok.encode("Here's a simple Python function that takes a list as an argument and returns the sum "
                            "of its elements:")
    ids = torch.tensor([prompt + completion])

    def completion_nll():
        with torch.no_grad():
            logits = hf_model(ids).logits[0, len(prompt) - 1:-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(completion)).item()

    def llama_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    heads = {"q_proj": ckpt.config["num_attention_heads"], "k_proj": ckpt.config["num_key_value_heads"]}
    params = {f"model.layers.{n}.self_attn.{proj}.{kind}": n_head for n in range(ckpt.config["num_hidden_layers"])
              for proj, n_head in heads.items() for kind in ("weight", "bias")}
    state = dict(hf_model.named_parameters())
    originals = {name: state[name].detach().clone() for name in params}
    try:
        with torch.no_grad():
            for name in params:
                state[name].copy_(ckpt.tensors[name])
        ours = completion_nll()
        with torch.no_grad():
            for name, n_head in params.items():
                state[name].copy_(llama_permute(ckpt.tensors[name], n_head))
        permuted = completion_nll()
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                state[name].copy_(value)
    assert ours < 0.9, ours  # measured 0.58
    assert permuted > ours + 0.5, (ours, permuted)  # measured 1.36


def test_quantized_types_against_independent_dequantizers(ckpt):
    """The check above shares gguf.quants with transformers' loader; here each type is decoded by other code:
    transformers' torch kernels (Q8_0, Q4_K, Q6_K) and a numpy Q5_0 decoder written from ggml's block layout."""
    hf_dequant = pytest.importorskip("transformers.integrations.gguf.dequant").dequantize
    smallest = {}  # ggml type -> its smallest tensor in the file, to keep this quick
    for t in ckpt.file.tensors:
        kind = t.tensor_type.name
        if kind != "F32" and (kind not in smallest or t.n_elements < smallest[kind].n_elements):
            smallest[kind] = t
    assert set(smallest) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    for qtype, t in smallest.items():
        ours = ckpt.tensors[hf_name(t.name, ckpt.config["num_hidden_layers"])]
        raw = np.array(t.data).reshape(-1)
        ref = torch.from_numpy(_dequant_q5_0(raw)) if qtype == "Q5_0" else hf_dequant(torch.from_numpy(raw),
                                                                                        int(t.tensor_type))
        torch.testing.assert_close(ours.flatten(), ref, rtol=1e-6, atol=1e-7, msg=f"{t.name} {qtype}")


def _dequant_q5_0(raw: np.ndarray) -> np.ndarray:
    """ggml block_q5_0: fp16 d, 32 high bits qh, 16 bytes of low nibbles; x = d * (q - 16), element j from the low
    nibble of qs[j] (j < 16) or the high nibble of qs[j-16], high bit j of qh."""
    blocks = raw.reshape(-1, 22)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    qh = blocks[:, 2:6].copy().view(np.uint32)  # (nb, 1), little endian
    qs = blocks[:, 6:22].astype(np.uint32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (nb, 32)
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1
    return (d * ((low | (high << 4)).astype(np.float32) - 16)).reshape(-1)


# ---- damaged and foreign files --------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(path)


@pytest.mark.parametrize("content", [b"", b"hello, not a GGUF file\n", b"PK\x03\x04" + bytes(100)])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        load_gguf(path)


def test_truncated_download(demo_gguf, tmp_path):
    path = tmp_path / "partial.gguf"  # metadata complete, tensor data cut short: an interrupted download
    with open(demo_gguf, "rb") as src:
        path.write_bytes(src.read(10_000_000))
    with pytest.raises(ValueError, match=r"partial\.gguf is a truncated or corrupt GGUF"):
        load_gguf(path)


# ---- tiny written GGUFs: tensor types, tied embeddings, rope scaling, wrong architecture ------------------------
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
TOKENS = [chr(c) for c in range(33, 127)] + ["he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = len(TOKENS)
# One tensor per type; the quantized ones hold rows of multiples of 32 (their block size).
LAYER0_TYPES = {"attn_q.weight": QT.F16, "attn_k.weight": QT.BF16, "attn_v.weight": QT.Q5_0,
                "attn_output.weight": QT.Q4_0, "ffn_gate.weight": QT.Q8_0, "ffn_up.weight": QT.Q5_1}
TOLERANCE = {QT.F32: 0, QT.F16: 0, QT.BF16: 0, QT.Q8_0: 0.03, QT.Q5_0: 0.2, QT.Q5_1: 0.2, QT.Q4_0: 0.4}


def _tiny_shapes():
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    per_layer = {"attn_q.weight": (HIDDEN, HIDDEN), "attn_q.bias": (HIDDEN,),
                 "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_k.bias": (KV_HEADS * HEAD_DIM,),
                 "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v.bias": (KV_HEADS * HEAD_DIM,),
                 "attn_output.weight": (HIDDEN, HIDDEN), "ffn_gate.weight": (INTER, HIDDEN),
                 "ffn_up.weight": (INTER, HIDDEN), "ffn_down.weight": (HIDDEN, INTER),
                 "attn_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,)}
    for n in range(LAYERS):
        shapes.update({f"blk.{n}.{k}": v for k, v in per_layer.items()})
    return shapes


def write_tiny_gguf(path, *, arch="qwen2", tied=False, metadata=(), tensors=None):
    """A 2-layer Qwen2-shaped GGUF; returns {gguf name: (float32 values, type)}. `tensors` overrides entries."""
    rng = np.random.default_rng(0)
    values = {name: (rng.standard_normal(shape).astype(np.float32), QT.F32) for name, shape in _tiny_shapes().items()}
    values.update({f"blk.0.{k}": (values[f"blk.0.{k}"][0], t) for k, t in LAYER0_TYPES.items()})
    values["token_embd.weight"] = (values["token_embd.weight"][0], QT.Q8_0)
    if tied:
        del values["output.weight"]
    values.update(tensors or {})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", LAYERS)
    w.add_uint32(f"{arch}.context_length", 4096)
    w.add_uint32(f"{arch}.embedding_length", HIDDEN)
    w.add_uint32(f"{arch}.feed_forward_length", INTER)
    w.add_uint32(f"{arch}.attention.head_count", HEADS)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - 3) + [3, 3, 3])
    w.add_token_merges(["h e", "l l"])
    w.add_eos_token_id(VOCAB - 1)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    for key, value in metadata:
        (w.add_float32 if isinstance(value, float) else w.add_string if isinstance(value, str) else w.add_uint32)(
            key, value)
    for name, (x, qtype) in values.items():
        if qtype in (QT.F32, QT.F16) or x.dtype.kind == "i":
            w.add_tensor(name, x if qtype == QT.F32 or x.dtype.kind == "i" else x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_tiny_gguf_every_float_and_quant_type(tmp_path):
    values = write_tiny_gguf(tmp_path / "tiny.gguf")
    ckpt = load_gguf(tmp_path / "tiny.gguf", progress=False)
    assert set(ckpt.tensors.ggml_types.values()) >= {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0"}
    for gguf_name, (x, qtype) in values.items():
        ours = ckpt.tensors[hf_name(gguf_name, LAYERS)]
        assert ours.shape == x.shape, gguf_name  # GGUF's reversed dims undone
        expected = torch.from_numpy(x)
        if qtype == QT.F16:
            expected = expected.half().float()
        elif qtype == QT.BF16:
            expected = expected.bfloat16().float()
        torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE[qtype], msg=f"{gguf_name} {qtype.name}")
    cfg = ckpt.config
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (HIDDEN, KV_HEADS, VOCAB)
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in ckpt.tensors
    assert ckpt.tokenizer.encode("hello<|im_end|>")[-1] == VOCAB - 1


def test_tiny_gguf_tied_scaling_and_sampling(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tied=True, metadata=[
        ("qwen2.rope.scaling.type", "yarn"), ("qwen2.rope.scaling.factor", 4.0),
        ("qwen2.rope.scaling.original_context_length", 32768),
        ("general.sampling.temp", 0.7), ("general.sampling.top_p", 0.8)])
    ckpt = load_gguf(tmp_path / "tiny.gguf", dtype=torch.float16, progress=False)
    assert ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensors
    assert ckpt.config["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32768}
    assert ckpt.generation_defaults == {"temperature": 0.7, "top_p": 0.8}
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == torch.float16


def test_wrong_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match="'llama'"):
        load_gguf(tmp_path / "llama.gguf")


def test_unsupported_tensor_type(tmp_path):
    ints = np.zeros((HIDDEN,), dtype=np.int32)
    write_tiny_gguf(tmp_path / "int.gguf", tensors={"blk.1.attn_norm.weight": (ints, QT.I32)})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_norm\.weight has type I32"):
        load_gguf(tmp_path / "int.gguf")


def test_wrong_shape(tmp_path):
    bad = np.zeros((HIDDEN, HIDDEN), dtype=np.float32)  # k_proj must be (KV_HEADS * HEAD_DIM, HIDDEN)
    write_tiny_gguf(tmp_path / "shape.gguf", tensors={"blk.1.attn_k.weight": (bad, QT.F32)})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_k\.weight .*shape \(64, 64\), expected \(32, 64\)"):
        load_gguf(tmp_path / "shape.gguf")


@pytest.mark.parametrize("keep", [10, 200, 2000, -100], ids=["header", "metadata", "tensor_info", "tensor_data"])
def test_truncated(tmp_path, keep):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"cut\.gguf is a truncated or corrupt GGUF"):
        load_gguf(tmp_path / "cut.gguf")


def test_bfloat16_target(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    fp32 = load_gguf(tmp_path / "tiny.gguf", progress=False).tensors
    bf16 = load_gguf(tmp_path / "tiny.gguf", dtype=torch.bfloat16, progress=False).tensors
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name


# ---- items(): the next tensor is dequantized on a worker thread while the caller copies this one -----------------
def test_items_in_file_order_and_equal_to_getitem(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    tensors = load_gguf(tmp_path / "tiny.gguf", progress=False).tensors
    pairs = list(tensors.items())
    assert [name for name, _ in pairs] == list(tensors)  # file order, each once
    for name, tensor in pairs:
        assert torch.equal(tensor, tensors[name]), name
        assert tensor.shape == tensors.shapes[name]


def test_items_stopped_early_and_failing(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    tensors = load_gguf(tmp_path / "tiny.gguf", progress=False).tensors
    it = tensors.items()
    first = next(it)
    it.close()  # a consumer that raised (load_into on a bad shape): the worker is joined, nothing hangs
    assert first[0] == next(iter(tensors))
    names = list(tensors)
    real = gguf_loader._dequantize

    def broken(t):
        if t.name == "blk.0.attn_q.weight":  # the fourth tensor in file order
            raise ValueError(f"cannot decode {t.name}")
        return real(t)

    monkeypatch.setattr(gguf_loader, "_dequantize", broken)
    assert hf_name("blk.0.attn_q.weight", LAYERS) == names[3]
    seen = []
    with pytest.raises(ValueError, match="cannot decode blk.0.attn_q.weight"):  # in the caller, in order
        for name, _ in tensors.items():
            seen.append(name)
    assert seen == names[:3]


def test_big_endian_file_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "qwen2", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("qwen2.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"be\.gguf is a big-endian GGUF file"):
        load_gguf(tmp_path / "be.gguf")
