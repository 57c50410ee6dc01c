"""
ablate.py: a grid of named variants trained on one model with identical data, seeds and budget, measured with cheap,
continuous metrics, so an ablation shows a signal on a CPU where pass@1 would read 0 everywhere.

    python ablate.py --model=FOLDER                          # the whole grid (VARIANTS below), out/ablate-default/
    python ablate.py --model=FOLDER --only=vanilla,sft-lora,memgen --steps=300 --name=core
    python ablate.py --quick=true                            # a tiny random model built in memory, < 1 minute
    python ablate.py --model=FOLDER --only=sft-lora,memgen --seeds=42,43,44   # one grid per seed + seeds.md

Each variant is a set of overrides of the MemGen / training constants (the VARIANTS table: edit it to add one).
Every EVAL_EVERY steps (and at step 0) each variant is measured the same way:
  in_nll       held-out answer NLL on the task (DATA's validation split), teacher-forced, with MemGen's latents
               inserted where the variant inserts them
  ood_nll      out-of-domain NLL: HumanEval canonical function bodies given their prompt and signature (code the
               model was not trained on; the paper's forgetting claim: LoRA-SFT degrades other domains, MemGen not)
  insertions   inference insertions per held-out example (teacher-forced points; from decoding when PASS_LIMIT > 0)
  pass@1       greedy accuracy on the first PASS_LIMIT test problems, at the end only (0 = skipped)
Retrieval variants (memgen-fused, memorybank) retrieve the MEMORY_TOP_K nearest training examples from a
MemoryBank (memory.py) built once per grid from DATA's training split (gold solutions) in out/ablate-<name>/memorybank/;
memgen-fused gives their text to the weaver only, in front of the prompt (memgen.weaver_context), memorybank puts it
in the reasoner's prompt as eval.py --mode=memorybank does. A problem never retrieves itself.
out/ablate-<name>/results.jsonl gets one line per variant and eval point as they finish (a killed grid resumes:
finished variants are skipped, a variant in progress continues from its last saved step), results.md the table,
nll_vs_step.png / in_vs_ood.png the plots (matplotlib, a dev-only dependency), and adapters/<variant>/ each trained
variant's adapters (for eval.py and show.py --adapter). With --seeds each seed's grid goes to seed-S/ and
seeds.md / seeds.json / seeds_in_vs_ood.png give each variant's mean, spread and per-seed values, and the paired
differences between variants seed by seed.
"""
import json
import math
import os
import shutil
import statistics
import sys
import time
import types

import torch

import data
import errors
import evaluation
import lora
import loading
import memgen
import memory
import settings
import training
from files import pyplot, save_figure, write_atomic

MODEL = ""  # the model folder (or hub id) every variant trains on; not needed with --quick=true
DATA = "gsm8k"  # the training task and in-domain metric (data.get_task); its validation split gives in_nll
OOD_DATA = "humaneval"  # the out-of-domain task for ood_nll ("" = skip); HumanEval: canonical bodies
NAME = "default"  # the grid's name: results go to out/ablate-<name>/ (or --out_dir)
OUT_DIR = ""  # "" = out/ablate-<name>
ONLY = ""  # comma-separated variants to run, in this order ("" = all of VARIANTS)
STEPS = 300  # optimizer steps per trained variant (the same budget for all)
BATCH_SIZE = 4  # examples per optimizer step
MICRO_BATCH = 4  # rows per forward/backward
LR = 1e-4  # peak learning rate (higher than the paper's 1e-5 so a few hundred CPU steps show a signal)
WARMUP = 0.1  # fraction of the steps with a linear warm-up, then cosine decay to 0
GRAD_CLIP = 1.0  # global gradient-norm clip (0 = none)
EVAL_EVERY = 50  # measure every this many steps (and at steps 0 and STEPS)
SAVE_EVERY = 10  # also keep the training state every this many steps: a killed run loses at most these
VAL_SIZE = 32  # held-out problems for in_nll
OOD_SIZE = 32  # out-of-domain problems for ood_nll
PASS_LIMIT = 0  # greedy pass@1 on the first PASS_LIMIT test problems at the end (0 = skip; slow on a CPU)
MAX_NEW_TOKENS = 256  # longest completion for pass@1
MAX_LEN = 512  # prompt + target tokens of a training or NLL example (targets are cut)
SEED = 42  # the same for every variant: same batches, same initial adapters where shapes agree
SEEDS = ""  # comma-separated seeds: one grid per seed in OUT_DIR/seed-S/ and seeds.md ("" = one grid at SEED)
# (seeds.md / seeds.json: each variant's mean, spread and per-seed values, and paired differences between variants)
DTYPE = "auto"  # auto | float32 | bfloat16 | float16
DEVICE = "auto"  # auto | cpu | cuda
QUICK = False  # a tiny random model and synthetic tasks built in memory: the whole grid in under a minute
PLOTS = True  # draw the PNG plots (needs matplotlib)
PROGRESS = True  # show progress bars
MEMORY_TOP_K = 3  # retrieval variants: nearest training examples per problem (eval.py's default)
MEMORY_BUDGET = 768  # retrieval variants: most tokens of retrieved text per problem (eval.py's default)
MEMORY_LIMIT = 0  # retrieval variants: the MemoryBank holds the first this many training problems (0 = all)
# (SmolLM2-135M embeds 256 GSM8K problems in about 80 s on 2 CPU cores: all 7,473 in about 40 minutes)

# name -> what differs from the paper's MemGen-SFT (method "sft", K = memgen.K, N = memgen.N, trigger "always",
# boundary "official", latent_init "paper"). method "none" = the untrained base model, "sft-lora" = the SFT baseline.
VARIANTS = {
    "vanilla": dict(method="none"),
    "sft-lora": dict(method="sft-lora"),
    "memgen": dict(),
    "memgen-k2": dict(k=2),
    "memgen-k16": dict(k=16),
    "memgen-n0": dict(n=0),  # the prompt insertion only
    "memgen-n1": dict(n=1),
    "memgen-n5": dict(n=5),
    "memgen-trigger-random": dict(trigger="random"),  # each insertion point kept with p = 0.5, in training and eval
    "memgen-boundary-sentence": dict(boundary="sentence"),  # no insertion inside 3.5 or 1,000
    "memgen-init-small": dict(latent_init="embedding"),  # first latents at the token-embedding scale
    # retrieval fused into the weaver (the paper's framework figure): retrieved examples read by the weaver only
    "memgen-fused": dict(retrieval="weaver"),
    "memorybank": dict(method="none", retrieval="prompt"),  # the untrained base with retrieved examples in its prompt
}
_DEFAULTS = dict(method="sft", k=memgen.K, n=memgen.N, trigger="always", boundary=memgen.BOUNDARY,
                 latent_init=memgen.LATENT_INIT, retrieval="none")
_PROG = "ablate.py"


def variant(name):
    if name not in VARIANTS:
        raise settings.SettingsError(f"unknown variant {name!r} in --only; the grid has {', '.join(VARIANTS)}")
    v = dict(_DEFAULTS, **VARIANTS[name])
    if v["retrieval"] == "weaver" and v["method"] != "sft":
        raise settings.SettingsError(f"variant {name}: retrieval into the weaver needs a MemGen (method sft)")
    return v


# -----------------------------------------------------------------------------
# the policy of a variant, and its loss


def build(v, model, tok, seed):
    """(policy, trainable params): a MemGen, the model with an "sft" LoRA, or the bare model (method none)."""
    torch.manual_seed(seed)
    if v["method"] == "none":
        return model, []
    if v["method"] == "sft-lora":
        if "sft" not in getattr(model, "lora_meta", {}):
            lora.inject(model, ["sft"])
        return model, list(lora.parameters(model, "sft").values())
    mg = memgen.MemGen(model, tok, k=v["k"], n=v["n"], boundary=v["boundary"], latent_init=v["latent_init"])
    return mg, list(mg.trainable("weaver").values())


def points_for(policy, v, ids, mask, prompt_len, generator):
    """The insertion points of a batch under the variant: the paper's (prompt end + first N boundaries), with each
    inference point kept with p = 0.5 when the trigger is "random"."""
    points = memgen.insertion_points(policy, ids, mask, prompt_len)
    if v["trigger"] == "random" and points.shape[1] > 1:
        drop = torch.rand(points[:, 1:].shape, generator=generator) < 0.5
        inner = torch.where(drop.to(points.device), -1, points[:, 1:])
        inner = torch.where(inner < 0, ids.shape[1] + 1, inner).sort(1).values  # kept points first, in order
        points[:, 1:] = torch.where(inner > ids.shape[1], -1, inner)
    return points


def nll(policy, v, model, examples, pad_id, vocab, generator):
    """(summed completion-token NLL, tokens, inference insertions) of examples under the variant's policy."""
    ids, mask, prompt_len = memgen.right_pad([e["prompt"] for e in examples], [e["completion"] for e in examples],
                                             pad_id, model.device)
    inserted = 0
    if isinstance(policy, memgen.MemGen):
        points = points_for(policy, v, ids, mask, prompt_len, generator)
        inserted = int((points[:, 1:] >= 0).sum())
        context = [e["context"] for e in examples] if v["retrieval"] == "weaver" else None
        h = memgen.teacher_forced(policy, ids, mask, prompt_len, points, context)
    else:
        h = training.adapter_hidden(model, ids, mask, "sft" if v["method"] == "sft-lora" else None)
    return (*training.completion_nll(model, h, ids, mask, prompt_len, vocab), inserted)


@torch.no_grad()
def measure(policy, v, model, tok, sets, cfg):
    """{metric: value} on the fixed evaluation sets; the random trigger draws the same points at every eval."""
    was = policy.training
    policy.eval()
    out, vocab = {}, min(tok.vocab_size, model.cfg.vocab_size)
    for key, examples in sets.items():
        g = torch.Generator().manual_seed(cfg["seed"] + 7)
        s = n = ins = 0
        for part in training.chunks(examples, cfg["micro_batch"]):
            a, b, c = nll(policy, v, model, part, tok.pad_id, vocab, g)
            s, n, ins = s + a.item(), n + b, ins + c
        out[f"{key}_nll"] = round(s / max(n, 1), 5)
        if key == "in":
            out["insertions"] = round(ins / max(len(examples), 1), 3)
    policy.train(was)
    return out


# -----------------------------------------------------------------------------
# data: training and held-out examples, and the out-of-domain set


def examples(cfg, task, ood, tok):
    train_rows = task.load("train")
    train, _ = training.encode_examples(train_rows, tok, task, cfg["max_len"])
    val, _ = training.encode_examples(task.load("val")[:cfg["val_size"]], tok, task, cfg["max_len"])
    sets = {"in": val}
    if ood is not None:
        sets["ood"] = ood_examples(ood, ood.load("test")[:cfg["ood_size"]], tok, cfg["max_len"])
    if len(train) < cfg["batch_size"] or not val:
        raise training.TrainError(f"--data={cfg['data']} gives {len(train)} training and {len(val)} validation "
                                  "examples: too few for this grid (lower --batch_size or use more rows)")
    return train, sets


def ood_examples(task, rows, tok, max_len):
    """Prompt + completion ids for the OOD NLL. A code row (HumanEval: prompt, entry point, target = the prompt and
    the canonical body in a python block): the prompt, the block's opening and the signature are the context, the
    function body is scored. Other tasks: their SFT target."""
    out = []
    for r in rows:
        prompt = tok.chat(task.messages(r))
        if "entry_point" in r and r["target"].startswith("```python\n" + r["prompt"]):
            head = "```python\n" + r["prompt"]
            prompt, body = prompt + tok.encode(head), r["target"][len(head):]
        else:
            body = r["target"]
        completion = tok.encode(body) + [tok.end_id]
        if len(prompt) < max_len:
            out.append(dict(r, prompt=prompt, completion=completion[:max_len - len(prompt)]))
    return out


# -----------------------------------------------------------------------------
# retrieval variants: a MemoryBank of the training split, read by the weaver or put in the prompt


def retrieval_memory(cfg, out_dir, task, model, tok):
    """The grid's MemoryBank of DATA's training split (gold solutions; its first MEMORY_LIMIT problems), built once
    in out_dir/memorybank (a killed build resumes) with the base model, loaded for this variant's model."""
    path = os.path.join(out_dir, "memorybank")
    unused = dict(attempts=1, temperature=0.0, top_p=1.0, max_new_tokens=1, induce_max_new_tokens=1, shown_tokens=1,
                  success_group=0, max_rules=1, workflow_group=1)  # settings of the other memory kinds
    rows = task.load("train")
    memory.build(path, task, rows[:cfg["memory_limit"]] if cfg["memory_limit"] else rows, model, tok,
                 dict(unused, kind="memorybank", data=cfg["data"], model=cfg["model"] or "quick",
                      limit=cfg["memory_limit"],
                      memory_source="gold", chunk=256, seed=0, dtype=cfg["dtype"], batch_size=16),
                 progress=cfg["progress"])
    return memory.load(path, model, tok, top_k=cfg["memory_top_k"])


def with_retrieval(v, cfg, mem, tok, rows):
    """(example, task) -> the example with the variant's retrieval: "weaver" adds context (the retrieved examples'
    text as token ids, for the weaver only); "prompt" puts the text in front of the user message of the reasoner's
    prompt (a code prompt keeps what ood_examples appended after the chat part). The completion stays as it was, so
    every variant scores the same tokens. rows: the tasks' rows the examples were made from (an example's "prompt"
    holds ids, a HumanEval row's its text). Retrieval runs once per problem."""
    done, row = {}, {(task.NAME, str(r["id"])): r for task, part in rows for r in part}

    def attach(e, task):
        key = (task.NAME, str(e["id"]))
        if key not in done:
            done[key] = memory.augment(mem, task, row[key], tok, cfg["memory_budget"])[0]
        messages, own = done[key], task.messages(row[key])
        if v["retrieval"] == "weaver":
            text = messages[0]["content"][:len(messages[0]["content"]) - len(own[0]["content"])]
            return dict(e, context=tok.encode(text))
        return dict(e, prompt=tok.chat(messages) + e["prompt"][len(tok.chat(own)):])

    return attach


# -----------------------------------------------------------------------------
# one variant: train (resumable at every eval point) and measure


def run_variant(name, cfg, load, results, out_dir):
    v = variant(name)
    model, tok, task, ood = load()
    train, sets = examples(cfg, task, ood, tok)
    attach = lambda e, t: e  # noqa: E731
    if v["retrieval"] != "none":  # the memory is built and queried with the base model, before any adapter exists
        rows = [(task, task.load("train") + task.load("val"))] + ([(ood, ood.load("test"))] if ood else [])
        attach = with_retrieval(v, cfg, retrieval_memory(cfg, out_dir, task, model, tok), tok, rows)
        sets = {key: [attach(e, task if key == "in" else ood) for e in part] for key, part in sets.items()}
    policy, params = build(v, model, tok, cfg["seed"])
    if params:
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
    trainable = sum(p.numel() for p in params)
    steps = cfg["steps"] if params else 0
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"]) if params else None
    ckpt = os.path.join(out_dir, "state", f"{name}.pt")
    step, wall = 0, 0.0
    if params and os.path.exists(ckpt):  # continue from the last saved step (batches and dropout are seeded by step)
        state = torch.load(ckpt, map_location=model.device, weights_only=True)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step, wall = state["step"], state["wall_s"]
    done = {r["step"] for r in results if r["variant"] == name}

    def record(step, extra=None):
        if step in done:
            return
        row = dict(variant=name, step=step, **measure(policy, v, model, tok, sets, cfg), trainable=trainable,
                   wall_s=round(wall, 1), final=step == steps, **(extra or {}))
        append(os.path.join(out_dir, "results.jsonl"), row)
        results.append(row)
        print(f"{_PROG}: {name} step {step}: " + ", ".join(f"{k} {row[k]}" for k in ("in_nll", "ood_nll",
              "insertions") if k in row), file=sys.stderr, flush=True)

    if step == 0 and steps:
        record(0)
    from tqdm import tqdm

    vocab = min(tok.vocab_size, model.cfg.vocab_size)
    sched = dict(lr=cfg["lr"], warmup=cfg["warmup"])
    with tqdm(total=steps, initial=step, desc=name, unit="step", disable=not cfg["progress"] or None) as bar:
        while step < steps:
            t0 = time.time()
            torch.manual_seed(cfg["seed"] + training.SEED_STRIDE * (step + 1))  # dropout and random points
            g = torch.Generator().manual_seed(cfg["seed"] + training.SEED_STRIDE * (step + 1))
            for group in optimizer.param_groups:
                group["lr"] = training.lr_at(step, steps, sched)
            batch = [attach(train[i], task)
                     for i in training.batch_indices(step, len(train), cfg["batch_size"], cfg["seed"])]
            policy.train()
            optimizer.zero_grad(set_to_none=True)
            n_tok = sum(len(e["completion"]) for e in batch)
            loss = 0.0
            for part in training.chunks(batch, cfg["micro_batch"]):
                s, _, _ = nll(policy, v, model, part, tok.pad_id, vocab, g)
                (s / n_tok).backward()
                loss += s.item()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or math.inf)
            if not math.isfinite(loss):
                raise training.TrainError(f"{name}: the loss is {loss} at step {step + 1}; lower --lr")
            optimizer.step()
            step += 1
            wall += time.time() - t0
            bar.set_postfix(loss=f"{loss / n_tok:.4g}")
            bar.update(1)
            at_eval = step % cfg["eval_every"] == 0 or step == steps
            if at_eval or step % cfg["save_every"] == 0:
                save_state(ckpt, step, wall, params, optimizer)
            if at_eval and step < steps:
                record(step)
    extra = {}
    if cfg["pass_limit"] > 0:
        mode = "memgen" if isinstance(policy, memgen.MemGen) else "lora" if params else "vanilla"
        s = evaluation.evaluate(policy, tok, task, task.load("test")[:cfg["pass_limit"]], mode,
                                batch_size=16, max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"],
                                trigger_mode=v["trigger"] if mode == "memgen" else None, progress=cfg["progress"])
        extra = {"pass@1": s["pass@1"], "decoded_insertions": s.get("mean_inference_insertions")}
    record(steps, extra)
    if params:  # the trained adapters, for eval.py / show.py --adapter
        save_adapters(os.path.join(out_dir, "adapters", name), policy, model)


def save_adapters(path, policy, model):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if isinstance(policy, memgen.MemGen):
        memgen.save(policy, tmp, parts=("weaver",))
    else:
        lora.save_adapter(model, "sft", tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_state(path, step, wall, params, optimizer):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"step": step, "wall_s": wall, "params": [p.detach() for p in params],
                "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, path)


def append(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    return rows


# -----------------------------------------------------------------------------
# the report: results.md and the plots


def final_rows(results, names):
    """The last line of each variant that finished, in grid order (the final line holds pass@1 when measured)."""
    out = []
    for name in names:
        mine = [r for r in results if r["variant"] == name and r.get("final")]
        if mine:
            out.append(mine[-1])
    return out


def write_markdown(path, results, names, cfg, where):
    rows = final_rows(results, names)
    base = next((r for r in rows if r["variant"] == "vanilla"), None)
    cols = ["in_nll", "ood_nll", "insertions", "pass@1", "trainable", "wall_s"]
    cols = [c for c in cols if any(c in r and r[c] is not None for r in rows)]
    lines = [f"# ablate.py grid `{cfg['name']}`", "",
             f"{where}; {cfg['steps']} steps x {cfg['batch_size']} examples, lr {cfg['lr']}, seed {cfg['seed']}, "
             f"in-domain {cfg['data']} ({cfg['val_size']} held-out), out-of-domain {cfg['ood_data'] or 'none'} "
             f"({cfg['ood_size']}). NLL in nats per token (lower is better); in parentheses: minus vanilla.", "",
             "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c)
            if x is None:
                cells.append("")
            elif c.endswith("_nll") and base is not None and r is not base:
                cells.append(f"{x:.4f} ({x - base[c]:+.4f})")
            else:
                cells.append(f"{x:.4f}" if isinstance(x, float) and c != "wall_s" else str(x))
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    write_atomic(path, "\n".join(lines) + "\n")


def plot(out_dir, results, names):
    """nll_vs_step.png (held-out NLL against step, one line per variant) and in_vs_ood.png (final in-domain vs
    out-of-domain NLL per variant)."""
    plt = pyplot(_PROG)
    if plt is None:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        mine = [r for r in results if r["variant"] == name]
        pts = sorted((r["step"], r["in_nll"]) for r in mine)
        if len(pts) == 1 and mine[0].get("final"):  # an untrained variant (vanilla): a level, not a curve
            ax.axhline(pts[0][1], ls="--", color="gray", label=name)
        elif pts:  # a curve, or the first point of a variant still training
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out answer NLL (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, os.path.join(out_dir, "nll_vs_step.png")))
    rows = [r for r in final_rows(results, names) if "ood_nll" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            ax.scatter(r["in_nll"], r["ood_nll"])
            ax.annotate(r["variant"], (r["in_nll"], r["ood_nll"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("in-domain NLL (held-out, lower is better)")
        ax.set_ylabel("out-of-domain NLL (lower = less forgetting)")
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, os.path.join(out_dir, "in_vs_ood.png")))
    return paths


# -----------------------------------------------------------------------------
# --quick: a tiny random model, a byte tokenizer and two synthetic tasks, all in memory


class ByteTokenizer:
    """Bytes are tokens 0-255, then <|im_start|>, <|im_end|>, <pad>; ChatML like the real tokenizers."""

    def __init__(self):
        self.start, self.end_id, self.pad_id = 256, 257, 258
        self.vocab_size, self.eos_ids, self.special_ids = 259, [257], [256, 257, 258]

    def encode(self, text):
        return list(text.encode())

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else b""

    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [self.start] + self.encode(f"{m['role']}\n{m['content']}") + [self.end_id] + self.encode("\n")
        return ids + ([self.start] + self.encode("assistant\n") if add_generation_prompt else [])


def quick_setup():
    from model import Config, Transformer

    cfg = Config(arch="llama", vocab_size=259, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, rope_theta=10000.0, rms_eps=1e-5, tie_word_embeddings=False,
                 max_positions=1024, qkv_bias=False)
    torch.manual_seed(0)

    def fresh_model():  # the same random model for every variant, built anew so no adapter carries over
        torch.manual_seed(0)
        model = Transformer(cfg).requires_grad_(False).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
        model.init_rope()
        return model

    tok = ByteTokenizer()
    gsm = data.get_task("gsm8k")

    def sums(lo, hi):
        return [{"id": f"q{i}", "question": f"What is {i} + {i % 7}?", "answer": str(i + i % 7),
                 "target": f"We add {i} and {i % 7}, which gives {i + i % 7}.\n\\boxed{{{i + i % 7}}}"}
                for i in range(lo, hi)]

    task = types.SimpleNamespace(NAME="sums", messages=gsm.messages, grade=gsm.grade,
                                 load=lambda split: sums(0, 24) if split == "train" else sums(24, 30))
    code = [{"id": f"c{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}", "answer": "",
             "target": f"```python\ndef f{i}(x):\n    return x + {i}\n```"} for i in range(4)]
    ood = types.SimpleNamespace(NAME="code", load=lambda split: code, grade=lambda r, c: False,
                                messages=lambda r: [{"role": "user", "content": "Complete:\n" + r["prompt"]}])
    return lambda: (fresh_model(), tok, task, ood)


# -----------------------------------------------------------------------------


def main(argv=None):
    with errors.one_line_errors(_PROG):
        cfg, _ = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
        if cfg["quick"]:
            cfg.update(steps=min(cfg["steps"], 4), eval_every=2, save_every=1, val_size=4, ood_size=4, batch_size=2,
                       micro_batch=2, max_len=256, max_new_tokens=8, pass_limit=min(cfg["pass_limit"], 2),
                       name=cfg["name"] if cfg["name"] != "default" else "quick")
        settings.at_least(cfg, 1, "steps", "batch_size", "micro_batch", "eval_every", "save_every", "val_size",
                          "max_len", "max_new_tokens", "memory_top_k", "memory_budget")
        settings.at_least(cfg, 0, "ood_size", "pass_limit", "grad_clip", "memory_limit")
        settings.above(cfg, 0, "lr")
        settings.in_range(cfg, "warmup", 0, 1, " (a fraction of the steps)")
        names = [n.strip() for n in cfg["only"].split(",") if n.strip()] or list(VARIANTS)
        for n in names:
            if variant(n)["retrieval"] != "none" and cfg["pass_limit"] > 0:
                raise settings.SettingsError(f"--pass_limit does not cover the retrieval variant {n}: evaluate it "
                                             "with --pass_limit=0")
        if not cfg["quick"] and not cfg["model"]:
            raise settings.SettingsError("--model is required: a local model folder or a hub id (or --quick=true)")
        seeds = parse_seeds(cfg["seeds"])
        out_dir = cfg["out_dir"] or os.path.join("out", f"ablate-{cfg['name']}")
        if not seeds:
            return run_grid(cfg, names, out_dir)
        grids = {s: run_grid(dict(cfg, seed=s), names, os.path.join(out_dir, f"seed-{s}")) for s in seeds}
        report = write_seeds(out_dir, {s: g["results"] for s, g in grids.items()}, names, cfg)
        print(f"{_PROG}: {len(seeds)} seeds -> {', '.join(report)}", file=sys.stderr)
        return {"out_dir": out_dir, "seeds": grids, "report": report}


def parse_seeds(text):
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise settings.SettingsError(f"--seeds={text!r}: give whole numbers separated by commas, e.g. 42,43,44") \
            from None
    if len(set(seeds)) != len(seeds):
        raise settings.SettingsError(f"--seeds={text!r} names a seed twice")
    return seeds


def run_grid(cfg, names, out_dir):
    """The grid at cfg's seed in out_dir: every variant of names not finished there, then results.md and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    load, where = quick_setup(), "tiny random model (--quick)"
    if not cfg["quick"]:
        load, where = real_setup(cfg), f"{os.path.basename(cfg['model'].rstrip('/'))}"
    results = read_results(os.path.join(out_dir, "results.jsonl"))
    for name in names:
        if any(r["variant"] == name and r.get("final") for r in results):
            print(f"{_PROG}: {name}: finished earlier, skipped", file=sys.stderr)
            continue
        run_variant(name, cfg, load, results, out_dir)
        write_markdown(os.path.join(out_dir, "results.md"), results, names, cfg, where)
    write_markdown(os.path.join(out_dir, "results.md"), results, names, cfg, where)
    plots = plot(out_dir, results, names) if cfg["plots"] else []
    print(f"{_PROG}: {len(final_rows(results, names))}/{len(names)} variants done -> "
          f"{os.path.join(out_dir, 'results.md')}" + "".join(f", {p}" for p in plots), file=sys.stderr)
    return {"out_dir": out_dir, "results": results, "plots": plots}


# -----------------------------------------------------------------------------
# --seeds: one grid per seed, and each variant's mean and spread over them


def seed_stats(by_seed, names):
    """{variant: {metric: {"values": {seed: x}, "mean", "sd" (sample; None for one seed), "min", "max"}}} over the
    final rows of each seed's grid; and {(a, b): {metric: {seed: a - b}}} for every pair of variants that finished
    in the same seeds (a grid's variants share data, batches and seed, so differences pair up seed by seed)."""
    stats = {}
    for name in names:
        finals = {s: r for s, res in by_seed.items() for r in final_rows(res, [name])}
        if not finals:
            continue
        stats[name] = {}
        for metric in ("in_nll", "ood_nll"):
            vals = {s: r[metric] for s, r in finals.items() if r.get(metric) is not None}
            if not vals:
                continue
            xs = list(vals.values())
            stats[name][metric] = dict(values=vals, mean=statistics.mean(xs),
                                       sd=statistics.stdev(xs) if len(xs) > 1 else None, min=min(xs), max=max(xs))
    pairs = {}
    done = list(stats)
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            for metric in ("in_nll", "ood_nll"):
                va, vb = stats[a].get(metric, {}).get("values", {}), stats[b].get(metric, {}).get("values", {})
                both = sorted(set(va) & set(vb))
                if len(both) > 1:
                    pairs.setdefault((a, b), {})[metric] = {s: va[s] - vb[s] for s in both}
    return stats, pairs


def write_seeds(out_dir, by_seed, names, cfg):
    """seeds.md (each variant's mean, sample sd and range over the seeds, and the paired differences), seeds.json
    (the same numbers) and, with PLOTS, seeds_in_vs_ood.png. Returns the paths written."""
    stats, pairs = seed_stats(by_seed, names)
    seeds = sorted(by_seed)
    fmt = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"# ablate.py grid `{cfg['name']}` over seeds {', '.join(map(str, seeds))}", "",
             f"{cfg['steps']} steps x {cfg['batch_size']} examples, lr {cfg['lr']}; each seed's grid in seed-S/. "
             "NLL in nats per token (lower is better): the mean over the seeds whose grid finished the variant, the "
             "sample standard deviation, the range, and each seed's value.", "",
             "| variant | metric | seeds | mean | sd | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (7 + len(seeds)) + "|"]
    for name, by_metric in stats.items():
        for metric, st in by_metric.items():
            lines.append(f"| {name} | {metric} | {len(st['values'])} | {fmt(st['mean'])} | {fmt(st['sd'])} | "
                         f"{fmt(st['min'])} | {fmt(st['max'])} | "
                         + " | ".join(fmt(st["values"].get(s)) for s in seeds) + " |")
    if pairs:
        lines += ["", "Paired differences (a minus b, seed by seed; negative: a is lower):", "",
                  "| a | b | metric | mean | sd | a lower in | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (6 + len(seeds)) + "|"]
        for (a, b), by_metric in pairs.items():
            for metric, d in by_metric.items():
                xs = list(d.values())
                lines.append(f"| {a} | {b} | {metric} | {statistics.mean(xs):+.4f} | {statistics.stdev(xs):.4f} | "
                             f"{sum(x < 0 for x in xs)} of "
                             f"{len(xs)} | " + " | ".join("" if d.get(s) is None else f"{d[s]:+.4f}" for s in seeds)
                             + " |")
    paths = [os.path.join(out_dir, "seeds.md"), os.path.join(out_dir, "seeds.json")]
    write_atomic(paths[0], "\n".join(lines) + "\n")
    as_json = {"seeds": seeds, "variants": stats,
               "pairs": [dict(a=a, b=b, metric=m, diff=d) for (a, b), bm in pairs.items() for m, d in bm.items()]}
    write_atomic(paths[1], json.dumps(as_json, indent=1) + "\n")
    plt = pyplot(_PROG) if cfg["plots"] else None
    if plt is not None and any("ood_nll" in st for st in stats.values()):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, st in stats.items():
            if "in_nll" not in st or "ood_nll" not in st:
                continue
            both = [s for s in st["in_nll"]["values"] if s in st["ood_nll"]["values"]]
            dots = ax.scatter([st["in_nll"]["values"][s] for s in both], [st["ood_nll"]["values"][s] for s in both],
                              s=12, alpha=0.5)
            ax.scatter(st["in_nll"]["mean"], st["ood_nll"]["mean"], marker="x", s=60, color=dots.get_facecolor()[0],
                       label=name)
        ax.set_xlabel("in-domain NLL (held-out, lower is better)")
        ax.set_ylabel("out-of-domain NLL (lower = less forgetting)")
        ax.set_title("dots: one seed each; x: the mean", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, os.path.join(out_dir, "seeds_in_vs_ood.png")))
    return paths


def real_setup(cfg):
    """A loader that gives each variant a freshly loaded base model (adapters never leak between variants)."""
    device = loading.resolve_device(cfg["device"])
    task = data.get_task(cfg["data"])
    ood = data.get_task(cfg["ood_data"]) if cfg["ood_data"] else None

    def load():
        model, tok = loading.load_base(cfg["model"], cfg["dtype"], device)
        return model, tok, task, ood

    return load


if __name__ == "__main__":
    main()
