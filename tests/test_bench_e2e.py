"""The end-to-end benchmark runs (shrunken shapes, so also on CPU) and writes its CSV row."""
import csv

from qwen2_triton.bench.e2e import SHAPES, config_dict, main


def test_shapes_are_the_releases():
    c = config_dict("qwen2-7b", tiny=False)
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"],
            c["tie_word_embeddings"]) == (3584, 28, 4, 128, 152064, False)
    assert set(SHAPES) == {"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen1.5-4b"}


def test_tiny_run_writes_a_row(tmp_path):
    out = tmp_path / "e2e.csv"
    assert main(["--tiny", "--models", "qwen2-1.5b", "--decode-tokens", "8", "--prefill", "64", "--out",
                 str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    # The plumbing, not the timings: on a busy CPU a 9-token difference of timings can be noise (then nan).
    assert row["model"] == "qwen2-1.5b" and row["gpu"] and row["torch"] and row["triton"] and row["date"]
    for col in ("decode_graph_tok_s", "decode_eager_tok_s", "hf_eager_tok_s", "prefill_64_tok_s",
                "offline_out_tok_s", "graph_over_eager", "over_hf_eager"):
        value = float(row[col])  # a number or nan, never missing
        assert value > 0 or value != value, (col, row[col])
    assert float(row["weights_GB"]) >= 0  # tiny shapes: well under the 0.01 GB the CSV rounds to


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
