"""
train_weaver.py: train MemGen's memory weaver by SFT or GRPO - or, for the paper's baselines, a plain LoRA on the
reasoner - on a task of the data registry (GSM8K by default).

    python train_weaver.py --data=gsm8k                                  # MemGen-SFT, Qwen2.5-1.5B-Instruct
    python train_weaver.py --method=grpo --adapter=out/sft-gsm8k-Qwen2.5-1.5B-Instruct/final   # MemGen-GRPO
    python train_weaver.py --method=sft-lora                             # the SFT baseline (LoRA on the reasoner)
    python train_weaver.py --model=/path/to/folder --max_steps=200       # a short run (its final eval is short too)
    python train_weaver.py --resume=out/sft-gsm8k-Qwen2.5-1.5B-Instruct  # continue a killed run exactly
    torchrun --nproc_per_node=2 train_weaver.py ...                      # data parallel (gloo on CPU, nccl on GPU)

The run folder (--out_dir) receives config.json, log.jsonl (one line per step and per validation),
step-NNNNNNN/ checkpoints (adapters + optimizer state, written to a temp folder and renamed), final/ (the trained
adapters, which `eval.py --adapter` reads) and final_eval.json.

What is trained (the reasoner's own weights never change):
  sft, grpo            the weaver: its LoRA, the prompt/inference queries, their LayerNorms and scales, and the
                       reasoner->weaver and weaver->reasoner maps (memgen.MemGen.trainable("weaver"))
  sft-lora, grpo-lora  one LoRA ("sft") on the reasoner itself, same layers and rank: the paper's SFT/GRPO rows

A saved weaver's weaver.json records the rules it was trained under - K, N, BOUNDARY, the delimiters, LATENT_INIT
(memgen.RULES) - and every script that loads it runs it by them: --adapter continues under the adapter's rules and
LoRA shape (rank, alpha, targets; dropout unless given), and --k, --n, --boundary, --latent_init or a --lora_* shape
given against them is refused.
"""
import torch

import data
import errors
import evaluation
import lora
import loading
import memgen
import official
import settings
import training
from model import generate

# --- what to train: defaults are the paper's, and the official configs/latent_memory/gsm8k.yaml where it is silent
DATA = "gsm8k"  # the task (data.get_task): gsm8k, humaneval, or FORMAT:FILE.jsonl with FORMAT qa|choice|fever
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id org/name (downloaded once) or a local Hugging Face model folder
METHOD = "sft"  # sft | grpo train MemGen's weaver; sft-lora | grpo-lora train a LoRA on the reasoner (baselines)
ADAPTER = ""  # start from these saved adapters (a final/ or step-NNNNNNN/ folder), e.g. GRPO after SFT
OUT_DIR = ""  # the run folder; "" = out/<method>-<data>-<model folder name>
RESUME = ""  # continue a killed run exactly: its run folder (latest checkpoint) or one step-NNNNNNN/ folder
OVERWRITE = False  # start over in an OUT_DIR that already holds checkpoints or final/ (deletes them)
# --- optimisation
LR = 1e-5  # peak learning rate of AdamW (the paper's 1e-5 for SFT)
EPOCHS = 2  # passes over the training set (SFT 2 as in the paper; GRPO is usually run for 1)
MAX_STEPS = 0  # > 0: train this many optimizer steps instead of EPOCHS (the cosine schedule spans them)
STOP_STEP = 0  # > 0: stop after this step, keeping the run's schedule (train in chunks; --resume goes on to the end)
BATCH_SIZE = 4  # per optimizer step over all processes: examples (SFT) or prompts (GRPO, each x GROUP rollouts)
MICRO_BATCH = 4  # rows per forward/backward (gradient accumulation when smaller than a process's share)
WARMUP = 0.1  # fraction of the steps with a linear warm-up, then cosine decay to 0
WEIGHT_DECAY = 0.0  # AdamW weight decay of the trained tensors
GRAD_CLIP = 1.0  # clip the gradient's global norm to this; 0 = no clipping
MAX_LEN = 1024  # prompt + target tokens; longer targets are cut, prompts that alone exceed it are skipped
LIMIT = 0  # train on the first LIMIT training rows (0 = all)
# --- MemGen (paper §4.1: K = 8, at most 3 inference insertions, LoRA r 16 / alpha 32 / dropout 0.1 on q_proj, v_proj)
K = memgen.K  # latent vectors the weaver writes per insertion
N = memgen.N  # at most N insertions after sentence ends per completion (plus the one at the end of the prompt)
BOUNDARY = memgen.BOUNDARY  # where insertions go: official (after every , . newline) | sentence (not inside 3.5, 1,000)
LATENT_INIT = memgen.LATENT_INIT  # a new weaver's first latents: paper (nn.Linear's init) | embedding (token scale)
TRIGGER_MODE = "always"  # when to insert in GRPO rollouts and validation: always | learned | random | off
LORA_RANK = lora.RANK  # rank r of the LoRA adapter (the weaver's, or the baseline's)
LORA_ALPHA = lora.ALPHA  # LoRA scale numerator: the update is (alpha / r) B A x
LORA_DROPOUT = lora.DROPOUT  # dropout on the LoRA input while training, a probability in [0, 1)
LORA_TARGETS = ",".join(lora.TARGETS)  # the Linear layers that get LoRA, comma-separated (q_proj,k_proj,...)
# --- GRPO
GROUP = 8  # rollouts per prompt; advantages are relative to the prompt's group
TEMPERATURE = 1.0  # sampling temperature of the rollouts (> 0)
MAX_NEW_TOKENS = 512  # longest completion: per rollout, and in validation and the final eval
STD_FLOOR = 1e-4  # advantages are (r - mean) / max(std, STD_FLOOR) within a group
# --- runtime and bookkeeping
SEED = 42  # seeds the adapters' initialisation, the batch order, dropout and rollouts
# the frozen base model runs in DTYPE; everything trained stays float32 and is cast at its output (mixed precision
# without autocast)
DTYPE = "auto"  # auto (bfloat16 on GPUs and on CPUs with native bf16, else float32) | float32 | bfloat16 | float16
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
GRAPHS = "auto"  # decode steps replayed as CUDA graphs: auto (on with CUDA, off on a CPU) | true | false
EVAL_INTERVAL = 100  # validate every this many steps (and at the end); 0 = only at the end
VAL_SIZE = 64  # validation problems (SFT: held-out token NLL; GRPO: greedy accuracy); 0 = no validation
SAVE_INTERVAL = 100  # write a checkpoint every this many steps (and at the end); 0 = only at the end
KEEP_CHECKPOINTS = 2  # checkpoints kept in the run folder (older ones are deleted)
FINAL_EVAL_LIMIT = 0  # final greedy eval: 0 = steps x batch size test problems (at most all), N = first N, -1 = none
EVAL_BATCH_SIZE = 16  # rows per generate call in validation and the final eval
ALLOW_OTHER_BASE = False  # load an --adapter trained on another base model anyway (same shapes required)
PROGRESS = True  # show a progress bar
# -----------------------------------------------------------------------------
_METHODS = ("sft", "grpo", "sft-lora", "grpo-lora")
_PROG = "train_weaver.py"


_RULES = ("k", "n", "boundary", "latent_init")  # the settings a saved weaver records (memgen.RULES) and brings back


def check(cfg):
    settings.one_of(cfg, "method", _METHODS)
    cfg["adapter"] = official.resolve_adapter(cfg["adapter"])  # an official MemGen checkpoint: converted once
    settings.one_of(cfg, "trigger_mode", memgen.TRIGGER_MODES)
    settings.one_of(cfg, "boundary", memgen.BOUNDARIES)
    settings.one_of(cfg, "latent_init", memgen.LATENT_INITS)


def main(argv=None):
    """Train; returns {"step", "out_dir", "policy" (the trained MemGen or LoRA model), validation metrics,
    "final_eval"}."""
    with errors.one_line_errors(_PROG):
        run = training.start(_PROG, argv, globals(), check, prefix="{method}")
        cfg = run.cfg
        run.rl, is_mg = "grpo" in cfg["method"], cfg["method"] in ("sft", "grpo")
        run.model, run.tok = loading.load_base(cfg["model"], cfg["dtype"], run.device)
        run.task = data.get_task(cfg["data"])
        build_policy(run, is_mg)  # K and N may come from --adapter
        training.check_context(cfg, run.model, latents=(cfg["n"] + 1) * cfg["k"] if is_mg else 0)
        training.load_examples(run, need_target=not run.rl)
        return training.fit(run, grpo_step if run.rl else sft_step, validate,
                            save=lambda path: save(run, path), load=lambda path: load(run, path))


def build_policy(run, is_mg):
    """run.policy (a MemGen, or the model with an "sft" LoRA) and run.params, its trainable tensors; the same seed
    in every process gives the same initial adapters. The reasoner is frozen."""
    cfg, model = run.cfg, run.model
    layers = tuple(t.strip() for t in cfg["lora_targets"].split(",") if t.strip())
    loading.check_lora_targets(model, layers)
    torch.manual_seed(cfg["seed"])
    if cfg["adapter"] and not run.resume:  # an adapter that goes on training keeps the shape it was trained with
        layers = adapter_shape(run, "weaver" if is_mg else "sft", layers)
    lora_shape = (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], layers)
    if is_mg:
        r = weaver_rules(run)
        run.policy = memgen.MemGen(model, run.tok, r["k"], r["n"], cfg["trigger_mode"], *lora_shape,
                                   boundary=r["boundary"], latent_init=r["latent_init"], delimiters=r["delimiters"])
        params = run.policy.trainable("weaver")
    else:
        lora.inject(model, ["sft"], layers, *lora_shape[:3])
        run.policy, params = model, lora.parameters(model, "sft")
    if cfg["adapter"] and not run.resume:  # adapter_shape has checked its base model
        load(run, cfg["adapter"])
    run.params = list(params.values())
    for p in model.parameters():  # only the adapter tensors learn
        p.requires_grad_(any(p is q for q in run.params))
    run.vocab = min(run.tok.vocab_size, model.cfg.vocab_size)


def adapter_shape(run, part, layers):
    """The LoRA rank, alpha and targets of the --adapter being continued, from its json, into the settings: an alpha
    left at the default while the adapter was trained with another would silently rescale its update. A shape setting
    given on the command line that contradicts the adapter is an error; --lora_dropout may change (the adapter's is
    kept unless given). Returns the targets."""
    cfg = run.cfg
    info = loading.check_adapter(cfg["adapter"], part, run.model, allow_other_base=cfg["allow_other_base"])
    saved = {"lora_rank": info["rank"], "lora_alpha": info["alpha"], "lora_targets": tuple(info["targets"])}
    given = {"lora_rank": cfg["lora_rank"], "lora_alpha": cfg["lora_alpha"], "lora_targets": layers}
    for key, value in saved.items():
        if key in run.given and given[key] != value:
            shown = ",".join(value) if key == "lora_targets" else value
            raise settings.SettingsError(f"--{key} contradicts {cfg['adapter']}/{part}.json, which was trained with "
                                         f"{key}={shown}: drop --{key} (the adapter brings its own)")
    cfg["lora_rank"], cfg["lora_alpha"] = info["rank"], info["alpha"]
    cfg["lora_targets"] = ",".join(info["targets"])
    if "lora_dropout" not in run.given:
        cfg["lora_dropout"] = info["dropout"]
    return saved["lora_targets"]


def weaver_rules(run):
    """The rules the weaver is built with (memgen.RULES): a new weaver's come from the settings; a weaver that goes
    on from --adapter (e.g. GRPO after SFT) keeps the ones it was trained with, which config.json then records, and
    a setting given on the command line that contradicts them is an error; a resumed run has them in its
    config.json (and its checkpoint the delimiters, which are no setting)."""
    cfg = run.cfg
    if run.resume or not cfg["adapter"]:
        base = memgen.rules_at(run.resume) if run.resume else memgen.OFFICIAL
        return dict(base, **{k: cfg[k] for k in _RULES})
    info = loading.check_adapter(cfg["adapter"], "weaver", run.model, allow_other_base=cfg["allow_other_base"])
    rules = loading.adapter_rules(cfg["adapter"], info, {k: cfg[k] for k in _RULES if k in run.given})
    cfg.update({k: rules[k] for k in _RULES})
    return rules


def save(run, path):
    if isinstance(run.policy, memgen.MemGen):
        memgen.save(run.policy, path, parts=("weaver",))
    else:
        lora.save_adapter(run.policy, "sft", path)


def load(run, path):
    if isinstance(run.policy, memgen.MemGen):
        memgen.load(run.policy, path, parts=("weaver",))
    else:
        lora.load_adapter(run.policy, "sft", path)


# -----------------------------------------------------------------------------
# SFT: the target completions' token NLL


def sft_step(run, batch, seed):
    """Teacher-forced NLL of the target completions, averaged over all completion tokens of the global batch."""
    run.policy.train()  # adapter dropout on (the base model has no dropout)
    # the loss counts the completion's tokens; in a multi-turn trajectory only the agent's turns (n_labels)
    n_tok = training.all_sum(sum(e.get("n_labels", len(e["completion"])) for e in batch))
    loss = 0.0
    for part in training.chunks(batch, run.cfg["micro_batch"]):
        s, _ = sft_loss(run, part)
        (s / n_tok).backward()
        loss += s.item()
    return dict(loss=training.all_sum(loss) / n_tok, tokens=int(n_tok))


def sft_loss(run, examples):
    """(summed NLL, tokens) of a micro-batch, through MemGen's training forward (prompt end + first N sentence ends
    get latents) or through the reasoner with its "sft" LoRA. Multi-turn trajectories (agent.encode_trajectories):
    the agent's turns only, MemGen inserting where the agent loop does."""
    if "agent" in examples[0]:
        import agent

        return agent.sft_nll(run.policy, examples, run.tok.pad_id, run.vocab)
    model = run.model
    ids, mask, prompt_len = memgen.right_pad([e["prompt"] for e in examples], [e["completion"] for e in examples],
                                             run.tok.pad_id, model.device)
    if isinstance(run.policy, memgen.MemGen):
        points = memgen.insertion_points(run.policy, ids, mask, prompt_len)
        h = memgen.teacher_forced(run.policy, ids, mask, prompt_len, points)
    else:
        h = training.adapter_hidden(model, ids, mask, "sft")
    return training.completion_nll(model, h, ids, mask, prompt_len, run.vocab)


def validate(run):
    """SFT: mean token NLL of the validation targets (all processes). GRPO: greedy accuracy (rank 0)."""
    if not run.val_set:
        return {}
    if run.rl:
        if not run.main:
            return {}
        s = evaluation.evaluate(run.policy, run.tok, run.task, run.val_set, training.eval_mode(run),
                                batch_size=run.cfg["eval_batch_size"], max_new_tokens=run.cfg["max_new_tokens"],
                                seed=run.cfg["seed"], progress=False)
        return {"val_acc": s["pass@1"]}
    run.policy.eval()
    nll = n = 0
    with torch.no_grad():
        for part in training.chunks(run.val_set[run.rank::run.world], run.cfg["micro_batch"]):
            s, c = sft_loss(run, part)
            nll, n = nll + s.item(), n + c
    return {"val_loss": training.all_sum(nll) / max(training.all_sum(n), 1)}


# -----------------------------------------------------------------------------
# GRPO: rollouts, rewards from the task's grader, group-relative advantages


def grpo_step(run, batch, seed):
    """On-policy GRPO with one update per batch (the PPO ratio is 1, its gradient is grad log-prob) and beta = 0:
    GROUP rollouts per prompt, each weighted by its reward relative to its group, token-level policy gradient
    averaged over all completion tokens of the global batch."""
    cfg = run.cfg
    run.policy.eval()  # no dropout: the policy that samples is the policy that is scored
    rows = [e for e in batch for _ in range(cfg["group"])]
    prompts = [e["prompt"] for e in rows]
    outs = rollouts(run, prompts, seed)
    rewards = training.task_rewards(run.task, rows, outs)
    adv = group_advantages(rewards, cfg["group"], cfg["std_floor"]).to(run.device)
    n_tok = training.all_sum(sum(len(o["ids"]) for o in outs))
    loss = 0.0
    for idx in training.chunks(list(range(len(outs))), cfg["micro_batch"]):
        logp, cmask = policy_logprobs(run, [prompts[i] for i in idx], [outs[i] for i in idx])
        s = -(adv[idx][:, None] * logp * cmask).sum()
        (s / n_tok).backward()
        loss += s.item()
    n = training.all_sum(len(outs))
    inserted = training.all_sum(sum(sum(t > 0 for t in o["insertions"]) for o in outs))  # after the prompt's
    return dict(loss=training.all_sum(loss) / n_tok, tokens=int(n_tok), reward=training.all_sum(sum(rewards)) / n,
                length=n_tok / n, insertions=inserted / n)


def rollouts(run, prompts, seed):
    """Sampled completions (EOS kept: it is a scored action) -> dicts with ids, text, insertions."""
    cfg = run.cfg
    if isinstance(run.policy, memgen.MemGen):
        return memgen.generate(run.policy, run.tok, prompts, cfg["max_new_tokens"], cfg["temperature"], seed=seed,
                               mode=cfg["trigger_mode"])
    with lora.use(run.policy, "sft"):
        seqs, texts = generate(run.policy, run.tok, prompts, cfg["max_new_tokens"], cfg["temperature"], seed=seed,
                               keep_eos=True)
    return [dict(ids=s, text=t, insertions=[]) for s, t in zip(seqs, texts)]


def policy_logprobs(run, prompts, outs):
    """Log-probs (B, Tc) of the rollouts' tokens under the policy being trained, and their mask: MemGen replays
    each rollout's insertions; the LoRA baseline reads the tokens with its adapter."""
    completions = [o["ids"] for o in outs]
    if isinstance(run.policy, memgen.MemGen):
        logp, cmask, _, _ = memgen.logprobs(run.policy, prompts, completions, [o["insertions"] for o in outs],
                                            pad_id=run.tok.pad_id)
        return logp, cmask
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, run.tok.pad_id, run.model.device)
    with lora.use(run.model, "sft"):
        _, h = run.model(ids, mask=mask, logits="none")
    return memgen.completion_logprobs(run.model, h, ids, prompt_len, completions, run.vocab)


def group_advantages(rewards, group, floor):
    """Each rollout's reward relative to its own prompt's group: (r - mean) / max(std, floor)."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True).clamp(min=floor)).view(-1)


if __name__ == "__main__":
    main()
