"""bench.py --quick runs end to end and prints the headline ratios; its official-style decode is a real reference
(in float32 it produces exactly our tokens). Speed itself is never asserted here: bench.py reports it."""
import json

import bench


def test_quick_bench_prints_the_ratios(capsys):
    ratios = bench.main(["--quick"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert set(last) == {"memgen_vs_vanilla", "memgen_vs_naive", "train_vs_naive", "memory_ratio"}
    assert all(v > 0 for v in ratios.values())
    figures = {r["figure"]: r for r in map(json.loads, (x for x in out if x.startswith('{"figure"')))}
    assert figures["official_style_memgen_tok_s"]["same_tokens"] is True
    assert figures["memgen_tok_s"]["insertions_per_row"] > 1  # inference insertions did happen
    # the two SFT steps compute the same loss (the reference the tests hold the forward to)
    assert abs(figures["sft_step_s"]["loss"] - figures["naive_sft_step_s"]["loss"]) < 1e-4
