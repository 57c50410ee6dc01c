"""
MemGen core against the naive references of reference.py, which mirror the official code path: per example, the
weaver re-run from scratch over each prefix, the reasoner run once (training) or from scratch every step (decoding).
"""
import pytest
import torch

import lora
import memgen
from reference import naive_forward, naive_generate
from model import KVCache, ModelError, generate, load_model
from tokenizer import load_tokenizer

K = 4  # small K keeps the tiny tests fast; the code path is the same for K = 8


def make(tiny, family="qwen2", tied=False, n=3, k=K, mode="always", seed=0):
    path, _ = tiny(family, tied)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    torch.manual_seed(seed)
    mg = memgen.MemGen(model, tok, k=k, n=n, mode=mode).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random adapters and heads, so every part visibly matters
        for name in ("weaver", "trigger"):
            for p in lora.parameters(model, name).values():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in list(mg.weaver.parameters()) + list(mg.trigger.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return mg, tok


def sft_batch(tok):
    """Rows with different prompt lengths, completion lengths and numbers of delimiters (0 to 5)."""
    pairs = [("What is 2+3?", "First, 2 plus 3. So the answer is 5.\nDone, yes."),
             ("Hi", "no delimiters here at all"),
             ("A longer question, with a comma. And more text here", "a. b, c.\nd"),
             ("Count", "1, 2, 3, 4, 5, 6.")]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q, _ in pairs]
    completions = [tok.encode(a) + [tok.eos_ids[0]] for _, a in pairs]
    return prompts, completions


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_training_forward_equals_naive_reference(tiny, family, tied):
    mg, tok = make(tiny, family, tied)
    prompts, completions = sft_batch(tok)
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    counts = (points >= 0).sum(1).tolist()
    assert len(set(counts)) > 1 and max(counts) == mg.n + 1  # rows really differ, and N caps the count
    params = {k: p for k, p in mg.trainable("weaver").items()}
    weights = torch.randn(ids.shape[0], ids.shape[1], mg.model.cfg.vocab_size, generator=torch.Generator().manual_seed(9))

    h = memgen.teacher_forced(mg, ids, mask, prompt_len, points)
    logits = mg.model.head(h)
    loss = (logits * weights * mask[..., None]).sum()
    grads = torch.autograd.grad(loss, list(params.values()))

    ref_logits, ref_loss = [], 0
    for b in range(len(prompts)):
        L = int(mask[b].sum())
        pts = [int(p) for p in points[b] if p >= 0]
        rl = mg.model.head(naive_forward(mg, ids[b, :L], int(prompt_len[b]), pts))
        ref_logits.append(rl)
        ref_loss = ref_loss + (rl * weights[b, :L]).sum()
        assert (logits[b, :L] - rl).abs().max() <= 1e-4
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    for name, g, rg in zip(params, grads, ref_grads):
        assert rg.abs().max() > 0, name  # every weaver parameter gets a gradient
        assert (g - rg).abs().max() <= 1e-4 * max(1.0, rg.abs().max().item()), name


def test_insertion_points_follow_delimiters(tiny):
    mg, tok = make(tiny)
    prompts, completions = sft_batch(tok)
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    for b in range(len(prompts)):
        P, L = len(prompts[b]), int(mask[b].sum())
        text_ends = [i for i in range(P + 1, L) if tok.decode([int(ids[b, i - 1])]).endswith((",", ".", "\n"))]
        assert [int(p) for p in points[b] if p >= 0] == [P] + text_ends[:mg.n]


def test_greedy_decode_equals_naive_and_batch_equals_single(tiny):
    mg, tok = make(tiny, "llama", True)
    mg.is_delim[::3] = True  # a random model rarely says "." greedily: more boundaries exercise more insertions
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in
               ["What is 2+3?", "Say: a, b. c", "Hello there, how are you doing today?", "x"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=40)
    assert sum(len(r["insertions"]) for r in res) > len(prompts)  # some inference insertions happened
    for p, r in zip(prompts, res):
        with torch.no_grad():
            toks, ins = naive_generate(mg, tok, p, 40)
        assert r["ids"] == toks and r["insertions"] == ins
        single = memgen.generate(mg, tok, [p], max_new_tokens=40)[0]
        assert single["ids"] == r["ids"] and single["insertions"] == r["insertions"]


def test_mode_off_equals_vanilla_generate(tiny):
    mg, tok = make(tiny)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=30, mode="off")
    seqs, texts = generate(mg.model, tok, prompts, max_new_tokens=30)
    for r, s, t in zip(res, seqs, texts):
        assert [x for x in r["ids"] if x not in tok.eos_ids] == s and r["text"] == t and r["insertions"] == []


@pytest.mark.parametrize("mode", ["always", "learned", "random"])
def test_rl_logprobs_equal_those_recorded_while_sampling(tiny, mode):
    mg, tok = make(tiny, mode=mode)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c", "Hi"]] * 2
    res = memgen.generate(mg, tok, prompts, max_new_tokens=30, temperature=1.0, seed=3, trigger_sample=True)
    assert any(len(r["insertions"]) > 1 for r in res)
    decisions = [[(i, d) for i, _, d in r["decisions"]] for r in res]
    logp, cmask, dlogp, dmask = memgen.logprobs(mg, prompts, [r["ids"] for r in res], [r["insertions"] for r in res],
                                                decisions, tok.pad_id)
    for b, r in enumerate(res):
        assert torch.allclose(logp[b, :len(r["ids"])], torch.tensor(r["logprobs"]), atol=1e-4)
        for m, (_, p, d) in enumerate(r["decisions"]):
            assert abs(dlogp[b, m].exp().item() - (p if d else 1 - p)) <= 1e-4
    if mode == "learned":
        assert sum(len(d) for d in decisions) > len(prompts)  # the trigger was asked at delimiters too
        assert any(d == 0 for ds in decisions for _, d in ds) and any(d == 1 for ds in decisions for _, d in ds)
    # gradients reach the weaver through the latents, and the trigger through its decisions
    loss = -logp.sum() - (dlogp.sum() if mode == "learned" else 0)
    loss.backward()
    assert mg.weaver.prompt_queries.grad.abs().sum() > 0
    assert mg.weaver.weaver_to_reasoner.weight.grad.abs().sum() > 0
    if mode == "learned":
        assert mg.trigger.head.weight.grad.abs().sum() > 0


def test_learned_trigger_threshold_and_counts(tiny):
    mg, tok = make(tiny, mode="learned")
    with torch.no_grad():
        mg.trigger.head.bias.copy_(torch.tensor([0.0, -100.0]))  # never insert
    prompts = [tok.chat([{"role": "user", "content": "Say: a, b. c"}])]
    r = memgen.generate(mg, tok, prompts, max_new_tokens=30)[0]
    assert r["insertions"] == [] and r["decisions"][0][0] == 0 and all(d == 0 for _, _, d in r["decisions"])
    with torch.no_grad():
        mg.trigger.head.bias.copy_(torch.tensor([0.0, 100.0]))  # always insert = mode always
    r = memgen.generate(mg, tok, prompts, max_new_tokens=30)[0]
    a = memgen.generate(mg, tok, prompts, max_new_tokens=30, mode="always")[0]
    assert r["ids"] == a["ids"] and r["insertions"] == a["insertions"]


def test_a_declined_boundary_does_not_use_up_n(tiny):
    """N counts insertions, not trigger calls (the official code's sentence_augment_count): after a decline the trigger
    is asked again at the next boundary, and the asking stops only at the N-th insertion."""
    mg, tok = make(tiny, mode="learned", n=2)
    with torch.no_grad():  # p(insert) = 0.5 at every boundary
        mg.trigger.head.weight.zero_()
        mg.trigger.head.bias.zero_()
    mg.is_delim[::3] = True  # more boundaries than a random model says on its own
    prompts = [tok.chat([{"role": "user", "content": "Say: a, b. c"}])] * 8
    outs = memgen.generate(mg, tok, prompts, 40, 1.0, seed=0, mode="learned", trigger_sample=True)
    more_asks_than_n = 0
    for r in outs:
        comp = r["ids"]
        asked = [t for t, _, _ in r["decisions"] if t > 0]
        fired = [t for t, _, d in r["decisions"] if t > 0 and d]
        assert fired == [t for t in r["insertions"] if t > 0] and len(fired) <= mg.n
        last = fired[-1] if len(fired) == mg.n else len(comp) - 1
        assert asked == [t for t in range(1, last + 1) if bool(mg.is_delim[comp[t - 1]])], r["decisions"]
        more_asks_than_n += len(asked) > mg.n
    assert more_asks_than_n > 0, [(len(r["ids"]), r["decisions"]) for r in outs]  # some row declined, asked again


def test_save_load_round_trip(tiny, tmp_path):
    mg, tok = make(tiny)
    prompts = [tok.chat([{"role": "user", "content": "Say: a, b. c"}])]
    want = memgen.generate(mg, tok, prompts, max_new_tokens=20)[0]
    memgen.save(mg, str(tmp_path))
    fresh, _ = make(tiny, seed=5)  # different random parts ...
    assert not torch.equal(fresh.weaver.prompt_queries, mg.weaver.prompt_queries)
    memgen.load(fresh, str(tmp_path))  # ... replaced by the saved ones
    for part in ("weaver", "trigger"):
        for (k, a), b in zip(mg.trainable(part).items(), fresh.trainable(part).values()):
            assert torch.equal(a, b), k
    got = memgen.generate(fresh, tok, prompts, max_new_tokens=20)[0]
    assert got["ids"] == want["ids"] and got["insertions"] == want["insertions"]
    other_k, _ = make(tiny, k=K + 2)
    with pytest.raises(ModelError, match=f"weaver.json was trained with K={K} latents, this MemGen has K={K + 2}"):
        memgen.load(other_k, str(tmp_path))


def test_trainable_counts(tiny):
    mg, _ = make(tiny)
    cfg = mg.model.cfg
    D, r = cfg.hidden_size, 16
    lora_w = cfg.num_layers * (r * D + cfg.num_heads * cfg.head_dim * r + r * D + cfg.num_kv_heads * cfg.head_dim * r)
    weaver = lora_w + 2 * K * D + 2 * 2 * D + 2 + 2 * (D * D + D)
    assert mg.count() == {"weaver": weaver, "trigger": lora_w + 2 * D + 2}


def test_token_tables_follow_the_token_texts(tiny):
    mg, tok = make(tiny)
    texts = {v: tok.token_bytes(v) for v in range(mg.vocab) if v not in tok.special_ids}
    for name, want in [("is_delim", lambda b: b.decode("latin-1")[-1:] in memgen.DELIMITERS),
                       ("punct_in_number", lambda b: len(b) > 1 and chr(b[-1]) in ".," and chr(b[-2]) in "0123456789"),
                       ("just_punct", lambda b: b in (b".", b",")),
                       ("starts_digit", lambda b: b[:1] != b"" and chr(b[0]) in "0123456789"),
                       ("ends_digit", lambda b: b[-1:] != b"" and chr(b[-1]) in "0123456789")]:
        table = getattr(mg, name)
        assert [bool(table[v]) for v in texts] == [want(b) for b in texts.values()], name
    assert mg.just_punct.sum() == 2 and mg.starts_digit.sum() >= 10
    # the tiny vocabulary splits digits from punctuation; a hand-made one has every case
    vocab = [b"3.", b"1,", b".", b",", b"a.", b"7", b"5x", b" 5", b"\n", b"<s>"]
    fake = type("Tok", (), dict(special_ids=[9], vocab_size=10, token_bytes=lambda self, v: vocab[v]))()
    t = {k: v.nonzero().squeeze(1).tolist() for k, v in memgen.token_tables(fake, 12).items()}
    assert t == {"is_delim": [0, 1, 2, 3, 4, 8], "punct_in_number": [0, 1], "just_punct": [2, 3], "ends_digit": [5, 7],
                 "starts_digit": [0, 1, 5, 6]}


def _boundary_tables(mg):
    """Rig the tables so a random tiny model meets many delimiters, many of them possibly inside numbers."""
    g = torch.Generator().manual_seed(7)
    for name, p in (("is_delim", 0.3), ("punct_in_number", 0.5), ("just_punct", 0.2), ("ends_digit", 0.5),
                    ("starts_digit", 0.5)):
        getattr(mg, name).copy_(torch.rand(mg.is_delim.shape, generator=g) < p)
    mg.punct_in_number &= mg.is_delim
    mg.just_punct &= mg.is_delim & ~mg.punct_in_number


@pytest.mark.parametrize("boundary", ["official", "sentence"])
def test_greedy_decode_equals_naive_under_each_boundary_rule(tiny, boundary):
    mg, tok = make(tiny, n=4)
    mg.boundary = boundary
    _boundary_tables(mg)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c", "x", "1.5, 2"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=40)
    deferred = 0
    for p, r in zip(prompts, res):
        with torch.no_grad():
            toks, ins = naive_generate(mg, tok, p, 40)
        assert r["ids"] == toks and r["insertions"] == ins
        # the rule decided something: a delimiter that may end a number, followed or not by a digit
        prev = [p[-1]] + r["ids"][:-1]
        deferred += sum(bool(mg.is_delim[x]) and (bool(mg.punct_in_number[x]) or bool(mg.just_punct[x])
                        and bool(mg.ends_digit[q])) for q, x in zip(prev, r["ids"]))
    assert deferred >= 3


@pytest.mark.parametrize("boundary", ["official", "sentence"])
def test_training_points_are_the_points_decoding_used(tiny, boundary):
    """Training and decoding apply the same boundary rule: insertion_points over a decoded completion = the
    insertions decoding made (mode always, while N is not used up)."""
    mg, tok = make(tiny, n=40)
    mg.boundary = boundary
    _boundary_tables(mg)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c", "1.5, 2"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=30, temperature=1.0, seed=1)
    ids, mask, plen = memgen.right_pad(prompts, [r["ids"] for r in res], tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, plen)
    for b, r in enumerate(res):
        got = [int(x) - len(prompts[b]) for x in points[b] if x >= 0]
        want = [i for i in r["insertions"] if i < len(r["ids"])]  # a point after the last token has no token
        assert got == want
    if boundary == "sentence":
        mg.boundary = "official"
        assert not torch.equal(points, memgen.insertion_points(mg, ids, mask, plen))  # the rule changed something


def test_embedding_init_gives_latents_the_scale_of_token_embeddings(tiny):
    path, _ = tiny("qwen2", False)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    torch.manual_seed(0)
    paper = memgen.MemGen(model, tok, k=K)
    torch.manual_seed(0)
    small = memgen.MemGen(model, tok, k=K, latent_init="embedding")
    target = model.model.embed_tokens.weight[:small.vocab].norm(dim=-1).median()
    res = memgen.generate(small, tok, [tok.chat([{"role": "user", "content": "Hi"}])], max_new_tokens=2)
    assert res[0]["insertions"][0] == 0
    # the probe both inits share: the queries alone
    norms = {}
    for name, m in (("paper", paper), ("embedding", small)):
        cache = KVCache(model.cfg, 2, device="cpu", dtype=model.dtype)
        lat = memgen.weave(m, cache, torch.zeros(2, 0, model.cfg.hidden_size), torch.zeros(2, 0, dtype=torch.bool),
                           torch.tensor([True, False]))
        norms[name] = lat.norm(dim=-1).mean()
    assert abs(norms["embedding"] / target - 1) < 1e-4
    assert abs(norms["paper"] / target - 1) > 0.1  # the paper's init is not already at that scale
    with pytest.raises(ModelError, match="unknown boundary 'words'"):
        memgen.MemGen(model, tok, boundary="words")


@pytest.mark.parametrize("mode,graphs,context", [("always", False, False), ("learned", False, False),
                                                  ("learned", True, False), ("always", False, True)])
def test_a_repeated_prompt_is_read_once_by_all_three_caches(tiny, monkeypatch, mode, graphs, context):
    """Rows that repeat a prompt (GRPO's and the trigger's groups, pass@k) prefill the reasoner's, the weaver's and
    the trigger's caches once and copy them: sampled tokens, insertions and the trigger's decisions are those of
    reading every row. With a weaver context, rows share only when the context is the same too."""
    import model as M

    mg, tok = make(tiny, mode=mode)
    mg.is_delim[::3] = True
    qs = ["What is 2+3?", "Say: a, b. c", "What is 2+3?", "What is 2+3?", "Say: a, b. c"]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in qs]
    ctx = [tok.encode(c) for c in ("one", "two", "one", "three", "two")] if context else None
    copied = []
    real_copy = M.KVCache.copy_rows
    monkeypatch.setattr(M.KVCache, "copy_rows", lambda self, src, dst: (copied.append(src.tolist()),
                                                                        real_copy(self, src, dst)))
    kw = dict(max_new_tokens=30, temperature=1.0, seed=4, trigger_sample=True, graphs=graphs, context=ctx)
    shared = memgen.generate(mg, tok, prompts, **kw)
    rows = [0, 1, 0, 3, 1] if context else [0, 1, 0, 0, 1]  # "three" is a context of its own
    assert copied == [rows] * (3 if mode == "learned" else 2)  # reasoner, weaver (and trigger) caches
    monkeypatch.setattr(memgen, "shared_prompts", lambda keys, device: None)
    each = memgen.generate(mg, tok, prompts, **kw)
    assert sum(len(r["insertions"]) for r in shared) > len(prompts)
    for a, b in zip(shared, each):
        assert (a["ids"], a["insertions"], [d[::2] for d in a["decisions"]]) == \
               (b["ids"], b["insertions"], [d[::2] for d in b["decisions"]])
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        assert [d[1] for d in a["decisions"]] == pytest.approx([d[1] for d in b["decisions"]], abs=1e-5)


def test_trigger_logprobs_read_a_shared_prompt_once_with_the_same_values_and_gradients(tiny, monkeypatch):
    """The trigger's update over its rollouts (groups that share a prompt) reads each prompt once and repeats its
    cache rows: the decisions' log-probs and the trigger's gradients equal reading every row whole."""
    mg, tok = make(tiny, mode="learned")
    mg.is_delim[::3] = True
    qs = ["What is 2+3?", "Say: a, b. c", "What is 2+3?", "A longer question, with a comma.", "Say: a, b. c"]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in qs]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=24, temperature=1.0, seed=2, trigger_sample=True)
    completions, decisions = [r["ids"] for r in res], [r["decisions"] for r in res]
    completions[1], decisions[1] = [], decisions[1][:1]  # a row that ended at once: only the prompt-end decision
    assert sum(len(d) for d in decisions) > len(prompts)  # decisions inside completions too
    params = list(mg.trainable("trigger").values())

    def run():
        for p in params:
            p.grad = None
        dlogp, dmask = memgen.trigger_logprobs(mg, prompts, completions, decisions, tok.pad_id)
        (dlogp * torch.arange(1.0, 1 + dlogp.numel()).view_as(dlogp)).sum().backward()  # every entry weighs apart
        return dlogp.detach(), dmask, [p.grad.clone() for p in params]

    calls = []
    real = memgen.trigger_forward_shared
    monkeypatch.setattr(memgen, "trigger_forward_shared", lambda *a: (calls.append(1), real(*a))[1])
    shared = run()
    assert calls  # the shared path ran
    monkeypatch.setattr(memgen, "shared_prompts", lambda keys, device: None)
    whole = run()
    assert torch.equal(shared[1], whole[1])
    assert torch.allclose(shared[0], whole[0], atol=1e-5)
    for a, b in zip(shared[2], whole[2]):  # float32 sums in another order: equal to a millionth of the largest
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-6
