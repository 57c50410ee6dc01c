"""
The multi-turn agent loop (agent.py) on a small fake environment: the cached, batched loop against a naive one that
re-reads each episode's whole history from scratch for every token and every insertion (one episode at a time, no
cache), for vanilla, LoRA and MemGen; action parsing; turn and context limits; a killed evaluation resumed per
episode; and the multi-turn training forward against the insertions decoding made.
"""
import json

import pytest
import torch

import agent
import lora
import memgen
from model import load_model
from reference import naive_weave
from tokenizer import load_tokenizer

K = 4


class FakeEnv:
    """A toy world: an episode lasts row["length"] steps (then done, score 100); it scores START before any action
    and 10 x its number after each step, and echoes the action, so what the agent writes changes what it reads next."""

    START = 5

    def __init__(self, fail_after=None):
        self.fail_after, self.steps, self.closed = fail_after, 0, False

    def reset(self, row):
        self.n, self.length = 0, row["length"]
        return f"Reach step {self.length}.", f"You are in room {row['id']}. It is quiet.", self.START

    def step(self, action):
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("killed")
        self.n += 1
        done = self.n >= self.length
        return f"You did: {action}. Step {self.n}.", 100 if done else 10 * self.n, done

    def close(self):
        self.closed = True


def messages(row):
    return [{"role": "user", "content": f"Task: {row['question']}\nObservation: {row['observation']}\nThink, then "
                                        "write Action: <action>."}]


def any_action(text):
    """A parser that accepts every reply, so a random model's episodes step their environment every turn."""
    return f"step {len(text) % 7}"


ROWS = [{"id": "a", "length": 1}, {"id": "b", "length": 2}, {"id": "c", "length": 9}]


def make(tiny, mode="always", n=3, boundary="official", trigger_scale=1.0):
    path, _ = tiny("qwen2", False)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    torch.manual_seed(0)
    mg = memgen.MemGen(model, tok, k=K, n=n, mode=mode, boundary=boundary).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random adapters and heads, so every part visibly matters
        for name in ("weaver", "trigger"):
            for p in lora.parameters(model, name).values():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in list(mg.weaver.parameters()) + list(mg.trigger.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        mg.trigger.head.weight.mul_(trigger_scale)  # p(insert) far from the threshold: no decision rides on rounding
    mg.is_delim[::3] = True  # a random model rarely says "." greedily: more boundaries exercise more insertions
    return mg, tok


@torch.no_grad()
def naive_episode(policy, tok, mode, row, max_turns, turn_tokens, max_context, trigger_mode="always"):
    """One episode with no cache at all: every token and every insertion re-reads the whole history (tokens and
    latents) from the start, as the official code's decoding does within one turn."""
    mg = policy if mode == "memgen" else None
    model = mg.model if mg is not None else policy
    V = min(tok.vocab_size, model.cfg.vocab_size)
    env = FakeEnv()
    question, observation, score = env.reset(row)
    ids = tok.chat(messages(dict(row, question=question, observation=observation)))
    seq = model.embed(torch.tensor(ids))
    points, actions, end = [], [], None
    room = turn_tokens + (K * (mg.n + 1) if mg is not None and trigger_mode != "off" else 0) + 1

    def insert(is_prompt):
        nonlocal seq
        if trigger_mode == "learned":
            p = memgen.trigger_forward(mg, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0, -1]
            if float(p) < memgen.TRIGGER_THRESHOLD:
                return False
        seq = torch.cat([seq, naive_weave(mg, seq, is_prompt)])
        points.append(len(ids))
        return True

    def next_token(digits=True):
        with lora.use(model, "sft" if mode == "lora" else None):
            logits, _ = model(inputs_embeds=seq[None])
        logits = logits[0, -1, :V]
        return int((logits if digits else logits.masked_fill(mg.starts_digit[:V], float("-inf"))).argmax())

    for turn in range(max_turns):
        if mg is not None and trigger_mode != "off":
            insert(True)
        reply, n_ins, prev, pending = [], 0, ids[-1], False
        for t in range(turn_tokens):
            nxt = next_token()
            if pending:  # rule "sentence": a delimiter that may end a number is settled by the token after it
                pending = False
                if not bool(mg.starts_digit[nxt]) and insert(False):
                    n_ins += 1
                    nxt = next_token(digits=False)  # the sentence ended: the token after the latents is no digit
            reply.append(nxt)
            ids.append(nxt)
            seq = torch.cat([seq, model.embed(torch.tensor([nxt]))])
            if nxt in tok.eos_ids:
                break
            if mg is not None and trigger_mode != "off" and bool(mg.is_delim[nxt]) and n_ins < mg.n \
                    and t < turn_tokens - 1:
                in_number = bool(mg.punct_in_number[nxt]) or (bool(mg.just_punct[nxt]) and bool(mg.ends_digit[prev]))
                if mg.boundary == "sentence" and in_number:
                    pending = True
                else:
                    n_ins += insert(False)
            prev = nxt
        text = tok.decode([x for x in reply if x not in tok.eos_ids])
        action = any_action(text)
        actions.append(action)
        observation, score, done = env.step(action)
        if done or turn + 1 == max_turns:
            end = "done" if done else "turn_limit"
            break
        seg = ([] if reply[-1] in tok.eos_ids else [tok.end_id]) + agent.next_prompt(tok, observation)
        if len(seq) + len(seg) + room > max_context:
            end = "context"
            break
        ids += seg
        seq = torch.cat([seq, model.embed(torch.tensor(seg))])
    return dict(ids=ids, points=points, actions=actions, score=score, end=end)


def run(policy, tok, mode, rows=ROWS, max_turns=3, turn_tokens=10, max_context=256, trigger_mode=None, **kw):
    envs = [FakeEnv() for _ in rows]
    return agent.run_episodes(policy, tok, mode, envs, rows, messages, max_turns=max_turns, turn_tokens=turn_tokens,
                              max_context=max_context, trigger_mode=trigger_mode, parse=any_action, **kw)


def check_equal(eps, policy, tok, mode, max_turns=3, turn_tokens=10, max_context=256, trigger_mode="always"):
    for row, ep in zip(ROWS, eps):
        ref = naive_episode(policy, tok, mode, row, max_turns, turn_tokens, max_context, trigger_mode)
        assert ep["ids"] == ref["ids"], row["id"]
        assert ep["points"] == ref["points"]
        assert [t["action"] for t in ep["turns"]] == ref["actions"]
        assert (ep["score"], ep["end"]) == (ref["score"], ref["end"])


@pytest.mark.parametrize("mode", ["vanilla", "lora"])
def test_cached_multi_turn_decode_equals_rereading_the_history_vanilla_and_lora(tiny, mode):
    mg, tok = make(tiny)
    model = mg.model
    if mode == "lora":
        if "sft" not in getattr(model, "lora_meta", {}):
            lora.inject(model, ["sft"])
        with torch.no_grad():
            for p in lora.parameters(model, "sft").values():
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    eps = run(model, tok, mode)
    assert [len(e["turns"]) for e in eps] == [1, 2, 3]  # episodes end at different turns: rows drop out
    assert [e["end"] for e in eps] == ["done", "done", "turn_limit"]
    assert eps[1]["success"] and not eps[2]["success"]
    check_equal(eps, model, tok, mode)


def rig_boundary_tables(mg):
    """Token tables where a random tiny model meets many delimiters, many of them possibly inside numbers."""
    g = torch.Generator().manual_seed(7)
    for name, p in (("is_delim", 0.3), ("punct_in_number", 0.5), ("just_punct", 0.2), ("ends_digit", 0.5),
                    ("starts_digit", 0.5)):
        getattr(mg, name).copy_(torch.rand(mg.is_delim.shape, generator=g) < p)
    mg.punct_in_number &= mg.is_delim
    mg.just_punct &= mg.is_delim & ~mg.punct_in_number


def test_cached_multi_turn_decode_equals_rereading_the_history_sentence_rule(tiny):
    mg, tok = make(tiny, boundary="sentence")
    rig_boundary_tables(mg)
    eps = run(mg, tok, "memgen", turn_tokens=12)
    replies = [(e["ids"][p - 1], e["ids"][p]) for e in eps for p, is_p in zip(e["points"], e["prompt_points"])
               if not is_p]
    assert any(bool(mg.punct_in_number[a]) for a, _ in replies)  # the rule let a number-like boundary through
    check_equal(eps, mg, tok, "memgen", turn_tokens=12)


def test_cached_multi_turn_decode_equals_rereading_the_history_memgen(tiny):
    mg, tok = make(tiny)
    eps = run(mg, tok, "memgen", turn_tokens=12)
    prompt_points = [p for e in eps for p, is_p in zip(e["points"], e["prompt_points"]) if is_p]
    assert len(prompt_points) == sum(len(e["turns"]) for e in eps)  # one at the end of every turn's prompt
    assert any(not is_p for e in eps for is_p in e["prompt_points"])  # and some inside the replies
    check_equal(eps, mg, tok, "memgen", turn_tokens=12)


def test_cached_multi_turn_decode_equals_rereading_the_history_learned_trigger(tiny):
    mg, tok = make(tiny, mode="learned", trigger_scale=30.0)
    with torch.no_grad():  # centre p(insert) on the threshold over a sample text, so it fires about half the time
        ids = torch.tensor([tok.chat(messages(dict(ROWS[0], question="Reach step 1.", observation="x")))])
        with lora.use(mg.model, "trigger"):
            _, h = mg.model(ids)
        diff = mg.trigger.head(h[0].float())
        mg.trigger.head.bias[1] -= (diff[:, 1] - diff[:, 0]).median()
    eps = run(mg, tok, "memgen", turn_tokens=12)
    ps = [d[1] for e in eps for t in e["turns"] for d in t["decisions"]]
    assert any(p >= 0.5 for p in ps) and any(p < 0.5 for p in ps)  # the trigger really decides both ways
    assert min(abs(p - 0.5) for p in ps) > 1e-4  # and no decision rides on rounding
    check_equal(eps, mg, tok, "memgen", turn_tokens=12, trigger_mode="learned")


def test_batched_episodes_equal_one_by_one(tiny):
    mg, tok = make(tiny)
    together = run(mg, tok, "memgen")
    alone = [run(mg, tok, "memgen", rows=[r])[0] for r in ROWS]
    assert [e["ids"] for e in together] == [e["ids"] for e in alone]
    assert [e["points"] for e in together] == [e["points"] for e in alone]


def test_context_limit_ends_an_episode_cleanly(tiny):
    mg, tok = make(tiny)
    eps = run(mg, tok, "memgen", max_context=150, turn_tokens=12)
    assert eps[2]["end"] == "context" and len(eps[2]["turns"]) < 3
    check_equal(eps, mg, tok, "memgen", turn_tokens=12, max_context=150)
    first = run(mg.model, tok, "vanilla", max_context=20)  # not even the first prompt fits: no turn, no crash
    assert all(e["end"] == "context" and e["turns"] == [] for e in first)


def test_training_forward_inserts_where_decoding_did_and_predicts_its_tokens(tiny):
    """The recorded episodes as training rows: training_points finds the points decoding used (a prompt insertion
    at every turn start, the sentence ends inside replies), and the teacher-forced forward's argmax reproduces
    every greedy reply token."""
    mg, tok = make(tiny)
    eps = run(mg, tok, "memgen", turn_tokens=12)
    P = [e["points"][0] for e in eps]  # the first prompt ends where the first turn starts
    examples = [dict(prompt=e["ids"][:p], completion=e["ids"][p:], agent=e["agent"][p:],
                     turn_starts=[i for i, is_p in zip(e["points"], e["prompt_points"]) if is_p])
                for e, p in zip(eps, P)]
    ids, mask, agent_mask, starts = agent.batch_tensors(examples, tok.pad_id, "cpu")
    points, is_prompt = agent.training_points(mg, ids, agent_mask.tolist(), starts)
    for b, e in enumerate(eps):
        got = [(int(p), bool(q)) for p, q in zip(points[b], is_prompt[b]) if p >= 0]
        assert got == list(zip(e["points"], e["prompt_points"]))
    with torch.no_grad():
        h = memgen.teacher_forced(mg, ids, mask, None, points, is_prompt=is_prompt)
        pred = mg.model.head(h)[..., :mg.vocab].argmax(-1)
    label = agent_mask[:, 1:]
    assert torch.equal(pred[:, :-1][label], ids[:, 1:][label])
    nll, count = agent.sft_nll(mg, examples, tok.pad_id, mg.vocab)
    assert count == int(agent_mask.sum()) and nll.item() > 0


def test_render_trajectory_is_what_the_loop_feeds(tiny):
    _, tok = make(tiny)
    msgs = messages({"question": "Q", "observation": "O"})
    ids, agent_mask, starts = agent.render_trajectory(tok, msgs, [("Action: a", "obs one"), ("Action: b", None)])
    one, two = tok.encode("Action: a") + [tok.end_id], tok.encode("Action: b") + [tok.end_id]
    assert ids == tok.chat(msgs) + one + agent.next_prompt(tok, "obs one") + two
    assert starts == [len(tok.chat(msgs)), len(ids) - len(two)]
    assert [x for x, a in zip(ids, agent_mask) if a] == one + two
    # the loop's pieces are ChatML: the same tokens tok.chat renders for the whole conversation
    conv = msgs + [{"role": "assistant", "content": "Action: a"}, {"role": "user", "content": "Observation: obs one"}]
    assert ids[:starts[1]] == tok.chat(conv)


@pytest.mark.parametrize("text,action", [
    ("Think: go.\nAction: open door to kitchen", "open door to kitchen"),
    ("action:   Pick up  THE thermometer.", "pick up the thermometer"),
    ("**Action:** `focus on water`\nAction: look around", "focus on water"),  # the first action line counts
    ("I will open the door.", None),  # no action line: a wasted turn
    ("Action:   \n", None),
    ("", None),
    ("reaction: x\nThe action: y", None),  # "Action:" must start the line
])
def test_parse_action(text, action):
    assert agent.parse_action(text) == action


def test_an_unparseable_reply_is_a_wasted_turn_and_the_turn_limit_holds(tiny):
    mg, tok = make(tiny)
    envs = [FakeEnv() for _ in ROWS]
    eps = agent.run_episodes(mg.model, tok, "vanilla", envs, ROWS, messages, max_turns=2, turn_tokens=6)
    assert all(e["end"] == "turn_limit" and len(e["turns"]) == 2 for e in eps)  # a random model writes no action
    assert all(t["action"] is None and t["observation"] == agent.WASTED for e in eps for t in e["turns"])
    assert all(env.steps == 0 for env in envs)  # the environment was never stepped
    assert all(e["score"] == FakeEnv.START for e in eps)  # and the episode keeps the score of its start
    assert agent.summarize([agent.record(e) for e in eps])["wasted_turn_rate"] == 1.0
    assert agent.summarize([agent.record(e) for e in eps])["repeated_action_rate"] == 0.0  # wasted never repeat


def test_repeated_actions_count_turns_equal_to_the_one_before_within_an_episode():
    def rec(*actions):
        return {"score": 0, "success": False, "end": "turn_limit",
                "turns": [{"action": a, "tokens": 1, "insertions": []} for a in actions]}

    # pairs: (a, a) repeats; (a, b), (b, None), (None, None), (None, b) do not; nothing pairs across episodes
    s = agent.summarize([rec("a", "a", "b", None, None, "b"), rec("b"), rec("b", "c")])
    assert s["repeated_action_rate"] == pytest.approx(1 / 6)
    assert agent.summarize([rec("x")])["repeated_action_rate"] == 0.0  # no turn after a first one
    # revisits: turn 2 (a seen), turn 6 (b seen at turn 3); None never counts; nothing is seen across episodes
    assert s["revisited_action_rate"] == pytest.approx(2 / 6)


def test_revisited_actions_count_loops_that_repeats_miss():
    turns = [{"action": a, "tokens": 1, "insertions": []} for a in ("open", "close", "open", "close", "go")]
    s = agent.summarize([{"score": 0, "success": False, "end": "turn_limit", "turns": turns}])
    assert s["repeated_action_rate"] == 0.0 and s["revisited_action_rate"] == pytest.approx(2 / 4)


def test_killed_evaluation_resumes_per_episode(tiny, tmp_path):
    mg, tok = make(tiny)
    task = type("Task", (), {"NAME": "fake", "messages": staticmethod(messages)})
    rows = [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in ROWS]  # 6 episodes, batches of 4
    kw = dict(batch_size=4, max_turns=3, turn_tokens=8, max_context=256, progress=False, parse=any_action)
    whole = agent.evaluate(mg, tok, task, rows, "memgen", make_env=FakeEnv, **kw)

    out = tmp_path / "results.jsonl"
    with pytest.raises(RuntimeError, match="killed"):  # the 4th step in the first batch kills the run
        agent.evaluate(mg, tok, task, rows, "memgen", make_env=lambda: FakeEnv(fail_after=1), out_path=str(out), **kw)
    saved = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert 0 < len(saved) < len(rows)  # the episodes that had ended were written before the kill
    made = []
    resumed = agent.evaluate(mg, tok, task, rows, "memgen", make_env=lambda: made.append(FakeEnv()) or made[-1],
                             out_path=str(out), **kw)
    assert resumed["generated_episodes"] == len(rows) - len(saved)
    assert all(env.closed for env in made)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in rows)  # each episode once
    drop = ("wall_s", "generated_episodes")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert whole["n"] == 6 and whole["end_done"] == 4 and whole["end_turn_limit"] == 2
    assert whole["success_rate"] == pytest.approx(4 / 6) and whole["insertions_per_turn"] >= 1


def fake_task_module():
    """A multi-turn task module like data/scienceworld.py, over FakeEnv: gold trajectories say "step i"."""
    import types

    def load(split, path=None):
        rows = []
        for i in range(6 if split == "train" else 3):
            row = {"id": f"{split}-{i}", "length": 1 + i % 3, "answer": None, "question": f"Reach step {1 + i % 3}.",
                   "observation": f"You are in room {split}-{i}. It is quiet."}
            row["turns"] = [{"action": f"step {j}", "observation": f"You did: step {j}. Step {j + 1}."}
                            for j in range(row["length"])]
            row["target"] = "\n".join(f"Action: {t['action']}" for t in row["turns"])
            rows.append(row)
        return rows

    def grade(row, completion):
        raise AssertionError("a multi-turn task is never graded by completion")

    return types.SimpleNamespace(NAME="fakeworld", AGENT=True, load=load, messages=messages, grade=grade,
                                 make_env=FakeEnv)


@pytest.mark.parametrize("method,mode", [("sft", "memgen"), ("sft-lora", "lora")])
def test_sft_on_trajectories_then_eval_episodes_through_the_entry_points(tiny, tmp_path, monkeypatch, method, mode):
    """train_weaver.py fits the agent's turns of gold trajectories; eval.py runs the trained policy's episodes and
    writes one row per episode, the summary with its agent metrics, and the cross-domain table's column."""
    import sys

    import eval as ev
    import train_weaver as tw

    monkeypatch.setitem(sys.modules, "data.fakeworld", fake_task_module())
    monkeypatch.chdir(tmp_path)
    path, _ = tiny("qwen2", False)
    out = tmp_path / "run"
    res = tw.main(["--model", path, "--data=fakeworld", f"--method={method}", f"--out_dir={out}", "--max_steps=2",
                   "--batch_size=2", "--micro_batch=2", "--k=4", "--max_len=200", "--progress=false",
                   "--dtype=float32", "--val_size=2", "--eval_interval=0", "--save_interval=0", "--lr=1e-3"])
    assert res["step"] == 2 and "val_loss" in res
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    # the loss counts the agent's tokens only: "Action: step j" + <|im_end|> per turn, two trajectories a step
    assert all(0 < r["tokens"] < 60 for r in steps)
    s = ev.main(["--model", path, "--data=fakeworld", f"--mode={mode}", f"--adapter={out}/final", "--max_turns=2",
                 "--turn_tokens=6", "--max_context=256", "--batch_size=2", "--dtype=float32", "--progress=false",
                 f"--table={tmp_path}/table", f"--results_md={tmp_path}/results.md"])
    assert s["n"] == 3 and s["turns_per_episode"] > 0 and "mean_score" in s and "success_rate" in s
    if mode == "memgen":
        assert s["insertions_per_turn"] >= 1  # a prompt insertion every turn at least
    folder = next((tmp_path / "out" / "eval").iterdir())
    assert folder.name.endswith("-max_turns2-turn_tokens6-max_context256")  # the episode settings name the folder
    assert len((folder / "results.jsonl").read_text().splitlines()) == 3
    # an agent task's column: success (its pass@1) and the mean score with its standard error
    table = (tmp_path / "table.md").read_text()
    assert "| fakeworld success, mean score |" in table
    assert (f"| {100 * s['success_rate']:.1f} (n=3), score {s['mean_score']:.1f} ± {s['score_stderr']:.1f} |"
            in table)


def test_a_missing_scienceworld_package_is_one_clear_message(monkeypatch):
    import sys

    from data import DataError, scienceworld

    monkeypatch.setitem(sys.modules, "scienceworld", None)  # import scienceworld -> ImportError
    with pytest.raises(DataError, match=r"needs the scienceworld package: install it with `pip install scienceworld`"):
        scienceworld.make_env()
