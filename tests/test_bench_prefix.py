"""bench/prefix.py runs end to end on a tiny checkpoint and writes its CSV row (the plumbing, never timings)."""
import csv

from checkpoints import make_checkpoint
from qwen2_triton.bench.prefix import main


def test_tiny_run_writes_a_row(tmp_path, qwen_tokenizer_dir):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(str(ckpt), "qwen2-0.5b", qwen_tokenizer_dir)
    out = tmp_path / "prefix.csv"
    assert main(["--model", str(ckpt), "--device", "cpu", "--kernels", "torch", "--prefix-tokens", "80",
                 "--turns", "2", "--reply-tokens", "2", "--block-size", "8", "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["date"] and row["machine"] and row["torch"] and row["model"] == str(ckpt) and row["turns"] == "2"
    for col in ("ttft_s_cache", "ttft_s_no_cache"):
        assert all(float(v) > 0 for v in row[col].split(";")) and len(row[col].split(";")) == 2
    float(row["second_over_first_cache"])
    prompt = [int(v) for v in row["prompt_tokens"].split(";")]
    on = [int(v) for v in row["computed_cache"].split(";")]
    off = [int(v) for v in row["computed_no_cache"].split(";")]
    assert off == prompt and on[0] == prompt[0]  # without the cache, and on the first turn, every token is computed
    assert on[1] < prompt[1] - 60  # the second turn reuses (most of) the first turn's prompt
