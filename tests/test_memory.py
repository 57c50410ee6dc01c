"""memory.py / build_memory.py: retrieval, embeddings, prompt assembly and the token budget, ExpeL's operation parser
and importance counts, AWM's workflow parser, the forgetting curve, build -> augment end to end on a tiny random
model, and a build that is killed (an exception, a SIGKILL) and resumed without redoing finished work."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

import memory
from memory import Piece

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 3), (8, 8), (5, 5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): a random 2-layer Qwen2 with the tiny trained tokenizer and 2048 positions (an
    insight prompt is ~1,500 tiny-vocabulary tokens). One thread while these tests run: a model this small is
    several times faster so on a CPU shared with other work."""
    from conftest import build_model_folder
    from model import load_model
    from tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("memory-model"))
    build_model_folder(path, max_position_embeddings=2048)
    yield path, load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A question/answer jsonl of 10 sums: 9 training problems (the fixed-seed split), the whole file as test."""
    path = tmp_path_factory.mktemp("memory-task") / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?",
                                        "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}) + "\n" for a, b in PAIRS))
    return str(path)


@pytest.fixture(scope="module")
def task(task_file):
    from data import get_task

    return get_task(task_file)


def settings(**over):
    """build_memory.py's defaults, made small."""
    import build_memory
    from settings import defaults

    cfg = defaults(vars(build_memory))
    cfg.update(kind="expel", data="sums", model="tiny", attempts=2, max_new_tokens=4, induce_max_new_tokens=8,
               shown_tokens=16, success_group=2, workflow_group=3, batch_size=4, chunk=2, dtype="float32")
    cfg.update(over)
    return cfg


class Killed(Exception):
    pass


class Fake:
    """Stands in for memory._generate: scripted answers by prompt kind, counted; `fail` raises Killed (or SIGKILLs
    the process) when that many calls have been made."""

    def __init__(self, fail=None, sigkill=False):
        self.calls, self.fail, self.sigkill = Counter(), fail, sigkill

    def __call__(self, model, tok, prompts, max_new_tokens, temperature, top_p, seed):
        if self.fail is not None and sum(self.calls.values()) >= self.fail:
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Killed
        out = []
        for k, ids in enumerate(prompts):
            text = tok.decode(ids)
            if "EXISTING RULES" in text:
                kind = "insight"
                n = text.count("Rule seen after")
                out.append(f"Here are my operations.\nADD 1: Rule seen after {n} rules.\nAGREE 1: Rule seen after 0 "
                           "rules.\nEDIT 1")
            elif "Summary Workflows" in text:
                kind = "workflow"
                a, b = re.search(r"Problem 1: What is (\d+) plus (\d+)", text).groups()
                out.append(f"Workflow: Add two numbers\nSteps:\n1. Read {{first}} and {{second}}.\n2. Add them.\n\n"
                           f"Workflow: Add {a} and {b}\nSteps:\n1. Take {{a}}.\n2. Add {{b}} to get {{sum}}.\n"
                           "Workflow: Too short\n1. One step.")
            elif "YES or NO" in text:
                kind = "judge"
                out.append("YES, it is.")
            else:
                kind = "attempt"
                a, b = map(int, re.search(r"What is (\d+) plus (\d+)", text).groups())
                out.append(f"{a} + {b} = \\boxed{{{a + b if k % 2 == 0 else a + b + 1}}}")  # even: right, odd: wrong
        self.calls[kind] += 1  # calls, not prompts (a call holds prompts of one kind)
        return out


def files(d):
    """{name: bytes} of a finished memory directory."""
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


# ----------------------------------------------------------------------------------------------------------------
# retrieval and embeddings


def test_query_text_of_each_kind_of_row():
    task = types.SimpleNamespace(messages=lambda r: [{"role": "user", "content": f"Claim: {r['claim']}\nVerify."}])
    assert memory.query_text(task, {"question": "What is 1 plus 2?"}) == "What is 1 plus 2?"
    assert memory.query_text(task, {"question": "Capital?", "choices": ["Rome", "Paris"]}) == "Capital?\nA. Rome\nB. Paris"
    assert memory.query_text(task, {"claim": "The sky is green."}) == "Claim: The sky is green.\nVerify."


def test_nearest_on_a_hand_built_store():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1],
                                                      [0.8, 0.6, 0]]), dim=-1)
    q = torch.tensor([1.0, 0, 0])
    assert memory.nearest(emb, q, 3) == [0, 1, 4]  # cos 1, 0.8, 0.8 (tie: lower index first), then 0, 0
    assert memory.nearest(emb, torch.tensor([0.0, 1, 0]), 2) == [2, 1]
    allowed = torch.tensor([False, True, True, True, False])
    assert memory.nearest(emb, q, 2, allowed) == [1, 2]
    assert memory.nearest(emb, q, 10, allowed) == [1, 2, 3]  # never more than the allowed rows
    assert memory.nearest(emb, q, 2, torch.zeros(5, dtype=torch.bool)) == []


def test_embeddings_equal_a_brute_force_mean_of_hidden_states(tiny):
    _, model, tok = tiny
    texts = ["What is 1 plus 2?", "A much longer question about eggs, ducks and the farmers' market on Sunday.",
             "x", "Numbers like 1234567890.", "The quick brown fox jumps over the lazy dog."]
    got = memory.embed(model, tok, texts, batch_size=3)  # batches of mixed lengths, right-padded
    for i, t in enumerate(texts):
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            _, h = model(ids, logits="none")
        want = torch.nn.functional.normalize(h[0].mean(0), dim=-1)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)))


def hand_memory(d, tiny, kind="memorybank", items=None, vectors=None):
    """A finished memorybank directory written by hand: items and unit vectors along the given axes."""
    _, model, _ = tiny
    os.makedirs(d, exist_ok=True)
    memory.write_jsonl(os.path.join(d, "items.jsonl"), items)
    emb = torch.zeros(len(items), model.cfg.hidden_size)
    for i, v in enumerate(vectors):
        emb[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
    memory.save_embeddings(os.path.join(d, "embeddings.safetensors"), torch.nn.functional.normalize(emb, dim=-1))
    memory.write_json(os.path.join(d, "meta.json"), {
        "kind": kind, "format": memory.FORMAT, "complete": True, "settings": {},
        "model": {"name": "tiny", "hidden_size": model.cfg.hidden_size}})
    return d


ITEMS = [{"id": "a", "question": "What is 1 plus 2?", "solution": "1 + 2 = 3.\\boxed{3}", "source": "gold"},
         {"id": "b", "question": "What is 3 plus 4?", "solution": "3 + 4 = 7.\\boxed{7}", "source": "gold"},
         {"id": "c", "question": "What is 5 plus 6?", "solution": "5 + 6 = 11.\\boxed{11}", "source": "gold"}]


def fake_embed(table):
    """memory.embed replaced: each known text -> its hand-made direction (64-d, padded with zeros)."""
    def embed(model, tok, texts, batch_size=16):
        out = torch.zeros(len(texts), model.cfg.hidden_size)
        for i, t in enumerate(texts):
            out[i, :len(table[t])] = torch.tensor(table[t], dtype=torch.float32)
        return torch.nn.functional.normalize(out, dim=-1)
    return embed


def test_memorybank_retrieves_the_nearest_items_and_never_the_problem_itself(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    d = hand_memory(str(tmp_path / "mb"), tiny, items=ITEMS, vectors=[[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]])
    monkeypatch.setattr(memory, "embed", fake_embed({"What is 9 plus 9?": [0, 1, 0], "What is 1 plus 2?": [1, 0, 0],
                                                     "What is 5 plus 7?": [0, 0, 1]}))
    mem = memory.load(d, model, tok, top_k=2)
    task = types.SimpleNamespace(NAME="t", messages=lambda r: [{"role": "user", "content": "Q: " + r["question"]}])
    assert mem.retrieve(task, {"id": "x", "question": "What is 9 plus 9?"}) == [1, 0]  # cos 0.8, 0, 0: b, then a
    assert mem.retrieve(task, {"id": "x", "question": "What is 1 plus 2?"}) == [1, 2]  # its own copy "a" is excluded
    assert mem.retrieve(task, {"id": "x", "question": "What is 5 plus 7?"}) == [2, 0]
    assert mem.retrieve(task, {"id": "c", "question": "What is 5 plus 7?"}) == [0, 1]  # the same id is excluded


# ----------------------------------------------------------------------------------------------------------------
# prompt assembly and the token budget

GOLDEN = (
    "Here are solved problems similar to this one:\n\n"
    "Problem: What is 3 plus 4?\nSolution: 3 + 4 = 7.\\boxed{7}\n\n"
    "Problem: What is 1 plus 2?\nSolution: 1 + 2 = 3.\\boxed{3}\n\n"
    "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}."
    "Question: What is 9 plus 9?\n")


def test_prompt_assembly_is_exact(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    from data import gsm8k

    task = types.SimpleNamespace(NAME="gsm8k", messages=gsm8k.messages)
    d = hand_memory(str(tmp_path / "mb"), tiny, items=ITEMS, vectors=[[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]])
    monkeypatch.setattr(memory, "embed", fake_embed({"What is 9 plus 9?": [0, 1, 0]}))
    mem = memory.load(d, model, tok, top_k=2)
    row = {"id": "t-1", "question": "What is 9 plus 9?", "answer": "18"}
    messages, n = memory.augment(mem, task, row, tok, 10_000)
    assert messages == [{"role": "user", "content": GOLDEN}]
    assert n == len(tok.chat(messages)) - len(tok.chat(gsm8k.messages(row))) > 0
    assert mem.last_refs == ["b", "a"]

    # every section, in its order: examples, insights (numbered), workflows
    pieces = [Piece("insight", "Check the units.", "rule-1"), Piece("example", "Problem: P\nSolution: S", "a"),
              Piece("workflow", "Workflow: Add\nSteps:\n1. Read {x}.\n2. Add {y}.", "Add"),
              Piece("insight", "Write every step.", "rule-2")]
    assert memory.render(pieces) == (
        "Here are solved problems similar to this one:\n\nProblem: P\nSolution: S\n\n"
        "Insights from past attempts at similar problems:\n1. Check the units.\n2. Write every step.\n\n"
        "Workflows for this kind of problem:\n\nWorkflow: Add\nSteps:\n1. Read {x}.\n2. Add {y}.\n\n")
    # no memory (budget 0, or nothing retrieved): the task's own prompt, unchanged
    assert memory.augment(mem, task, row, tok, 0) == (gsm8k.messages(row), 0)
    empty = types.SimpleNamespace(pieces=lambda task, row: [])
    assert memory.augment(empty, task, row, tok, 768) == (gsm8k.messages(row), 0)


def test_the_token_budget_is_never_exceeded_and_the_count_is_right(tiny):
    _, _, tok = tiny
    content = "Solve this.Question: What is 9 plus 9?\n"
    base = len(tok.chat([{"role": "user", "content": content}]))
    pieces = [Piece("example", f"Problem: What is {a} plus {b}?\nSolution: " + "step. " * (3 * a), str(a))
              for a, b in PAIRS] + [Piece("insight", "Always check.", "r1")]
    seen_cut = seen_partial = False
    for budget in range(0, 700, 7):
        text, n, kept = memory.fit(pieces, tok, budget, content)
        assert n <= budget
        assert n == len(tok.chat([{"role": "user", "content": text + content}])) - base
        if kept == 0:
            assert text == "" and n == 0
            continue
        cut = text.endswith(memory.CUT_MARK + "\n\n")
        if cut:  # only the first piece is ever cut, and only when it does not fit whole
            seen_cut = True
            assert kept == 1 and memory.fit(pieces[:1], tok, budget, content)[2] == 1
            assert len(tok.chat([{"role": "user", "content": memory.render(pieces[:1]) + content}])) - base > budget
        else:
            assert text == memory.render(pieces[:kept])  # whole pieces, the most relevant first
            if kept < len(pieces):  # the next one would not fit: dropped whole
                seen_partial = True
                more = memory.render(pieces[:kept + 1])
                assert len(tok.chat([{"role": "user", "content": more + content}])) - base > budget
    assert seen_cut and seen_partial
    assert memory.fit(pieces, tok, 10_000, content)[2] == len(pieces)


# ----------------------------------------------------------------------------------------------------------------
# MemoryBank's forgetting curve


def test_forgetting_curve_by_hand_computed_numbers():
    f = memory.Forgetting(3, unit=1.0, threshold=0.3)
    f.tick()  # clock 1: R = exp(-1/1) = 0.3679 for all three, >= 0.3
    assert torch.allclose(f.retention(), torch.full((3,), math.exp(-1), dtype=torch.float64))
    assert f.alive.tolist() == [True, True, True]
    f.recall([0])  # S0 = 2, t0 reset at clock 1
    f.tick()  # clock 2: item 0 R = exp(-1/2) = 0.6065; items 1, 2 R = exp(-2) = 0.1353 < 0.3: forgotten
    assert f.retention()[0].item() == pytest.approx(0.60653066)
    assert f.retention()[1].item() == pytest.approx(0.13533528)
    assert f.alive.tolist() == [True, False, False]
    f.recall([0])  # S0 = 3 at clock 2
    for _ in range(3):
        f.tick()  # clock 5: R = exp(-3/3) = 0.3679
    assert f.alive.tolist() == [True, False, False] and f.retention()[0].item() == pytest.approx(math.exp(-1))
    f.tick()  # clock 6: R = exp(-4/3) = 0.2636 < 0.3
    assert f.alive.tolist() == [False, False, False]
    g = memory.Forgetting(1, unit=100.0, threshold=0.5)  # the defaults' scale: forgotten after 100 ln 2 = 69.3
    for _ in range(69):
        g.tick()
    assert g.alive.item()
    g.tick()
    assert not g.alive.item()


def test_memorybank_with_forgetting_stops_retrieving_forgotten_items(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    d = hand_memory(str(tmp_path / "mb"), tiny, items=ITEMS, vectors=[[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]])
    monkeypatch.setattr(memory, "embed", fake_embed({"q": [1, 0, 0]}))
    task = types.SimpleNamespace(NAME="t", messages=lambda r: [{"role": "user", "content": r["question"]}])
    mem = memory.load(d, model, tok, top_k=1, forget=True, forget_unit=1.0, forget_threshold=0.3)
    assert mem.retrieve(task, {"id": "x", "question": "q"}) == [0]  # clock 1: all alive; a recalled (S = 2)
    assert mem.retrieve(task, {"id": "x", "question": "q"}) == [0]  # clock 2: b, c forgotten (exp(-2) < 0.3)
    assert mem.forgetting.alive.tolist() == [True, False, False]
    off = memory.load(d, model, tok, top_k=3)  # off by default: nothing is ever forgotten
    for _ in range(5):
        assert off.retrieve(task, {"id": "x", "question": "q"}) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------
# ExpeL: operations and importance


def rules(*pairs):
    return [{"text": t, "importance": i} for t, i in pairs]


def test_expel_parser_reads_well_formed_operations():
    current = rules(("Check the units.", 2), ("Write every step.", 2), ("Reread the question.", 2))
    text = ("AGREE 1: Check the units.\n"
            "EDIT 2: Write every step and check it.\n"
            "REMOVE 3: Reread the question.\n"
            "ADD 4: Estimate the answer first.\n")
    ops, ignored = memory.parse_operations(text, current)
    assert ops == [("AGREE", 0, "Check the units."), ("EDIT", 1, "Write every step and check it."),
                   ("REMOVE", 2, "Reread the question."), ("ADD", None, "Estimate the answer first.")]
    assert ignored == Counter()
    # markdown decorations, a number-only AGREE, a rule found by its quoted text despite a wrong number
    ops, ignored = memory.parse_operations("- **ADD 1:** Draw a table.\n* AGREE 2:\n3. REMOVE 1: Reread the question.",
                                           current)
    assert ops == [("ADD", None, "Draw a table."), ("AGREE", 1, "Write every step."),
                   ("REMOVE", 2, "Reread the question.")]
    assert ignored == Counter()


def test_expel_parser_ignores_and_counts_malformed_lines():
    current = rules(("Check the units.", 2), ("Write every step.", 2))
    text = "\n".join([
        "Sure! Here are my operations:",  # not an operation
        "",  # blank: not counted
        "ADD 3:",  # empty rule
        "ADD 3: Then EDIT the rule.",  # garbled (an operation word inside)
        "ADD 3: a rule that was cut off",  # unfinished (no full stop)
        "AGREE 7: Something never said.",  # unknown rule
        "EDIT 9: A better rule.",  # unknown rule
        "ADD 3: Check the units.",  # duplicate of rule 1
        "AGREE 1: Check the units.",  # used
        "REMOVE 1: Check the units.",  # repeat: rule 1 already has an operation
        "add 4: lower-case is not an operation.",  # not an operation
        "ADDITION 5: Not an operation.",  # not an operation
        "\x00\x01\ufffd ADD",  # not an operation
        "AGREE 2",  # no colon: not an operation
        "ADD 3: A new rule.",  # used
        "ADD 4: A new rule.",  # duplicate of the ADD above
    ])
    ops, ignored = memory.parse_operations(text, current)
    assert ops == [("AGREE", 0, "Check the units."), ("ADD", None, "A new rule.")]
    assert ignored == Counter({"not an operation": 5, "empty rule": 1, "garbled": 1, "unfinished": 1,
                               "unknown rule": 2, "duplicate": 2, "repeat": 1})
    assert sum(ignored.values()) == 13
    for junk in (None, 42, "", "ADD", "::::", "EDIT 1:" * 1000, "\n" * 50):  # never a crash
        memory.parse_operations(junk, current)


def test_expel_importance_counts():
    r = memory.apply_operations([], [("ADD", None, "A.")], max_rules=20)
    assert r == rules(("A.", 2))  # ADD starts at 2
    r = memory.apply_operations(r, [("ADD", None, "B.")], 20)
    r = memory.apply_operations(r, [("AGREE", 1, "B.")], 20)  # +1
    assert r == rules(("B.", 3), ("A.", 2))  # sorted by importance
    r = memory.apply_operations(r, [("EDIT", 1, "A better.")], 20)  # +1 and the new text
    assert r == rules(("B.", 3), ("A better.", 3))
    r = memory.apply_operations(r, [("REMOVE", 0, "B."), ("AGREE", 1, "A better.")], 20)  # -1, +1
    assert r == rules(("A better.", 4), ("B.", 2))
    for _ in range(2):
        r = memory.apply_operations(r, [("REMOVE", 1, "B.")], 20)
    assert r == rules(("A better.", 4))  # at 0: dropped
    # through the parser: an EDIT that repeats an existing rule counts as AGREE on it (ExpeL)
    ops, _ = memory.parse_operations("EDIT 1: A better.", r)
    assert ops == [("AGREE", 0, "A better.")]
    # once the list holds max_rules + 5 rules, REMOVE takes 3
    full = rules(*[(f"R{i}.", 4) for i in range(7)])
    assert memory.apply_operations(full, [("REMOVE", 0, "R0.")], max_rules=2)[-1] == {"text": "R0.", "importance": 1}
    assert memory.apply_operations(full, [("REMOVE", 0, "R0.")], max_rules=3)[-1] == {"text": "R0.", "importance": 3}


# ----------------------------------------------------------------------------------------------------------------
# AWM: workflows


def test_awm_workflow_parser():
    text = ("Here are the workflows.\n\n"
            "Workflow: Find the total cost of items\n"
            "Steps:\n"
            "1. Multiply {quantity} by {unit price}.\n"
            "2. Add the costs to get {total}.\n"
            "3. Put {total} inside \\boxed{}.\n\n"
            "## Workflow 2: Split a quantity evenly\n"
            "**Steps:**\n"
            "- Divide {amount} by {people}.\n"
            "- Round down to a whole {amount}.\n"
            "Workflow: Only one step\n"
            "1. Do {it}.\n"
            "Workflow:\n"
            "1. A step.\n2. Another.\n"
            "stray text after the workflows\n")
    found, stats = memory.parse_workflows(text)
    assert found == [
        {"description": "Find the total cost of items",
         "steps": ["Multiply {quantity} by {unit price}.", "Add the costs to get {total}.",
                   "Put {total} inside \\boxed{}."],
         "variables": ["quantity", "unit price", "total"]},
        {"description": "Split a quantity evenly", "steps": ["Divide {amount} by {people}.", "Round down to a whole {amount}."],
         "variables": ["amount", "people"]}]
    assert stats == Counter({"ignored": 2, "rejected": 2})  # two stray lines; one-step and no-description workflows
    assert memory.parse_workflows("no workflows at all\njust text") == ([], Counter({"ignored": 2}))
    for junk in (None, "", "Workflow:" * 500, "1. step\n" * 20):
        memory.parse_workflows(junk)
    w = found[0]
    assert memory.workflow_text(w) == ("Workflow: Find the total cost of items\nSteps:\n1. Multiply {quantity} by "
                                       "{unit price}.\n2. Add the costs to get {total}.\n3. Put {total} inside \\boxed{}.")


def test_awm_merge_counts_support_and_orders_by_it():
    a = {"description": "Add two numbers", "steps": ["x", "y"], "variables": []}
    b = {"description": "Split evenly", "steps": ["x", "y"], "variables": []}
    ws = []
    assert [w["description"] for w in memory.merge_workflows(ws, [a, b], "offline")] == ["Add two numbers",
                                                                                         "Split evenly"]
    added = memory.merge_workflows(ws, [dict(b, description="split  EVENLY!")], "offline")
    assert added == [] and [(w["description"], w["support"]) for w in ws] == [("Split evenly", 2),
                                                                              ("Add two numbers", 1)]


# ----------------------------------------------------------------------------------------------------------------
# build -> augment, end to end


class Alternating:
    """The task with a grader that calls every other attempt right (a random model solves nothing), so that
    ExpeL has failures and successes to compare while the real tiny model writes every response."""

    def __init__(self, task):
        self.task, self.n = task, 0
        self.NAME, self.load, self.messages = task.NAME, task.load, task.messages

    def grade(self, row, completion):
        self.n += 1
        return self.n % 2 == 1


def test_build_then_augment_end_to_end_on_the_tiny_model(tiny, task, tmp_path):
    path, model, tok = tiny
    rows = task.load("train")[:5]
    test_row = task.load("test")[0]
    for kind, source in (("memorybank", "gold"), ("memorybank", "self"), ("expel", "gold"), ("awm", "gold")):
        d = str(tmp_path / f"{kind}-{source}")
        meta = memory.build(d, Alternating(task), rows, model, tok, settings(kind=kind, memory_source=source),
                            progress=False)
        assert meta["complete"] and not os.path.exists(os.path.join(d, "parts"))
        names = set(os.listdir(d))
        assert "meta.json" in names and "items.jsonl" in names and not any(n.endswith(".tmp") for n in names)
        if kind != "awm":
            emb = memory.load_embeddings(os.path.join(d, "embeddings.safetensors"))
            items = memory.read_jsonl(os.path.join(d, "items.jsonl"))
            assert emb.shape == (len(items), model.cfg.hidden_size)
            assert torch.allclose(emb, memory.embed(model, tok, [it["question"] for it in items]), atol=1e-5)
        if kind == "expel":
            ins = memory.read_json(os.path.join(d, "insights.json"))
            log = memory.read_jsonl(os.path.join(d, "insight_log.jsonl"))
            assert ins["steps"] == len(log) == meta["counts"]["insight_steps"] > 0
            assert log[0]["kind"] == "compare" and isinstance(log[0]["response"], str)
            assert len(memory.read_jsonl(os.path.join(d, "attempts.jsonl"))) == len(rows)
        if kind == "awm":
            assert set(memory.read_json(os.path.join(d, "workflows.json"))) >= {"workflows", "groups"}
        mem = memory.load(d, model, tok)
        messages, n = memory.augment(mem, task, test_row, tok, 200)
        own = task.messages(test_row)[0]["content"]
        assert messages[0]["content"].endswith(own) and 0 <= n <= 200
        assert n == len(tok.chat(messages)) - len(tok.chat(task.messages(test_row)))
        if kind == "memorybank":
            assert n > 0 and messages[0]["content"].startswith(memory.HEADERS["example"])
        assert memory.observe(mem, task, test_row, "\\boxed{3}", True) == []
        # a rerun of a finished build changes nothing
        before = files(d)
        memory.build(d, task, rows, model, tok, settings(kind=kind, memory_source=source), progress=False)
        assert files(d) == before


def test_build_memory_command_line(tiny, task_file, tmp_path, capsys):
    import build_memory

    path, _, _ = tiny
    d = str(tmp_path / "awm")
    args = ["--kind=awm", f"--data={task_file}", f"--model={path}", f"--out_dir={d}", "--limit=3",
            "--max_new_tokens=4", "--induce_max_new_tokens=8", "--shown_tokens=16", "--dtype=float32",
            "--memory_source=self", "--attempts=2"]
    meta = build_memory.main(args)
    capsys.readouterr()
    assert meta["complete"] and meta["counts"]["problems"] == 3
    assert build_memory.main(args) == meta and "already complete" in capsys.readouterr().err  # nothing loaded
    assert memory.read_json(os.path.join(d, "meta.json"))["settings"]["model"] == os.path.abspath(path)

    def error(argv):
        with pytest.raises(SystemExit) as e:
            build_memory.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("build_memory.py: error: ")
        return err

    assert "use one of memorybank, expel, awm" in error(["--kind=bank", f"--model={path}", f"--out_dir={d}"])
    assert "--kind is required" in error([f"--model={path}", f"--out_dir={d}"])
    assert "does not exist" in error(["--kind=awm", f"--data={task_file}", "--model=/no/such/folder", "--out_dir=x"])
    assert "holds a awm memory, not memorybank" in error(["--kind=memorybank", f"--model={path}", f"--out_dir={d}"])
    assert "other settings (limit: 3 there, 4 now" in error(args[:4] + ["--limit=4"] + args[5:])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not a memory directory" in error(["--kind=awm", f"--model={path}", f"--out_dir={tmp_path / 'other'}"])
    assert "does not apply to expel" in error(["--kind=expel", "--memory_source=gold", "--model=m", "--out_dir=x"])
    help_text = subprocess.run([sys.executable, "build_memory.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--kind=''" in help_text.stdout and "--memory_source" in help_text.stdout


def test_load_refuses_what_it_cannot_use(tiny, tmp_path):
    _, model, tok = tiny
    with pytest.raises(memory.MemError, match="not a memory directory"):
        memory.load(str(tmp_path), model, tok)
    d = hand_memory(str(tmp_path / "mb"), tiny, items=ITEMS, vectors=[[1], [1], [1]])
    with pytest.raises(memory.MemError, match="online induction is AWM's"):
        memory.load(d, model, tok, awm_online="gold")
    with pytest.raises(memory.MemError, match="needs the base model|pass the base model"):
        memory.load(d)
    meta = memory.read_json(os.path.join(d, "meta.json"))
    memory.write_json(os.path.join(d, "meta.json"), dict(meta, model={"name": "big", "hidden_size": 896}))
    with pytest.raises(memory.MemError, match="built with big"):
        memory.load(d, model, tok)
    memory.write_json(os.path.join(d, "meta.json"), dict(meta, complete=False))
    with pytest.raises(memory.MemError, match="unfinished build"):
        memory.load(d, model, tok)


# ----------------------------------------------------------------------------------------------------------------
# resume after a kill


def test_a_killed_build_resumes_without_redoing_finished_work(tiny, task, tmp_path, monkeypatch):
    _, model, tok = tiny
    rows = task.load("train")  # 9 problems: 5 chunks of 2 (one generate call of 4 prompts each)
    cfg = settings(kind="expel")
    whole = Fake()
    monkeypatch.setattr(memory, "_generate", whole)
    memory.build(str(tmp_path / "whole"), task, rows, model, tok, cfg, progress=False)
    steps = whole.calls["insight"]
    assert whole.calls["attempt"] == 5 and steps == 9 + 4  # 9 compare steps, 4 groups of 2 successes

    d = str(tmp_path / "killed")
    monkeypatch.setattr(memory, "_generate", Fake(fail=3))  # dies in the 4th attempt chunk
    with pytest.raises(Killed):
        memory.build(d, task, rows, model, tok, cfg, progress=False)
    assert sorted(os.listdir(os.path.join(d, "parts"))) == [f"attempts-{c:06d}.jsonl" for c in range(3)]
    assert not memory.read_json(os.path.join(d, "meta.json"))["complete"]
    with pytest.raises(memory.MemError, match="unfinished build"):
        memory.load(d, model, tok)

    again = Fake(fail=2 + 6)  # the 2 missing chunks, 6 insight steps, then dies again
    monkeypatch.setattr(memory, "_generate", again)
    with pytest.raises(Killed):
        memory.build(d, task, rows, model, tok, cfg, progress=False)
    assert again.calls == Counter(attempt=2, insight=6)
    assert memory.read_json(os.path.join(d, "parts", "insights-state.json"))["done"] == 6

    last = Fake()
    monkeypatch.setattr(memory, "_generate", last)
    memory.build(d, task, rows, model, tok, cfg, progress=False)
    assert last.calls == Counter(insight=steps - 6)  # no attempt chunk and no finished step redone
    assert files(d).keys() == files(tmp_path / "whole").keys()
    for name in ("attempts.jsonl", "items.jsonl", "insights.json", "insight_log.jsonl", "embeddings.safetensors"):
        assert files(d)[name] == files(tmp_path / "whole")[name], name
    rules_ = memory.read_json(os.path.join(d, "insights.json"))
    assert rules_["rules"][0] == {"text": "Rule seen after 0 rules.", "importance": 2 + steps - 1}
    assert rules_["ignored"]["not an operation"] == 2 * steps  # the chatter and the bare "EDIT 1" of every reply


def test_a_sigkilled_build_leaves_whole_files_and_resumes(tiny, task_file, task, tmp_path, monkeypatch):
    path, model, tok = tiny
    d = str(tmp_path / "awm")
    cfg = settings(kind="awm", memory_source="self", model=path)
    script = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import torch
torch.set_num_threads(1)
import memory, test_memory
from data import get_task
from model import load_model
from tokenizer import load_tokenizer
memory._generate = test_memory.Fake(fail=4, sigkill=True)
task = get_task({task_file!r})
memory.build({d!r}, task, task.load("train"), load_model({path!r}, dtype="float32"), load_tokenizer({path!r}),
             {cfg!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parts = sorted(os.listdir(os.path.join(d, "parts")))
    assert parts == [f"attempts-{c:06d}.jsonl" for c in range(4)]  # 4 chunks written, the 5th never started
    for p in parts:  # every file there is whole
        assert len(memory.read_jsonl(os.path.join(d, "parts", p))) == 2
    assert memory.read_json(os.path.join(d, "meta.json"))["complete"] is False

    rest = Fake()
    monkeypatch.setattr(memory, "_generate", rest)
    meta = memory.build(d, task, task.load("train"), model, tok, cfg, progress=False)
    assert rest.calls == Counter(attempt=1, workflow=3)  # the last chunk; 9 solved problems, 3 groups of 3
    assert meta["complete"] and meta["counts"]["solved_problems"] == 9
    wf = memory.read_json(os.path.join(d, "workflows.json"))
    assert wf["workflows"][0]["description"] == "Add two numbers" and wf["workflows"][0]["support"] == 3
    assert wf["rejected"] == 3 and len(wf["workflows"]) == 4


# ----------------------------------------------------------------------------------------------------------------
# AWM online


def test_awm_online_induction_after_judged_successes(tiny, task, tmp_path, monkeypatch):
    _, model, tok = tiny
    monkeypatch.setattr(memory, "_generate", Fake())
    d = str(tmp_path / "awm")
    train = task.load("train")[:3]
    memory.build(d, task, train, model, tok, settings(kind="awm"), progress=False)
    row = next(r for r in task.load("test") if r["question"] != train[0]["question"])
    mine = "Add {} and {}".format(*re.findall(r"\d+", row["question"]))
    off = memory.load(d, model, tok)
    assert memory.observe(off, task, row, "\\boxed{10}", True) == []

    gold = memory.load(d, model, tok, awm_online="gold")
    n = len(gold.workflows)
    assert memory.observe(gold, task, row, "wrong", False) == []
    new = memory.observe(gold, task, row, "\\boxed{10}", True)
    assert [w["description"] for w in new] == [mine] and len(gold.workflows) == n + 1
    assert gold.workflows[0]["support"] == 2  # "Add two numbers" induced again
    text, _ = memory.augment(gold, task, row, tok, 10_000)
    assert f"Workflow: {mine}\n" in text[0]["content"]

    judged = memory.load(d, model, tok, awm_online="self")  # the model's own YES counts, whatever the grader says
    assert [w["description"] for w in memory.observe(judged, task, row, "anything", False)] == [mine]
    replay = memory.load(d, model, tok)
    assert replay.add_workflows(new) == new and len(replay.workflows) == n + 1


def test_eval_with_a_memory_puts_it_in_every_prompt_within_the_budget(tiny, task_file, tmp_path, capsys):
    """build_memory.py -> eval.py --mode=memorybank: prompts carry memory text within the budget, the summary
    reports the mean memory tokens, and a missing, misplaced or mismatched memory is one line."""
    import build_memory
    import eval as eval_script

    path, _, tok = tiny
    d = str(tmp_path / "bank")
    build_memory.main(["--kind=memorybank", f"--data={task_file}", f"--model={path}", f"--out_dir={d}",
                       "--dtype=float32", "--progress=false"])
    out = str(tmp_path / "eval")
    args = [f"--data={task_file}", f"--model={path}", "--dtype=float32", "--max_new_tokens=4", "--limit=3",
            "--progress=false", "--results_md=", f"--out_dir={out}"]
    s = eval_script.main(args + ["--mode=memorybank", f"--memory={d}", "--memory_budget=60", "--memory_top_k=2"])
    assert s["n"] == 3 and 0 < s["mean_memory_tokens"] <= 60
    rows = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    assert [r["id"] for r in rows] == ["sums-0", "sums-1", "sums-2"]
    capsys.readouterr()
    for bad, message in ((["--mode=memorybank"], "--mode=memorybank needs --memory=DIR"),
                         (["--mode=awm", f"--memory={d}", f"--out_dir={tmp_path / 'x'}"], "holds a memorybank memory; pass --mode=memorybank"),
                         ([f"--memory={d}"], "--memory is read by --mode=memorybank|expel|awm only")):
        with pytest.raises(SystemExit):
            eval_script.main([a for a in args if not a.startswith("--out_dir")] + bad)
        assert message in capsys.readouterr().err
