"""
train_weaver.py: train MemGen's memory weaver by SFT or GRPO - or, for the paper's baselines, a plain LoRA on the
reasoner - on GSM8K or a local jsonl task. The project's main job.

    python train_weaver.py --data gsm8k                                  # MemGen-SFT, Qwen2.5-1.5B-Instruct
    python train_weaver.py --data gsm8k --method grpo                    # MemGen-GRPO
    python train_weaver.py --data gsm8k --method sft-lora                # the SFT baseline (LoRA on the reasoner)
    python train_weaver.py --data gsm8k --method grpo-lora               # the GRPO baseline
    python train_weaver.py --model /path/to/folder --max_steps=200 --final_eval_limit=100
    python train_weaver.py --resume out/sft-gsm8k-Qwen2.5-1.5B-Instruct  # continue a killed run exactly
    torchrun --nproc_per_node 2 train_weaver.py ...                      # data parallel (gloo on CPU, nccl on GPU)

Every constant below can be overridden with --key=value (or --key value); `python train_weaver.py --help` lists
them. The run folder (OUT_DIR) receives config.json, log.jsonl (one line per step and per validation),
step-NNNNNNN/ checkpoints (adapters + optimizer state, written to a temp folder and renamed), final/ (the trained
adapters, which `eval.py --adapter` reads) and final_eval.json.

What is trained (the reasoner's own weights never change):
  sft, grpo            the weaver: its LoRA, the prompt/inference queries, their LayerNorms and scales, and the
                       reasoner->weaver and weaver->reasoner maps (memgen.MemGen.trainable("weaver"))
  sft-lora, grpo-lora  one LoRA ("sft") on the reasoner itself, same targets and rank: the paper's SFT/GRPO rows
"""
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lora
import memgen
from model import ModelError

# -----------------------------------------------------------------------------
# defaults: the paper's, and the official configs/latent_memory/gsm8k.yaml where the paper is silent
DATA = "gsm8k"  # "gsm8k" or a .jsonl with "question" and "answer" ("#### final" style) fields
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id (downloaded once) or a local Hugging Face folder
METHOD = "sft"  # sft | grpo | sft-lora | grpo-lora
OUT_DIR = ""  # "" -> out/<method>-<data>-<model folder name>
INIT = ""  # start from saved adapters (e.g. --method grpo --init out/sft-.../final)
RESUME = ""  # a run folder (its latest checkpoint) or one step-NNNNNNN folder
# optimisation
LR = 1e-5
EPOCHS = 2  # SFT 2 (paper); GRPO is usually run for 1
MAX_STEPS = 0  # > 0: train this many optimizer steps instead of EPOCHS (the cosine spans them)
STOP_STEP = 0  # > 0: stop after this step, keeping the schedule of the full run (train in chunks)
BATCH_SIZE = 4  # per optimizer step over all processes: examples (SFT) or prompts (GRPO, x GROUP rollouts)
MICRO_BATCH = 4  # rows per forward/backward (gradient accumulation when smaller than a process's share)
WARMUP = 0.1  # fraction of the steps with a linear warm-up, then cosine to 0
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
MAX_LEN = 1024  # prompt + target tokens; longer targets are cut (prompts that alone exceed it are skipped)
LIMIT = 0  # use the first LIMIT training examples (0 = all)
# MemGen (paper §4.1: K = 8, at most 3 inference insertions, LoRA r 16 / alpha 32 / dropout 0.1 on q_proj, v_proj)
K = memgen.K
N = memgen.N
TRIGGER_MODE = "always"  # insertions during GRPO rollouts and validation (see memgen.TRIGGER_MODES)
LORA_RANK = lora.RANK
LORA_ALPHA = lora.ALPHA
LORA_DROPOUT = lora.DROPOUT
LORA_TARGETS = ",".join(lora.TARGETS)
# GRPO
GROUP = 8  # rollouts per prompt
TEMPERATURE = 1.0
MAX_NEW_TOKENS = 512  # per rollout, and for validation / the final eval
STD_FLOOR = 1e-4  # advantages (r - mean) / max(std, floor) within a group
# bookkeeping
SEED = 42
# the frozen base model runs in DTYPE; everything trained (LoRA, queries, norms, maps) stays float32 and is cast at
# its output - mixed precision without autocast. auto = bf16 on GPUs and on CPUs with native bf16, else float32
DTYPE = "auto"
DEVICE = "auto"
EVAL_INTERVAL = 100  # validation every this many steps (and at the end); 0 = only at the end
VAL_SIZE = 64  # validation examples (SFT: loss; GRPO: greedy accuracy)
SAVE_INTERVAL = 100  # checkpoint every this many steps (and at the end)
KEEP_CHECKPOINTS = 2
FINAL_EVAL_LIMIT = 0  # test problems for the final greedy eval: 0 = all, -1 = skip
EVAL_BATCH_SIZE = 16
PROGRESS = True
# -----------------------------------------------------------------------------
METHODS = ("sft", "grpo", "sft-lora", "grpo-lora")
STEP_SEED_STRIDE = 1_000_003


class TrainError(ValueError):
    """A bad setting or input; the message says what to do."""


# -----------------------------------------------------------------------------
# settings: module constants, overridden by --key=value


def defaults(namespace):
    """{lowercase name: value} of the upper-case constants of a script's globals."""
    return {k.lower(): v for k, v in namespace.items() if k.isupper() and not k.startswith("_")
            and isinstance(v, (bool, int, float, str)) and k not in ("STEP_SEED_STRIDE",)}


def parse_overrides(argv, base, prog):
    """--key=value / --key value (dashes or underscores) -> a copy of `base` with the values, type-checked."""
    cfg, given = dict(base), set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            width = max(map(len, base))
            print(f"usage: python {prog} [--key=value ...]\n\nsettings (defaults):")
            for key, value in base.items():
                print(f"  --{key:<{width}}  {value!r}")
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) < 3:
            raise TrainError(f"unexpected argument {arg!r}: settings are given as --key=value; "
                             f"valid keys: {', '.join(base)}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            raise TrainError(f"--{arg[2:]} needs a value (--key=value)")
        key = key.replace("-", "_")
        if key not in base:
            raise TrainError(f"unknown setting --{key}; valid keys: {', '.join(base)}")
        cfg[key] = convert(key, value, base[key])
        given.add(key)
    return cfg, given


def convert(key, value, default):
    kind = type(default)
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(value)
    except ValueError:
        raise TrainError(f"--{key}={value!r}: expected {kind.__name__} (like the default {default!r})") from None


def check(cfg):
    if cfg["method"] not in METHODS:
        raise TrainError(f"unknown --method {cfg['method']!r}; use one of {', '.join(METHODS)}")
    if cfg["trigger_mode"] not in memgen.TRIGGER_MODES:
        raise TrainError(f"unknown --trigger_mode {cfg['trigger_mode']!r}; use one of "
                         f"{', '.join(memgen.TRIGGER_MODES)}")
    for key in ("batch_size", "micro_batch", "group", "k", "max_len", "max_new_tokens", "lora_rank",
                "keep_checkpoints", "eval_batch_size"):
        if key in cfg and cfg[key] < 1:
            raise TrainError(f"--{key} must be >= 1, got {cfg[key]}")
    for key in ("max_steps", "stop_step", "limit", "epochs", "n", "eval_interval", "save_interval", "val_size"):
        if key in cfg and cfg[key] < 0:
            raise TrainError(f"--{key} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["warmup"] < 1:
        raise TrainError(f"--warmup is a fraction of the steps in [0, 1), got {cfg['warmup']}")
    if cfg["lr"] <= 0:
        raise TrainError(f"--lr must be > 0, got {cfg['lr']}")
    if "temperature" in cfg and cfg["temperature"] <= 0 and "grpo" in cfg["method"]:
        raise TrainError("--temperature must be > 0 for GRPO: greedy rollouts of one prompt are all the same")
    if cfg["max_steps"] == 0 and cfg["epochs"] == 0:
        raise TrainError("nothing to train: --epochs=0 and --max_steps=0")


# -----------------------------------------------------------------------------
# distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK. Each process holds the whole model (it is frozen, only
# the small adapters train), takes its share of every batch, and the gradients are summed over processes before
# the update - what DDP does, written out: the losses are normalised by the *global* token count, so the sum is
# exactly the one-process gradient of the same global batch.


def dist_setup(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(x):
    """Sum a tensor (or float) over processes; identity in a single process."""
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    dist.all_reduce(t)
    return t.item() if not torch.is_tensor(x) else t.to(x.dtype)


def all_gather(values):
    """Concatenate equal-length 1-d float lists from all processes, in rank order."""
    t = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def sync_grads(params):
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# data


def encode_examples(rows, tok, max_len, need_target=True):
    """Task rows -> (prompt ids, completion ids) with the completion = target + the turn-end token (so the model
    learns to stop). Completions are cut to fit max_len; prompts that alone reach it are skipped (counted)."""
    from data.gsm8k import messages

    out, skipped = [], 0
    for r in rows:
        try:
            prompt = tok.chat(messages(r["question"]))
            target = tok.encode(r["target"]) + [tok.end_id] if need_target else []
        except ValueError as e:
            raise TrainError(f"problem {r.get('id')}: {e}") from None
        if len(prompt) >= max_len:
            skipped += 1
            continue
        out.append(dict(r, prompt=prompt, completion=target[:max_len - len(prompt)]))
    if not out:
        raise TrainError(f"every prompt is longer than --max_len={max_len} tokens; raise --max_len")
    return out, skipped


def batch_indices(step, n, batch_size, seed):
    """The global batch of optimizer step `step`: a fixed-seed permutation per epoch, cut into whole batches.
    A function of the step alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


def lr_at(step, total, cfg):
    """Linear warm-up over the first WARMUP fraction of the steps, then cosine decay to 0 (step counts from 0)."""
    warm = math.ceil(cfg["warmup"] * total)
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def chunks(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


# -----------------------------------------------------------------------------
# losses


def token_nll(model, h, ids, mask, prompt_len, vocab):
    """Summed cross-entropy of the completion tokens (h[:, t] predicts ids[:, t+1]) and their count."""
    t = torch.arange(ids.shape[1], device=ids.device)
    label = (t[None, 1:] >= prompt_len[:, None]) & mask[:, 1:]
    logits = model.head(h[:, :-1][label])[:, :vocab].float()  # completion positions only: no (B, T, V) tensor
    return F.cross_entropy(logits, ids[:, 1:][label], reduction="sum"), int(label.sum())


def sft_loss(target, method, examples, pad_id, vocab):
    """(summed NLL, tokens) of a micro-batch through the MemGen training forward or the plain LoRA model."""
    model = target.model if method == "sft" else target
    ids, mask, prompt_len = memgen.right_pad([e["prompt"] for e in examples], [e["completion"] for e in examples],
                                         pad_id, model.device)
    if method == "sft":
        points = memgen.insertion_points(target, ids, mask, prompt_len)  # prompt end + first N delimiters
        h = memgen.teacher_forced(target, ids, mask, prompt_len, points)
    else:
        with lora.use(model, "sft"):
            _, h = model(ids, mask=mask, logits="none")
    return token_nll(model, h, ids, mask, prompt_len, vocab)


def lora_logprobs(model, prompts, completions, pad_id, vocab):
    """Completion token log-probs under the reasoner + "sft" LoRA: (B, Tc) and the mask (grpo-lora's policy)."""
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, pad_id, model.device)
    with lora.use(model, "sft"):
        _, h = model(ids, mask=mask, logits="none")
    return memgen.completion_logprobs(model, h, ids, prompt_len, completions, vocab)


def reward(text, gold, rollout):
    """The GRPO reward: 1 for a correct first \\boxed{} answer, else 0. (Tests swap in rigged rewards here.)"""
    from data.gsm8k import is_correct

    return float(is_correct(text, gold))


def group_advantages(rewards, group, floor):
    """GRPO: each rollout's reward relative to its own prompt's group, (r - mean) / max(std, floor)."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True).clamp(min=floor)).view(-1)


def rollouts(target, method, tok, prompts, cfg, seed):
    """Sample completions (EOS kept, it is a scored action) -> dicts with ids, text, insertions."""
    from model import generate

    if method == "grpo":
        return memgen.generate(target, tok, prompts, cfg["max_new_tokens"], cfg["temperature"], seed=seed,
                               mode=cfg["trigger_mode"])
    with lora.use(target, "sft"):
        seqs, texts = generate(target, tok, prompts, cfg["max_new_tokens"], cfg["temperature"], seed=seed,
                               keep_eos=True)
    return [dict(ids=s, text=t, insertions=[]) for s, t in zip(seqs, texts)]


# -----------------------------------------------------------------------------
# checkpoints


def save_adapters(target, method, path):
    if method in ("sft", "grpo"):
        memgen.save(target, path, parts=("weaver",))
    else:
        lora.save_adapter(target, "sft", path)


def load_adapters(target, method, path):
    try:
        if method in ("sft", "grpo"):
            memgen.load(target, path, parts=("weaver",))
        else:
            lora.load_adapter(target, "sft", path)
    except (lora.AdapterError, ModelError) as e:
        raise TrainError(str(e)) from None


def write_checkpoint(out_dir, step, save_fn, optimizer, keep):
    """out_dir/step-NNNNNNN/: the adapters (save_fn) and state.pt (optimizer + step), built in a hidden temp folder
    and renamed into place, so a kill at any moment leaves only whole checkpoints. Older ones beyond `keep` go."""
    final = os.path.join(out_dir, f"step-{step:07d}")
    tmp = os.path.join(out_dir, f".step-{step:07d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("step-") and n[5:].isdigit())
    return [os.path.join(out_dir, n) for n in names if os.path.isfile(os.path.join(out_dir, n, "state.pt"))]


def find_resume(path):
    """--resume PATH -> (run folder, checkpoint folder)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "state.pt")):
        return os.path.dirname(path), path
    found = checkpoints(path)
    if not found:
        raise TrainError(f"--resume {path}: no checkpoint there (expected step-NNNNNNN/state.pt folders written by "
                         "a training run)")
    return path, found[-1]


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Log:
    """log.jsonl, one line per event, flushed at once (a killed run keeps what it logged)."""

    def __init__(self, path, active):
        self.f = open(path, "a") if active else None

    def __call__(self, **row):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


def die(prog, msg):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# setup shared with train_trigger.py


def start(argv, namespace, prog, check_fn):
    """Settings (with --resume: the run's saved config, then any flags given now), processes, seeds, run folder."""
    base = defaults(namespace)
    cfg, given = parse_overrides(argv, base, prog)
    resume = None
    if cfg["resume"]:  # the run's own settings, then whatever is given now (e.g. a later --stop_step)
        run_dir, resume = find_resume(cfg["resume"])
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise TrainError(f"--resume: cannot read {run_dir}/config.json ({e})") from None
        now = cfg
        cfg = dict(base)
        cfg.update({k: v for k, v in saved.items() if k in base})
        cfg.update({k: now[k] for k in given})
        cfg["out_dir"], cfg["resume"] = run_dir, resume
    check_fn(cfg)
    from model import pick_device

    rank, world, device = dist_setup(pick_device(cfg["device"]))
    if cfg["batch_size"] % world:
        raise TrainError(f"--batch_size={cfg['batch_size']} does not split over {world} processes; use a multiple")
    return cfg, resume, rank, world, device


def load_base(cfg, device):
    """The frozen base model and its tokenizer (downloaded once when a hub id is given)."""
    from data.download import DownloadError, resolve_model
    from model import load_model
    from tokenizer import load_tokenizer

    try:
        folder = resolve_model(cfg["model"])
        return load_model(folder, dtype=cfg["dtype"], device=device), load_tokenizer(folder)
    except (DownloadError, ModelError, ValueError) as e:
        raise TrainError(str(e)) from None


def load_rows(cfg, split):
    from data.download import DownloadError
    from data.gsm8k import DataError, load_task

    try:
        return load_task(cfg["data"], split)
    except (DataError, DownloadError) as e:
        raise TrainError(str(e)) from None


def default_out(cfg, prefix):
    data = "gsm8k" if cfg["data"] == "gsm8k" else os.path.splitext(os.path.basename(cfg["data"]))[0]
    return os.path.join("out", f"{prefix}-{data}-{os.path.basename(cfg['model'].rstrip('/'))}")


def plan(cfg, n_examples):
    """(total optimizer steps, the step to stop after) for n training examples."""
    if n_examples < cfg["batch_size"]:
        raise TrainError(f"{n_examples} training examples, fewer than --batch_size={cfg['batch_size']}")
    total = cfg["max_steps"] or cfg["epochs"] * (n_examples // cfg["batch_size"])
    return total, min(total, cfg["stop_step"]) if cfg["stop_step"] else total


def restore(resume, load_fn, optimizer, device):
    """Load a checkpoint's adapters (load_fn) and optimizer state; return the step it was taken at."""
    load_fn(resume)
    state = torch.load(os.path.join(resume, "state.pt"), map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_final(out_dir, save_fn):
    """out_dir/final/ with the trained adapters, built in a temp folder and renamed."""
    final, tmp = os.path.join(out_dir, "final"), os.path.join(out_dir, ".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def final_eval(target, tok, cfg, mode, out_dir, trigger=None):
    """Greedy pass@1 on the first FINAL_EVAL_LIMIT test problems through eval.py's evaluate()."""
    import eval as ev

    rows = load_rows(cfg, "test")
    if cfg["final_eval_limit"] > 0:
        rows = rows[:cfg["final_eval_limit"]]
    path = os.path.join(out_dir, "final_eval.jsonl")
    if os.path.exists(path):
        os.remove(path)  # the adapters changed since any earlier eval
    summary = ev.evaluate(target, tok, rows, mode, batch_size=cfg["eval_batch_size"],
                          max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"], trigger=trigger, out_path=path,
                          progress=cfg["progress"])
    write_json(os.path.join(out_dir, "final_eval.json"), summary)
    return summary


# -----------------------------------------------------------------------------


def main(argv=None):
    prog = "train_weaver.py"
    try:
        return train(sys.argv[1:] if argv is None else list(argv), prog)
    except TrainError as e:
        die(prog, str(e))


def train(argv, prog):
    from tqdm import tqdm

    cfg, resume, rank, world, device = start(argv, globals(), prog, check)
    method, is_mg = cfg["method"], cfg["method"] in ("sft", "grpo")
    rl = "grpo" in method
    out_dir = cfg["out_dir"] or default_out(cfg, method)
    cfg["out_dir"] = out_dir
    main_proc = rank == 0

    # the base model and the trainable parts; the same seed in every process gives the same initial adapters
    torch.manual_seed(cfg["seed"])
    model, tok = load_base(cfg, device)
    targets = tuple(t.strip() for t in cfg["lora_targets"].split(",") if t.strip())
    if is_mg:
        target = memgen.MemGen(model, tok, cfg["k"], cfg["n"], cfg["trigger_mode"], cfg["lora_rank"],
                               cfg["lora_alpha"], cfg["lora_dropout"], targets)
        params = target.trainable("weaver")
    else:
        lora.inject(model, ["sft"], targets, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"])
        target, params = model, lora.parameters(model, "sft")
    if cfg["init"] and not resume:
        load_adapters(target, method, cfg["init"])
    params = list(params.values())
    for p in model.parameters():  # the reasoner is frozen; only the adapter tensors learn
        p.requires_grad_(any(p is q for q in params))
    vocab = min(tok.vocab_size, model.cfg.vocab_size)

    # data
    rows = load_rows(cfg, "train")
    if cfg["limit"]:
        rows = rows[:cfg["limit"]]
    train_set, skipped = encode_examples(rows, tok, cfg["max_len"])
    val_set, _ = encode_examples(load_rows(cfg, "val")[:cfg["val_size"]], tok, cfg["max_len"]) if cfg["val_size"] \
        else ([], 0)
    total, stop = plan(cfg, len(train_set))
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = restore(resume, lambda path: load_adapters(target, method, path), optimizer, device) if resume else 0
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "config.json"), cfg)
    log = Log(os.path.join(out_dir, "log.jsonl"), main_proc)
    counts = target.count()["weaver"] if is_mg else sum(p.numel() for p in params)
    if main_proc:
        print(f"{prog}: {method} on {len(train_set)} examples ({skipped} over max_len skipped), {total} steps of "
              f"{cfg['batch_size']}{' prompts x ' + str(cfg['group']) if rl else ''}, {counts:,} trainable "
              f"parameters, {model.dtype} on {device}, {world} process(es) -> {out_dir}"
              + (f" (resuming at step {step})" if step else ""), file=sys.stderr)
        log(event="start", step=step, total=total, examples=len(train_set), trainable=counts, world=world)

    def save(path):
        save_adapters(target, method, path)

    def validate():
        if not val_set:
            return {}
        if not rl:  # SFT: mean token NLL on held-out examples
            target.eval()
            nll = n = 0
            with torch.no_grad():
                for part in chunks(val_set[rank::world], cfg["micro_batch"]):
                    s, c = sft_loss(target, method, part, tok.pad_id, vocab)
                    nll, n = nll + s.item(), n + c
            nll, n = all_sum(nll), all_sum(n)
            return {"val_loss": nll / max(n, 1)}
        import eval as ev  # RL: greedy accuracy (rank 0 only; small)

        if not main_proc:
            return {}
        s = ev.evaluate(target, tok, val_set, "memgen" if is_mg else "lora", batch_size=cfg["eval_batch_size"],
                        max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"], progress=False,
                        trigger=cfg["trigger_mode"] if is_mg else None)
        return {"val_acc": s["pass@1"]}

    bar = tqdm(total=stop, initial=step, desc=f"train {method}", unit="step", disable=not (main_proc and
                                                                                          cfg["progress"]) or None)
    t_start = time.time()
    while step < stop:
        t0 = time.time()
        # every step re-seeds from (seed, step, rank): dropout masks and rollouts of a resumed run match
        torch.manual_seed(cfg["seed"] + STEP_SEED_STRIDE * (step + 1) + rank)
        lr = lr_at(step, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        mine = [train_set[i] for i in batch_indices(step, len(train_set), cfg["batch_size"], cfg["seed"])][rank::world]
        optimizer.zero_grad(set_to_none=True)
        info = {}
        if not rl:
            target.train()  # adapter dropout on (the base model has no dropout)
            n_tok = all_sum(sum(len(e["completion"]) for e in mine))
            loss_sum = 0.0
            for part in chunks(mine, cfg["micro_batch"]):
                s, _ = sft_loss(target, method, part, tok.pad_id, vocab)
                (s / n_tok).backward()
                loss_sum += s.item()
            loss, tokens = all_sum(loss_sum) / n_tok, n_tok
        else:
            # rollouts and their log-probs in eval mode: no dropout, so the policy that sampled is the policy that
            # is scored (on-policy, one update per batch: the PPO ratio is 1 and its gradient is grad log-prob)
            target.eval()
            prompts = [e["prompt"] for e in mine for _ in range(cfg["group"])]
            golds = [e["answer"] for e in mine for _ in range(cfg["group"])]
            outs = rollouts(target, method, tok, prompts, cfg, seed=cfg["seed"] + STEP_SEED_STRIDE * step + rank)
            rewards = [reward(o["text"], g, o) for o, g in zip(outs, golds)]
            adv = group_advantages(rewards, cfg["group"], cfg["std_floor"]).to(device)
            n_tok = all_sum(sum(len(o["ids"]) for o in outs))
            loss_sum = 0.0
            for idx in chunks(list(range(len(outs))), cfg["micro_batch"]):
                p, c = [prompts[i] for i in idx], [outs[i]["ids"] for i in idx]
                if is_mg:
                    logp, cmask, _, _ = memgen.logprobs(target, p, c, [outs[i]["insertions"] for i in idx],
                                                        pad_id=tok.pad_id)
                else:
                    logp, cmask = lora_logprobs(model, p, c, tok.pad_id, vocab)
                # token-level policy gradient (beta = 0, no reference model), averaged over all completion tokens
                s = -(adv[idx][:, None] * logp * cmask).sum()
                (s / n_tok).backward()
                loss_sum += s.item()
            loss, tokens = all_sum(loss_sum) / n_tok, n_tok
            ins = [sum(1 for t in o["insertions"] if t > 0) for o in outs]
            info = dict(reward=all_sum(sum(rewards)) / all_sum(len(rewards)),
                        length=all_sum(sum(len(o["ids"]) for o in outs)) / all_sum(len(outs)),
                        insertions=all_sum(sum(ins)) / all_sum(len(outs)))
        sync_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
        optimizer.step()
        step += 1
        dt = time.time() - t0
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=int(tokens), tok_s=tokens / dt,
                   elapsed=round(time.time() - t_start, 3), **info)
        log(**row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "lr", "tok_s", "reward")})
        bar.update(1)
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < stop:
            v = validate()
            if v and main_proc:
                log(step=step, **v)
                bar.write(f"step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()))
        if (cfg["save_interval"] and step % cfg["save_interval"] == 0) or step == stop:
            if main_proc:
                write_checkpoint(out_dir, step, save, optimizer, cfg["keep_checkpoints"])
            barrier()
    bar.close()

    result = {"step": step, "out_dir": out_dir, "target": target}  # the live objects, for tests and notebooks
    v = validate()
    if v and main_proc:
        log(step=step, **v)
        print(f"{prog}: step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()), file=sys.stderr)
    result.update(v)
    if step == total and main_proc:
        final = save_final(out_dir, save)
        print(f"{prog}: adapters saved to {final} (evaluate: python eval.py --data {cfg['data']} --model "
              f"{cfg['model']} --mode {'memgen' if is_mg else 'lora'} --adapter {final})", file=sys.stderr)
        if cfg["final_eval_limit"] >= 0:
            s = final_eval(target, tok, cfg, "memgen" if is_mg else "lora", out_dir,
                           trigger=cfg["trigger_mode"] if is_mg else None)
            log(step=step, event="final_eval", **{k: v for k, v in s.items() if isinstance(v, (int, float))})
            print(f"{prog}: final eval on {s['n']} test problems: pass@1 {s['pass@1']:.4f}", file=sys.stderr)
            result["final_eval"] = s
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
