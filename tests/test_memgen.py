"""
MemGen core against naive references written here, mirroring the official code path: per example, the weaver
re-run from scratch over each prefix, the reasoner run once (training) or from scratch every step (decoding).
"""
import pytest
import torch

import lora
import memgen
from reference import naive_forward, naive_generate
from model import generate, load_model
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


def test_trainable_counts(tiny):
    mg, _ = make(tiny)
    cfg = mg.model.cfg
    D, r = cfg.hidden_size, 16
    lora_w = cfg.num_layers * (r * D + cfg.num_heads * cfg.head_dim * r + r * D + cfg.num_kv_heads * cfg.head_dim * r)
    weaver = lora_w + 2 * K * D + 2 * 2 * D + 2 + 2 * (D * D + D)
    assert mg.count() == {"weaver": weaver, "trigger": lora_w + 2 * D + 2}
