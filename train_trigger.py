"""
train_trigger.py: train MemGen's memory trigger (paper §3.3) on top of a trained weaver.

    python train_trigger.py --data=gsm8k --adapter=out/sft-gsm8k-Qwen2.5-1.5B-Instruct/final
    python eval.py --mode=memgen --trigger_mode=learned --adapter=out/trigger-gsm8k-Qwen2.5-1.5B-Instruct/final

Only the trigger learns: its LoRA and its Linear(hidden, 2) head. The weaver and the reasoner are frozen. Each step
samples GROUP rollouts per prompt in which, at every allowed insertion point (the end of the prompt and sentence
ends, at most N inference insertions), the trigger draws d ~ Bernoulli(p(insert)). Rollout i earns

    R'_i = R(tau_i) - LAMBDA * sum_j max(0, d_ij - p_bar)

where R is the grader's 1/0 and p_bar the mean invocation rate of the rollouts whose reward is above the batch
median (the paper's reward-adaptive penalty: invoking memory more often than the successful rollouts do costs
reward; the official code leaves it out). The update is REINFORCE on the decision log-probs with the group-mean
baseline: loss = -sum_i (R'_i - mean of its group) * sum_j log pi(d_ij), averaged over rollouts.

Runs work as train_weaver.py's (--resume, torchrun, the run folder). Its checkpoints and final/ hold both weaver.*
(copied) and trigger.*, so eval.py loads final/ in one go.
"""
import os
import shutil

import torch

import data
import errors
import evaluation
import loading
import memgen
import official
import settings
import training

# --- what to train
DATA = "gsm8k"  # the task (data.get_task): gsm8k, humaneval, or FORMAT:FILE.jsonl with FORMAT qa|choice|fever
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # the base model the weaver was trained on: a hub id or a local model folder
ADAPTER = ""  # required: a weaver run's final/ (weaver.*), or a trigger run's final/ to continue its trigger too
OUT_DIR = ""  # the run folder; "" = out/trigger-<data>-<model folder name>
RESUME = ""  # continue a killed run exactly: its run folder (latest checkpoint) or one step-NNNNNNN/ folder
OVERWRITE = False  # start over in an OUT_DIR that already holds checkpoints or final/ (deletes them)
# --- optimisation
LR = 1e-6  # peak learning rate of AdamW (the paper's trigger learning rate)
EPOCHS = 1  # passes over the training prompts
MAX_STEPS = 0  # > 0: train this many optimizer steps instead of EPOCHS (the cosine schedule spans them)
STOP_STEP = 0  # > 0: stop after this step, keeping the run's schedule (train in chunks; --resume goes on to the end)
BATCH_SIZE = 4  # prompts per optimizer step over all processes (each x GROUP rollouts)
MICRO_BATCH = 8  # rollouts per forward/backward of the trigger
WARMUP = 0.1  # fraction of the steps with a linear warm-up, then cosine decay to 0
WEIGHT_DECAY = 0.0  # AdamW weight decay of the trigger's tensors
GRAD_CLIP = 1.0  # clip the gradient's global norm to this; 0 = no clipping
MAX_LEN = 1024  # prompts that alone reach this many tokens are skipped
LIMIT = 0  # train on the first LIMIT training rows (0 = all)
# --- REINFORCE
GROUP = 8  # rollouts per prompt; the baseline is the mean shaped reward of the prompt's group
TEMPERATURE = 1.0  # sampling temperature of the rollouts (> 0)
MAX_NEW_TOKENS = 512  # longest completion: per rollout, and in validation and the final eval
LAMBDA = 0.1  # weight of the invocation penalty (0 = plain REINFORCE on the task reward)
# --- runtime and bookkeeping
SEED = 42  # seeds the trigger's initialisation, the batch order and rollouts
DTYPE = "auto"  # the frozen base model's dtype: auto | float32 | bfloat16 | float16 (the trigger stays float32)
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
GRAPHS = "auto"  # decode steps replayed as CUDA graphs: auto (on with CUDA, off on a CPU) | true | false
EVAL_INTERVAL = 100  # validate (greedy accuracy and insertions, learned trigger) every this many steps; 0 = at the end
VAL_SIZE = 64  # validation problems; 0 = no validation
SAVE_INTERVAL = 100  # write a checkpoint every this many steps (and at the end); 0 = only at the end
KEEP_CHECKPOINTS = 2  # checkpoints kept in the run folder (older ones are deleted)
FINAL_EVAL_LIMIT = 0  # final greedy eval: 0 = steps x batch size test problems (at most all), N = first N, -1 = none
EVAL_BATCH_SIZE = 16  # rows per generate call in validation and the final eval
ALLOW_OTHER_BASE = False  # load an --adapter trained on another base model anyway (same shapes required)
PROGRESS = True  # show a progress bar
# -----------------------------------------------------------------------------
_PROG = "train_trigger.py"


def check(cfg):
    if not cfg["adapter"]:
        raise settings.SettingsError("--adapter is required: the final/ folder of a MemGen weaver run "
                                     "(train_weaver.py --method=sft or grpo), which holds weaver.safetensors")
    cfg["adapter"] = official.resolve_adapter(cfg["adapter"])  # an official MemGen checkpoint: converted once
    if not os.path.isfile(os.path.join(cfg["adapter"], "weaver.safetensors")):
        raise settings.SettingsError(f"--adapter={cfg['adapter']}: no weaver.safetensors there; pass the final/ "
                                     "folder of a MemGen (sft/grpo) weaver run")


def main(argv=None):
    """Train; returns {"step", "out_dir", "policy" (the MemGen), validation metrics, "final_eval"}."""
    with errors.one_line_errors(_PROG):
        run = training.start(_PROG, argv, globals(), check, prefix="trigger")
        cfg = run.cfg
        run.rl = True
        run.model, run.tok = loading.load_base(cfg["model"], cfg["dtype"], run.device)
        run.task = data.get_task(cfg["data"])
        build_policy(run)
        training.check_context(cfg, run.model, latents=(run.policy.n + 1) * run.policy.k)
        training.load_examples(run, need_target=False)
        run.policy.eval()  # no adapter dropout: the trigger that sampled the decisions is the one that is scored
        return training.fit(run, trigger_step, validate, save=lambda path: save(run, path),
                            load=lambda path: memgen.load(run.policy, path, parts=("trigger",)))


def build_policy(run):
    """run.policy: a MemGen shaped like the saved weaver, with the weaver (and a saved trigger, if the folder holds
    one) loaded; run.params: the trigger's tensors, the only ones that learn."""
    torch.manual_seed(run.cfg["seed"])
    run.policy = loading.memgen_for(run.model, run.tok, run.cfg["adapter"], "learned", run.cfg["allow_other_base"])
    run.params = list(run.policy.trainable("trigger").values())
    for p in run.policy.parameters():
        p.requires_grad_(any(p is q for q in run.params))


def save(run, path):
    memgen.save(run.policy, path, parts=("trigger",))
    for ext in ("safetensors", "json"):  # the weaver it was trained with goes along, unchanged
        shutil.copyfile(os.path.join(run.cfg["adapter"], f"weaver.{ext}"), os.path.join(path, f"weaver.{ext}"))


def trigger_step(run, batch, seed):
    """REINFORCE on the trigger's sampled decisions, with the reward-adaptive invocation penalty and the group-mean
    baseline, averaged over the rollouts of the global batch."""
    cfg = run.cfg
    rows = [e for e in batch for _ in range(cfg["group"])]
    prompts = [e["prompt"] for e in rows]
    outs = memgen.generate(run.policy, run.tok, prompts, cfg["max_new_tokens"], cfg["temperature"], seed=seed,
                           mode="learned", trigger_sample=True)
    rewards = training.task_rewards(run.task, rows, outs)
    decisions = [[d for _, _, d in o["decisions"]] for o in outs]
    # p_bar is over the whole (global) batch: gather rewards and invocation rates from every process
    p_bar = adaptive_rate(training.all_gather(rewards), training.all_gather(invocation_rates(decisions)))
    shaped = penalised_rewards(rewards, decisions, cfg["lambda"], p_bar)
    groups = shaped.view(-1, cfg["group"])
    adv = (groups - groups.mean(1, keepdim=True)).view(-1).float().to(run.device)
    n_roll = training.all_sum(len(outs))
    loss = 0.0
    for idx in training.chunks(list(range(len(outs))), cfg["micro_batch"]):
        dlogp, dmask = memgen.trigger_logprobs(run.policy, [prompts[i] for i in idx], [outs[i]["ids"] for i in idx],
                                               [outs[i]["decisions"] for i in idx], run.tok.pad_id)
        s = -(adv[idx] * (dlogp * dmask).sum(1)).sum()
        (s / n_roll).backward()
        loss += s.item()
    n_dec = training.all_sum(sum(len(d) for d in decisions))
    return dict(loss=training.all_sum(loss) / n_roll, reward=training.all_sum(sum(rewards)) / n_roll,
                shaped_reward=training.all_sum(shaped.sum().item()) / n_roll, p_bar=p_bar,
                invocation_rate=training.all_sum(sum(sum(d) for d in decisions)) / max(n_dec, 1))


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


def validate(run):
    """Greedy accuracy and insertions per completion with the learned trigger, on rank 0."""
    if not (run.val_set and run.main):
        return {}
    s = evaluation.evaluate(run.policy, run.tok, run.task, run.val_set, "memgen",
                            batch_size=run.cfg["eval_batch_size"], max_new_tokens=run.cfg["max_new_tokens"],
                            seed=run.cfg["seed"], progress=False)
    return {"val_acc": s["pass@1"], "val_insertions": s.get("mean_insertions", 0.0)}


if __name__ == "__main__":
    main()
