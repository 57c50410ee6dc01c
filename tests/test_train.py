"""train_weaver.py and train_trigger.py on a tiny random model and a toy task: what learns, what must not change,
the invocation penalty, exact resume after SIGKILL, settings parsing, and torchrun == one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memgen
import train_trigger as tt
import train_weaver as tw
from model import load_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--progress=false", "--dtype=float32", "--final_eval_limit=-1", "--val_size=0", "--save_interval=0"]


@pytest.fixture(scope="module")
def folder(long_folder):
    return long_folder


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """20 addition problems with one-token-ish answers: targets are short, so a few dozen steps can fit them."""
    path = tmp_path_factory.mktemp("task") / "add.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            a, b = 3 + i, 7 + 2 * i
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    return str(path)


def log_rows(out):
    return [json.loads(x) for x in Path(out, "log.jsonl").read_text().splitlines()]


def step_losses(out):
    """{step: loss} of the training lines; a step logged twice (a killed run, then its resume) keeps the last."""
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
        ids, mask, plen = memgen.right_pad([e["prompt"] for e in examples], [e["completion"] for e in examples], 0, "cpu")
        h = memgen.teacher_forced(mg, ids, mask, plen, plen[:, None])
        logits = mg.model.head(h[torch.arange(len(examples)), plen - 1])[:, :mg.vocab].float()
        return torch.nn.functional.cross_entropy(logits, ids[torch.arange(len(examples)), plen]).item()


def test_sft_lora_fits_and_leaves_the_reasoner_alone(folder, task, tmp_path):
    out = str(tmp_path / "sft-lora")
    res = tw.main(["--model", folder, "--data", task, "--method", "sft-lora", "--out_dir", out, "--max_steps=40",
                   "--limit=8", "--batch_size=8", "--micro_batch=4", "--lr=1e-2", "--warmup=0",
                   "--lora_dropout=0", *QUIET])
    losses = step_losses(out)
    assert len(losses) == 40
    assert losses[40] < 0.5 * losses[1], (losses[1], losses[40])
    assert_base_unchanged(res["target"], folder)
    assert os.path.isfile(os.path.join(out, "final", "sft.safetensors"))


def test_weaver_sft_fits_and_leaves_the_reasoner_alone(folder, task, tmp_path, monkeypatch):
    """A random 2-layer reasoner attends only weakly to 8 latents among ~60 slots, so the weaver cannot fit every
    token as a LoRA on the reasoner can (above); it must fit the tokens read off its own latent slots, and lower
    the whole loss clearly."""
    from data.gsm8k import load_task
    from tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    examples, _ = tw.encode_examples(load_task(task, "train")[:8], tok, 512)
    before = {}
    real = memgen.MemGen

    def capture(*a, **kw):
        mg = real(*a, **kw)
        before["nll"] = first_token_nll(mg, examples)
        return mg

    monkeypatch.setattr(memgen, "MemGen", capture)
    out = str(tmp_path / "sft")
    res = tw.main(["--model", folder, "--data", task, "--out_dir", out, "--max_steps=40", "--limit=8",
                   "--batch_size=8", "--micro_batch=4", "--lr=1e-2", "--warmup=0", "--lora_dropout=0", *QUIET])
    losses = step_losses(out)
    assert losses[40] < 0.7 * losses[1], (losses[1], losses[40])
    after = first_token_nll(res["target"], examples)
    assert after < 0.5 * before["nll"], (before["nll"], after)
    assert_base_unchanged(res["target"].model, folder)
    assert os.path.isfile(os.path.join(out, "final", "weaver.safetensors"))


def test_sft_forward_loss_matches_a_plain_cross_entropy(folder, task):
    """sft_loss through MemGen == cross-entropy of head(memgen.teacher_forced) over completion tokens, computed densely."""
    from tokenizer import load_tokenizer
    from data.gsm8k import load_task

    torch.manual_seed(0)
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    mg = memgen.MemGen(model, tok)
    mg.eval()
    ex, _ = tw.encode_examples(load_task(task, "train")[:3], tok, 512)
    s, n = tw.sft_loss(mg, "sft", ex, tok.pad_id, tok.vocab_size)
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


# ---- GRPO and the trigger on rigged rewards


def even_first_token(text, gold, rollout):
    """Rigged: reward 1 when the first completion token has an even id."""
    return float(rollout["ids"][0] % 2 == 0)


def p_even_first(mg, prompts):
    """Exact P(first completion token is even) under MemGen (prompt insertion included)."""
    with torch.no_grad():
        ids, mask, plen = memgen.right_pad(prompts, [[0]] * len(prompts), 0, "cpu")
        h = memgen.teacher_forced(mg, ids, mask, plen, plen[:, None])
        p = torch.softmax(mg.model.head(h[torch.arange(len(prompts)), plen - 1])[:, :mg.vocab].float(), -1)
    return p[:, ::2].sum(1).mean().item()


def test_grpo_moves_a_rigged_reward_and_trains_only_the_weaver(folder, task, tmp_path, monkeypatch):
    from tokenizer import load_tokenizer
    from data.gsm8k import load_task, messages

    monkeypatch.setattr(tw, "reward", even_first_token)
    tok = load_tokenizer(folder)
    prompts = [tok.chat(messages(r["question"])) for r in load_task(task, "train")[:4]]
    captured = {}
    real = memgen.MemGen

    def capture(*a, **kw):
        mg = real(*a, **kw)
        captured["before_p"] = p_even_first(mg, prompts)
        captured["weaver"], captured["trigger"] = snapshot(mg.trainable("weaver")), snapshot(mg.trainable("trigger"))
        return mg

    monkeypatch.setattr(memgen, "MemGen", capture)
    res = tw.main(["--model", folder, "--data", task, "--method", "grpo", "--out_dir", str(tmp_path / "g"),
                   "--max_steps=25", "--limit=4", "--batch_size=4", "--group=8", "--micro_batch=16",
                   "--max_new_tokens=2", "--lr=3e-2", "--warmup=0", *QUIET])
    mg = res["target"]
    after = p_even_first(mg, prompts)
    assert after > captured["before_p"] + 0.1, (captured["before_p"], after)
    assert changed(captured["trigger"], mg.trainable("trigger")) == set()
    assert changed(captured["weaver"], mg.trainable("weaver")) == set(mg.trainable("weaver"))
    assert_base_unchanged(mg.model, folder)
    rows = [r for r in log_rows(tmp_path / "g") if "reward" in r]
    assert {"reward", "length", "insertions"} <= set(rows[0])


def test_grpo_lora_moves_a_rigged_reward(folder, task, tmp_path, monkeypatch):
    import lora
    from data.gsm8k import load_task, messages
    from tokenizer import load_tokenizer

    monkeypatch.setattr(tw, "reward", even_first_token)
    tok = load_tokenizer(folder)
    prompts = [tok.chat(messages(r["question"])) for r in load_task(task, "train")[:4]]

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
    after = p_even(res["target"])
    assert after > before + 0.05, (before, after)
    assert_base_unchanged(res["target"], folder)


def invoke_more(text, gold, rollout):
    """Rigged: reward = the fraction of trigger decisions that inserted memory."""
    d = [x for _, _, x in rollout["decisions"]]
    return sum(d) / len(d) if d else 0.0


def test_trigger_learns_a_rigged_reward_and_trains_only_itself(folder, task, tmp_path, monkeypatch):
    from tokenizer import load_tokenizer
    from data.gsm8k import load_task, messages

    weaver = str(tmp_path / "w")
    tw.main(["--model", folder, "--data", task, "--out_dir", weaver, "--max_steps=1", "--limit=4", *QUIET])
    monkeypatch.setattr(tt, "reward", invoke_more)
    tok = load_tokenizer(folder)
    prompts = [tok.chat(messages(r["question"])) for r in load_task(task, "train")[:4]]
    captured = {}
    real = tt.build

    def p_insert(mg):
        with torch.no_grad():
            ids, mask, plen = memgen.right_pad(prompts, [[]] * len(prompts), 0, "cpu")
            return memgen.trigger_forward(mg, ids, mask)[torch.arange(len(prompts)), plen - 1].mean().item()

    def capture(cfg, device):
        model, tok_, mg, params = real(cfg, device)
        captured.update(p=p_insert(mg), weaver=snapshot(mg.trainable("weaver")),
                        trigger=snapshot(mg.trainable("trigger")))
        return model, tok_, mg, params

    monkeypatch.setattr(tt, "build", capture)
    out = str(tmp_path / "t")
    res = tt.main(["--model", folder, "--data", task, "--weaver", weaver + "/final", "--out_dir", out,
                   "--max_steps=25", "--limit=4", "--batch_size=4", "--group=8", "--max_new_tokens=2",
                   "--lr=3e-2", "--warmup=0", "--lambda=0", *QUIET])
    mg = res["target"]
    assert p_insert(mg) > captured["p"] + 0.1, (captured["p"], p_insert(mg))
    assert changed(captured["weaver"], mg.trainable("weaver")) == set()
    assert changed(captured["trigger"], mg.trainable("trigger")) == set(mg.trainable("trigger"))
    assert_base_unchanged(mg.model, folder)
    rows = [r for r in log_rows(out) if "invocation_rate" in r]
    assert rows[-1]["invocation_rate"] > rows[0]["invocation_rate"]
    assert {"trigger.safetensors", "weaver.safetensors"} <= set(os.listdir(os.path.join(out, "final")))


def test_invocation_penalty_by_hand():
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


def test_group_advantages():
    adv = tw.group_advantages([1, 0, 0, 0, 1, 1, 1, 1], 4, 1e-4)
    torch.testing.assert_close(adv[:4], torch.tensor([3.0, -1, -1, -1]) / (3 ** 0.5))
    assert torch.equal(adv[4:], torch.zeros(4))  # an all-correct group teaches nothing


def test_schedule_and_batches():
    cfg = {"lr": 1.0, "warmup": 0.1}
    lrs = [tw.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3
    seen = [i for s in range(5) for i in tw.batch_indices(s, 20, 4, 0)]
    assert sorted(seen) == list(range(20))  # one epoch covers every example once
    assert tw.batch_indices(5, 20, 4, 0) != tw.batch_indices(0, 20, 4, 0)  # the next epoch reshuffles


# ---- settings


def test_overrides():
    base = tw.defaults(vars(tw))
    cfg, given = tw.parse_overrides(["--lr=3e-4", "--max-steps", "7", "--progress=false", "--method=grpo"], base, "x")
    assert (cfg["lr"], cfg["max_steps"], cfg["progress"], cfg["method"]) == (3e-4, 7, False, "grpo")
    assert given == {"lr", "max_steps", "progress", "method"}
    assert cfg["epochs"] == tw.EPOCHS
    with pytest.raises(tw.TrainError, match="unknown setting --lrr; valid keys: .*lr"):
        tw.parse_overrides(["--lrr=1"], base, "x")
    with pytest.raises(tw.TrainError, match="--max_steps='ten': expected int"):
        tw.parse_overrides(["--max_steps=ten"], base, "x")
    with pytest.raises(tw.TrainError, match="expected bool"):
        tw.parse_overrides(["--progress=maybe"], base, "x")
    with pytest.raises(tw.TrainError, match="unexpected argument"):
        tw.parse_overrides(["gsm8k"], base, "x")


@pytest.mark.parametrize("args, message", [
    (["--method=dpo"], "unknown --method 'dpo'"),
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--warmup=1.5"], "--warmup is a fraction"),
    (["--method=grpo", "--temperature=0"], "--temperature must be > 0"),
    (["--data=nope.jsonl"], "nope.jsonl does not exist"),
    (["--model=/no/such/folder"], "/no/such/folder"),
    (["--resume=/no/such/run"], "no checkpoint there"),
])
def test_bad_settings_are_one_clear_line(folder, task, tmp_path, capsys, args, message):
    base = ["--model", folder, "--data", task, "--out_dir", str(tmp_path / "o"), "--max_steps=1", *QUIET]
    with pytest.raises(SystemExit) as e:
        tw.main(base + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_trigger_needs_a_weaver(folder, task, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tt.main(["--model", folder, "--data", task, "--out_dir", str(tmp_path), *QUIET])
    assert "--weaver DIR is required" in capsys.readouterr().err


# ---- kill and resume, torchrun


def script(*args, env=None):
    return [sys.executable, str(ROOT / "train_weaver.py"), *args]


def test_sigkill_then_resume_continues_exactly(folder, task, tmp_path):
    """Uninterrupted: steps 1..12. Killed: SIGKILL once it has logged step >= 5 (checkpoints every 2 steps),
    then --resume. Every step after the checkpoint it resumed from has the same loss, bit for bit."""
    common = ["--model", folder, "--data", task, "--max_steps=200", "--save_interval=2", "--batch_size=4",
              "--micro_batch=2", "--lr=1e-2", "--progress=false", "--dtype=float32", "--final_eval_limit=-1",
              "--val_size=0"]  # dropout stays on (0.1): the resumed run must draw the same masks
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
    ckpt = tw.checkpoints(run)[-1]
    start = int(Path(ckpt).name[5:])
    assert 2 <= start < 200
    subprocess.run(script("--resume", run, "--stop_step=" + str(max(12, start + 2))), check=True, cwd=ROOT,
                   capture_output=True)
    a, b = step_losses(ref), step_losses(run)
    for s in range(start + 1, 13):
        assert a[s] == b[s], (s, a[s], b[s])
    assert max(b) >= start + 2


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
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    la, lb = step_losses(one), step_losses(two)
    assert la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-5)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train
