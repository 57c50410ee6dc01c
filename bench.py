"""
bench.py: is this code fast? Side-by-side timings in one process, reported as ratios.

    python bench.py --model PATH [--dtype auto] [--batch 8] [--new-tokens 256]
    python bench.py --quick          # a small random model built in memory, < 60 s on 2 CPU cores

Figures (each printed as a table row and as one JSON line; the last line holds the headline ratios):
  1. vanilla decode tok/s: ours vs transformers generate, greedy, batch 1 and --batch       -> ours_vs_transformers
  2. MemGen decode (K=8, N=3, mode always): ours cached vs an official-style decode that drops the reasoner's
     cache and re-runs the weaver over the whole prefix at every insertion; and ours vs our vanilla decode
                                                                               -> memgen_vs_naive, memgen_vs_vanilla
  3. weaver SFT step (batch 8, max length 512): our batched cached forward+backward vs the per-example recompute
     reference (the one tests/test_memgen.py proves our forward equal to)                          -> train_vs_naive
  4. peak resident memory of reasoner + weaver + trigger relative to the base model alone           -> memory_ratio
Decoding ignores EOS here so every run produces exactly --new-tokens tokens per row.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import memgen
from model import Config, KVCache, Transformer, generate, load_model, pick_dtype
from tokenizer import load_tokenizer

from reference import naive_forward, official_style_decode


class NoEos:
    """A tokenizer view without EOS ids: benchmark runs always decode the full length."""

    def __init__(self, tok):
        self.tok, self.eos_ids = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)


class RandomTokenizer:
    """--quick: just enough tokenizer for a random model (ids in, ids out)."""
    eos_ids, pad_id, special_ids = [], 0, set()

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    # a random model rarely emits "," "." "\n": every 16th id "is" a "." so that insertions happen
    def token_bytes(self, i):
        return b"." if i % 16 == 0 else b"x"

    def decode(self, ids, skip_special=False):
        return b"".join(self.token_bytes(i) for i in ids).decode()


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())
    return f"{name}, {torch.get_num_threads()} threads"


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def sft_step(mg, ids, mask, prompt_len, naive):
    """One weaver SFT forward+backward: ours batched, or the per-example reference."""
    model = mg.model
    params = list(mg.trainable("weaver").values())
    for p in params:
        p.grad = None
    comp = mask.clone()
    comp[torch.arange(ids.shape[1])[None] < prompt_len[:, None]] = False
    target = torch.zeros_like(comp)
    target[:, :-1] = comp[:, 1:]  # hidden[t] predicts token t+1
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    if naive:
        total = 0
        for b in range(len(ids)):
            L = int(mask[b].sum())
            h = naive_forward(mg, ids[b, :L], int(prompt_len[b]), [int(p) for p in points[b] if p >= 0])
            sel = target[b, :L]
            loss = F.cross_entropy(model.head(h[sel]).float(), ids[b, :L].roll(-1)[sel], reduction="sum")
            (loss / target.sum()).backward()
            total += loss.item()
        return total / target.sum().item()
    h = memgen.teacher_forced(mg, ids, mask, prompt_len, points)
    logits = model.head(h[target]).float()
    loss = F.cross_entropy(logits, ids.roll(-1, 1)[target])
    loss.backward()
    return loss.item()


def memory_probe(path, dtype):
    """Run in a fresh process: peak RSS of the base model alone, then with MemGen's parts, minus the imports."""
    code = f"""
import json, torch, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
def rss(field):
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(field))) * 1024
import memgen
from model import load_model
from tokenizer import load_tokenizer
base = rss('VmRSS:')
m = load_model({path!r}, dtype={dtype!r}); tok = load_tokenizer({path!r})
from model import generate
with torch.no_grad(): generate(m, tok, [list(range(64))], max_new_tokens=8)  # the same decode work, vanilla
a, a_now = rss('VmHWM:'), rss('VmRSS:')
mg = memgen.MemGen(m, tok).eval()
with torch.no_grad():
    memgen.generate(mg, tok, [list(range(64))], max_new_tokens=8)
b, b_now = rss('VmHWM:'), rss('VmRSS:')
print(json.dumps(dict(base=a - base, memgen=b - base, base_now=a_now - base, memgen_now=b_now - base)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["memgen"] / r["base"], r


def report(rows, name, value, unit, **extra):
    rows.append((name, value, unit))
    print(json.dumps(dict(figure=name, value=round(value, 4), unit=unit, **extra)), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", help="a Hugging Face model folder (Qwen2 or Llama)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small random model in memory, under a minute")
    args = ap.parse_args(argv)
    if not args.quick and not args.model:
        ap.error("pass --model PATH (a Hugging Face model folder) or --quick")
    torch.manual_seed(0)
    if args.quick:
        dtype = torch.float32
        cfg = Config(arch="llama", vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=64, intermediate_size=512, rope_theta=10000.0, rms_eps=1e-5, tie_word_embeddings=False,
                     qkv_bias=False, max_positions=2048, name="random")
        model = Transformer(cfg).requires_grad_(False).eval()
        tok = RandomTokenizer(cfg.vocab_size)
        new_tokens, B, seq_len = 128, args.batch, 256
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, cfg.vocab_size, (40 + 7 * b,), generator=g).tolist() for b in range(B)]
    else:
        dtype = pick_dtype(args.dtype)
        from data.download import resolve_model

        args.model = resolve_model(args.model)  # a hub id is downloaded once; load_model takes folders only
        model, tok = load_model(args.model, dtype=dtype), NoEos(load_tokenizer(args.model))
        cfg, new_tokens, B, seq_len = model.cfg, args.new_tokens, args.batch, 512
        from data.gsm8k import load_task, messages

        rows = load_task("gsm8k", "test")[:B]
        prompts = [tok.chat(messages(r["question"])) for r in rows]
    print(f"# bench on {machine()}, dtype {str(dtype).replace('torch.', '')}, model {cfg.name} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), batch {B}, {new_tokens} new tokens")
    rows_out, ratios = [], {}

    # 1. vanilla decode
    generate(model, tok, prompts[:1], max_new_tokens=4)  # warm-up
    for bs in sorted({1, B}):
        dt, _ = timed(lambda: generate(model, tok, prompts[:bs], max_new_tokens=new_tokens))
        ours = bs * new_tokens / dt
        report(rows_out, f"vanilla_tok_s_b{bs}", ours, "tok/s")
        if args.quick:
            continue
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            print("# transformers not installed: skipping the transformers comparison")
            continue
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        ids, mask = _hf_batch(prompts[:bs], tok.pad_id)
        with torch.no_grad():
            hf.generate(ids[:1, -8:], max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
            dt_hf, _ = timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_id))
        report(rows_out, f"transformers_tok_s_b{bs}", bs * new_tokens / dt_hf, "tok/s")
        ratios[f"ours_vs_transformers_b{bs}"] = ours / (bs * new_tokens / dt_hf)
        del hf
    vanilla = B * new_tokens / timed(lambda: generate(model, tok, prompts, max_new_tokens=new_tokens))[0]

    # 2. MemGen decode
    mg = memgen.MemGen(model, tok).eval()
    dt, res = timed(lambda: memgen.generate(mg, tok, prompts, max_new_tokens=new_tokens, mode="always"))
    mem_tok_s = B * new_tokens / dt
    ins = sum(len(r["insertions"]) for r in res) / B
    report(rows_out, "memgen_tok_s", mem_tok_s, "tok/s", insertions_per_row=ins)
    dt_naive, naive_out = timed(lambda: official_style_decode(mg, tok, prompts, new_tokens))
    report(rows_out, "official_style_memgen_tok_s", B * new_tokens / dt_naive, "tok/s",
           same_tokens=all(r["ids"] == o for r, o in zip(res, naive_out)))
    ratios["memgen_vs_vanilla"] = mem_tok_s / vanilla
    ratios["memgen_vs_naive"] = dt_naive / dt

    # 3. weaver SFT step
    mg.train()
    if args.quick:
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(1, cfg.vocab_size, (seq_len - 13 * b,), generator=g).tolist() for b in range(8)]
        plen = [60 + 5 * b for b in range(8)]
    else:
        from data.gsm8k import load_task, messages

        train = load_task("gsm8k", "train")[:8]
        seqs, plen = [], []
        for r in train:
            p = tok.chat(messages(r["question"]))
            seqs.append((p + tok.encode(r["target"]) + [tok.end_id])[:seq_len])
            plen.append(len(p))
    ids, mask, prompt_len = memgen.right_pad([s[:p] for s, p in zip(seqs, plen)], [s[p:] for s, p in zip(seqs, plen)],
                                         tok.pad_id, model.device)
    mg.eval()  # dropout off so both paths compute the same function
    sft_step(mg, ids[:2], mask[:2], prompt_len[:2], naive=False)  # warm-up
    dt_ours, loss_ours = timed(lambda: sft_step(mg, ids, mask, prompt_len, naive=False))
    dt_ref, loss_ref = timed(lambda: sft_step(mg, ids, mask, prompt_len, naive=True))
    report(rows_out, "sft_step_s", dt_ours, "s", loss=loss_ours, tokens=int(mask.sum()))
    report(rows_out, "naive_sft_step_s", dt_ref, "s", loss=loss_ref)
    ratios["train_vs_naive"] = dt_ref / dt_ours

    # 4. memory
    if args.quick:
        base = sum(t.numel() * t.element_size() for t in model.parameters())
        extra = sum(t.numel() * t.element_size() for part in ("weaver", "trigger") for t in mg.trainable(part).values())
        ratios["memory_ratio"] = (base + extra) / base  # parameter bytes: an RSS probe needs a model folder
    else:
        ratios["memory_ratio"], detail = memory_probe(args.model, str(dtype).replace("torch.", ""))
        report(rows_out, "peak_rss_base_mb", detail["base"] / 2**20, "MiB")
        report(rows_out, "peak_rss_memgen_mb", detail["memgen"] / 2**20, "MiB")
        # the peak can be set by loading; the resident size after use shows what MemGen's parts add
        report(rows_out, "rss_base_mb", detail["base_now"] / 2**20, "MiB")
        report(rows_out, "rss_memgen_mb", detail["memgen_now"] / 2**20, "MiB",
               ratio=detail["memgen_now"] / detail["base_now"])

    print("\n| figure | value | unit |\n| --- | --- | --- |")
    for name, value, unit in rows_out:
        print(f"| {name} | {value:.4g} | {unit} |")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3g} | ratio |")
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    return ratios


def _hf_batch(prompts, pad_id):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    return ids, mask


if __name__ == "__main__":
    main()
