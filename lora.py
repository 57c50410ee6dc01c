"""
lora.py: hand-written LoRA with several named adapters on one frozen base model.

    y = W x + b + (alpha / r) * B (A (dropout(x)))        A: Kaiming-uniform, B: zeros -> starts equal to the base

MemGen keeps ONE copy of the base weights in memory. The weaver, the trigger and (for the LoRA-SFT/GRPO baselines)
the `sft` adapter are small A/B pairs living beside W in each target layer; `use(model, name)` makes one of them
active (or none, for the plain reasoner). Switching is a single attribute assignment on a state object that every
LoRA layer shares: no weights are copied or merged.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import linear

TARGETS = ("q_proj", "v_proj")  # the paper's (and the official code's) LoRA targets
RANK = 16
ALPHA = 32
DROPOUT = 0.1


class AdapterError(ValueError):
    pass


class Switch:
    """The one piece of state shared by all LoRA layers of a model: which adapter is active (None = base)."""

    def __init__(self):
        self.active = None


class LoRALinear(nn.Module):
    """Takes over an nn.Linear's weight and bias (same names, so checkpoint keys are unchanged) and adds adapters."""

    def __init__(self, linear, switch):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors, not copies
        self.switch = switch
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scale, self.dropout = {}, {}
        self.train(linear.training)  # a model in eval mode stays in eval mode (no adapter dropout)

    def add(self, name, r, alpha, dropout):
        out_f, in_f = self.weight.shape
        A = torch.empty(r, in_f, device=self.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(out_f, r, device=self.weight.device, dtype=torch.float32))
        self.scale[name], self.dropout[name] = alpha / r, dropout

    def forward(self, x):
        y = linear(x, self.weight, self.bias)  # the base product, in model.py's CPU-friendly layout
        name = self.switch.active
        if name is None or name not in self.lora_A:
            return y
        h = F.dropout(x, self.dropout[name], self.training)
        # adapters are kept in float32 (they are what we train); the product is added in the model's dtype
        h = F.linear(F.linear(h.to(torch.float32), self.lora_A[name]), self.lora_B[name])
        return y + (self.scale[name] * h).to(y.dtype)


def inject(model, names, targets=TARGETS, r=RANK, alpha=ALPHA, dropout=DROPOUT):
    """Add adapters `names` to every Linear whose attribute name is in `targets`. Returns the number of layers."""
    switch = getattr(model, "lora_switch", None)
    if switch is None:
        switch = model.lora_switch = Switch()
    found = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in targets:
                continue
            if isinstance(child, nn.Linear):
                child = LoRALinear(child, switch)
                setattr(module, child_name, child)
            for name in names:
                if name in child.lora_A:
                    raise AdapterError(f"adapter '{name}' already exists on this model")
                child.add(name, r, alpha, dropout)
            found += 1
    if not found:
        raise AdapterError(f"no layer named {list(targets)} found: pick targets among the model's Linear layers")
    model.lora_meta = getattr(model, "lora_meta", {})
    for name in names:
        model.lora_meta[name] = {"rank": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return found


class use:
    """`use(model, "weaver")` activates an adapter (None = the plain base); as a context manager it restores the
    previous one on exit."""

    def __init__(self, model, name):
        if name is not None and name not in getattr(model, "lora_meta", {}):
            raise AdapterError(f"unknown adapter '{name}': the model has {sorted(getattr(model, 'lora_meta', {}))}")
        self.switch = model.lora_switch if hasattr(model, "lora_switch") else Switch()
        self.previous = self.switch.active
        self.switch.active = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.switch.active = self.previous


def parameters(model, name):
    """The trainable tensors of one adapter, as {state-dict key: parameter}."""
    return {k: p for k, p in model.named_parameters() if k.endswith(f".lora_A.{name}") or k.endswith(f".lora_B.{name}")}


def save_adapter(model, name, path, extra=None, meta=None):
    """Write {path}/{name}.safetensors (+ .json). `extra`: more tensors to store beside the adapter (e.g. MemGen's
    weaver modules). Written to temp files and renamed, so a crash never leaves a half-written adapter."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in parameters(model, name).items()}
    tensors.update({k: v.detach().contiguous() for k, v in (extra or {}).items()})
    info = dict(model.lora_meta[name], adapter=name, base_model=model.cfg.name,
                hidden_size=model.cfg.hidden_size, num_layers=model.cfg.num_layers, **(meta or {}))
    st, js = os.path.join(path, f"{name}.safetensors"), os.path.join(path, f"{name}.json")
    save_file(tensors, st + ".tmp")
    with open(js + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(st + ".tmp", st)
    os.replace(js + ".tmp", js)


def load_adapter(model, name, path, extra=None):
    """Load {path}/{name}.safetensors into adapter `name` (created if absent) and, when given, the `extra` dict
    of parameters. Returns the adapter's json metadata. A file made for another model shape is a clear error."""
    from safetensors.torch import load_file

    st, js = os.path.join(path, f"{name}.safetensors"), os.path.join(path, f"{name}.json")
    if not (os.path.isfile(st) and os.path.isfile(js)):
        raise AdapterError(f"{path} holds no '{name}' adapter ({name}.safetensors + {name}.json): check --adapter")
    with open(js) as f:
        info = json.load(f)
    for key in ("hidden_size", "num_layers"):
        if info.get(key) != getattr(model.cfg, key):
            raise AdapterError(f"{st} was trained for a model with {key}={info.get(key)}, this one has "
                               f"{getattr(model.cfg, key)}: load it onto the base model it was made for "
                               f"({info.get('base_model')})")
    if name not in getattr(model, "lora_meta", {}):
        inject(model, [name], info["targets"], info["rank"], info["alpha"], info["dropout"])
    try:
        tensors = load_file(st)
    except Exception as e:
        raise AdapterError(f"cannot read {st}: {e}") from None
    want = dict(parameters(model, name), **(extra or {}))
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise AdapterError(f"{st} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, p in want.items():
            if p.shape != tensors[k].shape:
                raise AdapterError(f"{st}: {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(p.shape)}")
            p.copy_(tensors[k])
    return info
