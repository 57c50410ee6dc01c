"""
official.py: the official MemGen checkpoint layout (bingreeky/MemGen, MemGenModel.save_pretrained), converted once
into this project's adapter layout, so that --adapter of every entry point takes a released weaver.

    folder = resolve_adapter("Kana-s/MemGen/Qwen2.5-1.5B-Instruct/gsm8k/weaver-sft")  # hub path: downloaded once
    folder = resolve_adapter("path/to/an/official/checkpoint")                          # local: converted once
    folder = resolve_adapter("out/sft-gsm8k-M/final")                                   # ours: returned as it is

The official layout, one folder per trained MemGen:
    config.json       MemGenConfig: the base model's config plus the run's rules (prompt_latents_len,
                      inference_latents_len, max_prompt_aug_num, max_inference_aug_num, trigger_active, ...)
    projs.bin         {"reasoner_to_weaver": Linear state, "weaver_to_reasoner": Linear state}
    weaver.bin        {"prompt_query_latents": (K, D), "inference_query_latents": (K, D), "prompt_latent_ln": LayerNorm
                      state, "inference_latent_ln": ..., "prompt_latent_scale": (1,), "inference_latent_scale": (1,)}
    trigger.bin       {"output_layer": Linear(D, 2) state}
    weaver/weaver/    PEFT's folder of the LoRA adapter named "weaver": adapter_config.json (rank, alpha, dropout,
                      targets) + adapter_model.safetensors (or adapter_model.bin); keys
                      base_model.model.<module path>.lora_A.weight / .lora_B.weight
    trigger/trigger/  the same for the trigger
Each tensor has one place in memgen.MemGen (TENSORS below; LoRA: <module path>.lora_A.weaver). K is read from the
query tensors, N from config.json (or from the released folder's name pn=_pl=_in=_il=, or from the official training
script of the task, OFFICIAL_RUNS), and the rules the official code decodes with (the "official" boundary rule,
delimiters , . and newline) are written into the json beside the tensors, with where each value came from.

Why convert once instead of reading the official layout wherever --adapter is read: after conversion a released
weaver is an ordinary adapter folder (weaver.safetensors + weaver.json), so every check and every reader downstream
(K and base model in loading.py, the rules memgen.load applies, show.py's pages, eval's records) is the one already
tested, and there is no second loading path to keep equal to the first. The pickled .bin files are opened once, with
torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects. The converted folder
lives in the cache (<cache>/official/), keyed by the sha256 of the files read, so a changed checkpoint is converted
again and an unchanged one never is.

Nothing is skipped silently: a tensor the mapping does not place, or one it needs and does not find, fails the
conversion with one line naming it. The one deliberate exception is a trigger the official run never trained
(config.json: trigger_active false, as in every released weaver-SFT checkpoint; the official code then inserts at
every point): its tensors are checked by name but not converted, and the json says so. A checkpoint whose weaver
is another model than its reasoner (SmolLM3-3B/triviaqa: a Qwen2.5-1.5B weaver) cannot run here, where weaver and
reasoner share one base model, and is refused.
"""
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.parse
from pathlib import Path

import torch

import files
import lora
import memgen

# (official file, key inside it) -> our tensor name (memgen.extra_tensors / MemGen.trainable)
TENSORS = {
    "projs.bin": {"reasoner_to_weaver.weight": "weaver.reasoner_to_weaver.weight",
                  "reasoner_to_weaver.bias": "weaver.reasoner_to_weaver.bias",
                  "weaver_to_reasoner.weight": "weaver.weaver_to_reasoner.weight",
                  "weaver_to_reasoner.bias": "weaver.weaver_to_reasoner.bias"},
    "weaver.bin": {"prompt_query_latents": "weaver.prompt_queries",
                   "inference_query_latents": "weaver.inference_queries",
                   "prompt_latent_ln.weight": "weaver.prompt_ln.weight",
                   "prompt_latent_ln.bias": "weaver.prompt_ln.bias",
                   "inference_latent_ln.weight": "weaver.inference_ln.weight",
                   "inference_latent_ln.bias": "weaver.inference_ln.bias",
                   "prompt_latent_scale": "weaver.prompt_scale", "inference_latent_scale": "weaver.inference_scale"},
    "trigger.bin": {"output_layer.weight": "trigger.head.weight", "output_layer.bias": "trigger.head.bias"},
}
# the released checkpoints' runs, from the official training scripts (scripts/train/<model>_<task>.sh): latents per
# prompt / inference insertion (pl, il), prompt / inference insertion budgets (pn, in), and the weaver's base model
OFFICIAL_RUNS = {
    ("Qwen2.5-1.5B-Instruct", "gsm8k"): dict(pn=1, pl=8, inf=3, il=8, weaver="Qwen2.5-1.5B-Instruct"),
    ("Qwen2.5-1.5B-Instruct", "kodcode"): dict(pn=1, pl=4, inf=5, il=4, weaver="Qwen2.5-1.5B-Instruct"),
    ("Qwen2.5-1.5B-Instruct", "triviaqa"): dict(pn=8, pl=8, inf=0, il=8, weaver="Qwen2.5-1.5B-Instruct"),
    ("SmolLM3-3B", "kodcode"): dict(pn=1, pl=4, inf=5, il=4, weaver="SmolLM3-3B"),
    ("SmolLM3-3B", "triviaqa"): dict(pn=8, pl=4, inf=0, il=4, weaver="Qwen2.5-1.5B-Instruct"),
}
CONFIG_KEYS = {"pn": "max_prompt_aug_num", "pl": "prompt_latents_len", "inf": "max_inference_aug_num",
               "il": "inference_latents_len"}
FOLDER_RE = re.compile(r"pn=(\d+)_pl=(\d+)_in=(\d+)_il=(\d+)")  # the released folders' names
RELEASE_RE = re.compile(r"(weaver|trigger)-(sft|grpo)")  # Kana-s/MemGen/<model>/<task>/weaver-sft/...
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
# PEFT options that change what the adapter computes; ours is plain LoRA: y += alpha / r * B A x
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
HUB_FILES = ("config.json", "projs.bin", "weaver.bin", "trigger.bin")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def is_official(folder):
    return os.path.isfile(os.path.join(folder, "projs.bin")) or os.path.isfile(os.path.join(folder, "weaver.bin"))


def resolve_adapter(name):
    """--adapter as given -> a folder in this project's layout: ours unchanged, an official checkpoint (a folder, or
    a hub path org/repo/sub/folder) converted once into the cache. Anything else is returned unchanged, for the
    caller's own "not found" message."""
    if not name:
        return name
    path = os.path.expanduser(str(name))
    if os.path.isdir(path):
        return convert(path, _label(Path(path).resolve().parts[-3:])) if is_official(path) else name
    parts = path.split("/")
    if not is_hub_path(path):
        return name  # a missing local folder: never a network call
    from data.download import DownloadError

    try:
        folder = download_official(path)
    except DownloadError as e:
        raise DownloadError(f"{e}; or pass --adapter=PATH to a local copy of the checkpoint") from None
    return convert(folder, _label(parts[2:]))


def is_hub_path(path):
    """org/repo/folder... naming a released checkpoint: a part named like the official release (weaver-sft,
    trigger-grpo, pn=1_pl=8_in=3_il=8), and no first part that exists here. A mistyped local folder (out/x/final)
    is never looked up on the hub."""
    parts = path.split("/")
    return (len(parts) >= 3 and not path.startswith((".", "/", "~")) and not os.path.exists(parts[0])
            and any(RELEASE_RE.fullmatch(p) or FOLDER_RE.fullmatch(p) for p in parts[2:]))


def _label(parts):
    """A readable folder name: Qwen2.5-1.5B-Instruct/gsm8k/weaver-sft -> Qwen2.5-1.5B-Instruct-gsm8k-weaver-sft."""
    return re.sub(r"[^A-Za-z0-9._-]", "", "-".join(parts)) or "checkpoint"


# ----------------------------------------------------------------------------------------------------------------
# the hub


def download_official(path, cache=None):
    """Hub path org/repo/sub -> a local folder holding the one official checkpoint under sub (downloaded once into
    <cache>/adapters/, like a base model; only the files the conversion reads)."""
    from data.download import DownloadError, HF_ENDPOINT, _list_repo, cache_dir, download

    parts = path.strip("/").split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "adapters" / path.strip("/").replace("/", "--")
    if folder.is_dir():
        return _inside(folder)
    endpoint = (os.environ.get("MEMGEN_HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    listing = {f[0]: f for f in _list_repo(endpoint, repo) if f[0].startswith(sub + "/")}
    found = sorted({n.rsplit("/", 1)[0] for n in listing if n.endswith(("/projs.bin", "/weaver.bin"))})
    if len(found) != 1:
        what = f"{len(found)} official checkpoints: pass one of {', '.join(repo + '/' + f for f in found)}" if found \
            else "no official MemGen checkpoint (projs.bin, weaver.bin)"
        raise DownloadError(f"hub repo {repo} holds {what} under {sub}")
    top = found[0]
    wanted = [f"{top}/{n}" for n in HUB_FILES] + [f"{top}/{part}/{part}/{n}" for part in ("weaver", "trigger")
                                                   for n in ADAPTER_FILES]
    build = root / "adapters" / f".{folder.name}.incomplete"
    for name in wanted:
        if name in listing:
            _, size, sha = listing[name]
            download(f"{endpoint}/{repo}/resolve/main/{urllib.parse.quote(name)}", build / name[len(sub) + 1:],
                     sha256=sha, size=size, desc=name.rsplit("/", 1)[-1])
    if folder.is_dir():  # another process finished first: keep theirs
        shutil.rmtree(build, ignore_errors=True)
    else:
        os.replace(build, folder)
    return _inside(folder)


def _inside(folder):
    """The checkpoint folder within a download (kept at its depth below the path asked for: its name, such as
    pn=1_pl=8_in=3_il=8, states the run's rules)."""
    found = next((p.parent for p in sorted(Path(folder).rglob("*.bin")) if p.name in ("projs.bin", "weaver.bin")), None)
    if found is None:
        raise lora.AdapterError(f"{folder} holds no official checkpoint (projs.bin, weaver.bin): delete it to download "
                                "again")
    return str(found)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _bin(path):
    """A .bin written with torch.save, read with weights_only=True (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or a pickle holding objects that weights_only refuses
        raise lora.AdapterError(f"cannot read {path} as tensors only (torch.load weights_only=True): "
                                f"{' '.join(str(e).split())[:200]}") from None


def _flat(tree, prefix=""):
    """{"a": {"b": tensor}} -> {"a.b": tensor}; anything that is neither a dict nor a tensor stays as it is."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise lora.AdapterError(f"cannot read {path} ({e})") from None


def read_lora(folder, part, num_layers):
    """PEFT's adapter folder {folder}/{part}/{part}/ -> ({our LoRA name: tensor}, its settings)."""
    sub = os.path.join(folder, part, part)
    cfg = _json(os.path.join(sub, "adapter_config.json"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise lora.AdapterError(f"{sub}: peft_type {cfg.get('peft_type')} is not LoRA")
    odd = {k: cfg[k] for k, plain in UNSUPPORTED.items() if k in cfg and cfg[k] not in (plain, None, {}, [], False)}
    targets = cfg.get("target_modules")
    if odd or not isinstance(targets, list) or not targets:
        raise lora.AdapterError(f"{sub}/adapter_config.json: {odd or {'target_modules': targets}} is not supported; "
                                "only plain LoRA on a list of module names is")
    st, pt = os.path.join(sub, "adapter_model.safetensors"), os.path.join(sub, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            raw = load_file(st)
        except Exception as e:
            raise lora.AdapterError(f"cannot read {st}: {e}") from None
    elif os.path.isfile(pt):
        raw = _bin(pt)
    else:
        raise lora.AdapterError(f"{sub} holds neither adapter_model.safetensors nor adapter_model.bin")
    tensors, left = {}, []
    for key, t in raw.items():
        m = LORA_KEY.fullmatch(key)
        if m and m.group(1).rsplit(".", 1)[-1] in targets and isinstance(t, torch.Tensor):
            tensors[f"{m.group(1)}.{m.group(2)}.{part}"] = t
        else:
            left.append(key)
    # every layer has every target, each with its A and B
    found = {}
    for key in tensors:
        path, ab = key.rsplit(".", 2)[:2]
        found.setdefault(path, set()).add(ab)
    halves = sorted(f"{p}.{ab}" for p, abs_ in found.items() for ab in ("lora_A", "lora_B") if ab not in abs_)
    where = {(int(m.group(1)), p.rsplit(".", 1)[-1]) for p in found for m in [re.search(r"\.layers\.(\d+)\.", p)] if m}
    layers = num_layers or 1 + max((i for i, _ in where), default=-1)
    missing = halves + [f"layer {i} {t}" for i in range(layers) for t in targets if (i, t) not in where]
    if left or missing:
        raise lora.AdapterError(f"{sub}: " + "; ".join(
            x for x in (f"tensors this conversion does not place: {left[:4]}" if left else "",
                        f"missing LoRA tensors: {missing[:4]}" if missing else "") if x))
    rank, alpha = int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    return tensors, dict(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                         targets=sorted(targets), base=cfg.get("base_model_name_or_path"))


def read_parts(folder, fname):
    """One of projs.bin / weaver.bin / trigger.bin -> {our name: tensor}, every key placed or one error line."""
    path = os.path.join(folder, fname)
    if not os.path.isfile(path):
        raise lora.AdapterError(f"{folder} is an official MemGen checkpoint without {fname}: download it again")
    tree, table = _bin(path), TENSORS[fname]
    if not isinstance(tree, dict):
        raise lora.AdapterError(f"{path} holds a {type(tree).__name__}, not the dict of tensors the official code "
                                "saves")
    flat = _flat(tree)
    extra = sorted(k for k in flat if k not in table or not isinstance(flat[k], torch.Tensor))
    missing = sorted(set(table) - set(flat))
    if extra or missing:
        raise lora.AdapterError(f"{path}: " + "; ".join(
            x for x in (f"tensors this conversion does not place: {extra[:4]}" if extra else "",
                        f"missing tensors: {missing[:4]}" if missing else "") if x))
    return {table[k]: v for k, v in flat.items()}


def run_rules(folder, config, k):
    """The official run's insertion rules: config.json, the released folder's name, or the task's training script;
    the sources must agree. Returns ({pn, pl, inf, il}: the values found, {rule: where it came from})."""
    sources = []
    if any(v in config for v in CONFIG_KEYS.values()):
        sources.append(("config.json", {r: config[c] for r, c in CONFIG_KEYS.items() if c in config}))
    parts = Path(os.path.abspath(folder)).parts
    name = next((m for p in reversed(parts) for m in [FOLDER_RE.fullmatch(p)] if m), None)
    if name:
        sources.append((f"folder name {name.group(0)}", dict(zip(("pn", "pl", "inf", "il"), map(int, name.groups())))))
    flat = "/".join(parts).replace("--", "/")  # a hub download's folder is org--repo--model--task--...
    for (model, task), run in OFFICIAL_RUNS.items():
        if f"/{model}/{task}/" in flat + "/":
            sources.append((f"the official training script for {model} {task}", run))
    rules, origin = {}, {}
    for where, values in sources:
        for r in ("pn", "pl", "inf", "il"):
            if r in values and r in rules and values[r] != rules[r]:
                raise lora.AdapterError(f"{folder}: {CONFIG_KEYS[r]} is {rules[r]} by {origin[r]} but {values[r]} by "
                                        f"{where}: which run made this checkpoint?")
            if r in values and r not in rules:
                rules[r], origin[r] = values[r], where
    if "inf" not in rules:
        raise lora.AdapterError(f"{folder}: cannot tell the run's max_inference_aug_num (N): config.json does not "
                                "name it and the folder is not one of the released checkpoints")
    for r in ("pl", "il"):
        if rules.get(r, k) != k:
            raise lora.AdapterError(f"{folder}: the query tensors hold K={k} latents but {origin[r]} says "
                                    f"{CONFIG_KEYS[r]}={rules[r]}")
    return rules, origin


# ----------------------------------------------------------------------------------------------------------------
# converting


def digest(folder):
    """sha256 over the files the conversion reads (names and bytes)."""
    h = hashlib.sha256()
    names = list(HUB_FILES) + [f"{p}/{p}/{n}" for p in ("weaver", "trigger") for n in ADAPTER_FILES]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def convert(folder, label="checkpoint", cache=None):
    """An official checkpoint folder -> the folder of its conversion (weaver.safetensors + weaver.json, and the
    trigger's when the official run trained one), made once and kept in <cache>/official/."""
    from data.download import cache_dir

    sha = digest(folder)
    root = Path(cache) if cache is not None else cache_dir()
    out = root / "official" / f"{label}-{sha[:10]}"
    if (out / "weaver.json").is_file():
        return str(out)
    config = _json(os.path.join(folder, "config.json")) if os.path.isfile(os.path.join(folder, "config.json")) else {}
    weaver = read_parts(folder, "projs.bin")
    weaver.update(read_parts(folder, "weaver.bin"))
    trigger = read_parts(folder, "trigger.bin")
    pq, iq, r2w = weaver["weaver.prompt_queries"], weaver["weaver.inference_queries"], \
        weaver["weaver.reasoner_to_weaver.weight"]
    if pq.dim() != 2 or pq.shape != iq.shape:
        raise lora.AdapterError(f"{folder}/weaver.bin: prompt queries {tuple(pq.shape)} and inference queries "
                                f"{tuple(iq.shape)} differ; this project runs one K for both insertion types")
    k, D = pq.shape
    if tuple(r2w.shape) != (D, D):
        raise lora.AdapterError(f"{folder}/projs.bin: reasoner_to_weaver maps {r2w.shape[1]} -> {r2w.shape[0]}: its "
                                "weaver is another model than its reasoner, and here both share one base model")
    rules, origin = run_rules(folder, config, k)
    num_layers = config.get("num_hidden_layers")
    lora_w, wcfg = read_lora(folder, "weaver", num_layers)
    base = os.path.basename(str(wcfg["base"] or config.get("_name_or_path") or "").rstrip("/"))
    trained_trigger = bool(config.get("trigger_active", False))
    has_trigger = os.path.isdir(os.path.join(folder, "trigger", "trigger"))
    # an untrained trigger may sit on another base model (SmolLM3-3B/kodcode: Qwen2.5-1.5B): count its own layers
    lora_t, tcfg = read_lora(folder, "trigger", num_layers if trained_trigger else None) if has_trigger else ({}, None)
    layers = num_layers or 1 + max(int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in lora_w)
    rules_json = dict(k=int(k), n=int(rules["inf"]), boundary="official", delimiters=list(memgen.DELIMITERS),
                      latent_init="paper")
    official = dict(source=os.path.abspath(folder), sha256=sha,
                    max_prompt_aug_num=rules.get("pn"), prompt_latents_len=rules.get("pl", int(k)),
                    max_inference_aug_num=rules["inf"], inference_latents_len=rules.get("il", int(k)),
                    rules_from={CONFIG_KEYS[r]: w for r, w in origin.items()},
                    note="one prompt insertion per problem: max_prompt_aug_num counts the turns of a multi-turn "
                         "dialogue (one insertion each), and these tasks are single-turn")
    if trained_trigger:
        if not has_trigger:
            raise lora.AdapterError(f"{folder}: config.json says trigger_active but trigger/trigger/ is missing")
        head = tuple(trigger["trigger.head.weight"].shape)
        if head != (2, D):
            raise lora.AdapterError(f"{folder}/trigger.bin: output_layer is {head}, not (2, {D}): its trigger is "
                                    "another model than its reasoner")
        official["trigger"] = "trained in the official run (trigger_active true): converted"
    else:
        official["trigger"] = ("not converted: the official run never trained it (trigger_active false; the official "
                               "code then inserts at every point, --trigger_mode=always here); its tensors were "
                               "checked by name only")
    tmp = root / "official" / f".{out.name}.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = dict(base_model=base, hidden_size=int(D), num_layers=int(layers), **rules_json, official=official)
    _write(tmp, "weaver", dict(lora_w, **weaver), wcfg, meta)
    if trained_trigger:
        _write(tmp, "trigger", dict(lora_t, **trigger), tcfg, meta)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"official checkpoint {folder} converted to {out} (K={k}, N={rules['inf']}; trigger "
          f"{'converted' if trained_trigger else 'not trained in the official run, not converted'})", file=sys.stderr)
    return str(out)


def _write(folder, part, tensors, lcfg, meta):
    """{part}.safetensors + {part}.json as lora.save_adapter writes them."""
    from safetensors.torch import save_file

    tensors = {n: t.detach().to(torch.float32).contiguous() for n, t in tensors.items()}
    save_file(tensors, os.path.join(folder, f"{part}.safetensors"))
    info = dict(rank=lcfg["rank"], alpha=lcfg["alpha"], dropout=lcfg["dropout"], targets=lcfg["targets"],
                adapter=part, **meta)
    files.write_json(os.path.join(folder, f"{part}.json"), info)
