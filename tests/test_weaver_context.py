"""
The weaver-only context (memgen.weaver_context: retrieved experience fused into the weaver, issue 24 item 5): the
weaver reads it in front of the prompt, the reasoner never; decoding and the teacher-forced forward agree with it.
"""
import pytest
import torch

import memgen
from test_memgen import make, sft_batch


def contexts(tok):
    """One context per row of sft_batch, of different lengths, one of them empty."""
    return [tok.encode("Problem: 1+1? Solution: 2."), [], tok.encode("Problem: a, b. Solution: c"),
            tok.encode("x")]


def test_the_weaver_reads_the_context_as_the_start_of_its_prompt(tiny):
    """Round 0's latents with a context equal those of a weaver whose prompt began with the context tokens."""
    mg, tok = make(tiny)
    prompts, completions = sft_batch(tok)
    ctx = contexts(tok)
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    with torch.no_grad():
        fused = memgen.weaver_rounds(mg, mg.model.embed(ids), points[:, :1], prompt_len,
                                     memgen.weaver_context(mg, ctx))
        plain = memgen.weaver_rounds(mg, mg.model.embed(ids), points[:, :1], prompt_len)
        for b in range(len(prompts)):
            joined = torch.tensor([ctx[b] + prompts[b]])
            alone = memgen.weaver_rounds(mg, mg.model.embed(joined), torch.tensor([[joined.shape[1]]]),
                                         torch.tensor([joined.shape[1]]))
            assert (fused[0][b] - alone[0][0]).abs().max() <= 1e-5
            differs = (fused[0][b] - plain[0][b]).abs().max() > 1e-3
            assert differs == bool(ctx[b])  # the context reaches the weaver; an empty one changes nothing


def test_teacher_forced_reasoner_input_holds_no_context(tiny, monkeypatch):
    """The reasoner's packed sequence with a context has the same length and the same token slots as without one;
    only the latent slots (what the weaver wrote) differ."""
    mg, tok = make(tiny)
    prompts, completions = sft_batch(tok)
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    seen = []
    real = memgen.packed_reasoner
    monkeypatch.setattr(memgen, "packed_reasoner", lambda model, seq, seq_len, prefix_len, adapter=None: (
        seen.append((seq.detach().clone(), seq_len.clone(), prefix_len.clone())) or real(model, seq, seq_len,
                                                                                          prefix_len, adapter)))
    with torch.no_grad():
        h_ctx = memgen.teacher_forced(mg, ids, mask, prompt_len, points, contexts(tok))
        h_plain = memgen.teacher_forced(mg, ids, mask, prompt_len, points)
    (seq_c, len_c, pre_c), (seq_p, len_p, pre_p) = seen
    assert torch.equal(len_c, len_p) and torch.equal(pre_c, pre_p) and seq_c.shape == seq_p.shape
    embeds = mg.model.embed(ids)
    _, _, tok_slot = memgen.assemble(mg, embeds, mask, points, [embeds.new_zeros(len(prompts), mg.k, embeds.shape[-1])]
                                     * points.shape[1])
    is_tok = torch.zeros(seq_c.shape[:2], dtype=torch.bool)
    for b in range(len(prompts)):
        is_tok[b, tok_slot[b, :int(mask[b].sum())]] = True
    assert torch.equal(seq_c[is_tok], seq_p[is_tok])  # every token slot as without the context
    is_lat = ~is_tok & (torch.arange(seq_c.shape[1])[None] < len_c[:, None])
    assert (seq_c[is_lat] - seq_p[is_lat]).abs().max() > 1e-3  # the latents carry what the weaver read
    assert (h_ctx - h_plain).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["always", "random"])
def test_decode_with_context_equals_teacher_forced_and_the_reasoner_never_reads_it(tiny, mode):
    mg, tok = make(tiny, mode=mode)
    mg.is_delim[::3] = True  # more boundaries, more inference insertions
    prompts, _ = sft_batch(tok)
    ctx = contexts(tok)
    calls = []  # (active adapter, real input slots) of every model call

    def record(m, args, kw):
        x = args[0] if args else kw.get("input_ids")
        x = kw["inputs_embeds"] if x is None else x
        real = kw.get("mask")
        calls.append((mg.model.lora_switch.active, int(real.sum()) if real is not None else x.shape[0] * x.shape[1]))

    hook = mg.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = memgen.generate(mg, tok, prompts, max_new_tokens=30, temperature=1.0, seed=5, context=ctx)
    finally:
        hook.remove()
    assert sum(len(r["insertions"]) for r in res) > len(prompts)
    # every slot the reasoner read is a prompt token, a fed completion token (each but the last sampled one) or a
    # latent: no room for a context token
    fed = sum(len(p) + len(r["ids"]) - 1 + mg.k * len(r["insertions"]) for p, r in zip(prompts, res))
    assert sum(n for active, n in calls if active is None) == fed
    weaver = [n for active, n in calls if active == "weaver"]
    assert weaver[0] == sum(len(c) for c in ctx) + sum(len(p) for p in prompts)  # its first call reads both
    logp, cmask, _, _ = memgen.logprobs(mg, prompts, [r["ids"] for r in res], [r["insertions"] for r in res],
                                        pad_id=tok.pad_id, context=ctx)
    with torch.no_grad():
        logp_plain = memgen.logprobs(mg, prompts, [r["ids"] for r in res], [r["insertions"] for r in res],
                                     pad_id=tok.pad_id)[0]
    for b, r in enumerate(res):
        assert torch.allclose(logp[b, :len(r["ids"])], torch.tensor(r["logprobs"]), atol=1e-4)
        assert ((logp[b] - logp_plain[b]).abs().max() > 1e-3) == bool(ctx[b])
    (-logp.sum()).backward()  # the weaver learns from what it read: gradients reach it through the latents
    assert mg.weaver.reasoner_to_weaver.weight.grad.abs().sum() > 0


def test_greedy_decode_with_empty_contexts_equals_decode_without(tiny):
    mg, tok = make(tiny, "llama", True)
    prompts, _ = sft_batch(tok)
    a = memgen.generate(mg, tok, prompts, max_new_tokens=20, context=[[] for _ in prompts])
    b = memgen.generate(mg, tok, prompts, max_new_tokens=20)
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    assert all(torch.allclose(torch.tensor(x["logprobs"]), torch.tensor(y["logprobs"]), atol=1e-5) for x, y in zip(a, b))
