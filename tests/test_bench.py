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
    assert set(last) == {"memgen_vs_vanilla", "memgen_vs_naive", "train_vs_naive", "sft_vs_lora", "memory_ratio",
                         "grpo_vs_sft", "trigger_vs_sft", "few_rows_route_speedup",
                         "grpo_rollout_shared_prompt_speedup", "trigger_rollout_shared_prompt_speedup",
                         "trigger_update_shared_prompt_speedup"}
    assert ratios["memory_ratio"] > 1  # MemGen's parts add parameter bytes to the base model's
    figures = {r["figure"]: r for r in map(json.loads, (x for x in out if x.startswith('{"figure"')))}
    assert figures["official_style_memgen_tok_s"]["same_tokens"] is True
    assert figures["memgen_tok_s"]["insertions_per_row"] > 1  # inference insertions did happen
    # memgen_vs_vanilla divides the two figures printed (not another timing of either)
    memgen_vs_vanilla = figures["memgen_tok_s"]["value"] / figures[f"vanilla_tok_s_b{8}"]["value"]
    assert abs(ratios["memgen_vs_vanilla"] - memgen_vs_vanilla) <= 1e-3 * memgen_vs_vanilla
    # on a CPU, the same decode with model.linear's few-rows route off is timed beside it, and the route restored
    route = figures["vanilla_tok_s_b8"]["value"] / figures["vanilla_tok_s_b8_f_linear"]["value"]
    assert abs(ratios["few_rows_route_speedup"] - route) <= 1e-3 * route and bench.model_lib.FEW_ROWS > 0
    # the two SFT steps compute the same loss (the reference the tests hold the forward to)
    assert abs(figures["sft_step_s"]["loss"] - figures["naive_step_s"]["loss"]) < 1e-4
    # GRPO and trigger steps are timed in two parts; the trigger's rollouts asked it at every boundary
    for name in ("grpo", "trigger"):
        assert figures[f"{name}_rollout_s"]["rollouts"] == 8 and 0 < figures[f"{name}_update_s"]["share_of_step"] < 1


def test_only_train_runs_just_the_training_figures(capsys):
    ratios = bench.main(["--quick=true", "--only=train", "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16"])
    rl = {"grpo_vs_sft", "trigger_vs_sft", "grpo_rollout_shared_prompt_speedup",
          "trigger_rollout_shared_prompt_speedup", "trigger_update_shared_prompt_speedup"}
    assert set(ratios) == {"train_vs_naive", "sft_vs_lora"} | rl
    out = capsys.readouterr().out
    assert "vanilla_tok_s" not in out and "sft_lora_step_s" in out and "trigger_update_s" in out
    assert "top operators" not in out  # the profile only when asked
    # one row per forward/backward: the updates and their SFT comparisons run in parts, as the trainers' do
    assert set(bench.main(["--quick=true", "--only=rl", "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16",
                           "--rl_micro_batch=1"])) == rl
    assert "sft_lora_step_s" not in capsys.readouterr().out


def test_profile_prints_the_top_operators_of_both_sft_steps(capsys):
    bench.main(["--quick=true", "--only=train", "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16",
                "--profile=true"])
    out = capsys.readouterr().out
    for step in ("MemGen-SFT", "LoRA-SFT", "GRPO update", "MemGen-SFT, same tokens"):
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
    assert "pass one of --model=PATH" in one_line_error([], capsys)
    assert "model folder '/no/such/model' does not exist" in one_line_error(["--model=/no/such/model"], capsys)


def test_bench_on_a_model_folder_offline_is_one_line(long_folder, tmp_path, monkeypatch, capsys):
    """Offline, the GSM8K prompts cannot be fetched: one line that says so, no DownloadError traceback."""
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("MEMGEN_GSM8K_URL", "http://127.0.0.1:9/no-network/")
    err = one_line_error([f"--model={long_folder}", "--dtype=float32"], capsys)
    assert err.startswith("bench.py: error: could not reach http://127.0.0.1:9/no-network/test.jsonl")


def test_random_shapes_match_transformers_and_their_tokenizer_decodes_every_id():
    """SHAPE's pieces: the model built from a named shape holds the weights transformers' model of the same
    architecture is given (equal logits), and the synthetic tokenizer decodes every id the model can emit, with a
    delimiter every 12th id."""
    import torch

    cfg = dict(shape="smollm2-135m", device="cpu", dtype="float32", seed=0, tokenizer="", batch_size=3,
               max_new_tokens=8)
    setup = bench.shape_setup(cfg)
    model, tok = setup["model"], setup["tok"]
    assert model.cfg.num_layers == 30 and tok.vocab_size == model.cfg.vocab_size == 49152
    hf = bench.transformers_model(model)
    ids = torch.tensor([setup["prompts"][0][:16]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() <= 1e-4
    text = tok.decode(list(range(model.cfg.vocab_size)))
    assert len(text) > model.cfg.vocab_size and text.count(".") + text.count(",") + text.count("\n") == 4096
    assert len(setup["prompts"]) == 3 and all(100 <= len(p) < 160 for p in setup["prompts"])
    assert 0 < bench.weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())  # tied: the head reads it


def test_shape_and_model_settings_are_checked(capsys):
    assert "pass one of --model=PATH" in one_line_error(["--shape=qwen2.5-1.5b", "--quick=true"], capsys)
    assert "qwen9" in one_line_error(["--shape=qwen9"], capsys)
