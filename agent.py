"""
agent.py: a policy as a multi-turn agent in a text environment - the reasoner alone (vanilla), with its LoRA (lora),
MemGen (any trigger mode), or with a retrieval memory in its first prompt - whose KV caches live for the whole
episode. Read it like memgen.generate.

One episode, as the model reads it (ChatML; decoding and SFT build exactly these tokens, with the helpers of §1):

    <|im_start|>user\n{task.messages(row): instructions, task, first observation}<|im_end|>\n    first prompt
    <|im_start|>assistant\n
    Think: the kitchen has the stove.\nAction: open door to kitchen<|im_end|>                       the agent's turn
    \n<|im_start|>user\nObservation: The door is now open.<|im_end|>\n<|im_start|>assistant\n        next_prompt
    ...                                                                                             (turns repeat)

Read top to bottom:
  1. Prompts and actions  next_prompt, render_trajectory (what SFT trains on) and parse_action: the first line of
                          a turn that starts with "Action:"; a turn without one is a WASTED turn - the environment is
                          not stepped, the agent is told how to write an action, the turn still counts
  2. Decoder              the per-episode state of B rows: the reasoner's cache, MemGen's weaver cache (and the
                          trigger's), and what each of them has not read yet. feed() appends a new observation and
                          prefills it - the history is never read again; insert() is MemGen's (a) decide,
                          (b) weave, (c) feed, as in memgen.generate; decode_turn() samples one turn, with an
                          insertion at the end of the turn's prompt and after sentence ends inside the turn
  3. run_episodes         the batched loop: reset every environment, then turns until each episode is done,
                          reaches the turn limit, or its next turn would not fit the context
  4. evaluate             episodes in fixed batches; one results.jsonl row per episode as soon as it ends, so a
                          killed run resumes with the episodes it had not finished; the summary
  5. Training             trajectories rendered as the loop renders them; MemGen's teacher-forced forward with the
                          loop's insertions (a prompt insertion at every turn start, up to N inside every turn); the
                          NLL of the agent's own tokens only

An environment is any object with
    reset(row) -> (task description, first observation, score 0..100 before any action)
    step(action) -> (observation, score 0..100, done)
    close()
data/scienceworld.py makes ScienceWorld ones (make_env); tests/test_agent.py has a small fake one.
"""
import math
import re
import time

import torch
import torch.nn.functional as F

import evaluation
import lora
import memgen
from model import KVCache, sample

MAX_TURNS = 30  # turns per episode (the agent's replies; a wasted turn counts)
TURN_TOKENS = 128  # longest reply per turn; a reply cut here is closed with <|im_end|>
MAX_CONTEXT = 4096  # slots of one episode's history (tokens and latents); an episode whose next turn would not fit ends
OBS_TOKENS = 256  # an observation longer than this many tokens is cut (with " [...]")
ACTION_LINE = re.compile(r"^[ \t>*`#-]*action\s*:(.*)$", re.IGNORECASE | re.MULTILINE)
WASTED = 'No action found in your reply. End every reply with one line "Action: <action>".'
ACTION_FORMAT = "Action: {action}"  # how a gold action is written as the agent's turn (SFT)


class AgentError(evaluation.EvalError):
    """A bad argument or environment; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Prompts and actions


def parse_action(text):
    """The action of a turn: the first line starting with "Action:" (case and leading markdown ignored), its rest with
    spaces collapsed, quotes and a final period removed, lower-cased. None when no such line or it is empty: the
    turn is wasted, never an error."""
    for m in ACTION_LINE.finditer(text):
        action = " ".join(m.group(1).split()).strip("`\"'* ").rstrip(".").strip().lower()
        return action or None
    return None


def cut(tok, text, max_tokens):
    """text, or its first max_tokens tokens + " [...]"."""
    ids = tok.encode(text)
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens]).rstrip("\ufffd") + " [...]"


def next_prompt(tok, observation, obs_tokens=OBS_TOKENS):
    """The tokens after an agent's turn (its closing <|im_end|> included): the observation as a user turn, then the
    assistant's header - what tok.chat renders between two turns."""
    return tok.encode("\n") + tok.chat([{"role": "user", "content": "Observation: " + cut(tok, observation,
                                                                                          obs_tokens)}])


def render_trajectory(tok, messages, turns, obs_tokens=OBS_TOKENS):
    """A whole episode as the loop feeds it: messages (the first user message), turns = [(reply text, observation
    after it, or None after the last)]. Returns (ids, agent mask: the reply tokens and their <|im_end|>, turn starts:
    the index of each turn's first token)."""
    ids = tok.chat(messages)
    agent, starts = [False] * len(ids), []
    for text, observation in turns:
        starts.append(len(ids))
        reply = tok.encode(text) + [tok.end_id]
        ids, agent = ids + reply, agent + [True] * len(reply)
        if observation is not None:
            p = next_prompt(tok, observation, obs_tokens)
            ids, agent = ids + p, agent + [False] * len(p)
    return ids, agent, starts


# ----------------------------------------------------------------------------------------------------------------
# 2. The decoder: caches that live for the whole episode


def right_pad(seqs, pad, device):
    """Lists of ids -> (R, T) ids and mask, padded on the right: trailing padding takes no slot in the cache."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    mask = torch.arange(T)[None] < torch.tensor([len(s) for s in seqs])[:, None]
    return ids.to(device), mask.to(device)


class Decoder:
    """
    B episodes' caches and what each part has not read yet:
      cache      the reasoner's KV cache (tokens and latents), MAX_CONTEXT slots per row
      wcache     MemGen's weaver cache; w_lat[r] / w_tok[r]: row r's last latents and the tokens after them, which
                 its weaver has not read (the weaver reads exactly the reasoner's inputs, latents included)
      gcache     the trigger's cache (mode "learned"); g_tok[r]: tokens it has not read (it reads tokens only)
      used[r]    slots row r has filled; next_logits (B, V): the reasoner's logits after each row's last slot
    Rows are cache rows (episode indices): every call names the rows it is for, the others pay nothing.
    """

    def __init__(self, model, tok, mg, B, max_context, trigger_mode, generator):
        self.model, self.tok, self.mg, self.B, self.gen = model, tok, mg, B, generator
        cfg, dev, dtype = model.cfg, model.device, model.dtype
        self.vocab = mg.vocab if mg is not None else min(tok.vocab_size, cfg.vocab_size)
        self.mode = trigger_mode if mg is not None else "off"
        self.cache = KVCache(cfg, B, max_context, dev, dtype)
        self.used = [0] * B
        self.last_tok = [tok.pad_id] * B
        self.next_logits = torch.zeros(B, self.vocab, device=dev)
        if self.mode != "off":
            self.wcache = KVCache(cfg, B, max_context + mg.k, dev, dtype)
            self.w_lat, self.w_tok = [None] * B, [[] for _ in range(B)]
        if self.mode == "learned":
            self.gcache = KVCache(cfg, B, max_context, dev, dtype)
            self.g_tok = [[] for _ in range(B)]

    def rows_arg(self, rows):
        """The rows= argument of a model call: None (all rows, the cache's fast path) or a tensor."""
        return None if rows == list(range(self.B)) else torch.tensor(rows, device=self.model.device)

    def read(self, rows, segs):
        """Bookkeeping after the reasoner read segs: each part's unread tokens, slots used, the last token."""
        for r, s in zip(rows, segs):
            self.used[r] += len(s)
            self.last_tok[r] = s[-1]
            if self.mode != "off":
                self.w_tok[r] += s
            if self.mode == "learned":
                self.g_tok[r] += s

    def feed(self, rows, segs):
        """Append each row's new tokens (a first prompt, or the end of a turn and the next observation) and prefill
        them; the rows' next logits follow their last token."""
        ids, mask = right_pad(segs, self.tok.pad_id, self.model.device)
        _, h = self.model(ids, mask=mask, cache=self.cache, rows=self.rows_arg(rows), logits="none")
        last = h[torch.arange(len(rows), device=h.device), mask.sum(1) - 1]
        self.next_logits[rows] = self.model.head(last)[:, :self.vocab].float()
        self.read(rows, segs)

    def decide(self, rows, t):
        """(a) DECIDE which rows insert; returns a list of bools and the trigger's (t, p, 0/1) per row or None."""
        if self.mode == "always":
            return [True] * len(rows), [None] * len(rows)
        if self.mode == "random":  # the paper's ablation: insert with p = 0.5
            return (torch.rand(len(rows), generator=self.gen, device=self.model.device) < 0.5).tolist(), \
                [None] * len(rows)
        ids, mask = right_pad([self.g_tok[r] for r in rows], self.tok.pad_id, self.model.device)
        with lora.use(self.model, "trigger"):
            _, h = self.model(ids, mask=mask, cache=self.gcache, rows=self.rows_arg(rows), logits="none")
        for r in rows:
            self.g_tok[r] = []
        p = memgen.trigger_probs(self.mg, h[torch.arange(len(rows), device=h.device), mask.sum(1) - 1])
        fire = (p >= memgen.TRIGGER_THRESHOLD).tolist()
        return fire, [(t, pr, int(f)) for pr, f in zip(p.tolist(), fire)]

    def insert(self, rows, t, is_prompt):
        """(a)-(c) for `rows` at reply index t (0: the end of the turn's prompt): decide, weave from what each
        row's weaver has not read plus the K queries, feed the latents to the reasoner. Returns (the rows that
        inserted, the trigger's decisions per row)."""
        if not rows:
            return [], []
        mg, model, k = self.mg, self.model, self.mg.k
        fire, decisions = self.decide(rows, t)
        rows = [r for r, f in zip(rows, fire) if f]
        if rows:
            ids, tmask = right_pad([self.w_tok[r] or [self.tok.pad_id] for r in rows], self.tok.pad_id, model.device)
            tmask &= torch.tensor([bool(self.w_tok[r]) for r in rows], device=model.device)[:, None]
            D = model.cfg.hidden_size
            lat = torch.stack([self.w_lat[r] if self.w_lat[r] is not None else
                               torch.zeros(k, D, dtype=model.dtype, device=model.device) for r in rows])
            has = torch.tensor([self.w_lat[r] is not None for r in rows], device=model.device)
            new = torch.cat([lat, model.embed(ids)], 1)
            new_mask = torch.cat([has[:, None].expand(-1, k), tmask], 1)
            is_p = torch.full((len(rows),), is_prompt, device=model.device)
            latents = memgen.weave(mg, self.wcache, new, new_mask, is_p, self.rows_arg(rows))
            for r, latent in zip(rows, latents):
                self.w_lat[r], self.w_tok[r] = latent, []
                self.used[r] += k
            logits, _ = model(inputs_embeds=latents, cache=self.cache, rows=self.rows_arg(rows), logits="last")
            self.next_logits[rows] = logits[:, -1, :self.vocab].float()
        return rows, decisions

    def decode_turn(self, rows, max_new_tokens, temperature=0.0, top_p=1.0):
        """One reply per row: the prompt insertion, then one token at a time from the cache, every sampled token
        fed back (the closing <|im_end|> too: it is part of the history), MemGen inserting after a token ending a
        sentence while the row has insertions left (at most N per turn) and the reply goes on. Returns per row
        dict(ids: the reply's ids, <|im_end|> included when sampled; closed: it was sampled; insertions: reply
        indices where latents went in; decisions: the trigger's (index, p, 0/1))."""
        mg, model, dev = self.mg, self.model, self.model.device
        R, inserting = len(rows), self.mode != "off"
        out = torch.full((R, max_new_tokens), self.tok.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        eos = torch.tensor(self.tok.eos_ids, device=dev)
        n_ins, deferred = [0] * R, torch.zeros(R, dtype=torch.bool, device=dev)
        prev = torch.tensor([self.last_tok[r] for r in rows], device=dev)
        insertions, decisions = [[] for _ in range(R)], [[] for _ in range(R)]
        at = {r: i for i, r in enumerate(rows)}

        def insert(idx, t, is_prompt):
            fired, ds = self.insert([rows[i] for i in idx], t, is_prompt)
            for i, d in zip(idx, ds):
                if d is not None:
                    decisions[i].append(d)
            for r in fired:
                insertions[at[r]].append(t)
                n_ins[at[r]] += 0 if is_prompt else 1
            return [at[r] for r in fired]

        if inserting:
            insert(list(range(R)), 0, True)
        for t in range(max_new_tokens):
            tok = sample(self.next_logits[rows], temperature, top_p, self.gen)
            if bool(deferred.any()):  # rule "sentence": the boundary before tok holds unless tok continues a number
                idx = (deferred & ~mg.starts_digit[tok]).nonzero().squeeze(1).tolist()
                fired = insert(idx, t, False)
                if fired:  # tok came before the latents: sample again after them, among tokens that start no digit
                    logits = self.next_logits[[rows[i] for i in fired]]
                    tok[fired] = sample(logits.masked_fill(mg.starts_digit[:self.vocab], float("-inf")), temperature,
                                        top_p, self.gen)
                deferred[:] = False
            tok = torch.where(done, self.tok.pad_id, tok)
            out[:, t] = tok
            live = ~done
            done = done | torch.isin(tok, eos)
            logits, _ = model(tok[:, None], cache=self.cache, rows=self.rows_arg(rows), mask=live[:, None],
                              logits="last")
            self.next_logits[rows] = logits[:, -1, :self.vocab].float()
            live_rows = live.nonzero().squeeze(1).tolist()
            self.read([rows[i] for i in live_rows], [[int(tok[i])] for i in live_rows])
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if inserting:
                cand = mg.is_delim[tok] & ~done & torch.tensor([n < mg.n for n in n_ins], device=dev)
                if mg.boundary == "sentence":
                    deferred = cand & memgen.maybe_in_number(mg, prev, tok)
                    cand &= ~deferred
                prev = torch.where(live, tok, prev)
                if bool(cand.any()):
                    insert(cand.nonzero().squeeze(1).tolist(), t + 1, False)
        results = []
        eos_set = set(self.tok.eos_ids)
        for i, row in enumerate(out.tolist()):
            cut_at = next((j + 1 for j, x in enumerate(row) if x in eos_set), None)
            ids = row[:cut_at] if cut_at else row[:t + 1]
            results.append(dict(ids=ids, closed=cut_at is not None, insertions=insertions[i],
                                decisions=decisions[i]))
        return results


# ----------------------------------------------------------------------------------------------------------------
# 3. The episode loop


def policy_parts(policy, mode):
    """(the reasoner, the MemGen or None, the adapter active while the reasoner decodes) of a policy."""
    is_mg = isinstance(policy, memgen.MemGen)
    if mode == "memgen":
        if not is_mg:
            raise AgentError("mode memgen needs a memgen.MemGen, got a plain model")
        return policy.model, policy, None
    if mode not in ("vanilla", "lora"):
        raise AgentError(f"unknown mode {mode!r}: use vanilla, lora or memgen")
    model = policy.model if is_mg else policy
    if mode == "lora" and "sft" not in getattr(model, "lora_meta", {}):
        raise AgentError("mode lora needs an 'sft' adapter on the model (lora.load_adapter)")
    return model, None, "sft" if mode == "lora" else None


@torch.no_grad()
def run_episodes(policy, tok, mode, envs, rows, messages, max_turns=MAX_TURNS, turn_tokens=TURN_TOKENS,
                 max_context=MAX_CONTEXT, obs_tokens=OBS_TOKENS, temperature=0.0, top_p=1.0, seed=0,
                 trigger_mode=None, parse=parse_action, on_end=None):
    """
    One episode per environment, all decoded together. rows[i] is handed to envs[i].reset; messages(row) renders
    the first user message from the row with "question" (the task description) and "observation" (the first one)
    filled in. An episode ends when the environment says done, after max_turns replies, or when its next turn might
    not fit max_context slots (its history, a full reply and MemGen's latents). on_end(episode) is called as each
    one ends. Returns one dict per episode: id, score (the last one the environment gave), success (score 100),
    end ("done" | "turn_limit" | "context"), turns (reply, action or None, observation, score, insertions, tokens,
    decisions), ids (the whole history as the reasoner read it, latents not included), agent (which of ids are the
    agent's), points (where latents went in, as indices into ids) and prompt_points (whether each was a turn's
    prompt insertion).
    """
    model, mg, adapter = policy_parts(policy, mode)
    trigger_mode = (mg.mode if trigger_mode is None else trigger_mode) if mg is not None else None
    if mg is not None and trigger_mode not in memgen.TRIGGER_MODES:
        raise AgentError(f"unknown trigger mode {trigger_mode!r}: use one of {', '.join(memgen.TRIGGER_MODES)}")
    if len(envs) != len(rows):
        raise AgentError(f"{len(envs)} environments for {len(rows)} episodes")
    max_context = min(max_context, model.cfg.max_positions)
    room = turn_tokens + (mg.k * (mg.n + 1) if mg is not None and trigger_mode != "off" else 0) + 1
    gen = torch.Generator(device=model.device).manual_seed(seed)
    dec = Decoder(model, tok, mg, len(rows), max_context, trigger_mode, gen)
    episodes, active, segs = [], [], []
    for r, (env, row) in enumerate(zip(envs, rows)):
        # the score before any action: ScienceWorld gives partial credit for some starting states, which an episode
        # that never acts (every turn wasted) keeps, as one whose actions change nothing does
        question, observation, score = env.reset(row)
        prompt = tok.chat(messages(dict(row, question=question, observation=observation)))
        ep = dict(id=str(row["id"]), question=question, score=score, success=False, end=None, turns=[],
                  ids=list(prompt), agent=[False] * len(prompt), points=[], prompt_points=[])
        episodes.append(ep)
        if len(prompt) + room > max_context:
            finish(ep, "context", on_end)
        else:
            active.append(r)
            segs.append(prompt)
    with lora.use(model, adapter):
        for turn in range(max_turns):
            if not active:
                break
            dec.feed(active, segs)
            replies = dec.decode_turn(active, turn_tokens, temperature, top_p)
            next_active, segs = [], []
            for r, reply in zip(active, replies):
                ep = episodes[r]
                start = len(ep["ids"])
                ep["points"] += [start + t for t in reply["insertions"]]
                ep["prompt_points"] += [t == 0 for t in reply["insertions"]]
                ep["ids"] += reply["ids"]
                ep["agent"] += [True] * len(reply["ids"])
                eos = set(tok.eos_ids)
                text = tok.decode([x for x in reply["ids"] if x not in eos])
                action = parse(text)
                if action is None:
                    observation, done = WASTED, False
                else:
                    observation, ep["score"], done = envs[r].step(action)
                ep["turns"].append(dict(reply=text, action=action, observation=observation, score=ep["score"],
                                        insertions=reply["insertions"], tokens=len(reply["ids"]),
                                        decisions=reply["decisions"]))
                if done:
                    finish(ep, "done", on_end)
                    continue
                if turn + 1 == max_turns:
                    finish(ep, "turn_limit", on_end)
                    continue
                seg = ([] if reply["closed"] else [tok.end_id]) + next_prompt(tok, observation, obs_tokens)
                if dec.used[r] + len(seg) + room > max_context:
                    finish(ep, "context", on_end)
                    continue
                ep["ids"] += seg
                ep["agent"] += [False] * len(seg)
                next_active.append(r)
                segs.append(seg)
            active = next_active
    return episodes


def finish(ep, end, on_end):
    ep["end"], ep["success"] = end, ep["score"] >= 100
    if on_end is not None:
        on_end(ep)


# ----------------------------------------------------------------------------------------------------------------
# 4. Evaluation: batches of episodes, one row per episode, resumable


def record(ep):
    """The results.jsonl row of an episode ("correct" makes it a complete row for evaluation.read_results)."""
    return dict(id=ep["id"], question=ep["question"], score=ep["score"], success=ep["success"],
                correct=[ep["success"]], end=ep["end"], turns=[{k: v for k, v in t.items() if k != "decisions" or v}
                                                               for t in ep["turns"]])


def summarize(records, memgen_rows=False):
    """Mean score (0-100), success rate (score 100, also reported as pass@1 for the cross-domain table), turns per
    episode, wasted, repeated and revisited turns, reply tokens per turn, MemGen's insertions per turn (memgen_rows),
    and how episodes ended."""
    n = len(records)
    turns = [t for r in records for t in r["turns"]]
    out = dict(n=n, samples=1, skipped=0)
    out["mean_score"] = sum(r["score"] for r in records) / n if n else 0.0
    out["success_rate"] = sum(r["success"] for r in records) / n if n else 0.0
    out["pass@1"] = out["success_rate"]
    out["score_stderr"] = (math.sqrt(sum((r["score"] - out["mean_score"]) ** 2 for r in records) / (n - 1) / n)
                           if n > 1 else 0.0)
    out["turns_per_episode"] = len(turns) / n if n else 0.0
    out["wasted_turn_rate"] = sum(t["action"] is None for t in turns) / len(turns) if turns else 0.0
    # a small greedy policy tends to copy its last reply when the observation repeats too: the share of turns after
    # an episode's first whose action is the one just before it (wasted turns never count)
    later = [(a["action"], b["action"]) for r in records for a, b in zip(r["turns"], r["turns"][1:])]
    out["repeated_action_rate"] = (sum(b is not None and a == b for a, b in later) / len(later)) if later else 0.0
    # it misses loops (open door, close door, open door): the share of those turns whose action the episode has
    # already taken on any earlier turn
    seen = [t["action"] in {u["action"] for u in r["turns"][:i]} for r in records
            for i, t in enumerate(r["turns"]) if i and t["action"] is not None]
    out["revisited_action_rate"] = sum(seen) / len(later) if later else 0.0
    out["tokens_per_turn"] = sum(t["tokens"] for t in turns) / len(turns) if turns else 0.0
    if memgen_rows:
        out["insertions_per_turn"] = sum(len(t["insertions"]) for t in turns) / len(turns)
        out["inference_insertions_per_turn"] = sum(sum(1 for i in t["insertions"] if i > 0) for t in turns) / len(turns)
    for end in ("done", "turn_limit", "context"):
        out[f"end_{end}"] = sum(r["end"] == end for r in records)
    return out


def evaluate(policy, tok, task, rows, mode, messages=None, batch_size=8, max_turns=MAX_TURNS, turn_tokens=TURN_TOKENS,
             max_context=MAX_CONTEXT, obs_tokens=OBS_TOKENS, temperature=0.0, top_p=1.0, seed=0, trigger_mode=None,
             out_path=None, progress=True, make_env=None, parse=parse_action):
    """
    Run one episode per row (task.make_env() environments, one per batch row, reused across batches), in batches
    fixed by the rows' positions (batch i = rows i*B .. i*B+B-1, sampled with seed + i). With out_path, each
    episode's row is appended to that results.jsonl as soon as the episode ends, and rows already there are not run
    again: a killed run resumes with its unfinished episodes (greedy decoding gives the same episodes; with sampling
    a resumed batch draws anew). messages: the first-message renderer (default task.messages; eval.py passes one
    with a retrieval memory in front). Returns summarize() over all rows plus timing.
    """
    from tqdm import tqdm

    messages = messages or task.messages
    make_env = make_env or task.make_env
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise AgentError(f"episode id {next(i for i in ids if ids.count(i) > 1)!r} appears twice in the rows")
    done = {str(r["id"]): r for r in (evaluation.read_results(out_path) if out_path else []) if "score" in r}
    pending = {}
    for pos, i in enumerate(ids):
        if i not in done:
            pending.setdefault(pos // batch_size, []).append(pos)
    todo, t0, envs = sum(len(v) for v in pending.values()), time.time(), []
    training = {m: m.training for m in policy.modules()}
    policy.eval()
    try:
        with tqdm(total=len(rows), initial=len(rows) - todo, desc=f"episodes {mode}", unit="episode",
                  disable=not progress or None) as bar:
            for b, positions in pending.items():
                while len(envs) < len(positions):
                    envs.append(make_env())

                def ended(ep):
                    rec = record(ep)
                    if out_path:
                        evaluation.append_results(out_path, [rec])
                    done[rec["id"]] = rec
                    bar.update(1)

                run_episodes(policy, tok, mode, envs[:len(positions)], [rows[p] for p in positions], messages,
                             max_turns, turn_tokens, max_context, obs_tokens, temperature, top_p, seed + b,
                             trigger_mode, parse, on_end=ended)
    finally:
        for env in envs:
            env.close()
        for m, was in training.items():
            m.train(was)
    summary = summarize([done[i] for i in ids], mode == "memgen")
    summary.update(wall_s=round(time.time() - t0, 3), generated_episodes=todo)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# 5. Training on trajectories


def encode_trajectories(rows, tok, task, max_len, obs_tokens=OBS_TOKENS):
    """Rows with a gold trajectory ("question", "observation" and "turns": [{"action", "observation"}]) -> (examples,
    skipped): each row plus prompt (the first prompt's ids), completion (the rest, cut to max_len), agent (per
    completion token: is it the agent's), turn_starts (each kept turn's first index into prompt + completion) and
    n_labels (the agent's tokens: what the loss counts). A row whose first prompt plus one turn does not fit max_len
    is skipped (counted)."""
    out, skipped = [], 0
    for r in rows:
        if not r.get("turns"):
            raise AgentError(f"{task.NAME} episode {r.get('id')} has no gold trajectory to train on")
        turns = [(ACTION_FORMAT.format(action=t["action"]), t["observation"] if i + 1 < len(r["turns"]) else None)
                 for i, t in enumerate(r["turns"])]
        ids, agent, starts = render_trajectory(tok, task.messages(r), turns, obs_tokens)
        starts = [s for s in starts if s < max_len - 1]
        if not starts:
            skipped += 1
            continue
        ids, agent = ids[:max_len], agent[:max_len]
        P = starts[0]
        out.append(dict(r, prompt=ids[:P], completion=ids[P:], agent=agent[P:], turn_starts=starts,
                        n_labels=sum(agent)))
    if rows and not out:
        raise AgentError(f"no trajectory's first prompt and turn fit --max_len={max_len}; raise --max_len")
    return out, skipped


def training_points(mg, ids, agent, turn_starts, n=None):
    """The insertion points of decoding (mode always) on known trajectories, per row: before each turn's first token
    (a prompt insertion), and inside each turn after each of its first n tokens that end a sentence and are followed
    by another token of the turn (rule "sentence": not inside a number). Returns (points (B, J) sorted, -1 where a
    row has fewer; is_prompt (B, J))."""
    n = mg.n if n is None else n
    delim, rows = mg.is_delim[ids].tolist(), []
    in_number = torch.zeros_like(ids, dtype=torch.bool)
    if mg.boundary == "sentence":  # token i-1 may end a number and token i starts with a digit
        in_number[:, 2:] = memgen.maybe_in_number(mg, ids[:, :-2], ids[:, 1:-1]) & mg.starts_digit[ids[:, 2:]]
    in_number = in_number.tolist()
    for b in range(ids.shape[0]):
        pts, count, a, starts = [], 0, agent[b], set(turn_starts[b])
        for i in range(1, len(a)):
            if i in starts:
                pts.append((i, True))
                count = 0
            elif a[i - 1] and a[i] and delim[b][i - 1] and not in_number[b][i] and count < n:
                pts.append((i, False))
                count += 1
        rows.append(pts)
    J = max([len(p) for p in rows] + [0])
    points = torch.full((len(rows), J), -1, dtype=torch.long)
    is_prompt = torch.zeros(len(rows), J, dtype=torch.bool)
    for b, pts in enumerate(rows):
        for j, (i, p) in enumerate(pts):
            points[b, j], is_prompt[b, j] = i, p
    return points.to(ids.device), is_prompt.to(ids.device)


def batch_tensors(examples, pad_id, device):
    """Right-padded ids, mask and agent mask (B, T) of encode_trajectories examples, and their turn starts."""
    seqs = [e["prompt"] + e["completion"] for e in examples]
    ids, mask = right_pad(seqs, pad_id, device)
    agent = torch.zeros_like(mask)
    for b, e in enumerate(examples):
        agent[b, len(e["prompt"]):len(seqs[b])] = torch.tensor(e["agent"], dtype=torch.bool)
    return ids, mask, agent, [e["turn_starts"] for e in examples]


def sft_nll(policy, examples, pad_id, vocab, adapter="sft"):
    """(summed NLL, count) of the agent's tokens of a micro-batch of trajectories: MemGen through
    memgen.teacher_forced with the loop's insertions; otherwise the reasoner with `adapter` (LoRA-SFT), packed as
    memgen does."""
    is_mg = isinstance(policy, memgen.MemGen)
    model = policy.model if is_mg else policy
    ids, mask, agent, starts = batch_tensors(examples, pad_id, model.device)
    if is_mg:
        points, is_prompt = training_points(policy, ids, agent.tolist(), starts)
        h = memgen.teacher_forced(policy, ids, mask, None, points, is_prompt=is_prompt)
    else:
        zero = torch.zeros_like(mask[:, 0], dtype=torch.long)
        h = memgen.packed_reasoner(model, model.embed(ids), mask.sum(1), zero, adapter)
    label = agent[:, 1:]
    logits = model.head(h[:, :-1][label])[:, :vocab].float()
    return F.cross_entropy(logits, ids[:, 1:][label], reduction="sum"), int(label.sum())

