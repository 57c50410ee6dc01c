"""
training.py: what train_weaver.py and train_trigger.py share. A trainer builds its policy, then hands fit() one
step function per method; everything else about a run lives here, in the order a run meets it:

  start          settings (a resumed run's saved ones, then the flags given now), the checks both trainers
                 share, the device, torchrun processes, and the run folder (refused when it already holds a run,
                 unless --resume or --overwrite=true)
  load_examples  the task's train and validation rows as prompt + completion ids (encode_examples)
  fit            optimizer, resume, config.json and log.jsonl, the planned final eval, then the loop - per step the
                 lr (lr_at), this process's share of the global batch (batch_indices), the step function (forward
                 + backward), update() (gradient all-reduce, clipping, finite check, AdamW), the log line and
                 progress bar, validation and a checkpoint at their intervals - and finish(): final validation,
                 final/, the final eval
  run folder     checkpoints written to a temp folder and renamed, restore, save_final, log.jsonl
  distributed    torchrun: each process holds the whole (frozen) model, takes its share of every batch, and the
                 gradients are summed before the update - what DDP does, written out (all_sum, sync_grads, ...)

A step function is `step_fn(run, batch, seed) -> {"loss": float, "tokens": int, ...}`: it runs forward and
backward on this process's share of the batch (losses normalised by the *global* count, so the summed gradient is
the one-process gradient), leaves the gradients in the parameters, and returns what to log.
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

import data
import evaluation
import loading
import memgen
import settings
from files import write_atomic, write_json
from model import set_graphs

SEED_STRIDE = 1_000_003  # every step re-seeds from (seed, step, rank): a resumed run draws what the whole run would


class TrainError(ValueError):
    """A bad input or a run that cannot go on; the message says what and what to do."""


class Run:
    """One training run. start() fills prog, cfg, rank, world, device, out_dir, resume; the trainer attaches model,
    tok, task, policy (the MemGen or the LoRA model being trained), params (its trainable tensors), rl (whether it
    learns from rollouts), train_set and val_set (encode_examples)."""

    def __init__(self, prog, cfg, rank, world, device, resume):
        self.prog, self.cfg, self.rank, self.world, self.device, self.resume = prog, cfg, rank, world, device, resume
        self.out_dir, self.main = cfg["out_dir"], rank == 0
        self.model = self.tok = self.task = self.policy = None
        self.params, self.rl, self.train_set, self.val_set, self.skipped = [], False, [], [], 0
        self.given = set()  # the settings set on this command line (start() fills it)

    def say(self, msg):
        if self.main:
            print(f"{self.prog}: {msg}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# start: settings, checks, processes, run folder


def check_common(cfg):
    """The checks of the settings both trainers have; each error names its setting."""
    settings.at_least(cfg, 1, "batch_size", "micro_batch", "group", "k", "max_len", "max_new_tokens", "lora_rank",
                      "keep_checkpoints", "eval_batch_size")
    settings.at_least(cfg, 0, "max_steps", "stop_step", "limit", "epochs", "n", "eval_interval", "save_interval",
                      "val_size", "grad_clip", "weight_decay", "lambda")
    settings.at_least(cfg, -1, "final_eval_limit")
    settings.above(cfg, 0, "lr", "lora_alpha", "temperature", "std_floor")
    settings.in_range(cfg, "warmup", 0, 1, " (a fraction of the steps)")
    if "lora_dropout" in cfg:
        settings.in_range(cfg, "lora_dropout", 0, 1, " (a probability)")
    if cfg["max_steps"] == 0 and cfg["epochs"] == 0:
        raise settings.SettingsError("nothing to train: --epochs=0 and --max_steps=0")
    if "graphs" in cfg:  # every decode loop of the run (rollouts, evaluations) follows it
        set_graphs(cfg["graphs"])


def start(prog, argv, script_globals, check, prefix):
    """Settings (with --resume: the run's saved config, then any flags given now), checks, device, processes and
    the run folder. prefix: the run folder's default name start, formatted with the settings (e.g. "{method}")."""
    cfg, given = settings.parse(sys.argv[1:] if argv is None else list(argv), script_globals, prog)
    resume = ""
    if cfg["resume"]:  # the run's own settings, then whatever is given now (e.g. a later --stop_step)
        run_dir, resume = find_resume(cfg["resume"])
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise TrainError(f"--resume: cannot read {run_dir}/config.json ({e})") from None
        now, cfg = cfg, settings.defaults(script_globals)
        cfg.update({k: v for k, v in saved.items() if k in cfg})
        cfg["stop_step"] = 0  # a chunk's stop belongs to that invocation: resuming trains on to the end unless given
        cfg.update({k: now[k] for k in given})
        cfg["out_dir"], cfg["resume"] = run_dir, resume
    check_common(cfg)
    check(cfg)
    name = f"{prefix.format(**cfg)}-{evaluation.data_label(cfg['data'])}-{os.path.basename(cfg['model'].rstrip('/'))}"
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("out", name)
    rank, world, device = dist_setup(loading.resolve_device(cfg["device"]))
    if cfg["batch_size"] % world:
        raise TrainError(f"--batch_size={cfg['batch_size']} does not split over {world} processes; use a multiple")
    if not resume:
        claim_run_dir(cfg["out_dir"], cfg["overwrite"], rank == 0)
    run = Run(prog, cfg, rank, world, device, resume)
    run.given = set(given)  # held against a loaded adapter's rules (loading.adapter_rules)
    return run


def claim_run_dir(out_dir, overwrite, main):
    """A fresh run may not mix with an earlier one: a folder holding checkpoints or final/ is refused unless
    --overwrite=true, which deletes them (and the earlier log, config and final eval)."""
    held = [os.path.basename(c) for c in checkpoints(out_dir)]
    held += ["final"] if os.path.isdir(os.path.join(out_dir, "final")) else []
    if held and not overwrite:
        raise TrainError(f"{out_dir} already holds a run ({', '.join(held)}): pass --resume={out_dir} to continue "
                         "it, --overwrite=true to start over there (deletes it), or another --out_dir")
    if held and main:
        for name in os.listdir(out_dir):
            if name.startswith(("step-", ".step-", "final", ".final")) or name in ("log.jsonl", "config.json"):
                path = os.path.join(out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    barrier()


def check_context(cfg, model, latents=0):
    """--max_len (plus the latents MemGen inserts) must fit the model's context."""
    room = model.cfg.max_positions - latents
    if cfg["max_len"] > room:
        plus = f" plus {latents} latent positions ((N+1) x K)" if latents else ""
        raise TrainError(f"--max_len={cfg['max_len']}{plus} exceeds the model's context ({model.cfg.max_positions} "
                         f"positions); use --max_len={room} or less")


# -----------------------------------------------------------------------------
# examples


def encode_examples(rows, tok, task, max_len, need_target=True):
    """Task rows -> (examples, skipped): each row plus its prompt ids and completion ids = the SFT target + the
    turn-end token (so the model learns to stop). Completions are cut to fit max_len; prompts that alone reach it
    are skipped (counted). A multi-turn task's rows are gold trajectories: agent.encode_trajectories renders them as
    the agent loop's prompts, with the loss on the agent's turns only."""
    if getattr(task, "AGENT", False):
        import agent

        if not need_target:
            raise TrainError(f"{task.NAME} is a multi-turn task: train it by SFT on its gold trajectories "
                             "(--method=sft or sft-lora); RL on episodes is not implemented")
        try:
            return agent.encode_trajectories(rows, tok, task, max_len)
        except agent.AgentError as e:
            raise TrainError(str(e)) from None
    out, skipped = [], 0
    for r in rows:
        if need_target and r.get("target") is None:
            raise TrainError(f"{task.NAME} problem {r.get('id')} has no SFT target; train this task with "
                             "--method=grpo (or grpo-lora)")
        try:
            prompt = tok.chat(task.messages(r))
            completion = tok.encode(r["target"]) + [tok.end_id] if need_target else []
        except ValueError as e:
            raise TrainError(f"problem {r.get('id')}: {e}") from None
        if len(prompt) >= max_len:
            skipped += 1
            continue
        out.append(dict(r, prompt=prompt, completion=completion[:max_len - len(prompt)]))
    if rows and not out:
        raise TrainError(f"every prompt is longer than --max_len={max_len} tokens; raise --max_len")
    return out, skipped


def load_examples(run, need_target=True):
    """run.train_set (the first LIMIT train rows), run.val_set (the first VAL_SIZE validation rows), encoded."""
    cfg = run.cfg
    rows = run.task.load("train")
    rows = rows[:cfg["limit"]] if cfg["limit"] else rows
    run.train_set, run.skipped = encode_examples(rows, run.tok, run.task, cfg["max_len"], need_target)
    run.val_set = []
    if cfg["val_size"]:
        val = run.task.load("val")[:cfg["val_size"]]
        if not val:
            raise TrainError(f"the validation split of --data={cfg['data']} is empty (too few rows to hold any "
                             "out); pass --val_size=0 to train without validation, or use a task with more rows "
                             "(10 or more)")
        run.val_set, _ = encode_examples(val, run.tok, run.task, cfg["max_len"], need_target)


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


def adapter_hidden(model, ids, mask, adapter):
    """The reasoner's hidden states (B, T, D) over right-padded rows with one LoRA adapter active (None = the base
    model): the rows are packed (memgen.packed_reasoner), so padding costs nothing, as in MemGen's training forward.
    LoRA-SFT's forward (train_weaver.py) and the NLL of ablate.py's non-MemGen variants."""
    zero = torch.zeros_like(mask[:, 0], dtype=torch.long)
    return memgen.packed_reasoner(model, model.embed(ids), mask.sum(1), zero, adapter)


def completion_nll(model, h, ids, mask, prompt_len, vocab):
    """(summed NLL, count) of the completion tokens from the reasoner's hidden states h (h[:, t] predicts
    ids[:, t+1]); logits only at completion positions, so no (B, T, V) tensor. The SFT loss of both kinds of policy
    (train_weaver.py) and ablate.py's NLL metrics."""
    t = torch.arange(ids.shape[1], device=ids.device)
    label = (t[None, 1:] >= prompt_len[:, None]) & mask[:, 1:]
    logits = model.head(h[:, :-1][label])[:, :vocab].float()
    return F.cross_entropy(logits, ids[:, 1:][label], reduction="sum"), int(label.sum())


def task_rewards(task, rows, rollouts):
    """The RL reward: 1.0 when the task's grader accepts a rollout's text, else 0.0. (Tests rig it.)"""
    return [float(ok) for ok in data.grade_all(task, rows, [o["text"] for o in rollouts])]


def plan(cfg, n_examples):
    """(total optimizer steps, the step to stop after) for n training examples."""
    if n_examples < cfg["batch_size"]:
        raise TrainError(f"{n_examples} training examples, fewer than --batch_size={cfg['batch_size']}: lower "
                         "--batch_size or use more rows")
    total = cfg["max_steps"] or cfg["epochs"] * (n_examples // cfg["batch_size"])
    return total, min(total, cfg["stop_step"]) if cfg["stop_step"] else total


# -----------------------------------------------------------------------------
# the loop


def fit(run, step_fn, validate, save, load):
    """Train run.params with step_fn until STOP_STEP (or the end), then finish(). validate(run) -> {name: value}
    (may be {}), save(folder) / load(folder) write and read the trained adapters. Returns finish()'s dict."""
    cfg = run.cfg
    total, stop = plan(cfg, len(run.train_set))
    optimizer = torch.optim.AdamW(run.params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = restore(run, load, optimizer) if run.resume else 0
    if step >= stop and step < total:
        raise TrainError(f"--stop_step={stop}: the run is already at step {step} of {total}; give a later --stop_step, "
                         "or none to train to the end")
    if run.main:
        os.makedirs(run.out_dir, exist_ok=True)
        write_json(os.path.join(run.out_dir, "config.json"), cfg)
    log = Log(os.path.join(run.out_dir, "log.jsonl"), run.main, fresh=not run.resume, resumed=step)
    what = f"prompts x {cfg['group']} rollouts" if run.rl else "examples"
    run.say(f"{cfg.get('method', 'trigger')} on {len(run.train_set)} examples ({run.skipped} over max_len skipped), "
            f"{total} steps of {cfg['batch_size']} {what}, {sum(p.numel() for p in run.params):,} trainable "
            f"parameters, {run.model.dtype} on {run.device}, {run.world} process(es) -> {run.out_dir}"
            + (f" (resuming at step {step})" if step else ""))
    final_rows = plan_final_eval(run, total)
    log(event="start", step=step, total=total, examples=len(run.train_set), world=run.world)
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=step, desc=f"train {cfg.get('method', 'trigger')}", unit="step",
               disable=not (run.main and cfg["progress"]) or None)
    t_start = time.time()
    while step < stop:
        t0 = time.time()
        torch.manual_seed(cfg["seed"] + SEED_STRIDE * (step + 1) + run.rank)  # dropout masks of this step
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [run.train_set[i] for i in batch_indices(step, len(run.train_set), cfg["batch_size"], cfg["seed"])]
        optimizer.zero_grad(set_to_none=True)
        row = step_fn(run, batch[run.rank::run.world], cfg["seed"] + SEED_STRIDE * step + run.rank)
        step += 1
        grad_norm = update(run, optimizer, step, row["loss"])
        row = dict(step=step, **row, lr=lr, grad_norm=grad_norm, elapsed=round(time.time() - t_start, 3),
                   step_s=round(time.time() - t0, 3))
        log(**row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "lr", "reward", "invocation_rate")})
        bar.update(1)
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < stop:
            v = validate(run)
            if v and run.main:
                log(step=step, **v)
                bar.write(f"{run.prog}: {step_line(step, v)}")
        if (cfg["save_interval"] and step % cfg["save_interval"] == 0) or step == stop:
            if run.main:
                write_checkpoint(run.out_dir, step, save, optimizer, cfg["keep_checkpoints"])
            barrier()
    bar.close()
    return finish(run, step, total, validate, save, log, final_rows)


def step_line(step, metrics):
    return f"step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in metrics.items())


def update(run, optimizer, step, loss):
    """Sum the gradients over processes, clip them to GRAD_CLIP (0 = no clipping), refuse a non-finite loss or
    gradient - the run stops with one line and nothing from this step is saved - and take the AdamW step."""
    sync_grads(run.params)
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg["grad_clip"] or math.inf).item()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        _stop(run, step, f"the loss is {loss:.4g} and the gradient norm {norm:.4g}")
    optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in run.params):
        _stop(run, step, "the update made a trained parameter non-finite")
    return norm


def _stop(run, step, what):
    last = checkpoints(run.out_dir)
    since = f"; the last checkpoint, {last[-1]}, is from before it" if last else ""
    raise TrainError(f"step {step}: {what}; the run stops here and nothing from this step is saved{since}: lower "
                     "--lr (or check the data)")


def finish(run, step, total, validate, save, log, final_rows):
    """After the loop: the final validation; when the run reached its last step, final/ and the final eval.
    Returns {"step", "out_dir", "policy" (the live object, for tests and notebooks), validation metrics,
    "final_eval" (its summary)}."""
    result = {"step": step, "out_dir": run.out_dir, "policy": run.policy}
    v = validate(run)
    if v and run.main:
        log(step=step, **v)
        run.say(step_line(step, v))
    result.update(v)
    if step == total and run.main:
        final = save_final(run.out_dir, save)
        mode = eval_mode(run)
        trigger = f" --trigger_mode={run.policy.mode}" if mode == "memgen" and run.policy.mode != "always" else ""
        run.say(f"adapters saved to {final} (evaluate: python eval.py --data={run.cfg['data']} "
                f"--model={run.cfg['model']} --mode={mode}{trigger} --adapter={final})")
        if final_rows:
            s = final_eval(run, final_rows)
            log(step=step, event="final_eval", **{k: v for k, v in s.items() if isinstance(v, (int, float))})
            run.say(f"final eval on {s['n']} test problems: pass@1 {s['pass@1']:.4f}")
            result["final_eval"] = s
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


# -----------------------------------------------------------------------------
# the final eval: greedy pass@1 on the task's test problems


def eval_mode(run):
    return "memgen" if isinstance(run.policy, memgen.MemGen) else "lora"


def plan_final_eval(run, total):
    """The test rows of the final eval, announced at start with a time estimate. FINAL_EVAL_LIMIT: -1 none, N the
    first N, 0 = follow the run's size: as many problems as the run trains on examples (steps x batch size), at
    most all - so a full run evaluates the whole test set and a --max_steps=2 run never turns into hours."""
    cfg = run.cfg
    if cfg["final_eval_limit"] < 0 or not run.main:
        return []
    if getattr(run.task, "AGENT", False):
        run.say("no final eval for a multi-turn task: run its episodes with eval.py --adapter=<run>/final "
                "(docs/agent.md)")
        return []
    rows = run.task.load("test")
    n = min(len(rows), cfg["final_eval_limit"] or total * cfg["batch_size"])
    seconds = evaluation.estimate_seconds(run.policy, run.tok, run.task, rows[:n], eval_mode(run),
                                          cfg["eval_batch_size"], cfg["max_new_tokens"])
    how = "the run's size" if not cfg["final_eval_limit"] else "--final_eval_limit"
    run.say(f"final eval after training: {n} of {len(rows)} test problems ({how}; --final_eval_limit=-1 skips it), "
            f"about {_duration(seconds)} at the decode speed measured now")
    return rows[:n]


def _duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 \
        else f"{seconds:.0f} s"


def final_eval(run, rows):
    """Greedy pass@1 of the trained policy on `rows`: final_eval.jsonl (one row per problem), final_eval.json."""
    path = os.path.join(run.out_dir, "final_eval.jsonl")
    if os.path.exists(path):
        os.remove(path)  # the adapters changed since any earlier eval
    summary = evaluation.evaluate(run.policy, run.tok, run.task, rows, eval_mode(run),
                                  batch_size=run.cfg["eval_batch_size"], max_new_tokens=run.cfg["max_new_tokens"],
                                  seed=run.cfg["seed"], out_path=path, progress=run.cfg["progress"])
    write_json(os.path.join(run.out_dir, "final_eval.json"), summary)
    return summary


# -----------------------------------------------------------------------------
# run folder: checkpoints, resume, final/, log.jsonl


def write_checkpoint(out_dir, step, save, optimizer, keep):
    """out_dir/step-NNNNNNN/: the adapters (save) and state.pt (optimizer + step), built in a hidden temp folder
    and renamed into place, so a kill at any moment leaves only whole checkpoints. Older ones beyond `keep` go."""
    final = os.path.join(out_dir, f"step-{step:07d}")
    tmp = os.path.join(out_dir, f".step-{step:07d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out_dir):
    """The run folder's step-NNNNNNN/ checkpoints, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("step-") and n[5:].isdigit())
    return [os.path.join(out_dir, n) for n in names if os.path.isfile(os.path.join(out_dir, n, "state.pt"))]


def find_resume(path):
    """--resume PATH -> (run folder, checkpoint folder): a run folder resumes from its latest checkpoint."""
    path = os.path.normpath(path)  # relative stays relative: config.json and messages hold the path as given
    if os.path.isfile(os.path.join(path, "state.pt")):
        return os.path.dirname(path) or ".", path
    found = checkpoints(path)
    if not found:
        raise TrainError(f"--resume={path}: no checkpoint there (expected step-NNNNNNN/state.pt folders written by "
                         "a training run)")
    return path, found[-1]


def _readable(ckpt):
    try:
        torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this one"
        return False


def restore(run, load, optimizer):
    """Load run.resume's adapters (load) and optimizer state; return the step it was taken at. A damaged
    checkpoint is one line naming the file and the previous good checkpoint to resume from."""
    ckpt = run.resume
    state_file = os.path.join(ckpt, "state.pt")
    try:
        load(ckpt)
        state = torch.load(state_file, map_location=run.device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        return state["step"]
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds for a damaged file
        first = " ".join(str(e).split()).split(". ")[0]
        reason = f"{type(e).__name__}: {first}" if first and len(first) <= 100 else type(e).__name__
        older = [c for c in checkpoints(os.path.dirname(ckpt)) if c < ckpt and _readable(c)]
        then = (f"resume from the previous good checkpoint: --resume={older[-1]}" if older else
                "no earlier checkpoint is readable: start over with --overwrite=true")
        raise TrainError(f"cannot restore {state_file}: the checkpoint is damaged ({reason}); {then}") from None


def save_final(out_dir, save):
    """out_dir/final/ with the trained adapters, built in a temp folder and renamed."""
    final, tmp = os.path.join(out_dir, "final"), os.path.join(out_dir, ".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


class Log:
    """log.jsonl, one line per event, flushed at once (a killed run keeps what it logged); a fresh run starts it
    anew, a run resumed at step `resumed` appends after dropping the lines logged past that step (a killed run
    logs steps after its last checkpoint; the resumed run does them again, and each step should appear once)."""

    def __init__(self, path, active, fresh, resumed=0):
        self.f = None
        if not active:
            return
        if not fresh and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()
            keep = [line for line in lines if line.endswith("\n") and json.loads(line).get("step", 0) <= resumed]
            if len(keep) < len(lines):  # rewritten whole (temp + rename), so a kill here loses nothing
                write_atomic(path, "".join(keep))
        self.f = open(path, "w" if fresh else "a")

    def __call__(self, **row):
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()


# -----------------------------------------------------------------------------
# distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK


def dist_setup(device):
    """(rank, world size, this process's device); one process without torchrun."""
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
    """Sum a tensor (or number) over processes; identity in a single process."""
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
