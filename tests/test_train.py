"""train_weaver.py and train_trigger.py on a tiny random model and a toy task: what learns, what must not change,
the invocation penalty, exact resume after SIGKILL, torchrun == one process, and every bad input of issue 11 as one
clear line (run folders, numeric settings, non-finite losses, damaged checkpoints, mismatched adapters)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import memgen
import train_trigger as tt
import train_weaver as tw
import training
from model import load_model
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--progress=false", "--dtype=float32", "--final_eval_limit=-1", "--val_size=0", "--save_interval=0",
         "--max_len=512"]


@pytest.fixture(scope="module")
def folder(long_folder):
    return long_folder


@pytest.fixture(scope="module")
def task(add_task):
    return add_task


def log_rows(out):
    return [json.loads(x) for x in Path(out, "log.jsonl").read_text().splitlines()]


def step_losses(out):
    """{step: loss} of the training lines."""
    return {r["step"]: r["loss"] for r in log_rows(out) if "loss" in r}


def base_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def assert_base_unchanged(model, folder):
    fresh = load_model(folder, dtype="float32")
    now = base_weights(model)
    ref = fresh.state_dict()
    assert set(now) == {k for k in ref}
    for k, v in now.items():
        assert torch.equal(v, ref[k]), k


def snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def changed(before, params):
    return {k for k, v in params.items() if not torch.equal(v.detach(), before[k])}


# ---- SFT


def first_token_nll(mg, examples):
    """Mean NLL of the first completion token, which the last latent's own slot predicts: the weaver controls
    that slot's input completely, so it can fit it whatever the (random) reasoner does."""
    with torch.no_grad():
        ids, mask, plen = memgen.right_pad([e["prompt"] for e in examples], [e["completion"] for e in examples], 0,
                                           "cpu")
        h = memgen.teacher_forced(mg, ids, mask, plen, plen[:, None])
        logits = mg.model.head(h[torch.arange(len(examples)), plen - 1])[:, :mg.vocab].float()
        return torch.nn.functional.cross_entropy(logits, ids[torch.arange(len(examples)), plen]).item()


def examples(folder, task, n):
    tok = load_tokenizer(folder)
    t = data.get_task(task)
    return tok, training.encode_examples(t.load("train")[:n], tok, t, 512)[0]


def test_sft_lora_fits_and_leaves_the_reasoner_alone(folder, task, tmp_path):
    out = str(tmp_path / "sft-lora")
    res = tw.main(["--model", folder, "--data", task, "--method", "sft-lora", "--out_dir", out, "--max_steps=40",
                   "--limit=8", "--batch_size=8", "--micro_batch=4", "--lr=1e-2", "--warmup=0",
                   "--lora_dropout=0", *QUIET])
    losses = step_losses(out)
    assert len(losses) == 40
    assert losses[40] < 0.5 * losses[1], (losses[1], losses[40])
    assert_base_unchanged(res["policy"], folder)
    assert os.path.isfile(os.path.join(out, "final", "sft.safetensors"))


def test_weaver_sft_fits_and_leaves_the_reasoner_alone(folder, task, tmp_path, monkeypatch):
    """A random 2-layer reasoner attends only weakly to 8 latents among ~60 slots, so the weaver cannot fit every
    token as a LoRA on the reasoner can (above); it must fit the tokens read off its own latent slots, and lower
    the whole loss clearly."""
    _, exs = examples(folder, task, 8)
    before = {}
    real = tw.build_policy

    def capture(run, is_mg):
        real(run, is_mg)
        before["nll"] = first_token_nll(run.policy, exs)

    monkeypatch.setattr(tw, "build_policy", capture)
    out = str(tmp_path / "sft")
    res = tw.main(["--model", folder, "--data", task, "--out_dir", out, "--max_steps=40", "--limit=8",
                   "--batch_size=8", "--micro_batch=4", "--lr=1e-2", "--warmup=0", "--lora_dropout=0", *QUIET])
    losses = step_losses(out)
    assert losses[40] < 0.7 * losses[1], (losses[1], losses[40])
    after = first_token_nll(res["policy"], exs)
    assert after < 0.5 * before["nll"], (before["nll"], after)
    assert_base_unchanged(res["policy"].model, folder)
    assert os.path.isfile(os.path.join(out, "final", "weaver.safetensors"))


def test_sft_forward_loss_matches_a_plain_cross_entropy(folder, task):
    """sft_loss through MemGen == cross-entropy of head(memgen.teacher_forced) over completion tokens, computed
    densely."""
    import types

    torch.manual_seed(0)
    tok, ex = examples(folder, task, 3)
    model = load_model(folder, dtype="float32")
    mg = memgen.MemGen(model, tok)
    mg.eval()
    run = types.SimpleNamespace(model=model, tok=tok, policy=mg, vocab=tok.vocab_size)
    s, n = tw.sft_loss(run, ex)
    ids, mask, plen = memgen.right_pad([e["prompt"] for e in ex], [e["completion"] for e in ex], tok.pad_id, "cpu")
    h = memgen.teacher_forced(mg, ids, mask, plen, memgen.insertion_points(mg, ids, mask, plen))
    logits = model.head(h)[..., :tok.vocab_size]
    ref, count = 0.0, 0
    for b, e in enumerate(ex):
        P, C = len(e["prompt"]), len(e["completion"])
        ref += torch.nn.functional.cross_entropy(logits[b, P - 1:P + C - 1], ids[b, P:P + C], reduction="sum")
        count += C
    assert n == count
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)


def test_lora_sft_loss_on_packed_rows_equals_each_example_alone(folder, task):
    """sft_loss with the "sft" adapter packs the padded rows (training.adapter_hidden); loss and adapter gradients
    equal the sum over examples run one at a time, unpadded."""
    import types

    import lora

    torch.manual_seed(0)
    tok, ex = examples(folder, task, 4)
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    params = lora.parameters(model, "sft")
    with torch.no_grad():
        for name, p in params.items():
            p.normal_(0, 0.05)  # lora_B starts at 0: make the adapter change every position
    model.eval()
    run = types.SimpleNamespace(model=model, tok=tok, policy=model, vocab=tok.vocab_size)
    s, n = tw.sft_loss(run, ex)
    s.backward()
    packed = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    ref, count = 0.0, 0
    for e in ex:
        ids = torch.tensor([e["prompt"] + e["completion"]])
        with lora.use(model, "sft"):
            logits, _ = model(ids)
        P, C = len(e["prompt"]), len(e["completion"])
        one = torch.nn.functional.cross_entropy(logits[0, P - 1:P + C - 1, :tok.vocab_size], ids[0, P:], reduction="sum")
        one.backward()
        ref, count = ref + one.item(), count + C
    assert n == count and len({len(e["prompt"] + e["completion"]) for e in ex}) > 1  # the rows were padded
    torch.testing.assert_close(s.item(), ref, rtol=1e-5, atol=1e-4)
    for k, p in params.items():
        torch.testing.assert_close(packed[k], p.grad, rtol=1e-4, atol=1e-5)


# ---- GRPO and the trigger on rigged rewards


def even_first_token(task, rows, rollouts):
    """Rigged: reward 1 when the first completion token has an even id."""
    return [float(o["ids"][0] % 2 == 0) for o in rollouts]


def p_even_first(mg, prompts):
    """Exact P(first completion token is even) under MemGen (prompt insertion included)."""
    with torch.no_grad():
        ids, mask, plen = memgen.right_pad(prompts, [[0]] * len(prompts), 0, "cpu")
        h = memgen.teacher_forced(mg, ids, mask, plen, plen[:, None])
        p = torch.softmax(mg.model.head(h[torch.arange(len(prompts)), plen - 1])[:, :mg.vocab].float(), -1)
    return p[:, ::2].sum(1).mean().item()


def test_grpo_moves_a_rigged_reward_and_trains_only_the_weaver(folder, task, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "task_rewards", even_first_token)
    tok, exs = examples(folder, task, 4)
    prompts = [e["prompt"] for e in exs]
    captured = {}
    real = tw.build_policy

    def capture(run, is_mg):
        real(run, is_mg)
        mg = run.policy
        captured["before_p"] = p_even_first(mg, prompts)
        captured["weaver"], captured["trigger"] = snapshot(mg.trainable("weaver")), snapshot(mg.trainable("trigger"))

    monkeypatch.setattr(tw, "build_policy", capture)
    res = tw.main(["--model", folder, "--data", task, "--method", "grpo", "--out_dir", str(tmp_path / "g"),
                   "--max_steps=25", "--limit=4", "--batch_size=4", "--group=8", "--micro_batch=16",
                   "--max_new_tokens=2", "--lr=3e-2", "--warmup=0", *QUIET])
    mg = res["policy"]
    after = p_even_first(mg, prompts)
    assert after > captured["before_p"] + 0.1, (captured["before_p"], after)
    assert changed(captured["trigger"], mg.trainable("trigger")) == set()
    assert changed(captured["weaver"], mg.trainable("weaver")) == set(mg.trainable("weaver"))
    assert_base_unchanged(mg.model, folder)
    rows = [r for r in log_rows(tmp_path / "g") if "reward" in r]
    assert {"reward", "length", "insertions"} <= set(rows[0])


def test_grpo_lora_moves_a_rigged_reward(folder, task, tmp_path, monkeypatch):
    import lora

    monkeypatch.setattr(training, "task_rewards", even_first_token)
    tok, exs = examples(folder, task, 4)
    prompts = [e["prompt"] for e in exs]

    def p_even(model):
        with torch.no_grad(), lora.use(model, "sft"):
            ids, mask, plen = memgen.right_pad(prompts, [[0]] * len(prompts), 0, "cpu")
            _, h = model(ids, mask=mask, logits="none")
            p = torch.softmax(model.head(h[torch.arange(len(prompts)), plen - 1])[:, :tok.vocab_size].float(), -1)
        return p[:, ::2].sum(1).mean().item()

    base = load_model(folder, dtype="float32")
    lora.inject(base, ["sft"])
    before = p_even(base)  # zero-initialised LoRA: the base model
    out = str(tmp_path / "gl")
    res = tw.main(["--model", folder, "--data", task, "--method", "grpo-lora", "--out_dir", out, "--max_steps=25",
                   "--limit=4", "--batch_size=4", "--group=8", "--micro_batch=16", "--max_new_tokens=2", "--lr=1e-2",
                   "--warmup=0", *QUIET])
    after = p_even(res["policy"])
    assert after > before + 0.05, (before, after)
    assert_base_unchanged(res["policy"], folder)


def invoke_more(task, rows, rollouts):
    """Rigged: reward = the fraction of trigger decisions that inserted memory."""
    ds = [[x for _, _, x in o["decisions"]] for o in rollouts]
    return [sum(d) / len(d) if d else 0.0 for d in ds]


def test_trigger_learns_a_rigged_reward_and_trains_only_itself(folder, task, tmp_path, monkeypatch):
    weaver = str(tmp_path / "w")
    tw.main(["--model", folder, "--data", task, "--out_dir", weaver, "--max_steps=1", "--limit=4", *QUIET])
    monkeypatch.setattr(training, "task_rewards", invoke_more)
    tok, exs = examples(folder, task, 4)
    prompts = [e["prompt"] for e in exs]
    captured = {}
    real = tt.build_policy

    def p_insert(mg):
        with torch.no_grad():
            ids, mask, plen = memgen.right_pad(prompts, [[]] * len(prompts), 0, "cpu")
            return memgen.trigger_forward(mg, ids, mask)[torch.arange(len(prompts)), plen - 1].mean().item()

    def capture(run):
        real(run)
        mg = run.policy
        captured.update(p=p_insert(mg), weaver=snapshot(mg.trainable("weaver")),
                        trigger=snapshot(mg.trainable("trigger")))

    monkeypatch.setattr(tt, "build_policy", capture)
    out = str(tmp_path / "t")
    res = tt.main(["--model", folder, "--data", task, "--adapter", weaver + "/final", "--out_dir", out,
                   "--max_steps=25", "--limit=4", "--batch_size=4", "--group=8", "--max_new_tokens=2",
                   "--lr=3e-2", "--warmup=0", "--lambda=0", *QUIET])
    mg = res["policy"]
    assert p_insert(mg) > captured["p"] + 0.1, (captured["p"], p_insert(mg))
    assert changed(captured["weaver"], mg.trainable("weaver")) == set()
    assert changed(captured["trigger"], mg.trainable("trigger")) == set(mg.trainable("trigger"))
    assert_base_unchanged(mg.model, folder)
    rows = [r for r in log_rows(out) if "invocation_rate" in r]
    assert rows[-1]["invocation_rate"] > rows[0]["invocation_rate"]
    assert {"trigger.safetensors", "weaver.safetensors"} <= set(os.listdir(os.path.join(out, "final")))


def test_invocation_penalty_matches_a_hand_computation():
    # rewards 1, 1, 0, 0: median 0.5, above it rollouts 0 and 1 with rates 1/2 and 0 -> p_bar = 0.25
    rewards = [1.0, 1.0, 0.0, 0.0]
    decisions = [[1, 0], [0, 0, 0], [1, 1], []]
    rates = tt.invocation_rates(decisions)
    assert rates == [0.5, 0.0, 1.0, 0.0]
    p_bar = tt.adaptive_rate(rewards, rates)
    assert p_bar == pytest.approx(0.25)
    shaped = tt.penalised_rewards(rewards, decisions, 0.1, p_bar)
    # each insertion costs 0.1 * (1 - 0.25) = 0.075; non-insertions cost nothing
    assert shaped.tolist() == pytest.approx([1 - 0.075, 1.0, -0.15, 0.0])
    # most rollouts correct: none is above the median (1), so the best ones (reward 1) set p_bar
    assert tt.adaptive_rate([1, 1, 1, 0], [1.0, 0.0, 0.5, 1.0]) == pytest.approx(0.5)
    # all equal: all of them
    assert tt.adaptive_rate([0, 0], [1.0, 0.0]) == pytest.approx(0.5)
    assert tt.penalised_rewards([1.0], [[1, 1, 1]], 0.0, 0.0).tolist() == [1.0]


def test_grpo_advantages_are_relative_to_each_prompts_group():
    adv = tw.group_advantages([1, 0, 0, 0, 1, 1, 1, 1], 4, 1e-4)
    torch.testing.assert_close(adv[:4], torch.tensor([3.0, -1, -1, -1]) / (3 ** 0.5))
    assert torch.equal(adv[4:], torch.zeros(4))  # an all-correct group teaches nothing


def test_lr_warms_up_then_decays_and_each_epoch_visits_every_example_once():
    cfg = {"lr": 1.0, "warmup": 0.1}
    lrs = [training.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3
    seen = [i for s in range(5) for i in training.batch_indices(s, 20, 4, 0)]
    assert sorted(seen) == list(range(20))  # one epoch covers every example once
    assert training.batch_indices(5, 20, 4, 0) != training.batch_indices(0, 20, 4, 0)  # the next epoch reshuffles


# ---- bad inputs: one clear line on stderr, exit status 2, no traceback (issue 11)


def fails(main, argv, capsys):
    """Run a main that must stop with one line; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--method=dpo"], "unknown --method='dpo'; use one of sft, grpo, sft-lora, grpo-lora"),
    (["--batch_size=0"], "--batch_size must be >= 1, got 0"),
    (["--warmup=1.5"], "--warmup must be in [0, 1) (a fraction of the steps), got 1.5"),
    (["--method=grpo", "--temperature=0"], "--temperature must be > 0, got 0.0"),
    (["--lr=inf"], "--lr='inf': must be a finite number"),
    (["--lr=nan"], "--lr='nan': must be a finite number"),
    (["--lr=0"], "--lr must be > 0, got 0.0"),
    (["--grad_clip=-1"], "--grad_clip must be >= 0, got -1.0"),
    (["--lora_dropout=1.5"], "--lora_dropout must be in [0, 1) (a probability), got 1.5"),
    (["--lora_targets=foo"], "--lora_targets: foo is not a Linear layer of this model; pick from down_proj, gate_proj, "
                             "k_proj, o_proj, q_proj, up_proj, v_proj"),
    (["--max_len=1000"], "--max_len=1000 plus 32 latent positions ((N+1) x K) exceeds the model's context (1024 "
                         "positions); use --max_len=992 or less"),
    (["--method=sft-lora", "--max_len=2048"], "--max_len=2048 exceeds the model's context (1024 positions); use "
                                              "--max_len=1024 or less"),
    (["--data=nope.jsonl"], "task file nope.jsonl (from 'nope.jsonl') does not exist"),
    (["--model=/no/such/folder"], "model folder '/no/such/folder' does not exist"),
    (["--resume=/no/such/run"], "no checkpoint there"),
])
def test_bad_settings_are_one_clear_line(folder, task, tmp_path, capsys, args, message):
    base = ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "o"), "--max_steps=1", *QUIET]
    assert message in fails(tw.main, base + args, capsys)
    assert not (tmp_path / "o").exists()  # nothing was written


def test_cuda_asked_for_without_cuda_is_one_line(folder, task, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = fails(tw.main, ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "o"), "--device=cuda",
                           *QUIET], capsys)
    assert "CUDA was asked for (--device=cuda) but this torch has no CUDA (or no GPU is visible)" in line


def test_a_task_too_small_for_a_validation_split_names_the_fix(folder, tmp_path, capsys):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(6)))
    line = fails(tw.main, ["--model", folder, "--data", str(tiny), "--out_dir", str(tmp_path / "o"),
                           "--max_steps=1", "--batch_size=2", *QUIET, "--val_size=8"], capsys)
    assert f"the validation split of --data={tiny} is empty" in line and "--val_size=0" in line


def test_trigger_training_without_a_weaver_or_with_a_wrong_one_is_one_line(folder, task, tmp_path, capsys):
    base = ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "t"), *QUIET]
    assert "--adapter is required" in fails(tt.main, base, capsys)
    assert f"--adapter={tmp_path}: no weaver.safetensors there" in fails(tt.main, base + [f"--adapter={tmp_path}"],
                                                                          capsys)


def test_a_second_run_into_the_same_folder_is_refused_unless_resume_or_overwrite(folder, task, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--model", folder, "--data", task, "--out_dir", out, "--max_steps=2", "--limit=4", *QUIET]
    tw.main(argv)
    first = Path(out, "final", "weaver.safetensors").read_bytes()
    line = fails(tw.main, argv, capsys)
    assert f"{out} already holds a run (step-0000002, final)" in line
    assert f"--resume={out}" in line and "--overwrite=true" in line
    assert Path(out, "final", "weaver.safetensors").read_bytes() == first  # untouched
    tw.main(argv + ["--overwrite=true", "--seed=7"])
    assert Path(out, "final", "weaver.safetensors").read_bytes() != first
    assert [r["event"] for r in log_rows(out) if "event" in r] == ["start"]  # one run's log, not two mixed


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_from_it(folder, task, tmp_path,
                                                                                   capsys, monkeypatch):
    real, calls = tw.sft_loss, []

    def nan_at_step_3(run, examples):
        calls.append(1)
        s, n = real(run, examples)
        return (s * float("nan"), n) if len(calls) == 3 else (s, n)

    monkeypatch.setattr(tw, "sft_loss", nan_at_step_3)
    out = tmp_path / "run"
    line = fails(tw.main, ["--model", folder, "--data", task, "--out_dir", str(out), "--max_steps=4", "--limit=4",
                           "--micro_batch=4", *QUIET, "--save_interval=1"], capsys)
    assert line.startswith("train_weaver.py: error: step 3: the loss is nan")
    assert "nothing from this step is saved" in line and f"{out}/step-0000002" in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-0000001", "step-0000002"]
    assert not (out / "final").exists() and max(step_losses(out)) == 2


def test_grad_clip_zero_means_no_clipping(folder, task, tmp_path):
    from safetensors.torch import load_file

    common = ["--model", folder, "--data", task, "--method=sft-lora", "--max_steps=2", "--limit=4", "--lr=1e-2",
              "--lora_dropout=0", *QUIET]
    tw.main(common + ["--out_dir", str(tmp_path / "zero"), "--grad_clip=0"])
    tw.main(common + ["--out_dir", str(tmp_path / "huge"), "--grad_clip=1e9"])
    tw.main(common + ["--out_dir", str(tmp_path / "tiny"), "--grad_clip=1e-6"])
    zero, huge, tiny = (load_file(tmp_path / d / "final" / "sft.safetensors") for d in ("zero", "huge", "tiny"))
    assert all(torch.equal(zero[k], huge[k]) for k in zero)  # 0 clips nothing
    assert any(not torch.equal(zero[k], tiny[k]) for k in zero)  # (clipping does change the update)
    assert any(torch.count_nonzero(v) for k, v in zero.items() if "lora_B" in k)  # and 0 did not zero the update


def test_a_damaged_checkpoint_names_the_file_and_the_previous_good_one(folder, task, tmp_path, capsys):
    out = tmp_path / "run"
    tw.main(["--model", folder, "--data", task, "--out_dir", str(out), "--max_steps=4", "--stop_step=2",
             "--limit=4", *QUIET, "--save_interval=1"])
    (out / "step-0000002" / "state.pt").write_bytes(b"not a checkpoint")
    line = fails(tw.main, ["--resume", str(out)], capsys)
    assert f"cannot restore {out}/step-0000002/state.pt: the checkpoint is damaged" in line
    assert line.endswith(f"resume from the previous good checkpoint: --resume={out}/step-0000001")
    res = tw.main(["--resume", f"{out}/step-0000001", "--stop_step=2"])  # which works
    assert res["step"] == 2


def test_a_chunk_then_resume_trains_to_the_end_with_relative_paths(folder, task, tmp_path, monkeypatch, capsys):
    """--stop_step ends one invocation: a plain --resume goes on to the last step and writes final/ (it once
    inherited the stop and exited 0 having done nothing), a stop already passed is one line, and the run folder
    given relative stays relative in config.json (committed configs hold no machine paths)."""
    monkeypatch.chdir(tmp_path)
    common = ["--model", folder, "--data", task, "--method=sft-lora", "--max_steps=3", "--limit=4", *QUIET,
              "--save_interval=1"]
    tw.main(common + ["--out_dir", "run", "--stop_step=1"])
    assert not os.path.exists("run/final")
    line = fails(tw.main, ["--resume", "run", "--stop_step=1"], capsys)
    assert line.startswith("train_weaver.py: error: --stop_step=1: the run is already at step 1 of 3")
    res = tw.main(["--resume", "run"])
    assert res["step"] == 3 and os.path.isfile("run/final/sft.safetensors")
    with open("run/config.json") as f:
        saved = json.load(f)
    assert saved["out_dir"] == "run" and saved["stop_step"] == 0


@pytest.fixture(scope="module")
def k4_weaver(folder, tmp_path_factory):
    """A saved MemGen weaver with K=4 latents, made on the test model."""
    path = str(tmp_path_factory.mktemp("k4"))
    memgen.save(memgen.MemGen(load_model(folder, dtype="float32"), load_tokenizer(folder), k=4), path)
    return path


def test_an_adapter_with_other_k_brings_it_and_a_contradicting_k_is_refused(folder, task, tmp_path, capsys,
                                                                           k4_weaver):
    args = ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "o"), "--method=grpo",
            f"--adapter={k4_weaver}", *QUIET]
    line = fails(tw.main, args + ["--k=8"], capsys)
    assert line.endswith(f"--k=8 contradicts {k4_weaver}/weaver.json, which was trained with k=4: drop --k (the "
                         "adapter brings its own) or pass another --adapter")
    res = tw.main(args + ["--max_steps=1", "--limit=4", "--group=2", "--max_new_tokens=2"])
    assert res["policy"].k == 4 and json.loads((tmp_path / "o/config.json").read_text())["k"] == 4


def test_an_adapter_from_another_base_model_is_refused_unless_allowed(folder, task, tmp_path, capsys, k4_weaver):
    other = tmp_path / "other"
    shutil.copytree(k4_weaver, other)
    info = json.loads((other / "weaver.json").read_text())
    (other / "weaver.json").write_text(json.dumps(dict(info, base_model="SmolLM2-135M-Instruct")))
    argv = ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "o"), "--max_steps=1", "--limit=4",
            "--k=4", f"--adapter={other}", *QUIET]
    line = fails(tw.main, argv, capsys)
    assert (f"{other}/weaver.json was trained on base model SmolLM2-135M-Instruct, this run loads "
            f"{Path(folder).name}: pass that --model, or --allow_other_base=true to load it anyway") in line
    assert tw.main(argv + ["--allow_other_base=true"])["step"] == 1


def test_a_quick_run_announces_and_runs_a_final_eval_of_its_own_size(folder, task, tmp_path, capsys):
    """--max_steps=2 x --batch_size=2: the final eval takes 4 test problems (of 20), announced with a time
    estimate before training starts."""
    out = tmp_path / "run"
    res = tw.main(["--model", folder, "--data", task, "--out_dir", str(out), "--max_steps=2", "--batch_size=2",
                   "--micro_batch=2", "--max_new_tokens=4", "--progress=false", "--dtype=float32", "--val_size=0",
                   "--max_len=512"])
    err = capsys.readouterr().err
    plan = next(x for x in err.splitlines() if "final eval after training" in x)
    assert re.search(r"4 of 20 test problems \(the run's size; --final_eval_limit=-1 skips it\), about \d+ s", plan)
    assert err.index(" on 18 examples") < err.index(plan) < err.index("adapters saved")  # announced at start
    assert res["final_eval"]["n"] == 4 and json.loads((out / "final_eval.json").read_text())["n"] == 4


# ---- kill and resume, torchrun


def script(*args, env=None):
    return [sys.executable, str(ROOT / "train_weaver.py"), *args]


def test_sigkill_then_resume_continues_exactly(folder, task, tmp_path):
    """Uninterrupted: steps 1..12. Killed: SIGKILL once it has logged step >= 5 (checkpoints every 2 steps),
    then --resume. Every step after the checkpoint it resumed from has the same loss, bit for bit."""
    common = ["--model", folder, "--data", task, "--max_steps=200", "--save_interval=2", "--batch_size=4",
              "--micro_batch=2", "--lr=1e-2", "--progress=false", "--dtype=float32", "--final_eval_limit=-1",
              "--val_size=0", "--max_len=512"]  # dropout stays on (0.1): the resumed run must draw the same masks
    ref = str(tmp_path / "ref")
    subprocess.run(script(*common, "--out_dir", ref, "--stop_step=12"), check=True, cwd=ROOT, capture_output=True)
    run = str(tmp_path / "run")
    p = subprocess.Popen(script(*common, "--out_dir", run), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    log = Path(run, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and max(step_losses(run) or [0]) >= 5:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ckpt = training.checkpoints(run)[-1]
    start = int(Path(ckpt).name[5:])
    assert 2 <= start < 200
    subprocess.run(script("--resume", run, "--stop_step=" + str(max(12, start + 2))), check=True, cwd=ROOT,
                   capture_output=True)
    a, b = step_losses(ref), step_losses(run)
    for s in range(start + 1, 13):
        assert a[s] == b[s], (s, a[s], b[s])
    assert max(b) >= start + 2
    steps = [r["step"] for r in log_rows(run) if "loss" in r]
    assert steps == sorted(set(steps)), steps  # steps done again after the kill are logged once


def test_a_resumed_log_drops_what_was_logged_after_its_checkpoint(tmp_path):
    """A run killed at step 5 with its last checkpoint at step 3 logged steps 4 and 5 (and a cut-off line); resumed at
    step 3, it does them again, so its log keeps steps up to 3 and appends from there. A fresh log starts empty."""
    path = str(tmp_path / "log.jsonl")
    lines = [json.dumps({"event": "start", "step": 0})] + [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    Path(path).write_text("\n".join(lines) + '\n{"step": 6, "lo')
    log = training.Log(path, True, fresh=False, resumed=3)
    log(event="start", step=3)
    log(step=4, loss=0.5)
    log.f.close()
    assert [(r.get("event"), r["step"]) for r in log_rows(tmp_path)] == [
        ("start", 0), (None, 1), (None, 2), (None, 3), ("start", 3), (None, 4)]
    training.Log(path, True, fresh=True).f.close()
    assert Path(path).read_text() == ""


def test_torchrun_two_processes_equal_one(folder, task, tmp_path):
    common = ["--model", folder, "--data", task, "--max_steps=2", "--batch_size=4", "--micro_batch=1",
              "--lr=1e-2", "--lora_dropout=0", *QUIET]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run(script(*common, "--out_dir", one), check=True, cwd=ROOT, capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train_weaver.py"), *common, "--out_dir", two], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(f"{one}/final/weaver.safetensors"), load_file(f"{two}/final/weaver.safetensors")
    assert set(a) == set(b)
    for k in a:
        # Adam divides by sqrt(v): where a gradient is ~0, rounding (different packed shapes per process) moves the
        # update by up to ~lr; a wrong all-reduce would be off by the gradient itself
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    la, lb = step_losses(one), step_losses(two)
    assert la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-5)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train
