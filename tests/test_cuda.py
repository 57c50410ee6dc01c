"""
On a GPU, when there is one (marker `cuda`; skipped with the reason otherwise): the equality properties (logits =
transformers, cached = uncached, MemGen's decode = the naive reference, the training forward and its gradients = the
per-example reference; float32, so the tolerances are the CPU tests'), and the four stages of the method end to end
through the entry points in bfloat16. Run alone with `python -m pytest -m cuda`; in the default suite they run (or
skip) like any other test.
"""
import json
import math

import pytest
import torch

import lora
import memgen
from model import KVCache, load_model
from reference import naive_forward, naive_generate
from tokenizer import load_tokenizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to this torch")]
DEV = "cuda"


def make(tiny, k=4):
    path, hf = tiny("qwen2", False)
    model, tok = load_model(path, dtype="float32", device=DEV), load_tokenizer(path)
    torch.manual_seed(0)
    mg = memgen.MemGen(model, tok, k=k).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(lora.parameters(model, "weaver").values()) + list(mg.weaver.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEV))
    return mg, tok, hf


def test_logits_and_cache_on_gpu_match_transformers_and_uncached(tiny):
    mg, tok, hf = make(tiny)
    model = mg.model
    ids = torch.randint(0, model.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids.to(DEV))
        assert (ours.cpu() - ref).abs().max() <= 1e-4
        cache = KVCache(model.cfg, 2, 40, DEV, model.dtype)
        a, _ = model(ids[:, :20].to(DEV), cache=cache)
        b, _ = model(ids[:, 20:].to(DEV), cache=cache)
        assert (torch.cat([a, b], 1) - ours).abs().max() <= 1e-4


def test_memgen_decode_and_training_forward_on_gpu_equal_the_naive_references(tiny):
    mg, tok, _ = make(tiny)
    mg.is_delim[::3] = True
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=24)
    for p, r in zip(prompts, res):
        with torch.no_grad():
            toks, ins = naive_generate(mg, tok, p, 24)
        assert r["ids"] == toks and r["insertions"] == ins
    ids, mask, plen = memgen.right_pad(prompts, [r["ids"] for r in res], tok.pad_id, DEV)
    points = memgen.insertion_points(mg, ids, mask, plen)
    h = memgen.teacher_forced(mg, ids, mask, plen, points)
    params = list(mg.trainable("weaver").values())
    grads = torch.autograd.grad(mg.model.head(h).sum(), params)
    ref = 0
    for b in range(len(prompts)):
        L = int(mask[b].sum())
        hb = naive_forward(mg, ids[b, :L], int(plen[b]), [int(x) for x in points[b] if x >= 0])
        assert (h[b, :L] - hb).abs().max() <= 1e-4
        ref = ref + mg.model.head(hb).sum()
    for g, rg in zip(grads, torch.autograd.grad(ref, params)):
        assert (g - rg).abs().max() <= 1e-3 * max(1.0, rg.abs().max().item())


def test_the_entry_points_run_end_to_end_on_the_gpu(long_folder, add_task, tmp_path, monkeypatch):
    """MemGen-SFT, GRPO on it, the trigger on that, and eval.py with the learned trigger, each for two steps or a few
    problems, in bfloat16 on the GPU: every tensor the scripts build along the way must land there."""
    import eval as ev
    import train_trigger as tt
    import train_weaver as tw
    monkeypatch.chdir(tmp_path)
    on = ["--model", long_folder, "--data", add_task, f"--device={DEV}", "--dtype=bfloat16", "--progress=false"]
    train = on + ["--max_len=512", "--max_steps=2", "--batch_size=2", "--val_size=2", "--eval_interval=1",
                  "--final_eval_limit=2", "--max_new_tokens=6", "--save_interval=1"]
    runs = {name: str(tmp_path / name) for name in ("sft", "grpo", "trigger", "eval")}
    res = tw.main(train + ["--out_dir", runs["sft"], "--micro_batch=1"])
    assert str(res["policy"].model.device).startswith(DEV)
    tw.main(train + ["--out_dir", runs["grpo"], "--method=grpo", "--group=2", "--adapter", runs["sft"] + "/final"])
    tt.main(train + ["--out_dir", runs["trigger"], "--group=2", "--adapter", runs["grpo"] + "/final"])
    summary = ev.main(on + ["--mode=memgen", "--trigger_mode=learned", "--adapter", runs["trigger"] + "/final",
                            "--limit=3", "--max_new_tokens=6", "--out_dir", runs["eval"], "--results_md=", "--table="])
    assert summary["n"] == 3
    for name in ("sft", "grpo", "trigger"):
        losses = [r["loss"] for r in map(json.loads, open(f"{runs[name]}/log.jsonl")) if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, losses)


@pytest.mark.parametrize("mode,boundary", [("always", "official"), ("learned", "official"), ("always", "sentence")])
def test_graphed_decode_gives_the_eager_tokens_and_insertions_in_float32(tiny, mode, boundary):
    """The recorded CUDA graphs (model.py section 6) against the plain loop, on the GPU, float32: the same tokens,
    insertion points and trigger decisions, greedy and sampled; vanilla decoding too."""
    from model import generate

    mg, tok, _ = make(tiny)
    mg.mode, mg.boundary = mode, boundary
    mg.is_delim[::3] = True
    mg.punct_in_number[::5] = mg.is_delim[::5]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c", "Hello", "x"]]
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=40, temperature=temperature, seed=5, trigger_sample=temperature > 0)
        plain = memgen.generate(mg, tok, prompts, graphs=False, **kw)
        for _ in range(2):  # the second call replays the graphs the first one recorded
            graphed = memgen.generate(mg, tok, prompts, graphs=True, **kw)
            for a, b in zip(plain, graphed):
                assert a["ids"] == b["ids"] and a["insertions"] == b["insertions"]
                assert [d[::2] for d in a["decisions"]] == [d[::2] for d in b["decisions"]]
        assert mg.model.static_steps["reasoner"].graphs and mg.model.static_steps["weaver"].graphs  # recorded
        v = dict(max_new_tokens=40, temperature=temperature, seed=5)
        assert generate(mg.model, tok, prompts, graphs=False, **v) == generate(mg.model, tok, prompts, graphs=True, **v)


def test_a_second_memgen_on_the_model_replays_its_own_weaver_not_the_first_ones(tiny):
    """Graphs recorded for one MemGen read its queries and maps: a second MemGen on the same model (other weights)
    must decode as its own plain loop does."""
    mg, tok, _ = make(tiny)
    mg.is_delim[::3] = True
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c"]]
    memgen.generate(mg, tok, prompts, max_new_tokens=24, graphs=True)  # records graphs for the first MemGen
    torch.manual_seed(7)
    other = memgen.MemGen(mg.model, tok, k=mg.k).eval()
    other.is_delim[::3] = True
    with torch.no_grad():
        for p in other.weaver.parameters():
            p.add_(torch.randn_like(p))
    plain = memgen.generate(other, tok, prompts, max_new_tokens=24, graphs=False)
    graphed = memgen.generate(other, tok, prompts, max_new_tokens=24, graphs=True)
    assert [r["ids"] for r in plain] == [r["ids"] for r in graphed]


def test_graphed_decode_in_bfloat16_stays_within_rounding_of_the_eager_one(tiny):
    """bfloat16: graphed and eager runs may pick other kernels, so tokens may part after a near tie; until they do,
    the log-probs of the sampled tokens agree within bf16 rounding."""
    path, _ = tiny("qwen2", False)
    model, tok = load_model(path, dtype="bfloat16", device=DEV), load_tokenizer(path)
    torch.manual_seed(0)
    mg = memgen.MemGen(model, tok, k=4).eval()
    mg.is_delim[::3] = True
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c"]]
    plain = memgen.generate(mg, tok, prompts, max_new_tokens=32, graphs=False)
    graphed = memgen.generate(mg, tok, prompts, max_new_tokens=32, graphs=True)
    for a, b in zip(plain, graphed):
        same = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), len(a["ids"]))
        assert same >= 4
        assert max(abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same])) <= 0.1


def test_every_bench_figure_runs_on_the_gpu(capsys):
    """bench.py on a random model of a real shape on the GPU: every figure, the transformers comparisons with both
    caches, and the bandwidth ceiling."""
    import bench

    ratios = bench.main(["--shape=smollm2-135m", "--device=cuda", "--batch_size=2", "--max_new_tokens=24",
                         "--rl_prompts=1", "--rl_group=2", "--rl_new_tokens=16"])
    for key in ("bandwidth_fraction_b1", "ours_vs_transformers_b1", "ours_vs_transformers_static_b2",
                "memgen_vs_vanilla", "memgen_vs_naive", "train_vs_naive", "sft_vs_lora", "memory_ratio"):
        assert key in ratios and math.isfinite(ratios[key]) and ratios[key] > 0, key
    out = capsys.readouterr().out
    assert '"figure": "grpo_update_s"' in out and '"figure": "trigger_update_s"' in out
