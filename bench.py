"""
bench.py: is this code fast? Side-by-side timings in one process, reported as ratios.

    python bench.py --model=PATH [--dtype=auto] [--batch_size=8] [--max_new_tokens=256]
    python bench.py --quick=true         # a small random model built in memory, < 60 s on 2 CPU cores

Figures (each printed as a table row and as one JSON line; the last line holds the headline ratios):
  1. vanilla decode tok/s: ours vs transformers generate, greedy, batch 1 and BATCH_SIZE    -> ours_vs_transformers
  2. MemGen decode (K=8, N=3, mode always): ours cached vs an official-style decode that drops the reasoner's
     cache and re-runs the weaver over the whole prefix at every insertion; and ours vs our vanilla decode
                                                                               -> memgen_vs_naive, memgen_vs_vanilla
  3. training steps on the same 8 examples (max length 512): the weaver SFT step (our batched cached
     forward+backward) vs the per-example recompute reference (reference.naive_forward, which the tests prove our
     forward equal to) and vs a LoRA-SFT step on the reasoner (the paper's SFT baseline)  -> train_vs_naive, sft_vs_lora
     and, split into rollout and update time, a MemGen-GRPO step and a trigger REINFORCE step
  4. peak resident memory of reasoner + weaver + trigger relative to the base model alone           -> memory_ratio
Decoding ignores EOS here so every run produces exactly MAX_NEW_TOKENS tokens per row. Needs requirements-dev.txt
(transformers, for figure 1).
"""
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import data
import loading
import lora
import memgen
import settings
import training
from model import Config, Transformer, generate
from reference import naive_forward, official_style_decode
import errors

MODEL = ""  # the model to time: a local Hugging Face folder (Qwen2 or Llama) or a hub id; required unless QUICK
DATA = "gsm8k"  # the task whose first problems are the prompts (and, for the SFT step, the targets)
DTYPE = "auto"  # auto (bfloat16 on GPUs and on CPUs with native bf16, else float32) | float32 | bfloat16 | float16
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
BATCH_SIZE = 8  # rows of the batched decode figures
MAX_NEW_TOKENS = 256  # tokens decoded per row (EOS ignored)
SEED = 0  # seeds MemGen's random initialisation (and QUICK's random model and prompts)
QUICK = False  # true: a random 4-layer model built in memory instead of MODEL, under a minute on 2 CPU cores
ONLY = ""  # "" = every figure; "train" = the training figures only (3, a few minutes); "decode" = figures 1-2 only
RL_PROMPTS = 2  # prompts of the GRPO and trigger steps (figure 3), each with RL_GROUP rollouts
RL_GROUP = 4  # rollouts per prompt in the GRPO and trigger steps
RL_NEW_TOKENS = 128  # longest rollout of the GRPO and trigger steps
PROFILE = False  # true: also print torch.profiler's top operators of one MemGen-SFT step and one LoRA-SFT step
# -----------------------------------------------------------------------------
_PROG = "bench.py"
_SFT_LEN = 512  # longest SFT example of figure 3, in tokens
_QUICK = dict(new_tokens=128, sft_len=256)  # QUICK's lengths


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
    predicts = torch.zeros_like(comp)
    predicts[:, :-1] = comp[:, 1:]  # hidden[t] predicts token t+1, a completion token
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    if naive:
        total = 0
        for b in range(len(ids)):
            L = int(mask[b].sum())
            h = naive_forward(mg, ids[b, :L], int(prompt_len[b]), [int(p) for p in points[b] if p >= 0])
            sel = predicts[b, :L]
            loss = F.cross_entropy(model.head(h[sel]).float(), ids[b, :L].roll(-1)[sel], reduction="sum")
            (loss / predicts.sum()).backward()
            total += loss.item()
        return total / predicts.sum().item()
    h = memgen.teacher_forced(mg, ids, mask, prompt_len, points)
    logits = model.head(h[predicts]).float()
    loss = F.cross_entropy(logits, ids.roll(-1, 1)[predicts])
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
    """Run every figure; returns the headline ratios."""
    with errors.one_line_errors(_PROG):
        cfg, _ = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
        settings.at_least(cfg, 1, "batch_size", "max_new_tokens", "rl_prompts", "rl_group", "rl_new_tokens")
        settings.one_of(cfg, "only", ("", "train", "decode"))
        if not cfg["quick"] and not cfg["model"]:
            raise settings.SettingsError("pass --model=PATH (a Hugging Face model folder or a hub id), or "
                                         "--quick=true for a random model built in memory")
        torch.manual_seed(cfg["seed"])
        setup = quick_setup(cfg) if cfg["quick"] else model_setup(cfg)
    model = setup["model"]
    print(f"# bench on {machine()}, dtype {str(model.dtype).replace('torch.', '')}, model {model.cfg.name} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), batch {len(setup['prompts'])}, "
          f"{setup['new_tokens']} new tokens")
    rows, ratios = [], {}
    if cfg["only"] != "train":
        vanilla = decode_figures(setup, rows, ratios)
        mg = memgen_figures(setup, vanilla, rows, ratios)
    else:
        mg = memgen.MemGen(model, setup["tok"]).eval()
    if cfg["only"] != "decode":
        sft_figures(mg, setup, rows, ratios, cfg["profile"])
        rl_figures(mg, setup, cfg, rows)
    if not cfg["only"]:
        memory_figures(mg, setup, rows, ratios)
    print("\n| figure | value | unit |\n| --- | --- | --- |")
    for name, value, unit in rows:
        print(f"| {name} | {value:.4g} | {unit} |")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3g} | ratio |")
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    return ratios


def decode_figures(setup, rows, ratios):
    """1. Vanilla greedy decode tok/s at batch 1 and BATCH_SIZE, ours and (with a model folder) transformers'.
    Returns ours at BATCH_SIZE."""
    model, tok, prompts, new_tokens = setup["model"], setup["tok"], setup["prompts"], setup["new_tokens"]
    generate(model, tok, prompts[:1], max_new_tokens=4)  # warm-up
    for bs in sorted({1, len(prompts)}):
        dt, _ = timed(lambda: generate(model, tok, prompts[:bs], max_new_tokens=new_tokens))
        ours = bs * new_tokens / dt
        report(rows, f"vanilla_tok_s_b{bs}", ours, "tok/s")
        theirs = transformers_tok_s(setup["folder"], model, tok, prompts[:bs], new_tokens) if "folder" in setup \
            else None
        if theirs:
            report(rows, f"transformers_tok_s_b{bs}", theirs, "tok/s")
            ratios[f"ours_vs_transformers_b{bs}"] = ours / theirs
    return len(prompts) * new_tokens / timed(lambda: generate(model, tok, prompts, max_new_tokens=new_tokens))[0]


def best_of(n, fn):
    """(fastest time, result) of n runs: the least disturbed by other work on the machine."""
    runs = [timed(fn) for _ in range(n)]
    return min(runs, key=lambda r: r[0])


def memgen_figures(setup, vanilla, rows, ratios):
    """2. MemGen decode (mode always): ours vs the official-style decode, and vs our vanilla decode."""
    model, tok, prompts, new_tokens = setup["model"], setup["tok"], setup["prompts"], setup["new_tokens"]
    B = len(prompts)
    mg = memgen.MemGen(model, tok).eval()
    dt, res = timed(lambda: memgen.generate(mg, tok, prompts, max_new_tokens=new_tokens, mode="always"))
    mem_tok_s = B * new_tokens / dt
    report(rows, "memgen_tok_s", mem_tok_s, "tok/s", insertions_per_row=sum(len(r["insertions"]) for r in res) / B)
    dt_naive, naive_out = timed(lambda: official_style_decode(mg, tok, prompts, new_tokens))
    report(rows, "official_style_memgen_tok_s", B * new_tokens / dt_naive, "tok/s",
           same_tokens=all(r["ids"] == o for r, o in zip(res, naive_out)))
    ratios["memgen_vs_vanilla"] = mem_tok_s / vanilla
    ratios["memgen_vs_naive"] = dt_naive / dt
    return mg


def lora_step(model, ids, mask, prompt_len):
    """One LoRA-SFT step on the same batch: the reasoner with an "sft" adapter, forward + backward."""
    params = list(lora.parameters(model, "sft").values())
    for p in params:
        p.grad = None
    h = training.adapter_hidden(model, ids, mask, "sft")  # packed, as train_weaver.py's LoRA-SFT
    total, n = training.completion_nll(model, h, ids, mask, prompt_len, model.cfg.vocab_size)
    (total / n).backward()
    return total.item() / n


def sft_figures(mg, setup, rows, ratios, profile=False):
    """3. One weaver SFT step (forward + backward), ours batched vs the per-example recompute reference and vs a
    LoRA-SFT step on the same batch (best of 2 runs each, the reference once: it is slow)."""
    model = mg.model
    seqs, plen = setup["sft_examples"]
    ids, mask, prompt_len = memgen.right_pad([s[:p] for s, p in zip(seqs, plen)], [s[p:] for s, p in zip(seqs, plen)],
                                             setup["tok"].pad_id, model.device)
    if "sft" not in model.lora_meta:
        lora.inject(model, ["sft"])
    for p in lora.parameters(model, "sft").values():
        p.requires_grad_(True)
    mg.eval()  # dropout off so both paths compute the same function
    sft_step(mg, ids, mask, prompt_len, naive=False)  # warm-up at the measured shapes (the first call at a new
    lora_step(model, ids, mask, prompt_len)  # shape is up to 2x slower on CPU: the allocator grows its pools)
    dt_ours, loss_ours = best_of(2, lambda: sft_step(mg, ids, mask, prompt_len, naive=False))
    dt_lora, loss_lora = best_of(2, lambda: lora_step(model, ids, mask, prompt_len))
    dt_ref, loss_ref = timed(lambda: sft_step(mg, ids, mask, prompt_len, naive=True))
    report(rows, "sft_step_s", dt_ours, "s", loss=loss_ours, tokens=int(mask.sum()))
    report(rows, "sft_lora_step_s", dt_lora, "s", loss=loss_lora)
    report(rows, "naive_step_s", dt_ref, "s", loss=loss_ref)
    ratios["train_vs_naive"] = dt_ref / dt_ours
    ratios["sft_vs_lora"] = dt_ours / dt_lora
    if profile:  # where the time goes, operator by operator (backward included)
        from torch.profiler import ProfilerActivity, profile as profiler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        for name, step in (("MemGen-SFT", lambda: sft_step(mg, ids, mask, prompt_len, naive=False)),
                           ("LoRA-SFT", lambda: lora_step(model, ids, mask, prompt_len))):
            with profiler(activities=acts) as prof:
                step()
            print(f"\n# {name} step: top operators by self time\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


def rl_figures(mg, setup, cfg, rows):
    """3b. A MemGen-GRPO step and a trigger REINFORCE step, each split into rollouts (sampling with the caches) and
    the update (log-probs of the rollouts with gradients, backward); advantages are random here - the figure is
    about time, not learning."""
    tok, B, G = setup["tok"], cfg["rl_prompts"], cfg["rl_group"]
    prompts = [p for p in setup["prompts"][:B] for _ in range(G)]
    adv = torch.randn(len(prompts), generator=torch.Generator().manual_seed(cfg["seed"])).to(mg.model.device)
    for mode, name in (("always", "grpo"), ("learned", "trigger")):
        dt_roll, outs = timed(lambda: memgen.generate(mg, tok, prompts, cfg["rl_new_tokens"], temperature=1.0,
                                                      seed=cfg["seed"], mode=mode, trigger_sample=True))

        def update():  # what train_weaver.grpo_step / train_trigger.trigger_step do after their rollouts
            completions = [o["ids"] for o in outs]
            if mode == "learned":
                dlogp, dmask = memgen.trigger_logprobs(mg, prompts, completions, [o["decisions"] for o in outs],
                                                       tok.pad_id)
                (-(adv * (dlogp * dmask).sum(1)).sum() / len(outs)).backward()
            else:
                logp, cmask, _, _ = memgen.logprobs(mg, prompts, completions, [o["insertions"] for o in outs],
                                                    pad_id=tok.pad_id)
                (-(adv[:, None] * logp * cmask).sum() / cmask.sum()).backward()

        dt_up, _ = timed(update)
        tokens = sum(len(o["ids"]) for o in outs)
        report(rows, f"{name}_rollout_s", dt_roll, "s", rollouts=len(outs), tokens=tokens)
        report(rows, f"{name}_update_s", dt_up, "s", share_of_step=round(dt_up / (dt_roll + dt_up), 3))


def memory_figures(mg, setup, rows, ratios):
    """4. Memory of MemGen relative to the base model: peak and resident RSS in a fresh process (model folder),
    or parameter bytes (QUICK, no folder to load)."""
    model = setup["model"]
    if "folder" not in setup:
        base = sum(t.numel() * t.element_size() for t in model.parameters())
        extra = sum(t.numel() * t.element_size() for part in ("weaver", "trigger") for t in mg.trainable(part).values())
        ratios["memory_ratio"] = (base + extra) / base
        return
    ratios["memory_ratio"], detail = memory_probe(setup["folder"], str(model.dtype).replace("torch.", ""))
    report(rows, "peak_rss_base_mb", detail["base"] / 2**20, "MiB")
    report(rows, "peak_rss_memgen_mb", detail["memgen"] / 2**20, "MiB")
    # the peak can be set by loading; the resident size after use shows what MemGen's parts add
    report(rows, "rss_base_mb", detail["base_now"] / 2**20, "MiB")
    report(rows, "rss_memgen_mb", detail["memgen_now"] / 2**20, "MiB", ratio=detail["memgen_now"] / detail["base_now"])


def quick_setup(cfg):
    """QUICK: a random 4-layer Llama built in memory (float32), random prompts and SFT sequences."""
    mcfg = Config(arch="llama", vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, intermediate_size=512, rope_theta=10000.0, rms_eps=1e-5, tie_word_embeddings=False,
                  qkv_bias=False, max_positions=2048, name="random")
    model = Transformer(mcfg).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(cfg["seed"])
    prompts = [torch.randint(1, mcfg.vocab_size, (40 + 7 * b,), generator=g).tolist() for b in range(cfg["batch_size"])]
    n = _QUICK["sft_len"]
    seqs = [torch.randint(1, mcfg.vocab_size, (n - 13 * b,), generator=g).tolist() for b in range(8)]
    return dict(model=model, tok=RandomTokenizer(mcfg.vocab_size), prompts=prompts, new_tokens=_QUICK["new_tokens"],
                sft_examples=(seqs, [60 + 5 * b for b in range(8)]))


def model_setup(cfg):
    """MODEL (a hub id is downloaded once), the first BATCH_SIZE test prompts of DATA, and its first 8 training
    examples (prompt + target, cut at 512 tokens) for the SFT step."""
    from data.download import resolve_model

    folder = resolve_model(cfg["model"])
    model, tok = loading.load_base(folder, cfg["dtype"], loading.resolve_device(cfg["device"]))
    tok = NoEos(tok)
    task = data.get_task(cfg["data"])
    prompts = [tok.chat(task.messages(r)) for r in task.load("test")[:cfg["batch_size"]]]
    seqs, plen = [], []
    for r in task.load("train")[:8]:
        p = tok.chat(task.messages(r))
        seqs.append((p + tok.encode(r["target"]) + [tok.end_id])[:_SFT_LEN])
        plen.append(len(p))
    return dict(model=model, tok=tok, prompts=prompts, new_tokens=cfg["max_new_tokens"], sft_examples=(seqs, plen),
                folder=folder)


def transformers_tok_s(folder, model, tok, prompts, new_tokens):
    """Greedy tok/s of transformers' generate on the same prompts (None when transformers is not installed)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("# transformers not installed: skipping the transformers comparison")
        return None
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    ids, mask = _hf_batch(prompts, tok.pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        hf.generate(ids[:1, -8:], max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
        dt, _ = timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_id))
    return len(prompts) * new_tokens / dt


def _hf_batch(prompts, pad_id):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    return ids, mask


if __name__ == "__main__":
    main()
