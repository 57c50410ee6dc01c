"""
reference.py: the naive, official-style MemGen references that the fast paths in memgen.py are proven equal to.

They do the same computation the slow, obvious way, one example at a time and without caches, in the shape of the
official code (KANABOON1/MemGen, memgen/model/modeling_memgen.py):
    naive_weave     the weaver re-run from scratch over the whole prefix plus the K queries
    naive_forward   the teacher-forced training forward of one example (memgen.teacher_forced does a batch)
    naive_generate  greedy MemGen decoding that recomputes everything at every step (memgen.generate)
    official_style_decode  batched greedy decoding with the official code's costs (bench.py's baseline)
tests/ prove memgen.py equal to these; bench.py times memgen.py against them. Nothing else imports this file.
"""
import torch

import lora
import memgen
from model import KVCache


def naive_weave(mg, seq, is_prompt):
    """Weaver over the whole prefix `seq` (S, D, reasoner space) plus queries, from scratch."""
    model, w = mg.model, mg.weaver
    q = (w.prompt_ln(w.prompt_queries) * w.prompt_scale) if is_prompt else \
        (w.inference_ln(w.inference_queries) * w.inference_scale)
    # the weaver's modules are float32; the model may run in bf16 (bench.py times this reference)
    x = torch.cat([w.reasoner_to_weaver(seq.float()), q], 0)[None].to(model.dtype)
    with lora.use(model, "weaver"):
        _, h = model(inputs_embeds=x)
    return w.weaver_to_reasoner(h[0, -mg.k:].float()).to(model.dtype)


def naive_forward(mg, ids, prompt_len, points):
    """Official _forward for one example: returns the hidden states predicting each next token, (T, D)."""
    model = mg.model
    emb = model.embed(ids)
    cur, is_lat, start = emb[:0], [], 0
    for p in points:
        cur = torch.cat([cur, emb[start:p]])
        is_lat += [False] * (p - start)
        lat = naive_weave(mg, cur, p == prompt_len)
        cur = torch.cat([cur, lat])
        is_lat += [True] * mg.k
        start = p
    cur = torch.cat([cur, emb[start:]])
    is_lat += [False] * (len(ids) - start)
    with lora.use(model, None):
        _, h = model(inputs_embeds=cur[None])
    followed_by_latent = torch.tensor(is_lat[1:] + [False], device=h.device)
    return h[0][~followed_by_latent]


def naive_generate(mg, tok, prompt, max_new_tokens):
    """
    Greedy MemGen decoding that recomputes everything from scratch at every step (mode always). Under the
    "sentence" boundary rule a delimiter that may sit inside a number ("3." then "5") is settled by the next token:
    it is chosen, and if it does not start with a digit it is dropped, the latents go in, and it is chosen again
    among the tokens that do not start with a digit.
    """
    model = mg.model
    seq = model.embed(torch.tensor(prompt, device=model.device))
    toks, insertions = [], []

    def next_token(digits=True):
        with lora.use(model, None):
            logits, _ = model(inputs_embeds=seq[None])
        logits = logits[0, -1, :mg.vocab]
        return int(logits.argmax() if digits else torch.where(mg.starts_digit[:mg.vocab], -1e30, logits).argmax())

    def insert(t):
        nonlocal seq
        seq = torch.cat([seq, naive_weave(mg, seq, t == 0)])
        insertions.append(t)

    insert(0)
    prev, pending = prompt[-1], False
    for t in range(max_new_tokens):
        nxt = next_token()
        if pending:
            pending = False
            if not bool(mg.starts_digit[nxt]):
                insert(t)
                nxt = next_token(digits=False)  # the sentence ended here: the token after it is no digit
        toks.append(nxt)
        if nxt in tok.eos_ids:
            break
        seq = torch.cat([seq, model.embed(torch.tensor([nxt], device=model.device))])
        if bool(mg.is_delim[nxt]) and len(insertions) - 1 < mg.n and t < max_new_tokens - 1:
            in_number = bool(mg.punct_in_number[nxt]) or (bool(mg.just_punct[nxt]) and bool(mg.ends_digit[prev]))
            if mg.boundary == "sentence" and in_number:
                pending = True
            else:
                insert(t + 1)
        prev = nxt
    return toks, insertions


def left_pad_embeds(seqs):
    T = max(len(s) for s in seqs)
    x = seqs[0].new_zeros(len(seqs), T, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), T, dtype=torch.bool, device=x.device)
    for b, s in enumerate(seqs):
        x[b, T - len(s):], mask[b, T - len(s):] = s, True
    return x, mask


@torch.no_grad()
def official_style_decode(mg, tok, prompts, new_tokens):
    """
    Greedy MemGen decoding shaped like the official code (memgen/model/modeling_memgen.py, generate):
      - a sentence boundary is found by decoding each row's last token to text, every step;
      - at every insertion the weaver runs from scratch over the inserting rows' whole prefix, and the reasoner's
        cache is dropped and rebuilt over every row's whole sequence;
      - between insertions the reasoner decodes from its cache;
      - once every row has used its N insertions, the rest is generated with use_cache=False: the whole
        sequence is recomputed for every new token.
    """
    model, k, dev = mg.model, mg.k, mg.model.device
    B = len(prompts)
    seqs = [model.embed(torch.tensor(p, device=dev)) for p in prompts]
    n_ins = [0] * B
    out = [[] for _ in range(B)]

    def weave(rows, is_prompt):
        x, mask = left_pad_embeds([seqs[r] for r in rows])
        q = mg.queries(torch.full((len(rows),), is_prompt, device=dev))
        inp = torch.cat([mg.weaver.reasoner_to_weaver(x.float()), q], 1).to(model.dtype)
        mask = torch.cat([mask, torch.ones(len(rows), k, dtype=torch.bool, device=dev)], 1)
        with lora.use(model, "weaver"):
            _, h = model(inputs_embeds=inp, mask=mask, logits="none")
        lat = mg.weaver.weaver_to_reasoner(h[:, -k:].float()).to(model.dtype)
        for r, latent in zip(rows, lat):
            seqs[r] = torch.cat([seqs[r], latent])

    def prefill(remaining):
        x, mask = left_pad_embeds(seqs)
        cache = KVCache(model.cfg, B, x.shape[1] + remaining, dev, model.dtype)
        logits, _ = model(inputs_embeds=x, mask=mask, cache=cache, logits="last")
        return cache, logits[:, -1]

    def is_boundary(token):
        return tok.decode([token]).endswith(memgen.DELIMITERS)

    weave(list(range(B)), True)
    cache, logits = prefill(new_tokens)
    for t in range(new_tokens):
        tok_ids = logits.argmax(-1)
        emb = model.embed(tok_ids)
        for b in range(B):
            out[b].append(int(tok_ids[b]))
            seqs[b] = torch.cat([seqs[b], emb[b:b + 1]])
        if t == new_tokens - 1:
            break
        if cache is None:  # every row is out of insertions: no cache from here on (use_cache=False)
            x, mask = left_pad_embeds(seqs)
            logits = model(inputs_embeds=x, mask=mask, logits="last")[0][:, -1]
            continue
        rows = [b for b in range(B) if n_ins[b] < mg.n and is_boundary(int(tok_ids[b]))]
        if rows:
            weave(rows, False)
            for r in rows:
                n_ins[r] += 1
            if all(n >= mg.n for n in n_ins):
                cache = None
                x, mask = left_pad_embeds(seqs)
                logits = model(inputs_embeds=x, mask=mask, logits="last")[0][:, -1]
            else:
                cache, logits = prefill(new_tokens - t)
        else:
            logits = model(tok_ids[:, None], cache=cache, logits="last")[0][:, -1]
    return out
