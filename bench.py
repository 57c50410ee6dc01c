"""
bench.py: is this code fast? Side-by-side timings in one process, reported as ratios.

    python bench.py --model=PATH [--dtype=auto] [--batch_size=8] [--max_new_tokens=256]
    python bench.py --shape=qwen2.5-1.5b --device=cuda   # random weights of a named shape: no download needed
    python bench.py --quick=true         # a small random model built in memory, < 60 s on 2 CPU cores

Figures (each printed as a table row and as one JSON line; the last line holds the headline ratios):
  1. vanilla decode tok/s: ours vs transformers generate (its default cache and, on a GPU, its static cache with
     torch.compile), greedy, batch 1 and BATCH_SIZE, every side warmed up at the measured shapes first
                                                                   -> ours_vs_transformers, ours_vs_transformers_static
     on a GPU also the batch-1 ceiling set by memory bandwidth (weight bytes / a copy bandwidth measured here)
                                                                                             -> bandwidth_fraction_b1
     on a CPU also the same decode with every linear layer on plain F.linear (model.linear's few-rows route off)
                                                                                             -> few_rows_route_speedup
  2. MemGen decode (K=8, N=3, mode always): ours cached vs an official-style decode that drops the reasoner's
     cache and re-runs the weaver over the whole prefix at every insertion; and ours vs our vanilla decode
                                                                               -> memgen_vs_naive, memgen_vs_vanilla
  3. training steps on the same 8 examples (max length 512): the weaver SFT step (our batched cached
     forward+backward) vs the per-example recompute reference (reference.naive_forward, which the tests prove our
     forward equal to) and vs a LoRA-SFT step on the reasoner (the paper's SFT baseline)  -> train_vs_naive, sft_vs_lora
     and, split into rollout and update time, a MemGen-GRPO step and a trigger REINFORCE step, whose rollouts are
     also timed with every row reading its prompt itself (model.shared_prompts off), as is the trigger's update
                           -> grpo_rollout_shared_prompt_speedup (and trigger_...), trigger_update_shared_prompt_speedup
  4. peak resident memory of reasoner + weaver + trigger relative to the base model alone           -> memory_ratio
Decoding ignores EOS here so every run produces exactly MAX_NEW_TOKENS tokens per row. The transformers figures need
requirements-dev.txt. Speed does not depend on the weights' values, so SHAPE measures a model of a real size with
random weights and no files; its synthetic tokenizer decodes every id and ends a token with "," "." or "\n" about
as often as GSM8K text does (every 12th id), so MemGen inserts as it would on real text.
"""
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import data
import errors
import loading
import lora
import memgen
import settings
import training
import model as model_lib
from model import Config, Transformer, generate
from reference import naive_forward, official_style_decode

MODEL = ""  # the model to time: a local Hugging Face folder (Qwen2 or Llama) or a hub id; or SHAPE, or QUICK
SHAPE = ""  # instead of MODEL, random weights on DEVICE: smollm2-135m | qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b
TOKENIZER = ""  # with SHAPE: a tokenizer folder, whose DATA prompts are then used ("" = synthetic ids and prompts)
DATA = "gsm8k"  # the task whose first problems are the prompts (and, for the SFT step, the targets)
DTYPE = "auto"  # auto (bfloat16 on GPUs and on CPUs with native bf16, else float32) | float32 | bfloat16 | float16
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
GRAPHS = "auto"  # decode steps replayed as CUDA graphs: auto (on with CUDA) | true | false (model.py section 6)
BATCH_SIZE = 8  # rows of the batched decode figures
MAX_NEW_TOKENS = 256  # tokens decoded per row (EOS ignored)
SEED = 0  # seeds MemGen's random initialisation (and QUICK's random model and prompts)
QUICK = False  # true: a random 4-layer model built in memory instead of MODEL, under a minute on 2 CPU cores
ONLY = ""  # "" = every figure; "train" = the training figures (3, a few minutes); "rl" = its GRPO / trigger steps;
# "decode" = figures 1-2 only
RL_PROMPTS = 2  # prompts of the GRPO and trigger steps (figure 3), each with RL_GROUP rollouts
RL_GROUP = 4  # rollouts per prompt in the GRPO and trigger steps
RL_NEW_TOKENS = 128  # longest rollout of the GRPO and trigger steps
RL_MICRO_BATCH = 4  # rows per forward/backward of an RL update and of its SFT comparison (the trainers' MICRO_BATCH)
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
    """QUICK and SHAPE: just enough tokenizer for a random model (ids in, ids out). Every id of the model decodes;
    every `every`-th id ends with a delimiter, so MemGen's boundaries come at a chosen rate."""
    eos_ids, pad_id, special_ids = [], 0, set()

    def __init__(self, vocab_size, every=16, delimiters=(b".",), word=b"x"):
        self.vocab_size, self.every, self.delimiters, self.word = vocab_size, every, delimiters, word

    def token_bytes(self, i):
        if i % self.every == 0:
            return self.delimiters[i // self.every % len(self.delimiters)]
        return self.word

    def decode(self, ids, skip_special=False):
        return b"".join(self.token_bytes(i) for i in ids).decode()


# the decoder shapes of the models the paper and this project use (their config.json files), for SHAPE
_LLAMA = dict(arch="llama", qkv_bias=False, rms_eps=1e-5)
_QWEN = dict(arch="qwen2", qkv_bias=True, rms_eps=1e-6, rope_theta=1e6, max_positions=32768)
SHAPES = {
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, intermediate_size=1536, rope_theta=1e5, tie_word_embeddings=True,
                         max_positions=8192),
    "qwen2.5-0.5b": dict(_QWEN, vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, intermediate_size=8960, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, intermediate_size=18944, tie_word_embeddings=False),
}


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
    comp[torch.arange(ids.shape[1], device=ids.device)[None] < prompt_len[:, None]] = False
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
        settings.at_least(cfg, 1, "batch_size", "max_new_tokens", "rl_prompts", "rl_group", "rl_new_tokens",
                          "rl_micro_batch")
        settings.one_of(cfg, "only", ("", "train", "rl", "decode"))
        settings.one_of(cfg, "shape", ("",) + tuple(SHAPES))
        if sum(map(bool, (cfg["quick"], cfg["model"], cfg["shape"]))) != 1:
            raise settings.SettingsError("pass one of --model=PATH (a Hugging Face model folder or a hub id), "
                                         "--shape=NAME (random weights of a named shape) or --quick=true")
        cfg["graphs"] = model_lib.use_graphs(cfg["graphs"], loading.resolve_device(cfg["device"]))
        torch.manual_seed(cfg["seed"])
        setup = quick_setup(cfg) if cfg["quick"] else shape_setup(cfg) if cfg["shape"] else model_setup(cfg)
        setup["graphs"] = cfg["graphs"]
    model = setup["model"]
    print(f"# bench on {machine()}, dtype {str(model.dtype).replace('torch.', '')}, model {model.cfg.name} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), batch {len(setup['prompts'])}, "
          f"{setup['new_tokens']} new tokens" + (f"; RL steps: {cfg['rl_prompts']} prompts x {cfg['rl_group']} "
                                                 f"rollouts of {cfg['rl_new_tokens']} tokens"
                                                 if cfg["only"] != "decode" else ""))
    rows, ratios = [], {}
    if cfg["only"] in ("", "decode"):
        vanilla = decode_figures(setup, rows, ratios)
        mg = memgen_figures(setup, vanilla, rows, ratios)
    else:
        mg = memgen.MemGen(model, setup["tok"]).eval()
    if cfg["only"] in ("", "train"):
        sft_figures(mg, setup, rows, ratios, cfg["profile"])
    if cfg["only"] != "decode":
        rl_figures(mg, setup, cfg, rows, ratios)
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
    """1. Vanilla greedy decode tok/s at batch 1 and BATCH_SIZE: ours, and transformers' with its default cache and
    (on a GPU) its static cache compiled. Every side runs once at the measured shapes before it is timed (graphs are
    recorded, kernels compiled, the allocator grown). Returns ours at BATCH_SIZE, the figure printed."""
    model, tok, prompts, new_tokens = setup["model"], setup["tok"], setup["prompts"], setup["new_tokens"]
    hf = transformers_model(model) if setup.get("compare", True) else None
    cuda = model.device.type == "cuda"
    for bs in sorted({1, len(prompts)}):
        run = lambda: generate(model, tok, prompts[:bs], max_new_tokens=new_tokens, graphs=setup["graphs"])  # noqa
        run()
        ours = bs * new_tokens / best_of(2, run)[0]
        report(rows, f"vanilla_tok_s_b{bs}", ours, "tok/s")
        if bs == 1 and cuda:
            ceiling = copy_bandwidth(model.device) / weight_bytes(model)
            report(rows, "bandwidth_ceiling_tok_s_b1", ceiling, "tok/s")
            ratios["bandwidth_fraction_b1"] = ours / ceiling
        for cache in ("dynamic", "static") if cuda else ("dynamic",):
            theirs = transformers_tok_s(hf, prompts[:bs], tok.pad_id, new_tokens, cache) if hf else None
            if theirs:
                suffix = "" if cache == "dynamic" else "_static"
                report(rows, f"transformers{suffix}_tok_s_b{bs}", theirs, "tok/s")
                ratios[f"ours_vs_transformers{suffix}_b{bs}"] = ours / theirs
    if not cuda:  # model.linear's few-rows route against plain F.linear everywhere, same batch, same run
        few, model_lib.FEW_ROWS = model_lib.FEW_ROWS, 0
        try:
            plain = len(prompts) * new_tokens / best_of(2, run)[0]
        finally:
            model_lib.FEW_ROWS = few
        report(rows, f"vanilla_tok_s_b{len(prompts)}_f_linear", plain, "tok/s")
        ratios["few_rows_route_speedup"] = ours / plain
    return ours


def copy_bandwidth(device, mib=1024):
    """Bytes per second a device-to-device copy moves (read + write): what bounds a batch-1 decode step."""
    x = torch.empty(mib * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    dt, _ = best_of(3, lambda: [y.copy_(x) for _ in range(5)])
    return 2 * 5 * x.numel() * 4 / dt


def weight_bytes(model):
    """Bytes a decode step reads: every weight once (an untied input embedding only by its few rows)."""
    skip = model.model.embed_tokens.weight if model.lm_head is not None else None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not skip)


def best_of(n, fn):
    """(fastest time, result) of n runs: the least disturbed by other work on the machine."""
    runs = [timed(fn) for _ in range(n)]
    return min(runs, key=lambda r: r[0])


def memgen_figures(setup, vanilla, rows, ratios):
    """2. MemGen decode (mode always): ours vs the official-style decode, and vs our vanilla decode."""
    model, tok, prompts, new_tokens = setup["model"], setup["tok"], setup["prompts"], setup["new_tokens"]
    B = len(prompts)
    mg = memgen.MemGen(model, tok).eval()
    run = lambda: memgen.generate(mg, tok, prompts, max_new_tokens=new_tokens, mode="always",  # noqa: E731
                                  graphs=setup["graphs"])
    run()  # at the measured shapes first: the graphs of every weaver width it meets are recorded here
    dt, res = best_of(2, run)
    mem_tok_s = B * new_tokens / dt
    report(rows, "memgen_tok_s", mem_tok_s, "tok/s", insertions_per_row=sum(len(r["insertions"]) for r in res) / B)
    dt_naive, naive_out = timed(lambda: official_style_decode(mg, tok, prompts, new_tokens))
    report(rows, "official_style_memgen_tok_s", B * new_tokens / dt_naive, "tok/s",
           same_tokens=all(r["ids"] == o for r, o in zip(res, naive_out)))
    ratios["memgen_vs_vanilla"] = mem_tok_s / vanilla
    ratios["memgen_vs_naive"] = dt_naive / dt
    return mg


def sft_adapter(model):
    """The reasoner's "sft" LoRA adapter that lora_step trains, added once."""
    if "sft" not in model.lora_meta:
        lora.inject(model, ["sft"])
    for p in lora.parameters(model, "sft").values():
        p.requires_grad_(True)


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
    sft_adapter(model)
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
    if profile:
        profile_steps([("MemGen-SFT", lambda: sft_step(mg, ids, mask, prompt_len, naive=False)),
                       ("LoRA-SFT", lambda: lora_step(model, ids, mask, prompt_len))])


def profile_steps(steps):
    """Where the time goes, operator by operator (backward included): torch.profiler's top operators by self time
    (on a GPU by device time, else host time) for each (name, step)."""
    from torch.profiler import ProfilerActivity, profile as profiler

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, step in steps:
        with profiler(activities=acts) as prof:
            step()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"\n# {name} step: top operators by self time\n"
              + prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


@contextlib.contextmanager
def each_row_reads_its_prompt():
    """memgen with model.shared_prompts off: every row reads its own copy of a repeated prompt (the baseline)."""
    shared, memgen.shared_prompts = memgen.shared_prompts, lambda keys, device: None
    try:
        yield
    finally:
        memgen.shared_prompts = shared


def rl_figures(mg, setup, cfg, rows, ratios):
    """3b. A MemGen-GRPO step and a trigger REINFORCE step, each split into rollouts (sampling with the caches) and
    the update (log-probs of the rollouts with gradients, backward); advantages are random here - the figure is
    about time, not learning. Each update is set against an SFT step over the very same sequences (the MemGen-SFT
    step for GRPO, the LoRA-SFT step for the trigger, whose adapter reads the same tokens): an update costs a
    forward and a backward over those tokens, as the SFT step does. Both run RL_MICRO_BATCH rows at a time, as the
    trainers do (the whole group at once needs memory for every row's logits).  -> grpo_vs_sft, trigger_vs_sft"""
    model, tok, B, G = mg.model, setup["tok"], cfg["rl_prompts"], cfg["rl_group"]
    sft_adapter(model)
    prompts = [p for p in setup["prompts"][:B] for _ in range(G)]
    adv = torch.randn(len(prompts), generator=torch.Generator().manual_seed(cfg["seed"])).to(model.device)
    for mode, name in (("always", "grpo"), ("learned", "trigger")):
        roll = lambda: memgen.generate(mg, tok, prompts, cfg["rl_new_tokens"], temperature=1.0,  # noqa: E731
                                       seed=cfg["seed"], mode=mode, trigger_sample=True, graphs=cfg["graphs"])
        roll()  # at the measured shapes first, as every timed figure here
        dt_roll, outs = timed(roll)
        with each_row_reads_its_prompt():
            dt_each, _ = timed(roll)
        ratios[f"{name}_rollout_shared_prompt_speedup"] = dt_each / dt_roll
        completions = [o["ids"] for o in outs]
        parts = training.chunks(list(range(len(outs))), cfg["rl_micro_batch"])
        n_tokens = sum(map(len, completions))

        def update():  # what train_weaver.grpo_step / train_trigger.trigger_step do after their rollouts
            for idx in parts:
                p, c, a = [prompts[i] for i in idx], [completions[i] for i in idx], adv[idx]
                if mode == "learned":
                    dlogp, dmask = memgen.trigger_logprobs(mg, p, c, [outs[i]["decisions"] for i in idx], tok.pad_id)
                    (-(a * (dlogp * dmask).sum(1)).sum() / len(outs)).backward()
                else:
                    logp, cmask, _, _ = memgen.logprobs(mg, p, c, [outs[i]["insertions"] for i in idx],
                                                        pad_id=tok.pad_id)
                    (-(a[:, None] * logp * cmask).sum() / n_tokens).backward()

        ids, mask, plen = memgen.right_pad(prompts, completions, tok.pad_id, model.device)

        def same():  # the SFT step over the same rows, in the same parts
            for idx in parts:
                if mode == "always":
                    sft_step(mg, ids[idx], mask[idx], plen[idx], naive=False)
                else:
                    lora_step(model, ids[idx], mask[idx], plen[idx])
        update(), same()  # warm-up
        dt_up, _ = best_of(2, update)
        dt_same, _ = best_of(2, same)
        if mode == "learned":  # the trigger's update also reads each shared prompt once (trigger_forward_shared)
            with each_row_reads_its_prompt():
                dt_up_each, _ = best_of(2, update)
            ratios["trigger_update_shared_prompt_speedup"] = dt_up_each / dt_up
        report(rows, f"{name}_rollout_s", dt_roll, "s", rollouts=len(outs), tokens=sum(map(len, completions)))
        report(rows, f"{name}_update_s", dt_up, "s", share_of_step=round(dt_up / (dt_roll + dt_up), 3),
               tokens=int(mask.sum()))
        report(rows, f"{name}_same_tokens_sft_s", dt_same, "s")
        ratios[f"{name}_vs_sft"] = dt_up / dt_same
        if cfg["profile"] and mode == "always":
            profile_steps([("GRPO update", update), ("MemGen-SFT, same tokens", same)])


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
                sft_examples=(seqs, [60 + 5 * b for b in range(8)]), compare=False)


def random_model(shape, dtype, device, seed):
    """A Transformer of a named shape with random weights, built straight on the device in its dtype. Weights
    ~ N(0, 0.02) (norms 1), as such models are initialised, so activations stay finite in bfloat16 over 28 layers."""
    cfg = Config(name=f"{shape} (random weights)", **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.init_rope(device)
    return model.requires_grad_(False).eval()


def shape_setup(cfg):
    """SHAPE: random weights of a real model's shape; with TOKENIZER the first test prompts and training examples of
    DATA, else synthetic ones of GSM8K's lengths (prompts of about 100-160 tokens; 8 SFT examples of about 1,800
    tokens together, as bench's GSM8K examples)."""
    device = loading.resolve_device(cfg["device"])
    dtype = model_lib.pick_dtype(cfg["dtype"], device)
    model = random_model(cfg["shape"], dtype, device, cfg["seed"])
    if cfg["tokenizer"]:
        from tokenizer import load_tokenizer

        tok = load_tokenizer(cfg["tokenizer"])
        return dict(task_examples(tok, cfg), model=model, tok=NoEos(tok), new_tokens=cfg["max_new_tokens"])
    tok = RandomTokenizer(model.cfg.vocab_size, every=12, delimiters=(b".", b",", b"\n"), word=b" w")
    g = torch.Generator().manual_seed(cfg["seed"])
    ids = lambda n: torch.randint(1, model.cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(100 + 37 * b % 60) for b in range(cfg["batch_size"])]
    seqs, plen = [ids(180 + 13 * b) for b in range(8)], [90 + 7 * b for b in range(8)]
    return dict(model=model, tok=tok, prompts=prompts, new_tokens=cfg["max_new_tokens"], sft_examples=(seqs, plen))


def task_examples(tok, cfg):
    """The first BATCH_SIZE test prompts of DATA and its first 8 training examples (prompt + target, cut at 512
    tokens) for the SFT step."""
    task = data.get_task(cfg["data"])
    prompts = [tok.chat(task.messages(r)) for r in task.load("test")[:cfg["batch_size"]]]
    seqs, plen = [], []
    for r in task.load("train")[:8]:
        p = tok.chat(task.messages(r))
        seqs.append((p + tok.encode(r["target"]) + [tok.end_id])[:_SFT_LEN])
        plen.append(len(p))
    return dict(prompts=prompts, sft_examples=(seqs, plen))


def model_setup(cfg):
    """MODEL (a hub id is downloaded once) and DATA's prompts and training examples (task_examples)."""
    from data.download import resolve_model

    folder = resolve_model(cfg["model"])
    model, tok = loading.load_base(folder, cfg["dtype"], loading.resolve_device(cfg["device"]))
    return dict(task_examples(tok, cfg), model=model, tok=NoEos(tok), new_tokens=cfg["max_new_tokens"],
                folder=folder)


def transformers_model(model):
    """transformers' model class of the same architecture, holding our very weight tensors (no second copy), or None
    when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        print("# transformers not installed: skipping the transformers comparison")
        return None
    c = model.cfg
    kind = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[c.arch]
    extra = {} if c.arch == "qwen2" else dict(attention_bias=c.qkv_bias, head_dim=c.head_dim)
    config = kind[0](vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                     num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                     intermediate_size=c.intermediate_size, rope_theta=c.rope_theta, rms_norm_eps=c.rms_eps,
                     tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_positions, **extra)
    with torch.device(model.device):
        hf = kind[1](config).to(model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    hf.load_state_dict(state, strict=False, assign=True)
    if c.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


def transformers_tok_s(hf, prompts, pad_id, new_tokens, cache="dynamic"):
    """Greedy tok/s of transformers' generate on the same prompts: its default cache, or ("static", on a GPU) its
    static cache, with which generate compiles the forward by itself (torch.compile; transformers' auto-compile)."""
    ids, mask = _hf_batch(prompts, pad_id)
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id, eos_token_id=None)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        hf.generate(ids, **kw)  # at the measured shapes first: compiled kernels, caches and allocator are ready
        dt, _ = best_of(2, lambda: hf.generate(ids, **kw))
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
