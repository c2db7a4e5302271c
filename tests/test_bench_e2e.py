"""The end-to-end benchmark runs (shrunken shapes, so also on CPU) and writes its CSV row."""
import csv
import os
import shutil

import pytest

from qwen2_triton.bench.e2e import SHAPES, config_dict, main


def test_shapes_are_the_releases():
    c = config_dict("qwen2-7b", tiny=False)
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"],
            c["tie_word_embeddings"]) == (3584, 28, 4, 128, 152064, False)
    assert set(SHAPES) == {"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen1.5-4b"}


def test_tiny_run_writes_a_row(tmp_path, monkeypatch, qwen_tokenizer_dir):
    monkeypatch.setenv("QWEN2_TRITON_TOKENIZER_DIR", qwen_tokenizer_dir)  # the offline run detokenizes for real
    out = tmp_path / "e2e.csv"
    assert main(["--tiny", "--models", "qwen2-1.5b", "--decode-tokens", "8", "--prefill", "64", "--out",
                 str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    # The plumbing, not the timings: on a busy CPU a 9-token difference of timings can be noise (then nan).
    assert row["model"] == "qwen2-1.5b" and row["gpu"] and row["torch"] and row["triton"] and row["date"]
    for col in ("decode_graph_tok_s", "decode_eager_tok_s", "hf_eager_tok_s", "prefill_64_tok_s",
                "offline_out_tok_s", "offline_sync_out_tok_s", "async_output_x", "graph_over_eager",
                "over_hf_eager"):
        value = float(row[col])  # a number or nan, never missing
        assert value > 0 or value != value, (col, row[col])
    assert float(row["weights_GB"]) >= 0  # tiny shapes: well under the 0.01 GB the CSV rounds to
    assert row["async_output"] == "False"  # the engine's choice on the CPU; the second offline run turns it off


def test_bench_tokenizer_is_the_qwen_one_when_named(monkeypatch, qwen_tokenizer_dir):
    from qwen2_triton.bench.e2e import _NoText, bench_tokenizer

    monkeypatch.delenv("QWEN2_TRITON_TOKENIZER_DIR", raising=False)
    assert isinstance(bench_tokenizer(), _NoText)
    monkeypatch.setenv("QWEN2_TRITON_TOKENIZER_DIR", qwen_tokenizer_dir)
    tok = bench_tokenizer()
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"


def test_in_memory_model_keeps_its_dtype():
    import torch

    from qwen2_triton.bench.e2e import random_llm

    llm = random_llm("qwen2-0.5b", torch.bfloat16, torch.device("cpu"), tiny=True, max_model_len=64)
    assert llm.dtype == torch.bfloat16 and llm.runner.kv_caches[0][0].dtype == torch.bfloat16


def test_rows_with_new_columns_widen_the_csv(tmp_path):
    from qwen2_triton.bench.e2e import append_rows, peak_gb_s

    out = str(tmp_path / "r.csv")
    append_rows(out, [{"date": "d1", "a": "1"}])
    append_rows(out, [{"date": "d2", "a": "2", "b": "3"}])
    rows = list(csv.DictReader(open(out)))
    assert [(r["date"], r["a"], r["b"]) for r in rows] == [("d1", "1", ""), ("d2", "2", "3")]
    assert peak_gb_s("NVIDIA H100 80GB HBM3") == 3350 and peak_gb_s("NVIDIA H100 PCIe") == 2000
    assert peak_gb_s("NVIDIA H200") == 4800 and peak_gb_s("some other GPU") is None


def test_decode_rate_reports_a_noise_dominated_difference_as_nan(caplog):
    import math

    from qwen2_triton.bench.e2e import decode_rate

    assert decode_rate(8, 0.5, 1.3) == 10.0
    assert math.isnan(decode_rate(8, 0.5, 0.49))
    assert "decode timing unusable" in caplog.text


# ------------------------------------------------------------------------------------------------ quantized rows
@pytest.fixture(scope="module")
def gptq_int4(module_tmp, qwen_tokenizer_dir):
    """tests/data/quant's symmetric GPTQ int4 fixture with the Qwen tokenizer files LLM reads from the directory."""
    path = module_tmp("gptq-int4")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "quant", "gptq-int4-g128-sym"), path,
                    dirs_exist_ok=True)
    shutil.copytree(qwen_tokenizer_dir, path, dirs_exist_ok=True)
    return str(path)


def test_quantized_checkpoint_rows_pair_with_a_dense_twin(tmp_path, gptq_int4):
    """Two rows for two --quant-model: the first paired with --dense-model, the second with random weights in its
    own config. On CPU (torch ops) the checkpoint is dequantized at load, so it holds exactly the bytes of its twin:
    the twin has the same shapes."""
    out = tmp_path / "e2e.csv"
    assert main(["--tiny", "--quant-only", "--quant-model", gptq_int4, "--quant-model", gptq_int4, "--dense-model",
                 gptq_int4, "--decode-tokens", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["dense"] for r in rows] == [gptq_int4, "random weights, same config"]
    for row in rows:
        assert row["quantization"] == "GPTQ int4 group 128 sym (format gptq)" and row["target"] == "over_dense>=2.2"
        assert row["quant_weights"] == "dequantized at load" and row["gpu"] and row["date"]
        assert row["weights_GB"] == row["dense_weights_GB"]
        for col in ("decode_graph_tok_s", "dense_decode_graph_tok_s", "over_dense"):
            value = float(row[col])  # a number or nan (a noise-dominated CPU timing), never missing
            assert value > 0 or value != value, (col, row[col])


def test_random_quantized_rows_run_the_packed_kernels():
    """--quant-random: the release's config (shrunken) with random packed projections on the Triton ops (the
    interpreter here), next to the same config dense."""
    import torch

    from qwen2_triton.bench.e2e_quant import random_rows

    (row,) = random_rows(["qwen2-0.5b"], ["int4-zeros"], dtype=torch.float32, device=torch.device("cpu"), tiny=True,
                         kw=dict(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=128), n_tokens=2,
                         peak=None)
    assert row["model"] == "qwen2-0.5b" and row["quant_weights"] == "packed (8 weights)"
    assert row["quantization"] == "random int4 group 32/64 asym"  # tiny widths 224 and 64: the largest group
    assert 0 < row["weights_GB"] < row["dense_weights_GB"]
    assert "over_dense" in row and row["target"] == "over_dense>=2.2"


@pytest.mark.parametrize("argv,match", [
    (["--quant-random", "int3"], "--quant-random int3: expected some of int4,int4-zeros,int8"),
    (["--quant-model", "a", "--dense-model", "b", "--dense-model", "c"], "2 --dense-model for 1 --quant-model"),
])
def test_bad_quantized_options_fail_before_loading(argv, match):
    with pytest.raises(ValueError, match=match):
        main(["--tiny", "--quant-only", *argv])
