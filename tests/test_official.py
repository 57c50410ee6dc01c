"""
The official checkpoint layout (bingreeky/MemGen, MemGenModel.save_pretrained): a checkpoint written here the way the
official code writes it - PEFT adapters saved by `peft` from a tiny random model, known random weaver tensors saved
with torch.save in its structure - converted by official.py, loaded by loading.memgen_for, and checked against the
official computation redone with transformers + peft from the same files (teacher-forced, float32). Bad checkpoints
fail in one line. The released checkpoints themselves cannot be downloaded here: these synthetic ones are the proof.
"""
import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import loading
import lora
import memgen
import official
from model import load_model
from tokenizer import load_tokenizer

K, N, R = 4, 2, 4  # latents per insertion, inference insertions, LoRA rank


def build_official(folder, model_path, seed=0, lora_bin=False, trigger_active=False, k=K, n=N):
    """An official-layout checkpoint of the tiny model at model_path, every tensor random (LoRA B too)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return scale * torch.randn(*shape, generator=g)

    for part in ("weaver", "trigger"):
        pm = PeftModel(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                       LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                  bias="none", task_type="CAUSAL_LM"), adapter_name=part)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(rand(*p.shape))
        pm.save_pretrained(str(folder / part), safe_serialization=not lora_bin)
    base = json.loads((Path(model_path) / "config.json").read_text())
    D = base["hidden_size"]

    def linear(i, o):
        return {"weight": rand(o, i), "bias": rand(o)}

    torch.save({"reasoner_to_weaver": linear(D, D), "weaver_to_reasoner": linear(D, D)}, folder / "projs.bin")
    torch.save({"prompt_query_latents": rand(k, D, scale=1), "inference_query_latents": rand(k, D, scale=1),
                "prompt_latent_ln": {"weight": 1 + rand(D), "bias": rand(D)},
                "inference_latent_ln": {"weight": 1 + rand(D), "bias": rand(D)},
                "prompt_latent_scale": 1 + rand(1), "inference_latent_scale": 1 + rand(1)}, folder / "weaver.bin")
    torch.save({"output_layer": linear(D, 2)}, folder / "trigger.bin")
    lcfg = dict(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="none")
    config = dict(base, model_type="memgen", prompt_latents_len=k, inference_latents_len=k, max_prompt_aug_num=1,
                  max_inference_aug_num=n, trigger_active=trigger_active, weaver_lora_config=lcfg,
                  trigger_lora_config=lcfg)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class Reference:
    """The official computation from the checkpoint's files with transformers + peft (MemGenModel._forward for one
    example, MemGenWeaver._augment, MemGenTrigger.forward), the LoRA loaded once onto a plain base model."""

    def __init__(self, folder, model_path):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def hf():
            return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

        self.reasoner = hf()
        self.weaver = PeftModel.from_pretrained(hf(), str(folder / "weaver" / "weaver"), adapter_name="weaver").eval()
        self.trigger = PeftModel.from_pretrained(hf(), str(folder / "trigger" / "trigger"),
                                                 adapter_name="trigger").eval()
        projs = torch.load(folder / "projs.bin", weights_only=True)
        w = torch.load(folder / "weaver.bin", weights_only=True)
        D = w["prompt_query_latents"].shape[1]
        self.r2w, self.w2r, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 2)
        self.r2w.load_state_dict(projs["reasoner_to_weaver"])
        self.w2r.load_state_dict(projs["weaver_to_reasoner"])
        self.head.load_state_dict(torch.load(folder / "trigger.bin", weights_only=True)["output_layer"])
        self.queries = {}
        for kind in ("prompt", "inference"):
            ln = nn.LayerNorm(D)
            ln.load_state_dict(w[f"{kind}_latent_ln"])
            self.queries[kind] = ln(w[f"{kind}_query_latents"]) * w[f"{kind}_latent_scale"]

    @torch.no_grad()
    def forward(self, ids, prompt_len, points):
        """ids (T,) of one example; latents inserted before each point -> (latents per point, logits (T, V))."""
        emb = self.reasoner.get_input_embeddings()(ids[None])
        cur, is_lat, start, latents = emb[:, :0], [], 0, []
        for p in points:
            cur = torch.cat([cur, emb[:, start:p]], 1)
            is_lat += [False] * (p - start)
            q = self.queries["prompt" if p == prompt_len else "inference"]
            x = torch.cat([self.r2w(cur), q[None]], 1)
            h = self.weaver(inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None],
                            output_hidden_states=True).hidden_states[-1][:, -len(q):]
            lat = self.w2r(h)
            latents.append(lat[0])
            cur = torch.cat([cur, lat], 1)
            is_lat += [True] * len(q)
            start = p
        cur = torch.cat([cur, emb[:, start:]], 1)
        is_lat += [False] * (len(ids) - start)
        logits = self.reasoner(inputs_embeds=cur).logits[0]
        followed = torch.tensor(is_lat[1:] + [False])
        return latents, logits[~followed]

    @torch.no_grad()
    def trigger_probs(self, ids):
        h = self.trigger(input_ids=ids[None], output_hidden_states=True).hidden_states[-1]
        return torch.softmax(self.head(h), -1)[0, :, 1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    path, _ = tiny("qwen2", False)
    return build_official(tmp_path_factory.mktemp("official") / "ckpt", path), path


def batch(tok):
    pairs = [("What is 2+3?", "First, 2 plus 3. So the answer is 5.\nDone, yes."), ("Count", "1, 2. 3")]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q, _ in pairs]
    completions = [tok.encode(a) + [tok.eos_ids[0]] for _, a in pairs]
    return memgen.right_pad(prompts, completions, tok.pad_id, "cpu")


def test_an_official_checkpoint_matches_transformers_and_peft(checkpoint, cache, capsys):
    folder, path = checkpoint
    converted = official.resolve_adapter(str(folder))
    assert "converted to" in capsys.readouterr().err
    assert official.resolve_adapter(str(folder)) == converted and capsys.readouterr().err == ""  # once
    info = json.loads((Path(converted) / "weaver.json").read_text())
    assert (info["k"], info["n"], info["rank"], info["alpha"], info["targets"]) == (K, N, R, 8, ["q_proj", "v_proj"])
    assert info["boundary"] == "official" and info["official"]["rules_from"]["max_inference_aug_num"] == "config.json"
    assert not (Path(converted) / "trigger.safetensors").exists()  # trigger_active false: never trained
    assert "not converted" in info["official"]["trigger"]

    model, tok = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    mg = loading.memgen_for(model, tok, converted, "always").eval()
    assert (mg.k, mg.n) == (K, N)
    ids, mask, prompt_len = batch(tok)
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    assert (points >= 0).sum() > 3  # inference insertions too, not only the prompt's
    ref = Reference(folder, path)
    with torch.no_grad():
        latents = memgen.weaver_rounds(mg, model.embed(ids), points, prompt_len)
        logits = model.head(memgen.teacher_forced(mg, ids, mask, prompt_len, points))
    for b in range(len(ids)):
        L, pts = int(mask[b].sum()), [int(p) for p in points[b] if p >= 0]
        ref_lat, ref_logits = ref.forward(ids[b, :L], int(prompt_len[b]), pts)
        for j, lat in enumerate(ref_lat):
            assert (latents[j][b] - lat).abs().max() <= 1e-4, (b, j)
        assert (logits[b, :L] - ref_logits).abs().max() <= 1e-4, b
    # the LoRA matters: without it the weaver's latents differ (so the checks above can fail)
    with torch.no_grad():
        for p in lora.parameters(model, "weaver").values():
            p.zero_()
        plain = memgen.weaver_rounds(mg, model.embed(ids), points, prompt_len)
    assert (plain[0] - latents[0]).abs().max() > 1e-3


def test_a_trained_trigger_and_bin_adapters_convert_too(tiny, tmp_path, cache):
    path, _ = tiny("qwen2", False)
    folder = build_official(tmp_path / "ck", path, seed=1, lora_bin=True, trigger_active=True)
    assert (folder / "weaver/weaver/adapter_model.bin").is_file()
    converted = official.resolve_adapter(str(folder))
    assert (Path(converted) / "trigger.safetensors").is_file()
    model, tok = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    mg = loading.memgen_for(model, tok, converted, "learned").eval()
    ids, mask, _ = batch(tok)
    ref = Reference(folder, path)
    with torch.no_grad():
        p = memgen.trigger_forward(mg, ids, mask)
    for b in range(len(ids)):
        L = int(mask[b].sum())
        assert (p[b, :L] - ref.trigger_probs(ids[b, :L])).abs().max() <= 1e-5


def mutate(src, dst, fname, change):
    shutil.copytree(src, dst)
    if fname.endswith(".safetensors"):
        from safetensors.torch import load_file, save_file
        t = load_file(dst / fname)
        change(t)
        save_file(t, dst / fname)
    else:
        t = torch.load(dst / fname, weights_only=True)
        change(t)
        torch.save(t, dst / fname)


def _drop(d, key):
    d.pop(key)


@pytest.mark.parametrize("fname,change,message", [
    ("weaver.bin", lambda t: t.update(memory_bank=torch.zeros(3)),
     r"weaver\.bin: tensors this conversion does not place: \['memory_bank'\]"),
    ("projs.bin", lambda t: _drop(t["weaver_to_reasoner"], "bias"),
     r"projs\.bin: missing tensors: \['weaver_to_reasoner\.bias'\]"),
    ("weaver/weaver/adapter_model.safetensors",
     lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}),
     r"tensors this conversion does not place: \['base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A"),
    ("weaver/weaver/adapter_model.safetensors",
     lambda t: _drop(t, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
     r"missing LoRA tensors: \['model\.layers\.1\.self_attn\.v_proj\.lora_B'\]"),
    ("weaver.bin", lambda t: t.update(inference_query_latents=torch.zeros(K + 1, 64)),
     "this project runs one K for both insertion types"),
    ("projs.bin", lambda t: t.update(reasoner_to_weaver={"weight": torch.zeros(48, 64), "bias": torch.zeros(48)}),
     "its weaver is another model than its reasoner"),
    ("trigger.bin", lambda t: t.update(args=argparse.Namespace(lr=1)), r"as tensors only \(torch\.load weights_only"),
])
def test_a_bad_checkpoint_is_one_line(checkpoint, tmp_path, cache, fname, change, message):
    bad = tmp_path / "bad"
    mutate(checkpoint[0], bad, fname, change)
    with pytest.raises(lora.AdapterError, match=message) as e:
        official.resolve_adapter(str(bad))
    assert "\n" not in str(e.value)
    assert not (cache / "official").exists() or not any(p.name.endswith("weaver.json")
                                                          for p in (cache / "official").rglob("*"))


def test_eval_takes_an_official_checkpoint_and_refuses_a_bad_one_in_one_line(checkpoint, tmp_path, cache, capsys,
                                                                              monkeypatch, gsm8k_fixture):
    import eval as ev

    folder, path = checkpoint
    monkeypatch.chdir(tmp_path)
    args = ["--model", path, "--mode", "memgen", "--limit", "1", "--max_new_tokens", "4", "--dtype", "float32",
            "--progress=false", "--results_md", str(tmp_path / "r.md")]
    s = ev.main(args + ["--adapter", str(folder), "--out_dir", str(tmp_path / "o")])
    assert s["n"] == 1
    assert "converted to" in capsys.readouterr().err
    bad = tmp_path / "bad"
    mutate(folder, bad, "weaver.bin", lambda t: _drop(t, "prompt_latent_scale"))
    with pytest.raises(SystemExit) as e:
        ev.main(args + ["--adapter", str(bad), "--out_dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "missing tensors: ['prompt_latent_scale']" in err


def test_run_rules_come_from_the_release_when_config_json_lacks_them(checkpoint, tmp_path, cache):
    folder, _ = checkpoint

    def without_rules(ck):
        shutil.copytree(folder, ck)
        config = json.loads((ck / "config.json").read_text())
        for key in official.CONFIG_KEYS.values():
            config.pop(key)
        (ck / "config.json").write_text(json.dumps(config))
        return ck

    def rules(ck):
        info = json.loads((Path(official.resolve_adapter(str(ck))) / "weaver.json").read_text())
        return info["n"], info["official"]["rules_from"]["max_inference_aug_num"]

    named = without_rules(tmp_path / "M" / "gsm8k" / "weaver-sft" / f"pn=1_pl={K}_in=3_il={K}")
    assert rules(named) == (3, f"folder name pn=1_pl={K}_in=3_il={K}")
    task = without_rules(tmp_path / "Qwen2.5-1.5B-Instruct" / "kodcode" / "weaver-sft" / "run")
    assert rules(task) == (5, "the official training script for Qwen2.5-1.5B-Instruct kodcode")
    # the training script of gsm8k says K=8: these K=4 queries contradict it
    with pytest.raises(lora.AdapterError, match=f"K={K} latents but the official training script for "
                                                "Qwen2.5-1.5B-Instruct gsm8k says prompt_latents_len=8"):
        official.resolve_adapter(str(without_rules(tmp_path / "Qwen2.5-1.5B-Instruct" / "gsm8k" / "weaver-sft")))
    # and two sources that disagree are named both
    with pytest.raises(lora.AdapterError, match="max_inference_aug_num is 2 by config.json but 3 by folder name"):
        official.resolve_adapter(str(shutil.copytree(folder, tmp_path / "x" / f"pn=1_pl={K}_in=3_il={K}")))


def serve_hub(tmp_path, monkeypatch, files):
    """A file:// hub: MEMGEN_HF_ENDPOINT points at tmp, the listing lists `files` {repo path: local file}."""
    import data.download

    hub = tmp_path / "hub"
    for name, src in files.items():
        dst = hub / "Kana-s/MemGen/resolve/main" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    listed = []

    def listing(endpoint, repo):
        assert repo == "Kana-s/MemGen" and endpoint == f"file://{hub}"
        listed.append(repo)
        return [(n, os.path.getsize(s), None) for n, s in files.items()]

    monkeypatch.setenv("MEMGEN_HF_ENDPOINT", f"file://{hub}")
    monkeypatch.setattr(data.download, "_list_repo", listing)
    return listed


def test_a_hub_path_downloads_once_into_the_cache(checkpoint, tmp_path, cache, monkeypatch):
    folder, _ = checkpoint
    run = f"pn=1_pl={K}_in={N}_il={K}"
    files = {f"Tiny/gsm8k/weaver-sft/{run}/{p.relative_to(folder)}": p for p in folder.rglob("*") if p.is_file()}
    files["Tiny/gsm8k/weaver-sft/README.md"] = folder / "config.json"
    listed = serve_hub(tmp_path, monkeypatch, files)
    name = "Kana-s/MemGen/Tiny/gsm8k/weaver-sft"
    converted = official.resolve_adapter(name)
    assert official.resolve_adapter(name) == converted and listed == ["Kana-s/MemGen"]  # the second time: no network
    got = cache / "adapters" / name.replace("/", "--") / run
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    assert Path(converted).parent == cache / "official"
    assert json.loads((Path(converted) / "weaver.json").read_text())["k"] == K


def test_a_hub_path_with_several_checkpoints_names_them(checkpoint, tmp_path, cache, monkeypatch):
    folder, _ = checkpoint
    files = {f"M/gsm8k/weaver-sft/{run}/projs.bin": folder / "projs.bin" for run in ("pn=1_pl=8_in=3_il=8", "old")}
    serve_hub(tmp_path, monkeypatch, files)
    from data.download import DownloadError
    with pytest.raises(DownloadError, match=r"2 official checkpoints: pass one of Kana-s/MemGen/M/gsm8k/weaver-sft/"
                                            r"old, Kana-s/MemGen/M/gsm8k/weaver-sft/pn=1_pl=8_in=3_il=8"):
        official.resolve_adapter("Kana-s/MemGen/M/gsm8k/weaver-sft")


def test_our_folders_and_mistyped_paths_pass_through_without_network(tmp_path, monkeypatch):
    import data.download

    def no_network(*a):
        raise AssertionError("network")

    monkeypatch.setattr(data.download, "_open", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ours").mkdir()
    for name in ("", str(tmp_path / "ours"), "out/sft-gsm8k-M/final", "no/such/dir", "./x/weaver-sft/y"):
        assert official.resolve_adapter(name) == name
    assert official.is_hub_path("Kana-s/MemGen/SmolLM3-3B/kodcode/weaver-sft")


def test_show_pages_an_official_checkpoint(long_folder, tmp_path, cache):
    pytest.importorskip("matplotlib")
    import show
    from test_show import write_task

    folder = build_official(tmp_path / "ck", long_folder, seed=2)
    task, out = str(tmp_path / "task.jsonl"), tmp_path / "out"
    write_task(task)
    show.main([f"--model={long_folder}", f"--adapter={folder}", f"--data={task}", "--max_new_tokens=8",
               "--dtype=float32", f"--out_dir={out}"])
    about = json.loads((out / "show.json").read_text())["about"]
    assert about["k"] == K and about["n"] == N and about["adapter"] == str(folder)
    assert json.loads(about["adapter_info"])["weaver"]["official"]["source"] == str(folder)
    assert str(folder) in (out / "problem-00000.html").read_text()  # the page names the checkpoint it shows


def test_a_file_that_is_no_dict_and_an_unreachable_hub_are_one_line(checkpoint, tmp_path, cache, monkeypatch):
    from data.download import DownloadError

    bad = shutil.copytree(checkpoint[0], tmp_path / "bad")
    torch.save(torch.zeros(3), bad / "projs.bin")
    with pytest.raises(lora.AdapterError, match=r"projs\.bin holds a Tensor, not the dict of tensors"):
        official.resolve_adapter(str(bad))
    monkeypatch.setenv("MEMGEN_HF_ENDPOINT", f"file://{tmp_path / 'no-hub'}")
    with pytest.raises(DownloadError, match="or pass --adapter=PATH to a local copy of the checkpoint") as e:
        official.resolve_adapter("Kana-s/MemGen/Tiny/gsm8k/weaver-sft")
    assert "\n" not in str(e.value)


def test_grpo_continues_from_an_official_checkpoint(long_folder, add_task, tmp_path, cache):
    import train_weaver

    folder = build_official(tmp_path / "ck", long_folder, seed=3)
    res = train_weaver.main(["--model", long_folder, "--data", add_task, "--out_dir", str(tmp_path / "o"),
                             "--method=grpo", f"--adapter={folder}", "--lora_rank=4", "--lora_alpha=8",
                             "--max_steps=1", "--limit=4", "--group=2", "--max_new_tokens=2", "--progress=false",
                             "--dtype=float32", "--final_eval_limit=-1", "--val_size=0", "--save_interval=0",
                             "--max_len=512"])  # the rank and alpha of the checkpoint: train_weaver's own settings
    assert (res["policy"].k, res["policy"].n) == (K, N)
    assert json.loads((tmp_path / "o/config.json").read_text())["k"] == K
