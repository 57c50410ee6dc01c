"""
loading.py: what every entry point loads before it works - the device, the base model and its tokenizer, saved
adapters - each with the checks that turn a bad input into one line that names it and says what to do.

    device = resolve_device("auto")                      # "cuda" asked for without CUDA is refused here
    model, tok = load_base("Qwen/...", "auto", device)   # a hub id is downloaded once; a local-looking path never is
    check_adapter(folder, "weaver", model)               # the base-model check, from the adapter's json
    mg = memgen_for(model, tok, folder, "always", given={"boundary": "official"})   # built with the adapter's rules
    policy = load_policy("memgen", model, tok, folder, "always")

Each error is a LoadError (or the ModelError / AdapterError of model.py and lora.py); errors.one_line_errors turns
them into one line for the user.
"""
import json
import os

import torch

import lora
import memgen

MODES = ("vanilla", "lora", "memgen")


class LoadError(ValueError):
    """A model, adapter or device that cannot be used; the message says which and what to do."""


# -----------------------------------------------------------------------------
# device and base model


def resolve_device(name):
    """--device: "auto" (CUDA when there is a GPU, else CPU), "cpu", "cuda", "cuda:N"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LoadError(f"unknown --device={name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"CUDA was asked for (--device={name}) but this torch has no CUDA (or no GPU is "
                            "visible); use --device=cpu or --device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoadError(f"--device={name}: this machine shows {torch.cuda.device_count()} GPU(s), numbered "
                            "from 0")
    return name


def load_base(model_name, dtype, device):
    """The frozen base model and its tokenizer. A hub id (org/name) is downloaded once into the cache; a name that
    looks like a local path must be an existing folder (data.download.resolve_model)."""
    from data.download import resolve_model
    from model import load_model
    from tokenizer import load_tokenizer

    folder = resolve_model(model_name)
    return load_model(folder, dtype=dtype, device=device), load_tokenizer(folder)


def check_lora_targets(model, layers):
    """--lora_targets must name Linear layers of this model (e.g. q_proj, v_proj)."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, lora.LoRALinear)) and "." in n})  # not lm_head
    bad = [t for t in layers if t not in names]
    if bad or not layers:
        raise LoadError(f"--lora_targets: {', '.join(bad) or '(none)'} is not a Linear layer of this model; pick "
                        f"from {', '.join(names)}")


# -----------------------------------------------------------------------------
# adapters


def _same_model(a, b):
    """Folder names of the same model: a hub download's folder (org--name) matches a copy named name."""
    return str(a).split("--")[-1] == str(b).split("--")[-1]


def adapter_info(folder, part):
    """The json that lora.save_adapter wrote beside {folder}/{part}.safetensors."""
    path = os.path.join(folder, f"{part}.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, f"{part}.safetensors")):
        raise LoadError(f"{folder} holds no {part} adapter ({part}.safetensors + {part}.json): pass the folder a "
                        "training run saved (its final/ or a step-NNNNNNN/)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read {path} ({e}); the adapter folder is damaged") from None


def check_adapter(folder, part, model, allow_other_base=False):
    """An adapter must have been trained on this base model (unless allow_other_base). Returns its json."""
    info = adapter_info(folder, part)
    if not allow_other_base and not _same_model(info.get("base_model"), model.cfg.name):
        raise LoadError(f"{folder}/{part}.json was trained on base model {info.get('base_model')}, this run loads "
                        f"{model.cfg.name}: pass that --model, or --allow_other_base=true to load it anyway")
    return info


def adapter_rules(folder, info, given=None):
    """The rules the weaver in `folder` was trained under (memgen.saved_rules of its json `info`). `given`:
    {setting: value} the user set on the command line (k, n, boundary, latent_init, ...); one that contradicts the
    adapter is refused, since the adapter decides how it must be run."""
    rules = memgen.saved_rules(info)
    for key, value in (given or {}).items():
        if key in rules and value != rules[key]:
            raise LoadError(f"--{key}={value} contradicts {folder}/weaver.json, which was trained with {key}="
                            f"{rules[key]}: drop --{key} (the adapter brings its own) or pass another --adapter")
    return rules


def memgen_for(model, tok, folder, mode, allow_other_base=False, given=None):
    """A MemGen built like the weaver saved in `folder` (its rules - K, N, boundary, delimiters, latent_init - and
    LoRA shape from weaver.json), with the weaver and, when the folder holds one, the trigger loaded. `given`: the
    command-line settings to hold against the adapter's rules (adapter_rules)."""
    info = check_adapter(folder, "weaver", model, allow_other_base=allow_other_base)
    r = adapter_rules(folder, info, given)
    mg = memgen.MemGen(model, tok, r["k"], r["n"], mode, info["rank"], info["alpha"], info["dropout"],
                       tuple(info["targets"]), boundary=r["boundary"], latent_init=r["latent_init"],
                       delimiters=r["delimiters"])
    parts = ["weaver"]
    if os.path.isfile(os.path.join(folder, "trigger.safetensors")):
        check_adapter(folder, "trigger", model, allow_other_base=allow_other_base)
        parts.append("trigger")
    memgen.load(mg, folder, parts)
    return mg


def load_policy(mode, model, tok, adapter, trigger_mode="always", allow_other_base=False):
    """What eval.py evaluates: the model (vanilla), the model with its "sft" LoRA (lora) or a MemGen (memgen)."""
    if mode == "lora":
        check_adapter(adapter, "sft", model, allow_other_base=allow_other_base)
        lora.load_adapter(model, "sft", adapter)
        return model
    if mode == "memgen":
        if adapter:
            return memgen_for(model, tok, adapter, trigger_mode, allow_other_base)
        return memgen.MemGen(model, tok, mode=trigger_mode)
    return model
