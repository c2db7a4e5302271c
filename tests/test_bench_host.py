"""bench host runs on CPU and writes its rows: the plumbing only, never the timings (a shared CPU makes them noise)."""
import csv
import math

import pytest

from qwen2_triton.bench.host import MODES, PHASES, VOCAB, main, noop_llm, small_tokenizer


def test_writes_a_row_per_batch_and_mode(tmp_path):
    out = tmp_path / "host.csv"
    assert main(["--batches", "1,3", "--steps", "3", "--repeats", "1", "--label", "smoke", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["batch"], r["mode"]) for r in rows] == [("1", "greedy"), ("1", "sampled"), ("3", "greedy"),
                                                       ("3", "sampled")]
    for r in rows:
        assert r["machine"] and r["torch"] and r["date"] and r["label"] == "smoke" and r["path"] == "graphs"
        for col in ("us_step", "wall_us_step", "us_per_seq", *(f"{p}_us" for p in PHASES), "over_greedy"):
            value = float(r[col])
            assert math.isfinite(value) and value >= 0, (col, r[col])
        assert float(r["us_step"]) >= sum(float(r[f"{p}_us"]) for p in PHASES) * 0.5  # phases lie inside a step


def test_decode_runs_through_the_padded_graph_buffers_and_the_eager_path():
    from qwen2_triton import SamplingParams

    for path in ("graphs", "eager"):
        llm = noop_llm(4, path=path, max_steps=8)
        outs = llm.generate([[5, 6, 7]] * 3, [SamplingParams(max_tokens=6, ignore_eos=True, seed=1, **MODES[m])
                                             for m in ("greedy", "sampled", "sampled")])
        assert [len(o.token_ids) for o in outs] == [6, 6, 6]
        assert all(0 <= t < VOCAB for o in outs for t in o.token_ids)
        stats = llm.stats()
        assert (stats["padded_eager_decodes"] > 0) == (path == "graphs")


def test_small_tokenizer_round_trips_text():
    tok = small_tokenizer()
    ids = tok.encode("the rain in spain, 42.")
    assert max(ids) < VOCAB and tok.decode(ids) == "the rain in spain, 42."
    assert tok.eos_token_ids


def test_unknown_mode_is_an_error():
    with pytest.raises(SystemExit):
        main(["--modes", "greedy,beam"])
