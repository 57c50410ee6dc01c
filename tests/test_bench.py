"""bench.py --quick=true runs end to end and prints the headline ratios; its official-style decode is a real
reference (in float32 it produces exactly our tokens). Speed itself is never asserted here: bench.py reports it.
Bad inputs end in one line, like every other entry point."""
import json

import pytest

import bench


def test_quick_bench_prints_the_ratios_and_its_reference_decodes_our_tokens(capsys):
    ratios = bench.main(["--quick=true"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert set(last) == {"memgen_vs_vanilla", "memgen_vs_naive", "train_vs_naive", "sft_vs_lora", "memory_ratio"}
    assert ratios["memory_ratio"] > 1  # MemGen's parts add parameter bytes to the base model's
    figures = {r["figure"]: r for r in map(json.loads, (x for x in out if x.startswith('{"figure"')))}
    assert figures["official_style_memgen_tok_s"]["same_tokens"] is True
    assert figures["memgen_tok_s"]["insertions_per_row"] > 1  # inference insertions did happen
    # the two SFT steps compute the same loss (the reference the tests hold the forward to)
    assert abs(figures["sft_step_s"]["loss"] - figures["naive_step_s"]["loss"]) < 1e-4
    # GRPO and trigger steps are timed in two parts; the trigger's rollouts asked it at every boundary
    for name in ("grpo", "trigger"):
        assert figures[f"{name}_rollout_s"]["rollouts"] == 8 and 0 < figures[f"{name}_update_s"]["share_of_step"] < 1


def test_only_train_runs_just_the_training_figures(capsys):
    ratios = bench.main(["--quick=true", "--only=train", "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16"])
    assert set(ratios) == {"train_vs_naive", "sft_vs_lora"}
    out = capsys.readouterr().out
    assert "vanilla_tok_s" not in out and "sft_lora_step_s" in out and "trigger_update_s" in out
    assert "top operators" not in out  # the profile only when asked


def test_profile_prints_the_top_operators_of_both_sft_steps(capsys):
    bench.main(["--quick=true", "--only=train", "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16",
                "--profile=true"])
    out = capsys.readouterr().out
    for step in ("MemGen-SFT", "LoRA-SFT"):
        assert f"# {step} step: top operators by self time" in out
    assert out.count("aten::mm") >= 2


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_bench_without_a_model_or_with_a_missing_one_is_one_line(capsys):
    assert "pass --model=PATH" in one_line_error([], capsys)
    assert "model folder '/no/such/model' does not exist" in one_line_error(["--model=/no/such/model"], capsys)


def test_bench_on_a_model_folder_offline_is_one_line(long_folder, tmp_path, monkeypatch, capsys):
    """Offline, the GSM8K prompts cannot be fetched: one line that says so, no DownloadError traceback."""
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("MEMGEN_GSM8K_URL", "http://127.0.0.1:9/no-network/")
    err = one_line_error([f"--model={long_folder}", "--dtype=float32"], capsys)
    assert err.startswith("bench.py: error: could not reach http://127.0.0.1:9/no-network/test.jsonl")
