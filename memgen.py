"""
memgen.py: MemGen (arXiv 2509.24704) on one base model: reasoner, memory weaver and memory trigger.

    reasoner = the frozen base model, no adapter           (paper §3: the frozen reasoning policy pi_theta)
    weaver   = the base model + the "weaver" LoRA           (paper §3.2, the memory weaver)
    trigger  = the base model + the "trigger" LoRA + Linear(hidden, 2) on the last hidden state  (paper §3.3)

Read this file top to bottom to follow one problem's journey:
  1. MemGen          the trainable parts around the frozen base model; where insertions may happen (is_delim)
  2. weave           one cached weaver call: new inputs + K queries -> K latents in the reasoner's space
  3. trigger_probs   the trigger's p(insert) from its last hidden state
  4. generate        decoding: the prompt is prefilled; at the end of the prompt and after every token ending in
                     "," "." or "\\n" (at most N times) the rows (a) DECIDE whether to insert, (b) WEAVE latents,
                     (c) FEED the latents to the reasoner at the next position ids (right after that token, in
                     the same call); then (d) SAMPLE the next token from the logits after the last slot, so a
                     latent is never sampled
  5. teacher_forced  the same computation over known completions (training): weaver rounds, sequence assembly,
                     packed reasoner pass
  6. logprobs        RL: log-probs of sampled completions (and of the trigger's decisions) under the policy
  7. save / load     the trained parts as safetensors + json

Speed: every model call is cached and batched. The weaver keeps a KV cache over the sequence, so an insertion feeds
only what is new since that row's last call plus K queries, then drops the query slots again (the official code
re-runs the weaver over the whole prefix each time). Calls are made for the rows that need them only. A decoding step
makes at most one weaver call and one reasoner call (the token and the latents go in together); with graphs (model.py
section 6, on by default with CUDA) both are fixed-shape calls replayed as CUDA graphs. Rows that repeat a prompt
(GRPO's and the trigger's groups, pass@k) prefill it once and copy the cache rows (model.shared_prompts).
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import lora
from model import (KVCache, ModelError, Steps, check_prompts, left_pad, prefill_shared, sample,
                   shared_prompts, use_graphs)

K = 8  # latents per insertion (the paper's default for both the prompt and the inference insertions)
N = 3  # at most N inference insertions per completion (plus the one at the end of the prompt)
DELIMITERS = (",", ".", "\n")  # an insertion point follows a token whose text ends with one of these
TRIGGER_MODES = ("always", "learned", "random", "off")
TRIGGER_MODE = "always"  # the official default: insert at every allowed point
TRIGGER_THRESHOLD = 0.5  # "learned" without sampling inserts when p(insert) >= this
# "official": every token ending in a delimiter is a boundary, also inside numbers ("3.5", "1,000"), as the official
# code does. "sentence": a "." or "," between two digits is not a boundary (decoding looks one token ahead).
BOUNDARIES = ("official", "sentence")
BOUNDARY = "official"
# "paper": the weaver->reasoner map starts as nn.Linear does (the first latents are several times larger than token
# embeddings). "embedding": the map is rescaled at the start so the first latents have the median norm of the
# reasoner's token embeddings.
LATENT_INITS = ("paper", "embedding")
LATENT_INIT = "paper"


# ----------------------------------------------------------------------------------------------------------------
# 1. The parts


class MemGen(nn.Module):
    """The trainable parts of MemGen around one base model. The base is frozen; LoRA adapters live inside it."""

    def __init__(self, model, tokenizer, k=K, n=N, mode=TRIGGER_MODE, rank=lora.RANK, alpha=lora.ALPHA,
                 dropout=lora.DROPOUT, targets=lora.TARGETS, boundary=BOUNDARY, latent_init=LATENT_INIT,
                 delimiters=DELIMITERS):
        super().__init__()
        for name, value, options in (("trigger mode", mode, TRIGGER_MODES), ("boundary", boundary, BOUNDARIES),
                                     ("latent init", latent_init, LATENT_INITS)):
            if value not in options:
                raise ModelError(f"unknown {name} {value!r}: use one of {', '.join(options)}")
        if not delimiters or not all(isinstance(d, str) and d for d in delimiters):
            raise ModelError(f"delimiters {delimiters!r}: give one or more non-empty strings, e.g. {DELIMITERS!r}")
        self.model, self.k, self.n, self.mode, self.boundary = model, k, n, mode, boundary
        # kept so that save() can write them beside the tensors (see rules): they decide how the weaver must be run
        self.latent_init, self.delimiters = latent_init, tuple(delimiters)
        if "weaver" not in getattr(model, "lora_meta", {}):
            lora.inject(model, ["weaver", "trigger"], targets, rank, alpha, dropout)
        # graphs recorded for another MemGen on this model (model.py section 6) read that one's queries and maps
        model.__dict__.pop("static_steps", None)
        D, dev = model.cfg.hidden_size, model.device
        # §3.2: K learned query vectors per insertion type, LayerNorm x a learned scale, and linear maps between
        # the reasoner's and the weaver's embedding spaces (the same model here, but kept as in the paper so a
        # different weaver could be plugged in). Kept in float32: they are trained.
        w = self.weaver = nn.Module()
        w.prompt_queries = nn.Parameter(torch.randn(k, D, device=dev))
        w.inference_queries = nn.Parameter(torch.randn(k, D, device=dev))
        w.prompt_ln, w.inference_ln = nn.LayerNorm(D, device=dev), nn.LayerNorm(D, device=dev)
        w.prompt_scale = nn.Parameter(torch.ones(1, device=dev))
        w.inference_scale = nn.Parameter(torch.ones(1, device=dev))
        w.reasoner_to_weaver = nn.Linear(D, D, device=dev)
        w.weaver_to_reasoner = nn.Linear(D, D, device=dev)
        # §3.3: the trigger's 2-way head (0 = skip, 1 = insert) on its last hidden state
        self.trigger = nn.Module()
        self.trigger.head = nn.Linear(D, 2, device=dev)
        self.vocab = min(tokenizer.vocab_size, model.cfg.vocab_size)  # padding rows of the head are never sampled
        for name, table in token_tables(tokenizer, model.cfg.vocab_size, self.delimiters).items():
            self.register_buffer(name, table.to(dev), persistent=False)
        if latent_init == "embedding":
            self.match_embedding_scale()

    def trainable(self, part):
        """{name: parameter} of one part: "weaver" (LoRA + queries, norms, scales, maps) or "trigger"."""
        extra = self.weaver if part == "weaver" else self.trigger
        return dict(lora.parameters(self.model, part), **{f"{part}.{k}": p for k, p in extra.named_parameters()})

    def count(self):
        return {part: sum(p.numel() for p in self.trainable(part).values()) for part in ("weaver", "trigger")}

    def queries(self, is_prompt):
        """(B,) bool -> (B, K, D): the normalised, scaled queries of each row's insertion type."""
        w = self.weaver
        p = w.prompt_ln(w.prompt_queries) * w.prompt_scale
        i = w.inference_ln(w.inference_queries) * w.inference_scale
        return torch.where(is_prompt[:, None, None], p, i)

    @torch.no_grad()
    def match_embedding_scale(self):
        """latent_init "embedding": scale weaver_to_reasoner so the latents the weaver makes from its queries alone
        have the median norm of the reasoner's token embeddings (a probe of both insertion types)."""
        model = self.model
        cache = KVCache(model.cfg, 2, device=model.device, dtype=model.dtype)
        probe = torch.zeros(2, 0, model.cfg.hidden_size, dtype=model.dtype, device=model.device)
        lat = weave(self, cache, probe, torch.zeros(2, 0, dtype=torch.bool, device=model.device),
                    torch.tensor([True, False], device=model.device))
        target = model.model.embed_tokens.weight[:self.vocab].float().norm(dim=-1).median()
        c = target / lat.float().norm(dim=-1).mean()
        self.weaver.weaver_to_reasoner.weight.mul_(c)
        self.weaver.weaver_to_reasoner.bias.mul_(c)


def token_tables(tokenizer, vocab_size, delimiters=DELIMITERS):
    """
    (V,) bool tables over the vocabulary, computed once so decoding does no string work:
      is_delim        the token's text ends with one of `delimiters` (an insertion point follows it)
      punct_in_number the text ends with "." or "," right after a digit ("3." "1,")
      just_punct      the text is "." or "," alone (then the digit would end the token before it)
      ends_digit, starts_digit
    The "sentence" boundary rule uses the last four (see inside_number).
    """
    ends = tuple(d.encode() for d in delimiters)
    names = ("is_delim", "punct_in_number", "just_punct", "ends_digit", "starts_digit")
    tables = {name: torch.zeros(vocab_size, dtype=torch.bool) for name in names}
    special = set(tokenizer.special_ids)
    for v in range(min(vocab_size, tokenizer.vocab_size)):
        if v in special:
            continue
        try:
            b = tokenizer.token_bytes(v)
        except ValueError:  # an id the vocabulary does not use
            continue
        tables["is_delim"][v] = b.endswith(ends)
        tables["punct_in_number"][v] = len(b) > 1 and b[-1:] in (b".", b",") and b[-2:-1].isdigit()
        tables["just_punct"][v] = b in (b".", b",")
        tables["ends_digit"][v] = b[-1:].isdigit()
        tables["starts_digit"][v] = b[:1].isdigit()
    return tables


def maybe_in_number(mg, prev, tok):
    """(B,) bool: token `tok` (after `prev`) ends with "." or "," right after a digit: under the "sentence" rule it
    is a boundary only if the next token does not start with a digit."""
    return mg.punct_in_number[tok] | (mg.just_punct[tok] & mg.ends_digit[prev])


def weaver_context(mg, context):
    """A weaver-only context (e.g. retrieved experience, the paper's weaver reading "retrieved knowledge"): per row a
    list of token ids the weaver reads in front of the prompt, the reasoner never. -> (reasoner-space embeddings
    (B, C, D), mask (B, C)), or None for no context. Rows may differ in length (padding is masked) or be empty."""
    if context is None:
        return None
    ids, mask = left_pad([list(c) for c in context], 0, mg.model.device)
    return mg.model.embed(ids), mask


# ----------------------------------------------------------------------------------------------------------------
# 2. The weaver: one cached call per insertion


def weave(mg, cache, new_embeds, new_mask, is_prompt, rows=None, active=None, steps=None):
    """
    Feed the weaver what it has not seen yet (reasoner-space embeddings: earlier latents and tokens, (B', S, D),
    padding marked False in new_mask) followed by the K queries; return the K latents (B', K, D) in reasoner space.
    The query slots are dropped from the cache afterwards: later insertions must not see earlier queries.
    Each row is packed as [its real inputs, its K queries, padding]: padding left between a row's inputs and its
    queries would stay behind in the cache as dead slots, insertion after insertion.
    A static cache (graphs, model.py section 6): the call keeps its full width S + K, so it has one shape per S and
    row count; active (B',) marks the rows that weave (the others pad the call to its fixed count); steps replays it
    as a graph.
    """
    if steps is not None:
        return steps("weave", lambda **a: weave(mg, cache, **a), new_embeds=new_embeds, new_mask=new_mask,
                     is_prompt=is_prompt, rows=rows, active=active)
    model, dtype, k = mg.model, mg.model.dtype, mg.k
    w = mg.weaver
    B, S = new_mask.shape
    D, dev = new_embeds.shape[-1], new_embeds.device
    x = w.reasoner_to_weaver(new_embeds.float()) if S else new_embeds.float()
    n = new_mask.sum(1)  # real inputs per row
    order = torch.sort((~new_mask).to(torch.int8), dim=1, stable=True).indices  # each row's real inputs first
    full = torch.cat([x.gather(1, order[..., None].expand(-1, -1, D)), mg.queries(is_prompt)], 1)  # (B', S+K, D)
    slot = torch.arange(S + k if cache.static else int(n.max()) + k, device=dev)[None]
    src = torch.where(slot < n[:, None], slot, S + slot - n[:, None]).clamp(max=S + k - 1)
    inp = full.gather(1, src[..., None].expand(-1, -1, D)).to(dtype)
    mask = slot < (n + k)[:, None]
    if active is not None:
        mask = mask & active[:, None]
    with lora.use(model, "weaver"):
        _, h = model(inputs_embeds=inp, mask=mask, cache=cache, rows=rows, logits="none")
    cache.rollback(k, rows, where=active)
    h = h.gather(1, (n[:, None] + torch.arange(k, device=dev))[..., None].expand(-1, -1, h.shape[-1]))
    return w.weaver_to_reasoner(h.float()).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# 3. The trigger


def trigger_probs(mg, hidden):
    """Trigger hidden states -> p(insert)."""
    return torch.softmax(mg.trigger.head(hidden.float()), -1)[..., 1]


def trigger_forward(mg, ids, mask):
    """The trigger reads the token sequence only (no latents): (B, T) -> p(insert) after each token, (B, T)."""
    with lora.use(mg.model, "trigger"):
        _, h = mg.model(ids, mask=mask, logits="none")
    return trigger_probs(mg, h)


# ----------------------------------------------------------------------------------------------------------------
# 4. Decoding


@dataclass
class Rows:
    """Per-row decoding state (B rows). Completion index t counts sampled tokens; an insertion "at t" goes in before
    completion token t (t = 0: the end of the prompt)."""
    out: torch.Tensor  # (B, max_new) sampled ids, pad after EOS
    logps: torch.Tensor  # (B, max_new) log-prob of each sampled token under the raw logits
    next_logits: torch.Tensor  # (B, V) the reasoner's logits after each row's last slot
    done: torch.Tensor  # (B,) the row sampled EOS
    n_ins: torch.Tensor  # (B,) inference insertions so far (the prompt's does not count toward N)
    inserted: torch.Tensor  # (B, max_new + 1) latents went in before completion token t
    w_seen: torch.Tensor  # (B,) completion tokens the weaver has read
    g_seen: torch.Tensor  # (B,) ... and the trigger
    pending: torch.Tensor  # (B, K, D) each row's last latents, which its weaver has not read yet
    has_pending: torch.Tensor  # (B,)
    g_hidden: torch.Tensor  # (B, D) or None: the trigger's state at the end of the prompt
    prev_tok: torch.Tensor  # (B,) the token before the last sampled one (boundary rule "sentence")
    deferred: torch.Tensor  # (B,) the last token may end a number: decide at the next token (rule "sentence")
    decisions: list  # per row: (completion index, p(insert), 0/1) wherever the trigger was asked


def new_tokens(st, rows, seen, t, width=None):
    """Completion tokens [seen[r], t) of each row in `rows`, right-padded (to `width` when given), and their mask."""
    start = seen[rows]
    S = max(int((t - start).max()), 0) if width is None else width
    idx = start[:, None] + torch.arange(S, device=start.device)
    return st.out[rows[:, None], idx.clamp(max=max(t - 1, 0))], idx < t


def decide(mg, st, caches, cand, t, mode, gen, trigger_sample):
    """(a) DECIDE: which of the candidate rows (cand, (B,) bool) insert at completion index t; returns (B,) bool.
    "learned" catches the trigger's cache up over the tokens since its last call and reads p(insert) from its last
    hidden state."""
    if mode == "always":
        return cand
    rows = cand.nonzero().squeeze(1)
    dev = rows.device
    if mode == "random":  # the paper's ablation: insert with p = 0.5
        return torch.zeros_like(cand).index_put((rows,), torch.rand(len(rows), generator=gen, device=dev) < 0.5)
    if t > 0:
        seg, seg_mask = new_tokens(st, rows, st.g_seen, t)
        with lora.use(mg.model, "trigger"):
            _, h = mg.model(seg, mask=seg_mask, cache=caches["trigger"], rows=rows, logits="none")
        last = seg_mask.long().cumsum(1).argmax(1)  # the last real slot of each row
        hid = h[torch.arange(len(rows), device=dev), last]
        st.g_seen[rows] = t
    else:
        hid = st.g_hidden[rows]
    p = trigger_probs(mg, hid)
    fire = (torch.rand(len(rows), generator=gen, device=dev) < p) if trigger_sample else p >= TRIGGER_THRESHOLD
    for r, pr, f in zip(rows.tolist(), p.tolist(), fire.tolist()):
        st.decisions[r].append((t, pr, int(f)))
    return torch.zeros_like(cand).index_put((rows,), fire)


def weave_rows(mg, st, steps, ins, t):
    """(b) WEAVE: the weaver reads each inserting row's latents of its previous insertion and its tokens since, then
    the K queries; their K latents become the rows' pending latents (which FEED reads)."""
    model, k = mg.model, mg.k
    rows = ins.nonzero().squeeze(1)  # only the rows that insert
    R, width, cache_rows, active = len(rows), None, rows, None
    if steps.static:  # a fixed shape: the row count and the width padded to powers of two (one graph each); the
        # padding rows are the cache's spare last row, which every mask keeps empty
        width = bucket(int((t - st.w_seen[rows]).max()))
        pad = bucket(R, least=1) - R
        active = torch.arange(R + pad, device=ins.device) < R
        cache_rows = torch.cat([rows, torch.full((pad,), len(ins), device=ins.device)])
        rows = torch.cat([rows, rows[:1].expand(pad)])  # what the padding rows read: never used
    seg, seg_mask = new_tokens(st, rows, st.w_seen, t, width)
    new = torch.cat([st.pending[rows], model.embed(seg)], 1)
    new_mask = torch.cat([st.has_pending[rows, None].expand(-1, k), seg_mask], 1)
    is_prompt = torch.full((len(rows),), t == 0, device=ins.device)
    lat = weave(mg, steps.cache, new, new_mask, is_prompt, cache_rows, active, steps if steps.static else None)
    st.pending[rows[:R]] = lat[:R]
    st.w_seen[rows[:R]] = t
    st.has_pending |= ins


def bucket(n, least=16):
    """The width (or row count) of a static weaver call for n new tokens (rows): the next power of two, at least
    `least`."""
    return max(least, 1 << (n - 1).bit_length())


def feed(mg, st, steps, tok, ins, t):
    """(c) FEED: one reasoner step. Every unfinished row reads its token `tok` (None: no token), and the rows in `ins`
    (None: no row) read their K pending latents right after it, at the next position ids. next_logits: after each
    row's last slot, so a latent is never sampled. With graphs one call covers every row; without, the rows that
    insert and the others run as two calls, each on just its rows, finished rows left out (a CPU pays for every slot
    it computes)."""
    model, k, cache, B = mg.model, mg.k, steps.cache, len(st.done)
    x, real = st.pending[:, :0], torch.zeros(B, 0, dtype=torch.bool, device=st.done.device)
    if tok is not None:
        x, real = model.embed(tok[:, None]), ~st.done[:, None]
    if ins is not None:
        x, real = torch.cat([x, st.pending], 1), torch.cat([real, ins[:, None].expand(-1, k)], 1)

    def call(x, real, rows=None):
        return model(inputs_embeds=x, mask=real, cache=cache, rows=rows, logits="last")[0][:, -1, :mg.vocab].float()

    if steps.static:  # rows that read nothing (finished, or sitting out a latent-only call) keep theirs
        st.next_logits = torch.where(real.any(1)[:, None], steps(f"feed{x.shape[1]}", call, x=x, real=real),
                                     st.next_logits)
    else:  # finished rows are left out (their logits are never read again)
        rest = ~st.done if tok is not None else torch.zeros_like(st.done)  # rows that read just their token
        if ins is not None:
            rows = ins.nonzero().squeeze(1)
            st.next_logits[rows] = call(x[rows], real[rows], rows)
            rest &= ~ins
        if bool(rest.all()):  # every row: no gather of cache rows
            st.next_logits = call(x[:, :1], real[:, :1])
        elif bool(rest.any()):
            rows = rest.nonzero().squeeze(1)
            st.next_logits[rows] = call(x[rows, :1], real[rows, :1], rows)
    if ins is not None:
        st.inserted[:, t] |= ins
        if t > 0:
            st.n_ins += ins.long()


def prefill(mg, ids, pmask, max_new_tokens, mode, graphs, context=None, share=None):
    """The prompt into the reasoner's cache, and into the weaver's and trigger's own caches when they will be used.
    context: weaver_context() or None; the weaver reads it before the prompt. share: model.shared_prompts() of the
    rows, or None: rows that repeat a prompt (GRPO's groups) read it once and copy the caches (prefill_shared).
    Returns the caches (as Steps: model.py section 6) and the reasoner's logits after the prompt."""
    model, k, dev, dtype = mg.model, mg.k, mg.model.device, mg.model.dtype
    B, P = ids.shape
    slots = P + max_new_tokens + k * (mg.n + 1)
    caches = {"reasoner": Steps.open(model, "reasoner", B, slots, graphs)}  # tokens and latents
    r = caches["reasoner"].cache
    logits, _ = prefill_shared(r, share, lambda ids, m, rows: model(ids, mask=m, cache=r, rows=rows, logits="last"),
                               ids, pmask)
    g_hidden = None
    if mode != "off":  # the weaver reads the prompt once; every later call only feeds what is new
        x, xmask = model.embed(ids), pmask
        if context is not None:  # the weaver-only context goes in front of the prompt (weaver_rounds does the same)
            x, xmask = torch.cat([context[0], x], 1), torch.cat([context[1], pmask], 1)
        # tokens (context included), latents and K query slots; with graphs a spare row pads weaver calls
        spare = int(use_graphs(graphs, dev))
        caches["weaver"] = w = Steps.open(model, "weaver", B + spare, slots + k + x.shape[1] - P, graphs)
        with lora.use(model, "weaver"):
            x = mg.weaver.reasoner_to_weaver(x.float()).to(dtype)
            everyone = torch.arange(B, device=dev) if spare else None  # the prompts' rows, not the spare one

            def weaver_prefill(x, m, rows):
                model(inputs_embeds=x, mask=m, cache=w.cache, rows=everyone if rows is None else rows, logits="none")
                return ()

            prefill_shared(w.cache, share, weaver_prefill, x, xmask)
    if mode == "learned":  # the trigger runs on boundary rows only: always a plain cache
        caches["trigger"] = g = KVCache(model.cfg, B, P + max_new_tokens, dev, dtype)  # tokens only
        with lora.use(model, "trigger"):
            _, g_hidden = prefill_shared(g, share, lambda ids, m, rows: model(ids, mask=m, cache=g, rows=rows,
                                                                              logits="none"), ids, pmask)
        g_hidden = g_hidden[:, -1]
    return caches, logits[:, -1, :mg.vocab].float(), g_hidden


def insert(mg, st, caches, cand, t, mode, gen, trigger_sample, tok=None):
    """(a)-(c) at completion index t for the candidate rows (cand, (B,) bool): decide, weave, and feed the latents -
    after the token `tok` every row reads at this step, in the same reasoner call, when tok is given. Returns the
    rows that inserted ((B,) bool) or None."""
    ins = decide(mg, st, caches, cand, t, mode, gen, trigger_sample)
    ins = ins if bool(ins.any()) else None
    if ins is not None:
        weave_rows(mg, st, caches["weaver"], ins, t)
    if tok is not None or ins is not None:
        feed(mg, st, caches["reasoner"], tok, ins, t)
    return ins


@torch.no_grad()
def generate(mg, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, mode=None,
             trigger_sample=False, graphs=None, context=None):
    """
    Batched MemGen decoding with KV caches for the reasoner, the weaver and the trigger.
    prompts: id lists (Tokenizer.chat) or strings. mode: trigger mode (default mg.mode). trigger_sample: in mode
    "learned", sample the trigger's decision (RL) instead of thresholding it. graphs: the reasoner's and the
    weaver's calls in fixed shapes, replayed as CUDA graphs (model.py section 6; None = model.GRAPHS); the same
    tokens and insertions either way. context: per row, token ids only the weaver reads, in front of the prompt
    (weaver_context), or None.
    Returns one dict per row: ids (completion ids, EOS included when sampled), text (EOS excluded), logprobs (of
    each sampled token, from the raw logits), insertions (completion indices where latents went in, 0 = end of
    prompt), decisions (completion index, p(insert), 0/1) at every point the trigger was asked.
    """
    mode = mg.mode if mode is None else mode
    if mode not in TRIGGER_MODES:
        raise ModelError(f"unknown trigger mode {mode!r}: use one of {', '.join(TRIGGER_MODES)}")
    model, k, dev = mg.model, mg.k, mg.model.device
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    max_new_tokens = check_prompts(model, prompts, max_new_tokens)
    ids, pmask = left_pad(prompts, tokenizer.pad_id, dev)
    B = ids.shape[0]
    gen = torch.Generator(device=dev).manual_seed(seed)
    eos = torch.tensor(tokenizer.eos_ids, device=dev)
    # rows that repeat a prompt (and its weaver context) read it once (model.shared_prompts); not in train mode,
    # where each row's adapter dropout is its own draw
    keys = [(tuple(p), None if context is None else tuple(context[b])) for b, p in enumerate(prompts)]
    share = None if mg.training else shared_prompts(keys, dev)
    caches, next_logits, g_hidden = prefill(mg, ids, pmask, max_new_tokens, mode, graphs, weaver_context(mg, context),
                                            share)
    zeros = lambda dtype=torch.long: torch.zeros(B, dtype=dtype, device=dev)  # noqa: E731
    st = Rows(out=torch.full((B, max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=dev),
              logps=torch.zeros(B, max_new_tokens, device=dev), next_logits=next_logits,
              done=zeros(torch.bool), n_ins=zeros(),
              inserted=torch.zeros(B, max_new_tokens + 1, dtype=torch.bool, device=dev), w_seen=zeros(),
              g_seen=zeros(), pending=torch.zeros(B, k, model.cfg.hidden_size, dtype=model.dtype, device=dev),
              has_pending=zeros(torch.bool), g_hidden=g_hidden, prev_tok=ids[:, -1], deferred=zeros(torch.bool),
              decisions=[[] for _ in range(B)])

    if mode != "off":  # the end of the prompt is always a candidate
        insert(mg, st, caches, torch.ones(B, dtype=torch.bool, device=dev), 0, mode, gen, trigger_sample)
    for t in range(max_new_tokens):
        # (d) SAMPLE: from the logits after each row's last slot, so never from a latent
        tok = sample(st.next_logits, temperature, top_p, gen)
        # rule "sentence": the boundary before tok holds unless tok continues a number (the rule test first: the
        # look at deferred waits for the GPU)
        if mg.boundary == "sentence" and bool(st.deferred.any()):
            ins = insert(mg, st, caches, st.deferred & ~mg.starts_digit[tok], t, mode, gen, trigger_sample)
            if ins is not None:  # tok was sampled before the latents: take it back, sample again after them, among
                # tokens that do not continue the number (the sentence ended here, as training will read it)
                rows = ins.nonzero().squeeze(1)
                no_digit = st.next_logits[rows].masked_fill(mg.starts_digit[:mg.vocab], float("-inf"))
                tok[rows] = sample(no_digit, temperature, top_p, gen)
            st.deferred[:] = False
        tok = torch.where(st.done, tokenizer.pad_id, tok)
        st.logps[:, t] = torch.log_softmax(st.next_logits, -1).gather(1, tok[:, None]).squeeze(1)
        st.out[:, t] = tok
        st.done = st.done | torch.isin(tok, eos)
        if t == max_new_tokens - 1 or caches["reasoner"].stop_check(t) and bool(st.done.all()):
            break
        cand = None
        if mode != "off":  # a sentence boundary in a row with insertions left: (a)-(c) before token t+1 (n_ins counts
            # insertions, not trigger calls: as in the official code, a declined boundary does not use up N)
            cand = mg.is_delim[tok] & ~st.done & (st.n_ins < mg.n)
            if mg.boundary == "sentence":
                st.deferred = cand & maybe_in_number(mg, st.prev_tok, tok)
                cand &= ~st.deferred
            st.prev_tok = tok
        if cand is None or mode != "always" and not bool(cand.any()):  # (c) alone: the token, no insertion
            feed(mg, st, caches["reasoner"], tok, None, t + 1)
        else:
            insert(mg, st, caches, cand, t + 1, mode, gen, trigger_sample, tok)
    return finish_rows(st, tokenizer)


def finish_rows(st, tokenizer):
    """Per-row results: cut after EOS, decode the text without it."""
    results = []
    eos_set = set(tokenizer.eos_ids)
    inserted = st.inserted.tolist()
    for b, row in enumerate(st.out.tolist()):
        cut = next((i + 1 for i, x in enumerate(row) if x in eos_set), len(row))
        ids_b = row[:cut]
        text_ids = ids_b[:-1] if ids_b and ids_b[-1] in eos_set else ids_b
        results.append(dict(ids=ids_b, text=tokenizer.decode(text_ids), logprobs=st.logps[b, :cut].tolist(),
                            insertions=[t for t, x in enumerate(inserted[b]) if x], decisions=st.decisions[b]))
    return results


# ----------------------------------------------------------------------------------------------------------------
# 5. Training: teacher-forced sequences with latents inserted at given points


def insertion_points(mg, ids, mask, prompt_len, n=None):
    """
    The training insertion points (mode "always"): before the first completion token, and after each of the first
    n completion tokens that end with a delimiter and are followed by another token (under the "sentence" rule, not
    one that continues a number). Returns (B, n+1) token
    indices, sorted, -1 where a row has fewer points. Latents are inserted *before* the token at each index.
    """
    n = mg.n if n is None else n
    B, T = ids.shape
    t = torch.arange(T, device=ids.device)
    after = torch.zeros_like(mask)
    # point i is allowed when token i-1 is a delimiter inside the completion and token i exists
    after[:, 1:] = mg.is_delim[ids[:, :-1]] & (t[None, :-1] >= prompt_len[:, None]) & mask[:, 1:]
    if mg.boundary == "sentence":  # not inside a number: "3.5", "1,000"
        in_number = maybe_in_number(mg, ids[:, :-2], ids[:, 1:-1]) & mg.starts_digit[ids[:, 2:]]
        after[:, 2:] &= ~in_number
    rank = after.long().cumsum(1)
    after &= rank <= n
    points = torch.full((B, n + 1), -1, dtype=torch.long, device=ids.device)
    points[:, 0] = prompt_len
    idx = torch.where(after, t, T)  # the first n allowed points, in order
    first = idx.sort(1).values[:, :n]
    points[:, 1:1 + first.shape[1]] = torch.where(first < T, first, -1)
    return points


def teacher_forced(mg, ids, mask, prompt_len, points, context=None, is_prompt=None):
    """
    The batched, cached training forward (paper §3.2, teacher forcing).
    ids, mask (B, T): prompt + completion tokens, right-padded. prompt_len (B,). points (B, J): token indices to
    insert latents before (sorted, -1 = none); a point equal to prompt_len is the prompt insertion. context: per row,
    token ids only the weaver reads, in front of the prompt (weaver_context), or None. is_prompt (B, J): each point's
    insertion type instead (agent.py: a prompt insertion at every turn; prompt_len may then be None).
    Returns hidden (B, T, D): hidden[:, t] is the reasoner's state that predicts token t+1 - the slot right before
    token t+1, which is the last latent when latents were inserted there. Logits: mg.model.head(hidden).
    Three stages: weaver_rounds (all latents), assemble (tokens and latents in one sequence per row), and
    packed_reasoner (the reasoner over all rows at once).
    """
    embeds = mg.model.embed(ids)
    latents = weaver_rounds(mg, embeds, points, prompt_len, weaver_context(mg, context), is_prompt)
    seq, seq_len, tok_slot = assemble(mg, embeds, mask, points, latents)
    first = points[:, 0] if points.shape[1] else torch.full_like(seq_len, -1)
    prefix_len = torch.where(first >= 0, first, seq_len)  # slots before a row's first latent
    h = packed_reasoner(mg.model, seq, seq_len, prefix_len)
    pred_slot = torch.cat([tok_slot[:, 1:] - 1, tok_slot[:, -1:]], 1).clamp(max=seq.shape[1] - 1)
    return h.gather(1, pred_slot[..., None].expand(-1, -1, h.shape[-1]))


def weaver_rounds(mg, embeds, points, prompt_len, context=None, is_prompt=None):
    """
    Stage 1: the latents of every insertion. The weaver runs once per insertion *round* j for all rows together,
    each row feeding its own new segment (its latents of round j-1, then its tokens since its previous point,
    padded) into a growing KV cache, so insertion j sees everything before it, latents included. context:
    weaver_context() or None; round 0 reads it in front of the prompt (as prefill does in decoding). is_prompt (B, J)
    bool: each point's insertion type, where a row has several prompt insertions (agent.py: one per turn); by default
    the point at prompt_len is the prompt's.
    Returns a list of J tensors (B, K, D) (a row without a j-th point gets latents that are never used).
    """
    model = mg.model
    B, T, D = embeds.shape
    dev, has, J = embeds.device, points >= 0, points.shape[1]
    latents = []
    if not (J and has.any()):
        return latents
    is_prompt = points == prompt_len[:, None] if is_prompt is None else is_prompt
    cache = KVCache(model.cfg, B, device=dev, dtype=model.dtype)  # growing: autograd-friendly
    prev = torch.zeros(B, dtype=torch.long, device=dev)
    prev_lat = torch.zeros(B, 0, D, dtype=model.dtype, device=dev)
    prev_has = torch.zeros(B, dtype=torch.bool, device=dev)
    for j in range(J):
        p = torch.where(has[:, j], points[:, j], prev)
        S = int((p - prev).max())
        idx = prev[:, None] + torch.arange(S, device=dev)
        seg_mask = idx < p[:, None]
        seg = embeds.gather(1, idx.clamp(max=T - 1)[..., None].expand(-1, -1, D))
        lat_mask = prev_has[:, None].expand(-1, prev_lat.shape[1])
        new, new_mask = torch.cat([prev_lat, seg], 1), torch.cat([lat_mask, seg_mask], 1)
        if j == 0 and context is not None:  # the weaver-only context, before the prompt; the reasoner never sees it
            new, new_mask = torch.cat([context[0], new], 1), torch.cat([context[1], new_mask], 1)
        lat = weave(mg, cache, new, new_mask, is_prompt[:, j])
        latents.append(lat)
        prev, prev_lat, prev_has = p, lat, has[:, j]
    return latents


def assemble(mg, embeds, mask, points, latents):
    """
    Stage 2: each row's reasoner input, tokens with the K latents of each point in front of the token at that
    point, by one gather. Returns the sequences (B, S, D), their lengths (B,), and tok_slot (B, T): where each
    token landed (token t of row b moves right by K per point <= t).
    """
    k = mg.k
    B, T, D = embeds.shape
    dev, has, J = embeds.device, points >= 0, points.shape[1]
    n_before = (has[:, None, :] & (points[:, None, :] <= torch.arange(T, device=dev)[None, :, None])).sum(-1)
    tok_slot = torch.arange(T, device=dev)[None] + k * n_before
    total = mask.sum(1) + k * has.sum(1)
    S = int(total.max())
    # one spare slot per point keeps the padding tokens' slots in range; they are cut off below
    src_index = torch.zeros(B, T + k * J, dtype=torch.long, device=dev)
    src_index.scatter_(1, tok_slot, torch.arange(T, device=dev).expand(B, T))
    if latents:
        lat_slot = points + k * torch.arange(J, device=dev)  # the block of point j starts here
        lat_slot = lat_slot[:, :, None] + torch.arange(k, device=dev)  # (B, J, K)
        lat_src = T + torch.arange(J * k, device=dev).view(J, k).expand(B, J, k)
        keep = has[:, :, None].expand(-1, -1, k)
        src_index[torch.arange(B, device=dev)[:, None, None].expand(B, J, k)[keep], lat_slot[keep]] = lat_src[keep]
        src = torch.cat([embeds] + latents, 1)
    else:
        src = embeds
    seq = src.gather(1, src_index[:, :S, None].expand(-1, -1, D))
    return seq, total, tok_slot


def packed_reasoner(model, seq, seq_len, prefix_len, adapter=None):
    """
    Stage 3: the frozen reasoner over all rows' sequences (B, S, D) at once, returning its hidden states (B, S, D).
    Rows are packed into as few rows as they fit in (first-fit, longest first, by the length of the autograd pass),
    each sequence attending only to itself (segment ids) with its own position ids: short rows share a row instead
    of being padded to the longest. The first prefix_len[b] slots of each row (its tokens before the first latent)
    depend on nothing that is trained, so they run first without autograd; the rest reads their keys and values
    from the same cache, and the backward pass covers only it.
    LoRA-SFT uses it too (adapter="sft", prefix_len 0: its adapter changes every position, so nothing runs without
    autograd), so both kinds of SFT skip padding alike.
    """
    B, S, D = seq.shape
    dev = seq.device
    lens, pre = seq_len.tolist(), prefix_len.tolist()
    # pack by the autograd pass's lengths (its slots cost ~3x a no-grad slot); each pass is as wide as its fullest row
    size = [n - p for n, p in zip(lens, pre)] if any(n > p for n, p in zip(lens, pre)) else lens
    fill, where = [], {}
    for b in sorted(range(B), key=lambda b: -size[b]):
        i = next((i for i, f in enumerate(fill) if f + size[b] <= max(size)), len(fill))
        if i == len(fill):
            fill.append(0)
        where[b] = i
        fill[i] += size[b]
    R = len(fill)
    used = {"prefix": [0] * R, "rest": [0] * R}  # how far each packed row is filled in each pass
    start = {"prefix": [], "rest": []}
    for b in range(B):
        i = where[b]
        for part, n in (("prefix", pre[b]), ("rest", lens[b] - pre[b])):
            start[part].append(used[part][i])
            used[part][i] += n
    t = torch.arange(S, device=dev)[None].expand(B, S)
    h = seq.new_zeros(B, S, D)
    cache = KVCache(model.cfg, R, device=dev, dtype=model.dtype)  # growing: the rest reads the prefix from it
    for part, lo, hi in (("prefix", torch.zeros_like(prefix_len), prefix_len), ("rest", prefix_len, seq_len)):
        L = max(used[part])
        if L == 0:
            continue
        take = (t >= lo[:, None]) & (t < hi[:, None])  # (B, S): this pass's slots
        offset = torch.tensor(start[part], device=dev)[:, None] + t - lo[:, None]
        row = torch.tensor([where[b] for b in range(B)], device=dev)[:, None].expand(B, S)
        dest = (row * L + offset)[take]  # packed slot of every slot of this pass, in row-major order
        packed = seq.new_zeros(R * L, D).index_put((dest,), seq[take]).view(R, L, D)
        pos = torch.zeros(R * L, dtype=torch.long, device=dev).index_put((dest,), t[take]).view(R, L)
        segment = torch.full((R * L,), -1, dtype=torch.long, device=dev)
        segment = segment.index_put((dest,), torch.arange(B, device=dev)[:, None].expand(B, S)[take]).view(R, L)
        with lora.use(model, adapter), torch.set_grad_enabled(part == "rest" and torch.is_grad_enabled()):
            _, hp = model(inputs_embeds=packed, positions=pos, segments=segment, mask=segment >= 0, cache=cache,
                          logits="none")
        h = h.index_put((take,), hp.reshape(R * L, D)[dest])
    return h


# ----------------------------------------------------------------------------------------------------------------
# 6. RL log-probs


def right_pad(prompts, completions, pad_id, device):
    """Right-padded prompt+completion ids, their mask and the prompt lengths."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = True
    prompt_len = torch.tensor([len(p) for p in prompts])
    return ids.to(device), mask.to(device), prompt_len.to(device)


def logprobs(mg, prompts, completions, insertions, decisions=None, pad_id=0, context=None):
    """
    The RL log-prob API. prompts/completions: id lists (completions as sampled, EOS included when it was sampled).
    insertions: per row, the completion indices where latents were inserted (0 = end of prompt), as recorded by
    generate(). decisions: per row, (completion index, 0/1) trigger decisions, for the trigger's log-probs.
    context: the weaver-only context generate() was given (per row, token ids), or None.
    Returns (token log-probs (B, Tc) under MemGen with gradients reaching the weaver through the latents,
    completion mask (B, Tc), decision log-probs (B, M) and their mask, or None without decisions).
    """
    dev = mg.model.device
    ids, mask, prompt_len = right_pad(prompts, completions, pad_id, dev)
    J = max([len(i) for i in insertions] + [0])
    points = torch.full((len(prompts), J), -1, dtype=torch.long)
    for b, ins in enumerate(insertions):
        points[b, :len(ins)] = torch.tensor(sorted(ins)) + len(prompts[b])
    h = teacher_forced(mg, ids, mask, prompt_len, points.to(dev), context)
    logp, comp_mask = completion_logprobs(mg.model, h, ids, prompt_len, completions, mg.vocab)
    if decisions is None:
        return logp, comp_mask, None, None
    dlogp, dmask = trigger_logprobs(mg, prompts, completions, decisions, pad_id, (ids, mask))
    return logp, comp_mask, dlogp, dmask


def completion_logprobs(model, h, ids, prompt_len, completions, vocab):
    """Log-probs (B, Tc) of each row's completion tokens from the reasoner's hidden states h (h[:, t] predicts
    ids[:, t+1]), and the completion mask. Only the vocabulary's first `vocab` logits count."""
    dev = ids.device
    Tc = max(len(c) for c in completions)
    # token t of the completion (sequence index prompt_len + t) is predicted by hidden[prompt_len + t - 1]
    pos = (prompt_len[:, None] - 1 + torch.arange(Tc, device=dev)).clamp(max=ids.shape[1] - 2)
    comp_mask = torch.arange(Tc, device=dev)[None] < torch.tensor([len(c) for c in completions], device=dev)[:, None]
    hs = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
    labels = ids.gather(1, pos + 1)
    logp = torch.log_softmax(model.head(hs)[..., :vocab].float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    return logp * comp_mask, comp_mask


def trigger_logprobs(mg, prompts, completions, decisions, pad_id=0, batched=None):
    """
    Log-probs (with gradients into the trigger adapter and head) of recorded trigger decisions: per row a list of
    (completion index i, 0/1) - the trigger was asked after completion token i-1 (i = 0: the end of the prompt).
    The trigger reads tokens only, so this is one plain forward - or, for rows in groups that share a prompt (the
    trigger's rollouts), one read of each distinct prompt and one of the completions (trigger_forward_shared).
    Returns (B, M) log-probs and their mask.
    """
    dev = mg.model.device
    share = None if batched is not None or mg.training else shared_prompts([tuple(p) for p in prompts], dev)
    if share is None:
        ids, mask = batched if batched is not None else right_pad(prompts, completions, pad_id, dev)[:2]
        probs, offset = trigger_forward(mg, ids, mask), [len(p) - 1 for p in prompts]
    else:
        probs, offset = trigger_forward_shared(mg, prompts, completions, share, pad_id), [0] * len(prompts)
    M = max([len(d) for d in decisions] + [1])
    at = torch.zeros(len(prompts), M, dtype=torch.long, device=dev)
    act = torch.zeros(len(prompts), M, device=dev)
    dmask = torch.zeros(len(prompts), M, dtype=torch.bool, device=dev)
    for b, ds in enumerate(decisions):
        for m, d in enumerate(ds):
            i, fired = d[0], d[-1]  # generate() records (i, p, 0/1); (i, 0/1) works too
            at[b, m], act[b, m], dmask[b, m] = offset[b] + i, float(fired), True
    p = probs.gather(1, at).clamp(1e-6, 1 - 1e-6)
    return (act * p.log() + (1 - act) * (1 - p).log()) * dmask, dmask


def trigger_forward_shared(mg, prompts, completions, share, pad_id=0):
    """trigger_forward for rows whose prompts repeat (share: model.shared_prompts): each distinct prompt is read
    once, with gradients, its cache row is repeated for every row of its group (KVCache.select), and each row then
    reads only its completion. -> p(insert) (B, 1 + Tc): after the prompt's last token, then after each completion
    token. Equal to trigger_forward at those places (tests/test_memgen.py)."""
    model, dev = mg.model, mg.model.device
    first, of_row = share
    uniq = [prompts[i] for i in first.tolist()]
    ids, mask, plen = right_pad(uniq, [[] for _ in uniq], pad_id, dev)
    cache = KVCache(model.cfg, len(uniq), device=dev, dtype=model.dtype)  # growing: autograd reads it
    with lora.use(model, "trigger"):
        _, hp = model(ids, mask=mask, cache=cache, logits="none")
        h = hp.gather(1, (plen - 1)[:, None, None].expand(-1, 1, hp.shape[-1]))[of_row]  # after each prompt
        if max(len(c) for c in completions):
            ids, mask, _ = right_pad([[] for _ in completions], completions, pad_id, dev)
            _, hc = model(ids, mask=mask, cache=cache.select(of_row), logits="none")
            h = torch.cat([h, hc], 1)
    return trigger_probs(mg, h)


# ----------------------------------------------------------------------------------------------------------------
# 7. Saving and loading the trained parts


# What a saved weaver or trigger must be run with, written into its json beside the tensors: the latents per
# insertion, the insertion budget, the boundary rule and the delimiters decide where and how decoding inserts, so a
# weaver run under other rules than it was trained with silently decodes differently. latent_init only shaped the
# start of training; it is kept for the record. A json from before these keys were written was trained with the
# official value of the keys it lacks.
RULES = ("k", "n", "boundary", "delimiters", "latent_init")
OFFICIAL = dict(k=K, n=N, boundary=BOUNDARY, delimiters=DELIMITERS, latent_init=LATENT_INIT)


def rules(mg):
    """{rule: value} of this MemGen, as save() writes them (delimiters as a list: json has no tuples)."""
    return dict(k=mg.k, n=mg.n, boundary=mg.boundary, delimiters=list(mg.delimiters), latent_init=mg.latent_init)


def saved_rules(info):
    """The rules an adapter's json records, official values for the keys it lacks; delimiters as a tuple."""
    out = {key: info.get(key, OFFICIAL[key]) for key in RULES}
    out["delimiters"] = tuple(out["delimiters"])
    return out


def rules_at(path, part="weaver"):
    """saved_rules of {path}/{part}.json (the official rules when the json is missing or unreadable)."""
    meta = os.path.join(path, f"{part}.json")
    return saved_rules(_read_json(meta) if os.path.isfile(meta) else {})


def extra_tensors(mg, part):
    """The non-LoRA trainable tensors of a part (queries, norms, maps / the trigger head)."""
    return {k: v for k, v in mg.trainable(part).items() if ".lora_A." not in k and ".lora_B." not in k}


def save(mg, path, parts=("weaver", "trigger")):
    """{path}/weaver.safetensors (+json), {path}/trigger.safetensors (+json): each adapter with its tensors; each
    json records the rules it was trained under (rules)."""
    for part in parts:
        lora.save_adapter(mg.model, part, path, extra=extra_tensors(mg, part), meta=rules(mg))


def load(mg, path, parts=("weaver", "trigger")):
    """Load saved parts into this MemGen, which must have been built with their rules (loading.memgen_for builds
    it from the json): a weaver trained with K=4 or the sentence rule is refused by a MemGen with K=8 or the
    official rule instead of decoding differently from how it was trained."""
    mine = dict(rules(mg), delimiters=mg.delimiters)
    for part in parts:
        meta, saved = os.path.join(path, f"{part}.json"), rules_at(path, part)
        if saved["k"] != mg.k:  # before the tensors, whose shapes would only say "(4, D) vs (8, D)"
            raise ModelError(f"{meta} was trained with K={saved['k']} latents, this MemGen has K={mg.k}")
        for key in ("n", "boundary", "delimiters"):
            if saved[key] != mine[key]:
                raise ModelError(f"{meta} was trained with {key}={saved[key]!r}, this MemGen has {key}="
                                 f"{mine[key]!r}: build the MemGen with the adapter's rules (memgen.saved_rules)")
        lora.load_adapter(mg.model, part, path, extra=extra_tensors(mg, part))
        if part == "weaver":
            mg.latent_init = saved["latent_init"]  # how the loaded weaver started, so a re-save records it


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # lora.load_adapter reports a bad file with its own message
