"""
train_trigger.py: train MemGen's memory trigger (paper §3.3) on top of a trained weaver.

    python train_trigger.py --data gsm8k --weaver out/sft-gsm8k-Qwen2.5-1.5B-Instruct/final
    python eval.py --data gsm8k --mode memgen --trigger learned --adapter out/trigger-gsm8k-Qwen2.5-1.5B-Instruct/final

Only the trigger learns: its LoRA and its Linear(hidden, 2) head. The weaver and the reasoner are frozen. Each step
samples GROUP rollouts per prompt in which, at every allowed insertion point (the end of the prompt and sentence
boundaries, at most N inference insertions), the trigger draws d ~ Bernoulli(p(insert)). Rollout i earns

    R'_i = R(tau_i) - LAMBDA * sum_j max(0, d_ij - p_bar)

where R is the grader's 1/0 and p_bar the mean invocation rate of the rollouts whose reward is above the batch
median (the paper's reward-adaptive penalty: invoking memory more often than the successful rollouts do costs
reward; the official code leaves it out). The update is REINFORCE on the decision log-probs with the group-mean
baseline: loss = -sum_i (R'_i - mean of its group) * sum_j log pi(d_ij), averaged over rollouts.

Settings work as in train_weaver.py (--key=value for any constant below, --resume RUN_DIR, torchrun). The run
folder holds checkpoints and final/ with both weaver.* (copied) and trigger.*, so eval.py can load it in one go.
"""
import os
import shutil
import sys
import time

import torch

import memgen
import train_weaver as tw
from train_weaver import TrainError

# -----------------------------------------------------------------------------
DATA = "gsm8k"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
WEAVER = ""  # a folder with weaver.safetensors + weaver.json (train_weaver.py's final/ or a step-N/): required
OUT_DIR = ""  # "" -> out/trigger-<data>-<model folder name>
RESUME = ""
INIT = ""  # start from a saved trigger (trigger.safetensors)
LR = 1e-6  # the paper's trigger learning rate
EPOCHS = 1
MAX_STEPS = 0
STOP_STEP = 0
BATCH_SIZE = 4  # prompts per step over all processes (x GROUP rollouts)
MICRO_BATCH = 8  # rollouts per forward/backward of the trigger
WARMUP = 0.1
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0
MAX_LEN = 1024
LIMIT = 0
GROUP = 8
TEMPERATURE = 1.0
MAX_NEW_TOKENS = 512
LAMBDA = 0.1  # weight of the invocation penalty (0 = plain REINFORCE on the task reward)
SEED = 42
DTYPE = "auto"  # as in train_weaver.py: the frozen base in this dtype, the trigger's tensors in float32
DEVICE = "auto"
EVAL_INTERVAL = 100
VAL_SIZE = 64
SAVE_INTERVAL = 100
KEEP_CHECKPOINTS = 2
FINAL_EVAL_LIMIT = 0  # 0 = all test problems, -1 = skip
EVAL_BATCH_SIZE = 16
PROGRESS = True
# -----------------------------------------------------------------------------


def invocation_rates(decisions):
    """Per rollout, the fraction of the trigger's decisions that inserted memory (0 when it was never asked)."""
    return [sum(d) / len(d) if len(d) else 0.0 for d in decisions]


def adaptive_rate(rewards, rates):
    """p_bar: the mean invocation rate of the rollouts whose reward is above the batch median - or, when none is
    strictly above it (binary rewards with most rollouts correct, or all equal), of those with the best reward."""
    r, rates = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(rates, dtype=torch.float64)
    good = r > r.median()
    if not good.any():
        good = r == r.max()
    return rates[good].mean().item()


def penalised_rewards(rewards, decisions, lam, p_bar):
    """R'_i = R_i - lam * sum_j max(0, d_ij - p_bar): every insertion beyond the good rollouts' rate costs."""
    over = [sum(max(0.0, d - p_bar) for d in ds) for ds in decisions]
    return torch.as_tensor(rewards, dtype=torch.float64) - lam * torch.tensor(over, dtype=torch.float64)


def check(cfg):
    cfg = dict(cfg, method="grpo", trigger_mode="learned")  # the checks shared with train_weaver.py
    tw.check(cfg)
    if not cfg["weaver"]:
        raise TrainError("--weaver DIR is required: the folder a weaver training saved (with weaver.safetensors)")
    if not os.path.isfile(os.path.join(cfg["weaver"], "weaver.safetensors")):
        raise TrainError(f"--weaver {cfg['weaver']}: no weaver.safetensors there; pass train_weaver.py's final/ "
                         "folder of a MemGen (sft/grpo) run")
    if cfg["lambda"] < 0:
        raise TrainError(f"--lambda must be >= 0, got {cfg['lambda']}")


def reward(text, gold, rollout):
    """The task reward (1/0 from the grader); tests swap in rigged rewards here."""
    return tw.reward(text, gold, rollout)


def build(cfg, device):
    """Base model + MemGen shaped like the saved weaver; the weaver loaded and frozen; the trigger trainable."""
    import json

    model, tok = tw.load_base(cfg, device)
    with open(os.path.join(cfg["weaver"], "weaver.json")) as f:
        info = json.load(f)
    mg = memgen.MemGen(model, tok, info.get("k", memgen.K), info.get("n", memgen.N), "learned", info["rank"],
                       info["alpha"], info["dropout"], tuple(info["targets"]))
    try:
        memgen.load(mg, cfg["weaver"], parts=("weaver",))
    except Exception as e:
        raise TrainError(f"--weaver {cfg['weaver']}: {e}") from None
    params = mg.trainable("trigger")
    trainable = list(params.values())
    for p in mg.parameters():
        p.requires_grad_(any(p is q for q in trainable))
    return model, tok, mg, trainable


def save(mg, cfg, path):
    memgen.save(mg, path, parts=("trigger",))
    for ext in ("safetensors", "json"):  # the weaver it was trained with goes along, unchanged
        shutil.copyfile(os.path.join(cfg["weaver"], f"weaver.{ext}"), os.path.join(path, f"weaver.{ext}"))


def main(argv=None):
    prog = "train_trigger.py"
    try:
        return train(sys.argv[1:] if argv is None else list(argv), prog)
    except TrainError as e:
        tw.die(prog, str(e))


def train(argv, prog):
    from tqdm import tqdm

    import eval as ev

    cfg, resume, rank, world, device = tw.start(argv, globals(), prog, check)
    out_dir = cfg["out_dir"] = cfg["out_dir"] or tw.default_out(cfg, "trigger")
    main_proc = rank == 0
    torch.manual_seed(cfg["seed"])
    model, tok, mg, params = build(cfg, device)
    if cfg["init"] and not resume:
        memgen.load(mg, cfg["init"], parts=("trigger",))

    rows = tw.load_rows(cfg, "train")
    if cfg["limit"]:
        rows = rows[:cfg["limit"]]
    train_set, skipped = tw.encode_examples(rows, tok, cfg["max_len"], need_target=False)
    val_set = tw.load_rows(cfg, "val")[:cfg["val_size"]]
    total, stop = tw.plan(cfg, len(train_set))
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = tw.restore(resume, lambda path: memgen.load(mg, path, parts=("trigger",)), optimizer, device) \
        if resume else 0
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        tw.write_json(os.path.join(out_dir, "config.json"), cfg)
        print(f"{prog}: trigger on {len(train_set)} prompts ({skipped} over max_len skipped), {total} steps of "
              f"{cfg['batch_size']} prompts x {cfg['group']}, {mg.count()['trigger']:,} trainable parameters, "
              f"{model.dtype} on {device}, {world} process(es) -> {out_dir}"
              + (f" (resuming at step {step})" if step else ""), file=sys.stderr)
    log = tw.Log(os.path.join(out_dir, "log.jsonl"), main_proc)

    def validate():
        if not (val_set and main_proc):
            return {}
        s = ev.evaluate(mg, tok, val_set, "memgen", batch_size=cfg["eval_batch_size"],
                        max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"], trigger="learned", progress=False)
        return {"val_acc": s["pass@1"], "val_insertions": s.get("mean_insertions", 0.0)}

    mg.eval()  # no adapter dropout: the trigger that sampled the decisions is the one that is scored
    bar = tqdm(total=stop, initial=step, desc="train trigger", unit="step",
               disable=not (main_proc and cfg["progress"]) or None)
    t_start = time.time()
    while step < stop:
        t0 = time.time()
        lr = tw.lr_at(step, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        mine = [train_set[i] for i in tw.batch_indices(step, len(train_set), cfg["batch_size"],
                                                       cfg["seed"])][rank::world]
        prompts = [e["prompt"] for e in mine for _ in range(cfg["group"])]
        golds = [e["answer"] for e in mine for _ in range(cfg["group"])]
        outs = memgen.generate(mg, tok, prompts, cfg["max_new_tokens"], cfg["temperature"],
                               seed=cfg["seed"] + tw.STEP_SEED_STRIDE * step + rank, mode="learned",
                               trigger_sample=True)
        rewards = [reward(o["text"], g, o) for o, g in zip(outs, golds)]
        decisions = [[d for _, _, d in o["decisions"]] for o in outs]
        # the penalty's p_bar is over the whole (global) batch: gather rewards and invocation rates
        p_bar = adaptive_rate(tw.all_gather(rewards), tw.all_gather(invocation_rates(decisions)))
        shaped = penalised_rewards(rewards, decisions, cfg["lambda"], p_bar)
        groups = shaped.view(-1, cfg["group"])  # REINFORCE with the group-mean baseline
        adv = (groups - groups.mean(1, keepdim=True)).view(-1).float().to(device)
        n_roll = tw.all_sum(len(outs))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for idx in tw.chunks(list(range(len(outs))), cfg["micro_batch"]):
            dlogp, dmask = memgen.trigger_logprobs(mg, [prompts[i] for i in idx], [outs[i]["ids"] for i in idx],
                                                   [outs[i]["decisions"] for i in idx], tok.pad_id)
            s = -(adv[idx] * (dlogp * dmask).sum(1)).sum()
            (s / n_roll).backward()
            loss_sum += s.item()
        tw.sync_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
        optimizer.step()
        step += 1
        n_dec = tw.all_sum(sum(len(d) for d in decisions))
        row = dict(step=step, loss=tw.all_sum(loss_sum) / n_roll, lr=lr, grad_norm=grad_norm,
                   reward=tw.all_sum(sum(rewards)) / n_roll, shaped_reward=tw.all_sum(shaped.sum().item()) / n_roll,
                   invocation_rate=tw.all_sum(sum(sum(d) for d in decisions)) / max(n_dec, 1), p_bar=p_bar,
                   elapsed=round(time.time() - t_start, 3), step_s=round(time.time() - t0, 3))
        log(**row)
        bar.set_postfix({k: f"{row[k]:.4g}" for k in ("reward", "invocation_rate", "lr")})
        bar.update(1)
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < stop:
            v = validate()
            if v:
                log(step=step, **v)
                bar.write(f"step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()))
        if (cfg["save_interval"] and step % cfg["save_interval"] == 0) or step == stop:
            if main_proc:
                tw.write_checkpoint(out_dir, step, lambda p: save(mg, cfg, p), optimizer, cfg["keep_checkpoints"])
            tw.barrier()
    bar.close()

    result = {"step": step, "out_dir": out_dir, "target": mg}
    v = validate()
    if v:
        log(step=step, **v)
        print(f"{prog}: step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()), file=sys.stderr)
        result.update(v)
    if step == total and main_proc:
        final = tw.save_final(out_dir, lambda path: save(mg, cfg, path))
        print(f"{prog}: weaver + trigger saved to {final} (evaluate: python eval.py --data {cfg['data']} --model "
              f"{cfg['model']} --mode memgen --trigger learned --adapter {final})", file=sys.stderr)
        if cfg["final_eval_limit"] >= 0:
            s = tw.final_eval(mg, tok, cfg, "memgen", out_dir, trigger="learned")
            log(step=step, event="final_eval", **{k: v for k, v in s.items() if isinstance(v, (int, float))})
            print(f"{prog}: final eval on {s['n']} test problems: pass@1 {s['pass@1']:.4f}", file=sys.stderr)
            result["final_eval"] = s
    tw.barrier()
    if tw.dist.is_initialized():
        tw.dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
