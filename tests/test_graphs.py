"""
The decode loop in fixed shapes (model.py section 6) against the plain loop. With graphs=True on a CPU nothing is
recorded, but every call runs exactly as a CUDA graph would replay it: on a static cache, all rows, all slots, the
weaver at bucketed widths, the stop check every few steps. So these tests prove the graphed path's arithmetic and
bookkeeping; tests/test_cuda.py checks the recording itself on a GPU.
"""
import pytest
import torch

import memgen
import model as M
from model import KVCache, Steps, generate, load_model
from test_memgen import make as memgen_make

K = 4


def make(tiny, mode="always", n=3, seed=0):
    mg, tok = memgen_make(tiny, "qwen2", False, n=n, k=K, mode=mode, seed=seed)  # random adapters and heads
    mg.is_delim[::3] = True  # a random model rarely says "." greedily: more boundaries, more insertions
    return mg, tok


PROMPTS = ["What is 2+3?", "Say: a, b. c", "Hello there, how are you doing today?", "x"]


def test_static_cache_equals_plain_cache_and_uncached(tiny):
    path, _ = tiny("qwen2", False)
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False  # left padding in one row
    with torch.no_grad():
        ref, _ = model(ids, mask=mask)
        cache = KVCache(model.cfg, 3, 40, static=True)
        a, _ = model(ids[:, :12], mask=mask[:, :12], cache=cache)
        steps = [model(ids[:, t:t + 1], mask=mask[:, t:t + 1], cache=cache)[0] for t in range(12, 21)]
    got = torch.cat([a] + steps, 1)
    assert (got - ref)[mask].abs().max() <= 1e-4
    assert cache.lens.tolist() == [21, 21, 21] and cache.next_pos.tolist() == [16, 21, 21]


def test_static_rollback_by_mask_equals_rollback_by_rows(tiny):
    path, _ = tiny("qwen2", False)
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    caches = [KVCache(model.cfg, 3, 30), KVCache(model.cfg, 3, 30, static=True)]
    with torch.no_grad():
        for c in caches:
            model(ids, cache=c)
        caches[0].rollback(4, torch.tensor([0, 2]))
        caches[1].rollback(4, where=torch.tensor([True, False, True]))
        a, b = (model(ids[:, :2], cache=c)[0] for c in caches)
    assert torch.equal(caches[0].lens, caches[1].lens) and torch.equal(caches[0].next_pos, caches[1].next_pos)
    assert torch.equal(caches[0].valid, caches[1].valid[:, :31])
    assert (a - b).abs().max() <= 1e-4


def test_vanilla_generate_same_tokens_with_graphs(tiny):
    mg, tok = make(tiny)
    model = mg.model
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS]
    for temperature in (0.0, 1.0):
        plain = generate(model, tok, prompts, max_new_tokens=37, temperature=temperature, seed=3, graphs=False)
        fixed = generate(model, tok, prompts, max_new_tokens=37, temperature=temperature, seed=3, graphs=True)
        assert plain == fixed


def test_stop_check_every_few_steps_gives_the_same_output(tiny):
    """Rows that end early (EOS) under the fixed-shape loop, which looks for "all finished" every STOP_EVERY steps."""
    mg, tok = make(tiny)
    model = mg.model
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS]
    seqs, _ = generate(model, tok, prompts, max_new_tokens=30, graphs=False)
    eos = seqs[0][5]  # make a token the model emits early an EOS: rows stop at different steps
    tok.eos_ids = [eos]  # this test's own tokenizer (make loads one per call): nothing to restore
    plain = generate(model, tok, prompts, max_new_tokens=30, graphs=False)
    fixed = generate(model, tok, prompts, max_new_tokens=30, graphs=True)
    assert plain == fixed and min(len(s) for s in plain[0]) < 30


def test_memgen_rows_that_finish_first_are_left_out_with_the_same_output(tiny):
    """The plain loop leaves finished rows out of later calls; the fixed-shape loop keeps every row in every call.
    Both give the same tokens and insertions when rows end (EOS) at different steps."""
    mg, tok = make(tiny, n=4)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS]
    kw = dict(max_new_tokens=40, temperature=1.0, seed=5)
    first = memgen.generate(mg, tok, prompts, graphs=False, **kw)[0]["ids"]
    tok.eos_ids = [first[6]]  # a token the model emits early: rows stop at different steps (this test's tokenizer)
    plain = memgen.generate(mg, tok, prompts, graphs=False, **kw)
    fixed = memgen.generate(mg, tok, prompts, graphs=True, **kw)
    lengths = sorted(len(r["ids"]) for r in plain)
    assert lengths[0] <= 7 and lengths[-1] > lengths[0] + 5  # some rows went on after others had finished
    for a, b in zip(plain, fixed):
        assert a["ids"] == b["ids"] and a["insertions"] == b["insertions"]


@pytest.mark.parametrize("mode,boundary", [("always", "official"), ("always", "sentence"), ("learned", "official"),
                                           ("random", "sentence")])
def test_memgen_generate_same_tokens_and_insertions_with_graphs(tiny, mode, boundary):
    mg, tok = make(tiny, mode=mode, n=4)
    mg.boundary = boundary
    mg.punct_in_number[::5] = mg.is_delim[::5]  # some delimiters "may end a number": the sentence rule defers them
    mg.starts_digit[1::4] = True
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS]
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=40, temperature=temperature, seed=5, trigger_sample=temperature > 0)
        plain = memgen.generate(mg, tok, prompts, graphs=False, **kw)
        fixed = memgen.generate(mg, tok, prompts, graphs=True, **kw)
        assert sum(len(r["insertions"]) for r in plain) > len(prompts)  # inference insertions happened
        for a, b in zip(plain, fixed):
            assert a["ids"] == b["ids"] and a["insertions"] == b["insertions"]
            assert [d[::2] for d in a["decisions"]] == [d[::2] for d in b["decisions"]]
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-4


def test_static_caches_are_kept_and_reset_between_calls(tiny):
    mg, tok = make(tiny)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS[:2]]
    first = memgen.generate(mg, tok, prompts, max_new_tokens=20, graphs=True)
    cache = mg.model.static_steps["reasoner"].cache
    again = memgen.generate(mg, tok, prompts, max_new_tokens=20, graphs=True)
    assert mg.model.static_steps["reasoner"].cache is cache  # one allocation (and one set of graphs) per shape
    assert [r["ids"] for r in first] == [r["ids"] for r in again]
    memgen.generate(mg, tok, prompts[:1], max_new_tokens=20, graphs=True)
    assert mg.model.static_steps["reasoner"].cache is not cache  # another batch size: a new cache


def test_weaver_widths_are_few_powers_of_two():
    assert [memgen.bucket(n) for n in (0, 1, 16, 17, 100, 256, 257)] == [16, 16, 16, 32, 128, 256, 512]
    assert [memgen.bucket(n, least=1) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]  # rows of a weaver call


def test_static_call_on_some_rows_padded_with_a_spare_row(tiny):
    """A static cache called on a subset of its rows, padded to a fixed count with its spare last row (the weaver's
    calls with graphs): the rows called equal a plain cache called on them; the others and the spare stay empty."""
    path, _ = tiny("qwen2", False)
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    plain, static = KVCache(model.cfg, 3, 30), KVCache(model.cfg, 4, 30, static=True)  # + 1 spare row
    with torch.no_grad():
        model(ids, cache=plain)
        model(ids, cache=static, rows=torch.arange(3))
        new = ids[[0, 2], :5]
        a, _ = model(new, cache=plain, rows=torch.tensor([0, 2]))
        pad = torch.cat([new, new[:1]])  # the spare row's input is never real
        real = torch.tensor([[True] * 5, [True] * 5, [False] * 5])
        b, _ = model(pad, cache=static, rows=torch.tensor([0, 2, 3]), mask=real)
        static.rollback(2, torch.tensor([0, 2, 3]), where=torch.tensor([True, False, False]))
        plain.rollback(2, torch.tensor([0]))
    assert (a - b[:2]).abs().max() <= 1e-4
    assert plain.lens.tolist() == static.lens.tolist()[:3] == [15, 12, 17] and static.lens[3] == 0
    assert torch.equal(plain.next_pos, static.next_pos[:3]) and not static.valid[3].any()


def test_graphs_setting_is_checked():
    assert M.use_graphs("auto", "cpu") is False and M.use_graphs("auto", "cuda:0") is True
    assert M.use_graphs("true", "cpu") is True and M.use_graphs(False, "cuda") is False
    with pytest.raises(M.ModelError, match="graphs='maybe'"):
        M.use_graphs("maybe", "cpu")
    assert Steps(None, None, False)("x", lambda a: a + 1, a=torch.tensor(1)) == 2


def test_a_new_memgen_on_the_model_drops_the_static_steps_of_the_old_one(tiny):
    """A recorded weave graph reads its MemGen's own query and map tensors: a second MemGen built on the same model
    must not replay the first one's graphs."""
    mg, tok = make(tiny)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in PROMPTS[:2]]
    memgen.generate(mg, tok, prompts, max_new_tokens=8, graphs=True)
    assert "reasoner" in mg.model.static_steps
    memgen.MemGen(mg.model, tok, k=mg.k)
    assert not getattr(mg.model, "static_steps", {})
