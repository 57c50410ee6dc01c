"""
memory.py: the paper's retrieval-memory baselines, on the same base model and tokenizer as MemGen.

    MemoryBank (Zhong et al. 2023)  stored experiences (problem + solution), dense retrieval, forgetting curve
    ExpeL      (Zhao et al. 2023)   insights distilled by the model from its own successes and failures, plus
                                    retrieved successful trajectories
    AWM        (Wang et al. 2024)   workflows induced from successful trajectories, all of them in the prompt

A memory is a directory that build() writes (python build_memory.py ...) and load() reads. At test time:

    mem = memory.load(DIR, model, tok)                                      # once
    messages, n = memory.augment(mem, task, row, tok, budget_tokens)        # per problem: prompt + memory tokens
    new = memory.observe(mem, task, row, completion, correct)               # per judged completion (AWM online)

The memory text goes into the task's single user message, before the task's own prompt (render() shows the exact
format), cut to budget_tokens (fit()). A memory directory holds plain files:

    meta.json                kind, task, base model, build settings, counts; "complete" once the build finished
    attempts.jsonl           expel, or memory_source=self: the model's sampled attempts per problem, graded
    items.jsonl              memorybank / expel: the experiences {"id", "question", "solution", "source"}
    embeddings.safetensors   memorybank / expel: "embeddings" (N, D) float32; row i belongs to line i of items.jsonl
    insights.json            expel: the rules with their importance, operation and ignored-line counts
    insight_log.jsonl        expel: every insight-extraction response and the operations read from it
    workflows.json           awm: the workflows {"description", "steps", "variables", "support"}
    workflow_log.jsonl       awm: every induction response and the workflows read from it
A build in progress also has parts/: whole files written one chunk at a time (temp file + rename), so a killed
build resumes where it stopped and redoes no finished chunk.
"""
import json
import os
import random
import re
import shutil
import time
from collections import Counter, namedtuple

import torch
import torch.nn.functional as F

from files import write_atomic, write_json

KINDS = ("memorybank", "expel", "awm")
FORMAT = 1  # of the memory directory
# test-time defaults (eval.py exposes them as settings)
TOP_K = 3  # retrieved experiences per problem (memorybank, expel)
BUDGET_TOKENS = 768  # most tokens of memory text in one prompt
FORGET = False  # MemoryBank's forgetting curve during evaluation (off: every item stays retrievable)
FORGET_UNIT = 100.0  # retrievals per unit of the curve's time t (MemoryBank counts days)
FORGET_THRESHOLD = 0.5  # an item whose retention exp(-t/S) falls below this is forgotten
AWM_ONLINE = "off"  # off | self (the model judges its own completion, as AWM's evaluator) | gold (the task grader)
AWM_ONLINE_MODES = ("off", "self", "gold")
CUT_MARK = " [...]"  # ends an item cut to fit the budget
EMBED_BATCH = 16
PROMPT_ROOM = 16  # an induction prompt must leave at least this many positions for the answer


class MemError(ValueError):
    """A bad memory directory or argument; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Tasks and files


def query_text(task, row):
    """What a problem is stored, shown and retrieved by: its question (with its lettered options when it has
    choices), else the text of its user message (e.g. a claim and its evidence)."""
    if isinstance(row.get("question"), str):
        choices = row.get("choices")
        if isinstance(choices, list):
            return row["question"] + "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        return row["question"]
    return "\n".join(m["content"] for m in task.messages(row) if m["role"] == "user")


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_embeddings(path, emb):
    from safetensors.torch import save_file

    tmp = f"{path}.tmp"
    save_file({"embeddings": emb.contiguous()}, tmp)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; the other files are plain readable files too
    os.replace(tmp, path)


def load_embeddings(path):
    from safetensors.torch import load_file

    return load_file(path)["embeddings"]


def cut_text(tok, text, max_tokens):
    """text, or its first max_tokens tokens + CUT_MARK when longer (a token boundary; a split character dropped)."""
    ids = tok.encode(text)
    if len(ids) <= max_tokens:
        return text
    return tok.decode(ids[:max_tokens]).rstrip("\ufffd") + CUT_MARK


def _generate(model, tok, prompts, max_new_tokens, temperature, top_p, seed):
    """Completion texts for lists of prompt ids (the one place this module samples; tests replace it)."""
    from model import generate

    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed)[1]


def _fits(model, ids):
    return len(ids) + PROMPT_ROOM <= model.cfg.max_positions


# ----------------------------------------------------------------------------------------------------------------
# 2. Embeddings and retrieval


@torch.no_grad()
def embed(model, tok, texts, batch_size=EMBED_BATCH):
    """(N, hidden) float32 unit vectors: each text encoded alone (no chat template), the base model's last hidden
    states (after the final norm) averaged over its tokens, L2-normalised. Rows are right-padded, so no real position
    ever attends to padding; texts are sorted by length so that batches hold little of it."""
    ids = [(tok.encode(t) or [tok.pad_id])[:model.cfg.max_positions] for t in texts]
    out = torch.zeros(len(ids), model.cfg.hidden_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        T = max(len(ids[i]) for i in batch)
        x = torch.full((len(batch), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, i in enumerate(batch):
            x[b, :len(ids[i])] = torch.tensor(ids[i])
            mask[b, :len(ids[i])] = True
        mask = mask.to(model.device)
        _, h = model(x.to(model.device), mask=mask, logits="none")
        m = mask[..., None].float()
        mean = (h.float() * m).sum(1) / m.sum(1)
        out[batch] = F.normalize(mean, dim=-1).cpu()
    return out


def nearest(emb, q, k, allowed=None):
    """Indices of the k rows of emb (N, D) most similar to q (D,), best first (ties: lower index first). Rows and q
    are unit vectors, so the dot product is the cosine similarity. allowed (N,) bool: the rows that may be returned."""
    scores = emb @ q
    n = len(scores)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        n = int(allowed.sum())
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:min(k, n)].tolist()


Piece = namedtuple("Piece", "section text ref")  # one unit of memory text; ref: what it came from (logged)


class Store:
    """Stored experiences and their embeddings: the part MemoryBank and ExpeL share."""

    def __init__(self, path, model, tok, top_k):
        self.items = read_jsonl(os.path.join(path, "items.jsonl"))
        self.emb = load_embeddings(os.path.join(path, "embeddings.safetensors")).float()
        if self.emb.shape[0] != len(self.items):
            raise MemError(f"{path}: {self.emb.shape[0]} embeddings for {len(self.items)} items; rebuild the memory")
        if model is None or tok is None:
            raise MemError("this memory retrieves by embedding the question: pass the base model and tokenizer")
        if self.emb.shape[1] != model.cfg.hidden_size:
            raise MemError(f"{path} was embedded with hidden size {self.emb.shape[1]}, this model has "
                           f"{model.cfg.hidden_size}: evaluate with the model the memory was built with")
        self.model, self.tok, self.top_k = model, tok, top_k

    def candidates(self, task, row):
        """(query embedding, allowed mask): a stored copy of the problem itself (same id or same question, e.g. a
        jsonl task whose test split is the whole file) is never retrieved."""
        question = query_text(task, row)
        allowed = torch.tensor([it["id"] != str(row.get("id")) and it["question"] != question for it in self.items],
                               dtype=torch.bool)
        return embed(self.model, self.tok, [question])[0], allowed


def example_text(item):
    return f"Problem: {item['question']}\nSolution: {item['solution']}"


# ----------------------------------------------------------------------------------------------------------------
# 3. MemoryBank


class Forgetting:
    """MemoryBank's forgetting curve (Ebbinghaus): an item's retention is R = exp(-t / S), t the time since it was
    stored or last recalled, S its strength: 1 when stored, +1 at every recall (which also resets t to 0).

    Time is counted in retrievals (one per problem), t = retrievals since / unit. An item whose retention falls
    below `threshold` is forgotten for good. (MemoryBank's code forgets an item at random with probability 1 - R;
    a threshold keeps evaluation reproducible.)"""

    def __init__(self, n, unit=FORGET_UNIT, threshold=FORGET_THRESHOLD):
        self.unit, self.threshold = unit, threshold
        self.strength = torch.ones(n, dtype=torch.float64)
        self.last = torch.zeros(n, dtype=torch.float64)
        self.alive = torch.ones(n, dtype=torch.bool)
        self.clock = 0

    def retention(self):
        return torch.exp(-(self.clock - self.last) / self.unit / self.strength)

    def tick(self):
        """Advance the clock by one retrieval and forget what fell below the threshold."""
        self.clock += 1
        self.alive &= self.retention() >= self.threshold

    def recall(self, idx):
        self.strength[idx] += 1
        self.last[idx] = self.clock


class MemoryBank:
    kind = "memorybank"

    def __init__(self, path, meta, model, tok, top_k=TOP_K, forget=FORGET, forget_unit=FORGET_UNIT,
                 forget_threshold=FORGET_THRESHOLD, **_):
        self.path, self.meta = path, meta
        self.store = Store(path, model, tok, top_k)
        self.forgetting = Forgetting(len(self.store.items), forget_unit, forget_threshold) if forget else None

    def retrieve(self, task, row):
        """Indices of the top-k stored items for this problem, most similar first."""
        q, allowed = self.store.candidates(task, row)
        if self.forgetting is not None:
            self.forgetting.tick()
            allowed &= self.forgetting.alive
        top = nearest(self.store.emb, q, self.store.top_k, allowed)
        if self.forgetting is not None:
            self.forgetting.recall(top)
        return top

    def pieces(self, task, row):
        return [Piece("example", example_text(self.store.items[i]), self.store.items[i]["id"])
                for i in self.retrieve(task, row)]


# ----------------------------------------------------------------------------------------------------------------
# 4. ExpeL
#
# The insight-extraction prompts, the operation format and the importance rules follow ExpeL's code
# (LeapLabTHU/ExpeL, agent/expel.py update_rules and prompts/templates/human.py), worded for solving problems
# instead of acting in an environment:
#   ADD     a new rule with importance 2 (dropped when the text holds an existing rule: a duplicate)
#   AGREE   +1 to the rule
#   EDIT    replaces the rule's text, +1 (an EDIT whose text holds an existing rule counts as AGREE on it)
#   REMOVE  -1, or -3 once the list holds max_rules + 5 rules
# applied in the order REMOVE, AGREE, EDIT, ADD; a rule at importance <= 0 is dropped; the list is kept sorted by
# importance (so the numbers shown in the next prompt change). Like ExpeL, AGREE / REMOVE / EDIT find their rule by
# its text when the line quotes it, else (here) by the number; ADD / EDIT texts must end with "." (ExpeL's guard
# against cut-off sentences) and must not contain an operation word. Differences: a line may carry markdown
# decorations ("- **ADD 1:** ..."); an AGREE / REMOVE may give only the number; a second operation on the same
# rule in one response is ignored (the prompt allows one); attempts are independent samples, not Reflexion retries,
# and one failure is compared with one success per problem (ExpeL compares every pair).

OPERATIONS = ("ADD", "EDIT", "REMOVE", "AGREE")
OPERATIONS_FORMAT = (
    "<OPERATION> <RULE NUMBER>: <RULE>\n\n"
    "The available operations are: AGREE (if the existing rule is strongly relevant for the task), REMOVE (if one "
    "existing rule is contradictory or similar/duplicated to other existing rules), EDIT (if any existing rule is not "
    "general enough or can be enhanced, rewrite and improve it), ADD (add new rules that are very different from "
    "existing rules and relevant for other tasks). Each needs to CLOSELY follow their corresponding formatting below "
    "(any existing rule not edited, not agreed, nor removed is considered copied):\n\n"
    "AGREE <EXISTING RULE NUMBER>: <EXISTING RULE>\n"
    "REMOVE <EXISTING RULE NUMBER>: <EXISTING RULE>\n"
    "EDIT <EXISTING RULE NUMBER>: <NEW MODIFIED RULE>\n"
    "ADD <NEW RULE NUMBER>: <NEW RULE>\n\n"
    "Do not mention the trials in the rules because all the rules should be GENERALLY APPLICABLE. Each rule should be "
    "concise and easy to follow. Any operation can be used MULTIPLE times. Do at most 4 operations and each existing "
    "rule can only get a maximum of 1 operation. ")
SUFFIX_NOT_FULL = "Below are the operations you do to the above list of EXISTING RULES:\n"
SUFFIX_FULL = ("Focus on REMOVE rules first, and stop ADD rule unless the new rule is VERY insightful and different "
               "from EXISTING RULES. " + SUFFIX_NOT_FULL)
AGENT = ("You are an advanced reasoning agent that can add, edit or remove rules from your existing rule set, based "
         "on forming new critiques of past task trajectories.")
COMPARE_PROMPT = (
    AGENT + " You will be given two previous task trials in which you were given a problem to solve: one successful "
    "and one unsuccessful trial. You failed the trial because your final answer was wrong.\n"
    "Here are the two previous trials to compare and critique:\n"
    "TRIAL TASK:\n{task}\n\nSUCCESSFUL TRIAL:\n{success}\n\nFAILED TRIAL:\n{failure}\n\n"
    "Here are the EXISTING RULES:\n{rules}\n\n"
    "By examining and contrasting to the successful trial, and the list of existing rules, you can perform the "
    "following operations: add, edit, remove, or agree so that the new list of rules is GENERAL and HIGH LEVEL "
    "critiques of the failed trial or proposed way of Thought so they can be used to avoid similar failures when "
    "encountered with different questions in the future. Have an emphasis on critiquing how to reason better. "
    "Follow the below format:\n\n" + OPERATIONS_FORMAT)
SUCCESS_PROMPT = (
    AGENT + " You will be given successful trials in which you were given a problem to solve.\n"
    "Here are the trials:\n{trials}\n\n"
    "Here are the EXISTING RULES:\n{rules}\n\n"
    "By examining the successful trials, and the list of existing rules, you can perform the following operations: "
    "add, edit, remove, or agree so that the new list of rules are general and high level insights of the successful "
    "trials or proposed way of Thought so they can be used as helpful tips to different tasks in the future. Have an "
    "emphasis on tips that help to reason better. Follow the below format:\n\n" + OPERATIONS_FORMAT)
OP_LINE = re.compile(r"^[\s>#*-]*(?:\d+[.)]\s*)?\**\s*(ADD|EDIT|REMOVE|AGREE)\b\s*(\d+)?\s*\**\s*:\**\s*(.*?)\s*$")


def rules_text(rules):
    return "\n".join(f"{i}. {r['text']}" for i, r in enumerate(rules, 1)) if rules else "(none yet)"


def _holds_rule(rules, text):
    """Index of the first existing rule whose text appears inside `text` (ExpeL's is_existing_rule), else None."""
    return next((i for i, r in enumerate(rules) if r["text"] and r["text"] in text), None)


def parse_operations(text, rules):
    """
    The operations in a model response, checked against the current rules (a list of {"text", "importance"}).
    Returns (ops, ignored): ops a list of (operation, rule index or None for ADD, text); ignored a Counter of the
    non-blank lines that were not used, by reason: "not an operation", "empty rule", "garbled" (an operation word
    inside the rule), "unfinished" (a rule not ending with "."), "unknown rule", "duplicate" (ADD of an existing
    rule), "repeat" (a second operation on the same rule). Never raises.
    """
    ops, ignored, touched = [], Counter(), set()
    for line in str(text).splitlines():
        if not line.strip():
            continue
        m = OP_LINE.match(line)
        if not m:
            ignored["not an operation"] += 1
            continue
        op, number, body = m.group(1), m.group(2), m.group(3).strip().strip("*").strip()
        if op in ("ADD", "EDIT"):
            if not body:
                ignored["empty rule"] += 1
                continue
            if any(w in body for w in OPERATIONS):
                ignored["garbled"] += 1
                continue
            if not body.endswith("."):
                ignored["unfinished"] += 1
                continue
        if op == "ADD":
            if _holds_rule(rules, body) is not None or any(o == "ADD" and t == body for o, _, t in ops):
                ignored["duplicate"] += 1
                continue
            ops.append(("ADD", None, body))
            continue
        quoted = _holds_rule(rules, body)
        if op == "EDIT" and quoted is not None:
            op, index = "AGREE", quoted  # an "edit" that repeats a rule agrees with it (ExpeL)
        elif op == "EDIT" or quoted is None:
            index = int(number) - 1 if number and 1 <= int(number) <= len(rules) else None
        else:
            index = quoted
        if index is None:
            ignored["unknown rule"] += 1
            continue
        if index in touched:
            ignored["repeat"] += 1
            continue
        touched.add(index)
        ops.append((op, index, body if op == "EDIT" else rules[index]["text"]))
    return ops, ignored


def apply_operations(rules, ops, max_rules):
    """The new rule list after `ops` (from parse_operations on the same `rules`); see the section comment."""
    rules = [dict(r) for r in rules]
    full = len(rules) >= max_rules + 5
    for kind in ("REMOVE", "AGREE", "EDIT", "ADD"):
        for op, index, text in ops:
            if op != kind:
                continue
            if op == "REMOVE":
                rules[index]["importance"] -= 3 if full else 1
            elif op == "AGREE":
                rules[index]["importance"] += 1
            elif op == "EDIT":
                rules[index] = {"text": text, "importance": rules[index]["importance"] + 1}
            else:
                rules.append({"text": text, "importance": 2})
    kept = [r for r in rules if r["importance"] > 0]
    return sorted(kept, key=lambda r: -r["importance"])  # stable: ties keep their order


def insight_prompt(step, rules, shown, tok, max_rules):
    """The user message of one insight-extraction step: step = {"kind": "compare", "task", "success", "failure"}
    or {"kind": "success", "trials": [(task, solution), ...]}; each trajectory cut to `shown` tokens."""
    if step["kind"] == "compare":
        body = COMPARE_PROMPT.format(task=step["task"], success=cut_text(tok, step["success"], shown),
                                     failure=cut_text(tok, step["failure"], shown), rules=rules_text(rules))
    else:
        trials = "\n\n".join(f"{q}\n{cut_text(tok, s, shown)}" for q, s in step["trials"])
        body = SUCCESS_PROMPT.format(trials=trials, rules=rules_text(rules))
    return body + (SUFFIX_FULL if len(rules) >= max_rules else SUFFIX_NOT_FULL)


class ExpeL:
    kind = "expel"

    def __init__(self, path, meta, model, tok, top_k=TOP_K, **_):
        self.path, self.meta = path, meta
        self.store = Store(path, model, tok, top_k)
        self.rules = read_json(os.path.join(path, "insights.json"))["rules"]

    def pieces(self, task, row):
        """The insights, most important first, then the top-k retrieved successes (dropped first when over budget)."""
        q, allowed = self.store.candidates(task, row)
        top = nearest(self.store.emb, q, self.store.top_k, allowed)
        return ([Piece("insight", " ".join(r["text"].split()), f"rule-{i + 1}") for i, r in enumerate(self.rules)]
                + [Piece("example", example_text(self.store.items[i]), self.store.items[i]["id"]) for i in top])


# ----------------------------------------------------------------------------------------------------------------
# 5. AWM
#
# The induction instruction follows AWM's (zorazrw/agent-workflow-memory, prompt/instruction.txt), worded for
# problems and their worked solutions, with one example workflow in the format that parse_workflows reads. Offline
# induction runs over groups of `workflow_group` trajectories (the training set does not fit one prompt); the
# same description induced again raises the workflow's "support", and the prompt lists workflows by support.
# Online (eval): after a completion judged correct (by the model itself, as AWM's evaluator, or by the task's
# grader), workflows are induced from that trajectory and the new ones added (AWM's WebArena pipeline re-induces
# from all past successes, which does not fit a small model's context).

AWM_PROMPT = (
    "Given a list of problems and their solutions, your task is to extract the common workflows to solve these "
    "problems.\nEach given problem contains a question and a worked solution. You need to find the repetitive "
    "reasoning steps across multiple problems, and extract each of them out as a workflow.\nEach workflow should be "
    "a commonly reused sub-routine of the problems. Do not generate similar or overlapping workflows. Each workflow "
    "should have at least two steps. Represent the non-fixed elements (numbers, names, quantities) with descriptive "
    "variable names in curly braces, as shown in the example.\nWrite every workflow in exactly this format:\n\n"
    "Workflow: Find the total cost of items bought in several quantities\n"
    "Steps:\n"
    "1. For each item, multiply {{quantity}} by {{unit price}} to get its cost.\n"
    "2. Add up the costs of all items to get {{total cost}}.\n\n"
    "## Problems\n\n{trajectories}\n\n## Summary Workflows\n")
AWM_JUDGE = ("Here is a problem and a proposed solution.\n\nProblem:\n{task}\n\nProposed solution:\n{solution}\n\n"
             "Is the proposed solution correct? Answer with one word: YES or NO.")
WORKFLOW_HEAD = re.compile(r"^[\s#*]*workflow\b[^:]*:\**\s*(.*?)[\s*]*$", re.IGNORECASE)
STEPS_HEAD = re.compile(r"^[\s#*]*steps?[\s*]*:[\s*]*$", re.IGNORECASE)
STEP_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$")
VARIABLE = re.compile(r"\{([^{}]+)\}")
MIN_STEPS = 2  # AWM: "each workflow should have at least two steps"


def parse_workflows(text):
    """
    Workflows in a model response: a "Workflow: <description>" line (markdown # / ** allowed, "Workflow 2:" too),
    an optional "Steps:" line, then numbered or bulleted steps. Returns (workflows, stats): each workflow
    {"description", "steps", "variables"} (variables: the {names} in its steps, in order, once each); stats a Counter
    with "ignored" (non-blank lines outside any workflow or not a step) and "rejected" (workflows without a
    description or with fewer than MIN_STEPS steps). Never raises.
    """
    found, stats, cur = [], Counter(), None

    def close():
        if cur is None:
            return
        if cur["description"] and len(cur["steps"]) >= MIN_STEPS:
            names = [v.strip() for s in cur["steps"] for v in VARIABLE.findall(s)]
            cur["variables"] = list(dict.fromkeys(n for n in names if n))
            found.append(cur)
        else:
            stats["rejected"] += 1

    for line in str(text).splitlines():
        if not line.strip():
            continue
        head = WORKFLOW_HEAD.match(line)
        if head:
            close()
            cur = {"description": head.group(1).strip(), "steps": []}
        elif cur is not None and STEPS_HEAD.match(line):
            continue
        elif cur is not None and STEP_LINE.match(line):
            cur["steps"].append(STEP_LINE.match(line).group(1))
        else:
            stats["ignored"] += 1
    close()
    return found, stats


def workflow_key(description):
    return re.sub(r"[^a-z0-9]+", " ", description.lower()).strip()


def merge_workflows(workflows, new, source):
    """Add `new` to `workflows` (in place): a known description raises its support, an unknown one is appended with
    support 1; the list stays sorted by support (stable). Returns the workflows that were new."""
    known = {workflow_key(w["description"]): w for w in workflows}
    added = []
    for w in new:
        key = workflow_key(w["description"])
        if key in known:
            known[key]["support"] += 1
            continue
        w = {"description": w["description"], "steps": list(w["steps"]), "variables": list(w["variables"]),
             "support": 1, "source": source}
        known[key] = w
        workflows.append(w)
        added.append(w)
    workflows.sort(key=lambda w: -w["support"])
    return added


def workflow_text(w):
    return f"Workflow: {w['description']}\nSteps:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(w["steps"], 1))


def awm_prompt(trajectories, tok, shown):
    return AWM_PROMPT.format(trajectories="\n\n".join(
        f"Problem {i}: {q}\nSolution: {cut_text(tok, s, shown)}" for i, (q, s) in enumerate(trajectories, 1)))


class AWM:
    kind = "awm"

    def __init__(self, path, meta, model=None, tok=None, awm_online=AWM_ONLINE, **_):
        if awm_online not in AWM_ONLINE_MODES:
            raise MemError(f"unknown awm_online {awm_online!r}; use one of {', '.join(AWM_ONLINE_MODES)}")
        if awm_online != "off" and (model is None or tok is None):
            raise MemError("online AWM induces with the model: pass the base model and tokenizer")
        self.path, self.meta, self.model, self.tok, self.online = path, meta, model, tok, awm_online
        self.workflows = read_json(os.path.join(path, "workflows.json"))["workflows"]

    def pieces(self, task, row):
        return [Piece("workflow", workflow_text(w), w["description"]) for w in self.workflows]

    def judge(self, task, row, completion):
        """The model's own verdict on a completion (AWM judges with a model, not with the gold answer)."""
        prompt = AWM_JUDGE.format(task=query_text(task, row), solution=completion)
        ids = self.tok.chat([{"role": "user", "content": prompt}])
        if not _fits(self.model, ids):
            return False
        answer = _generate(self.model, self.tok, [ids], 4, 0.0, 1.0, 0)[0]
        m = re.search(r"\b(yes|no)\b", answer, re.IGNORECASE)
        return bool(m) and m.group(1).lower() == "yes"

    def observe(self, task, row, completion, correct):
        if self.online == "off" or not (correct if self.online == "gold" else self.judge(task, row, completion)):
            return []
        s = self.meta["settings"]
        ids = self.tok.chat([{"role": "user", "content": awm_prompt([(query_text(task, row), completion)], self.tok,
                                                                     s["shown_tokens"])}])
        if not _fits(self.model, ids):
            return []
        text = _generate(self.model, self.tok, [ids], s["induce_max_new_tokens"], 0.0, 1.0, 0)[0]
        return merge_workflows(self.workflows, parse_workflows(text)[0], "online")

    def add_workflows(self, workflows):
        """Replay workflows an earlier (interrupted) evaluation added online."""
        return merge_workflows(self.workflows, workflows, "online")


# ----------------------------------------------------------------------------------------------------------------
# 6. Prompt assembly
#
# The memory text, then the task's own user message. Sections, in this order, each only when it has pieces:
#
#   Here are solved problems similar to this one:\n\n
#   Problem: <question>\nSolution: <solution>\n\n            (one per retrieved item)
#   Insights from past attempts at similar problems:\n
#   1. <rule>\n2. <rule>\n\n
#   Workflows for this kind of problem:\n\n
#   Workflow: <description>\nSteps:\n1. <step>\n2. <step>\n\n   (one per workflow)

HEADERS = {"example": "Here are solved problems similar to this one:\n\n",
           "insight": "Insights from past attempts at similar problems:\n",
           "workflow": "Workflows for this kind of problem:\n\n"}


def render(pieces):
    out = []
    for section in HEADERS:
        texts = [p.text for p in pieces if p.section == section]
        if not texts:
            continue
        if section == "insight":
            body = "".join(f"{i}. {t}\n" for i, t in enumerate(texts, 1)) + "\n"
        else:
            body = "".join(t + "\n\n" for t in texts)
        out.append(HEADERS[section] + body)
    return "".join(out)


def fit(pieces, tok, budget, content=""):
    """
    (memory text, n, number of pieces kept) for pieces given most relevant first, to go in front of a user message
    `content`: n is how many tokens the memory text adds to that message's chat prompt, exactly (tokens can merge
    across the boundary, so n is measured, not added up). Keeps the longest prefix of pieces with n <= budget (pieces
    are dropped whole from the least relevant); only when the first piece alone is too long is it cut, at a token
    boundary, with CUT_MARK. Never over budget.
    """
    if budget <= 0 or not pieces:
        return "", 0, 0
    base = len(tok.chat([{"role": "user", "content": content}]))

    def cost(text):
        return len(tok.chat([{"role": "user", "content": text + content}])) - base

    best = ("", 0, 0)
    for m in range(1, len(pieces) + 1):
        text = render(pieces[:m])
        n = cost(text)
        if n > budget:
            break
        best = (text, n, m)
    if best[2] > 0:
        return best
    first = pieces[0]
    ids = tok.encode(first.text)
    lo, hi = 0, len(ids) - 1
    while lo <= hi:  # the most tokens of the first piece that still fit, each candidate measured
        mid = (lo + hi) // 2
        text = render([first._replace(text=tok.decode(ids[:mid]).rstrip("\ufffd") + CUT_MARK)])
        n = cost(text)
        if n <= budget:
            best, lo = (text, n, 1), mid + 1
        else:
            hi = mid - 1
    return best


def augment(memory, task, row, tok, budget_tokens=BUDGET_TOKENS):
    """
    (messages, n_memory_tokens) for one problem: the task's single user message with the memory text (render)
    in front, cut to budget_tokens (fit). n_memory_tokens = len(tok.chat(messages)) - len(tok.chat(task.messages(row)))
    <= budget_tokens. memory.last_refs: what the kept pieces came from (item ids, "rule-<n>", workflow descriptions).
    """
    messages = task.messages(row)
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise MemError(f"task {getattr(task, 'NAME', task)} gives {len(messages)} messages; memory goes into a "
                       "single user message")
    pieces = memory.pieces(task, row)
    text, n, kept = fit(pieces, tok, budget_tokens, messages[0]["content"])
    memory.last_refs = [p.ref for p in pieces[:kept]]
    return [{"role": "user", "content": text + messages[0]["content"]}], n


def observe(memory, task, row, completion, correct):
    """After eval graded one completion: AWM online induction (when load(..., awm_online=self|gold)); returns the
    workflows it added (store them to replay with memory.add_workflows after a resume). Other memories: []."""
    return memory.observe(task, row, completion, correct) if hasattr(memory, "observe") else []


# ----------------------------------------------------------------------------------------------------------------
# 7. Build
#
# Stages, each resumable: attempts (expel, or memory_source=self) -> items -> embeddings (memorybank, expel)
# -> insights (expel) / workflows (awm). Attempts, embeddings and workflow groups go to parts/ in chunks (whole
# files, temp + rename); insight extraction is sequential (each step edits the rules), so its state is saved after
# every step. When every stage is done the final files are written, meta.json says "complete", parts/ goes.

# settings that decide what the directory holds: a rerun must give the same ones to resume
CONTENT_KEYS = ("kind", "data", "model", "limit", "memory_source", "attempts", "temperature", "top_p",
                "max_new_tokens", "induce_max_new_tokens", "shown_tokens", "success_group", "max_rules",
                "workflow_group", "chunk", "seed", "dtype")


def _progress(total, desc, progress):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="", disable=not progress or None, dynamic_ncols=True)


def check_dir(out_dir, cfg):
    """The meta of an existing build in out_dir made with the same settings, None for a new (or empty) directory;
    MemError for anything else (another kind, other settings, a folder that is not a memory)."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path):
        try:
            meta = read_json(meta_path)
        except (OSError, ValueError):
            raise MemError(f"{meta_path} is unreadable; delete {out_dir} and build again") from None
        if meta.get("kind") != cfg["kind"]:
            raise MemError(f"{out_dir} holds a {meta.get('kind')} memory, not {cfg['kind']}: pick another --out_dir")
        old = meta.get("settings", {})
        diff = [k for k in CONTENT_KEYS if old.get(k) != cfg[k]]
        if diff:
            raise MemError(f"{out_dir} was built with other settings ("
                           + ", ".join(f"{k}: {old.get(k)!r} there, {cfg[k]!r} now" for k in diff)
                           + "); rerun with those, or pick another --out_dir")
        return meta
    if os.path.exists(out_dir):
        # a build killed before its meta.json was renamed into place leaves at most parts/ and *.tmp files
        leftovers = [f for f in os.listdir(out_dir) if f != "parts" and not f.endswith(".tmp")] \
            if os.path.isdir(out_dir) else [out_dir]
        if leftovers:
            raise MemError(f"{out_dir} exists and is not a memory directory: pick another --out_dir")
    return None


def start(out_dir, cfg, model_info):
    """Create out_dir, or check that it holds a build of the same settings; return its meta."""
    meta = check_dir(out_dir, cfg)
    if meta is not None:
        return meta
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
    meta = {"kind": cfg["kind"], "format": FORMAT, "complete": False, "model": model_info,
            "settings": {k: cfg[k] for k in CONTENT_KEYS}, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def _chunks(n, size):
    return [(c, s, min(s + size, n)) for c, s in enumerate(range(0, n, size))]


def attempts_stage(d, task, rows, model, tok, cfg, progress):
    """cfg["attempts"] sampled completions per problem (the plain task prompt), graded: one record per problem."""
    A, C, B = cfg["attempts"], cfg["chunk"], cfg["batch_size"]
    bar = _progress(len(rows) * A, "attempts", progress)
    out = []
    for c, s, e in _chunks(len(rows), C):
        part = os.path.join(d, "parts", f"attempts-{c:06d}.jsonl")
        if os.path.isfile(part):
            recs = read_jsonl(part)
            if [r["id"] for r in recs] != [str(r["id"]) for r in rows[s:e]]:
                raise MemError(f"{part} holds other problems than the task gives now (was the data changed?); "
                               "delete the directory and build again")
            out += recs
            bar.update((e - s) * A)
            continue
        prompts = [tok.chat(task.messages(r)) for r in rows[s:e] for _ in range(A)]
        texts = []
        for j, b in enumerate(range(0, len(prompts), B)):
            texts += _generate(model, tok, prompts[b:b + B], cfg["max_new_tokens"], cfg["temperature"],
                               cfg["top_p"], cfg["seed"] + 1000 * c + j)
            bar.update(len(prompts[b:b + B]))
        recs = []
        for k, r in enumerate(rows[s:e]):
            mine = texts[k * A:(k + 1) * A]
            recs.append({"id": str(r["id"]), "question": query_text(task, r), "completions": mine,
                         "correct": [bool(task.grade(r, t)) for t in mine]})
        write_jsonl(part, recs)
        out += recs
    bar.close()
    return out


def make_items(task, rows, attempts, source):
    """The experiences: gold targets, or each problem's first correct attempt."""
    if source == "gold":
        items = [{"id": str(r["id"]), "question": query_text(task, r), "solution": r["target"], "source": "gold"}
                 for r in rows if r.get("target")]
        if not items:
            raise MemError("the task gives no gold solutions (target); use --memory_source=self")
        return items
    return [{"id": a["id"], "question": a["question"], "solution": a["completions"][a["correct"].index(True)],
             "source": "self"} for a in attempts if True in a["correct"]]


def embeddings_stage(d, items, model, tok, cfg, progress):
    C = cfg["chunk"]
    bar = _progress(len(items), "embeddings", progress)
    parts = []
    for c, s, e in _chunks(len(items), C):
        part = os.path.join(d, "parts", f"embeddings-{c:06d}.safetensors")
        if not os.path.isfile(part):
            save_embeddings(part, embed(model, tok, [it["question"] for it in items[s:e]], cfg["batch_size"]))
        parts.append(load_embeddings(part))
        bar.update(e - s)
    bar.close()
    return torch.cat(parts) if parts else torch.zeros(0, model.cfg.hidden_size)


def insight_steps(attempts, items, seed, group):
    """ExpeL's two kinds of critique: a failure against a success of the same problem, for every problem that has
    both, then groups of `group` successes of different problems (shuffled with the seed)."""
    steps = []
    for a in attempts:
        if True in a["correct"] and False in a["correct"]:
            steps.append({"kind": "compare", "ids": [a["id"]], "task": a["question"],
                          "success": a["completions"][a["correct"].index(True)],
                          "failure": a["completions"][a["correct"].index(False)]})
    if group >= 2:
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        for s in range(0, len(order) - 1, group):
            chunk = [items[i] for i in order[s:s + group]]
            if len(chunk) >= 2:
                steps.append({"kind": "success", "ids": [it["id"] for it in chunk],
                              "trials": [(it["question"], it["solution"]) for it in chunk]})
    return steps


def insights_stage(d, attempts, items, model, tok, cfg, progress):
    steps = insight_steps(attempts, items, cfg["seed"], cfg["success_group"])
    state_path = os.path.join(d, "parts", "insights-state.json")
    state = read_json(state_path) if os.path.isfile(state_path) else {
        "done": 0, "rules": [], "operations": {}, "ignored": {}, "too_long": 0}
    bar = _progress(len(steps), "insights", progress)
    bar.update(state["done"])
    for k in range(state["done"], len(steps)):
        step = steps[k]
        prompt = insight_prompt(step, state["rules"], cfg["shown_tokens"], tok, cfg["max_rules"])
        ids = tok.chat([{"role": "user", "content": prompt}])
        record = {"step": k, "kind": step["kind"], "ids": step["ids"]}
        if _fits(model, ids):
            text = _generate(model, tok, [ids], cfg["induce_max_new_tokens"], 0.0, 1.0, cfg["seed"])[0]
            ops, ignored = parse_operations(text, state["rules"])
            state["rules"] = apply_operations(state["rules"], ops, cfg["max_rules"])
            for op, _, _ in ops:
                state["operations"][op] = state["operations"].get(op, 0) + 1
            for why, n in ignored.items():
                state["ignored"][why] = state["ignored"].get(why, 0) + n
            record.update(response=text, operations=[[op, None if i is None else i + 1, t] for op, i, t in ops],
                          ignored=dict(ignored))
        else:
            state["too_long"] += 1
            record["skipped"] = f"prompt of {len(ids)} tokens does not fit the model's {model.cfg.max_positions}"
        write_json(os.path.join(d, "parts", f"insight-{k:06d}.json"), record)
        state["done"] = k + 1
        write_json(state_path, state)
        bar.update(1)
    bar.close()
    log = [read_json(os.path.join(d, "parts", f"insight-{k:06d}.json")) for k in range(len(steps))]
    return state, log


def workflows_stage(d, items, model, tok, cfg, progress):
    G = cfg["workflow_group"]
    groups = [items[s:s + G] for s in range(0, len(items), G)]
    per_part = max(1, cfg["chunk"] // G)
    bar = _progress(len(groups), "workflows", progress)
    log = []
    for c, s, e in _chunks(len(groups), per_part):
        part = os.path.join(d, "parts", f"workflows-{c:06d}.jsonl")
        if not os.path.isfile(part):
            recs, prompts = [], []
            for g in range(s, e):
                ids = tok.chat([{"role": "user", "content": awm_prompt(
                    [(it["question"], it["solution"]) for it in groups[g]], tok, cfg["shown_tokens"])}])
                recs.append({"group": g, "ids": [it["id"] for it in groups[g]]})
                if _fits(model, ids):
                    prompts.append((len(recs) - 1, ids))
                else:
                    recs[-1]["skipped"] = f"prompt of {len(ids)} tokens does not fit the model's " \
                                          f"{model.cfg.max_positions}"
            for j, b in enumerate(range(0, len(prompts), cfg["batch_size"])):
                batch = prompts[b:b + cfg["batch_size"]]
                texts = _generate(model, tok, [p for _, p in batch], cfg["induce_max_new_tokens"], 0.0, 1.0,
                                  cfg["seed"])
                for (r, _), text in zip(batch, texts):
                    found, stats = parse_workflows(text)
                    recs[r].update(response=text, workflows=found, ignored=stats["ignored"],
                                   rejected=stats["rejected"])
            write_jsonl(part, recs)
        log += read_jsonl(part)
        bar.update(e - s)
    bar.close()
    workflows = []
    for rec in log:
        merge_workflows(workflows, rec.get("workflows", []), "offline")
    return workflows, log


def build(out_dir, task, rows, model, tok, cfg, progress=True):
    """
    Build (or resume) the memory directory out_dir from the task's training `rows`. cfg: build_memory.py's settings
    (CONTENT_KEYS, batch_size; "model" is the model's identity string). Returns the final meta.
    """
    t0 = time.time()
    kind = cfg["kind"]
    if kind not in KINDS:
        raise MemError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    info = {"name": cfg["model"], "hidden_size": model.cfg.hidden_size, "num_layers": model.cfg.num_layers,
            "vocab_size": model.cfg.vocab_size}
    meta = start(out_dir, cfg, info)
    if meta.get("complete"):
        shutil.rmtree(os.path.join(out_dir, "parts"), ignore_errors=True)
        return meta
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        self_made = kind == "expel" or cfg["memory_source"] == "self"
        attempts = attempts_stage(out_dir, task, rows, model, tok, cfg, progress) if self_made else []
        items = make_items(task, rows, attempts, "self" if kind == "expel" else cfg["memory_source"])
        counts = {"problems": len(rows), "items": len(items)}
        if attempts:
            write_jsonl(os.path.join(out_dir, "attempts.jsonl"), attempts)
            counts.update(attempts=sum(len(a["correct"]) for a in attempts),
                          correct_attempts=sum(sum(a["correct"]) for a in attempts),
                          solved_problems=sum(True in a["correct"] for a in attempts))
        if kind in ("memorybank", "expel"):
            emb = embeddings_stage(out_dir, items, model, tok, cfg, progress)
        if kind == "expel":
            state, log = insights_stage(out_dir, attempts, items, model, tok, cfg, progress)
            write_jsonl(os.path.join(out_dir, "insight_log.jsonl"), log)
            write_json(os.path.join(out_dir, "insights.json"), {
                "rules": state["rules"], "steps": len(log), "operations": state["operations"],
                "ignored_lines": sum(state["ignored"].values()), "ignored": state["ignored"],
                "skipped_too_long": state["too_long"]})
            counts.update(rules=len(state["rules"]), insight_steps=len(log))
        if kind == "awm":
            workflows, log = workflows_stage(out_dir, items, model, tok, cfg, progress)
            write_jsonl(os.path.join(out_dir, "workflow_log.jsonl"), log)
            write_json(os.path.join(out_dir, "workflows.json"), {
                "workflows": workflows, "groups": len(log),
                "ignored_lines": sum(r.get("ignored", 0) for r in log),
                "rejected": sum(r.get("rejected", 0) for r in log),
                "skipped_too_long": sum("skipped" in r for r in log)})
            counts.update(workflows=len(workflows), induction_groups=len(log))
        write_jsonl(os.path.join(out_dir, "items.jsonl"), items)  # the store goes in last: beside its embeddings
        if kind in ("memorybank", "expel"):
            save_embeddings(os.path.join(out_dir, "embeddings.safetensors"), emb)
    finally:
        model.train(was_training)
    meta.update(complete=True, counts=counts, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                last_run_s=round(time.time() - t0, 1))
    write_json(os.path.join(out_dir, "meta.json"), meta)
    shutil.rmtree(os.path.join(out_dir, "parts"), ignore_errors=True)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# 8. Load

CLASSES = {"memorybank": MemoryBank, "expel": ExpeL, "awm": AWM}


def load(path, model=None, tok=None, top_k=TOP_K, forget=FORGET, forget_unit=FORGET_UNIT,
         forget_threshold=FORGET_THRESHOLD, awm_online=AWM_ONLINE):
    """The memory in directory `path`, ready for augment(). memorybank and expel need the base model and tokenizer
    (they embed each question); awm needs them only for online induction."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise MemError(f"{path} is not a memory directory (no meta.json); build one with build_memory.py")
    meta = read_json(meta_path)
    if meta.get("kind") not in CLASSES:
        raise MemError(f"{meta_path}: unknown memory kind {meta.get('kind')!r}")
    if not meta.get("complete"):
        raise MemError(f"{path} is an unfinished build: rerun build_memory.py with the same settings to finish it")
    if meta.get("format") != FORMAT:
        raise MemError(f"{path} has format {meta.get('format')}, this code reads {FORMAT}: build it again")
    kind = meta["kind"]
    if top_k < 1:
        raise MemError(f"top_k must be >= 1, got {top_k}")
    if forget and kind != "memorybank":
        raise MemError(f"the forgetting curve is MemoryBank's; {path} holds a {kind} memory")
    if awm_online != "off" and kind != "awm":
        raise MemError(f"online induction is AWM's; {path} holds a {kind} memory")
    built = meta.get("model", {})
    if model is not None:
        diff = [k for k in ("hidden_size", "num_layers", "vocab_size") if k in built and built[k] != getattr(model.cfg, k)]
        if diff:
            raise MemError(f"{path} was built with {built.get('name')} ({', '.join(f'{k} {built[k]}' for k in diff)}); "
                           "evaluate with that model, or build a memory for this one")
    mem = CLASSES[kind](path, meta, model, tok, top_k=top_k, forget=forget, forget_unit=forget_unit,
                        forget_threshold=forget_threshold, awm_online=awm_online)
    mem.last_refs = []
    return mem
