"""Saved adapters carry the rules they were trained under (K, N, boundary rule, delimiters, latent_init in
weaver.json / trigger.json), every entry point builds its MemGen from them, and a command-line setting that
contradicts them is one clear line (issue 23)."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

import data
import eval as ev
import loading
import memgen
import show
import train_trigger as tt
import train_weaver as tw
from model import ModelError, load_model
from tokenizer import load_tokenizer

QUIET = ["--progress=false", "--dtype=float32", "--final_eval_limit=-1", "--val_size=0", "--save_interval=0",
         "--max_len=512"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def folder(long_folder):
    return long_folder


@pytest.fixture(scope="module")
def sentence_weaver(folder, add_task, tmp_path_factory):
    """A weaver trained one step by train_weaver.py with --boundary=sentence --latent_init=embedding --n=5."""
    out = str(tmp_path_factory.mktemp("sentence") / "run")
    tw.main(["--model", folder, "--data", add_task, "--out_dir", out, "--boundary=sentence",
             "--latent_init=embedding", "--n=5", "--max_steps=1", "--batch_size=2", "--lr=1e-3", *QUIET])
    return out + "/final"


def fails(main, argv, capsys):
    """Run a main that must stop with one line; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def rigged_tables(tokenizer, vocab_size, delimiters=memgen.DELIMITERS):
    """The tiny tokenizer rarely puts a "." between digits; these tables (fixed seed) make a random model meet many
    boundaries, many of them possibly inside a number, so the two rules decode differently."""
    g = torch.Generator().manual_seed(7)
    t = {name: torch.rand(vocab_size, generator=g) < p for name, p in
         (("is_delim", 0.3), ("punct_in_number", 0.5), ("just_punct", 0.2), ("ends_digit", 0.5), ("starts_digit", 0.5))}
    t["punct_in_number"] &= t["is_delim"]
    t["just_punct"] &= t["is_delim"] & ~t["punct_in_number"]
    return t


def test_the_json_records_the_rules_and_config_json_the_settings(sentence_weaver):
    info = json.loads(Path(sentence_weaver, "weaver.json").read_text())
    assert {k: info[k] for k in memgen.RULES} == dict(k=memgen.K, n=5, boundary="sentence",
                                                      delimiters=list(memgen.DELIMITERS), latent_init="embedding")
    cfg = json.loads(Path(sentence_weaver).parent.joinpath("config.json").read_text())
    assert (cfg["boundary"], cfg["latent_init"], cfg["n"]) == ("sentence", "embedding", 5)


def test_eval_without_a_flag_decodes_by_the_adapters_sentence_rule(folder, add_task, sentence_weaver, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(memgen, "token_tables", rigged_tables)
    monkeypatch.chdir(tmp_path)
    ev.main(["--model", folder, "--data", add_task, "--limit=6", "--mode=memgen", f"--adapter={sentence_weaver}",
             f"--max_new_tokens={NEW_TOKENS}", "--dtype=float32", "--progress=false", "--results_md=",
             "--out_dir=o"])
    got = [r["insertions"][0] for r in map(json.loads, Path("o/results.jsonl").read_text().splitlines())]
    assert json.loads(Path("o/run.json").read_text())["rules"]["boundary"] == "sentence"
    # the same problems decoded by a MemGen holding the trained weaver, under each rule
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    task = data.get_task(add_task)
    prompts = [tok.chat(task.messages(r)) for r in task.load("test")[:6]]
    mg = loading.memgen_for(model, tok, sentence_weaver, "always").eval()
    by_rule = {}
    for rule in ("sentence", "official"):
        mg.boundary = rule
        by_rule[rule] = [o["insertions"] for o in memgen.generate(mg, tok, prompts, NEW_TOKENS)]
    assert by_rule["sentence"] != by_rule["official"]  # the rules disagree on these problems ...
    assert got == by_rule["sentence"]  # ... and eval followed the adapter's


def test_a_contradicting_setting_is_one_clear_line_and_an_agreeing_one_is_fine(folder, add_task, sentence_weaver,
                                                                               tmp_path, capsys):
    base = ["--model", folder, "--data", add_task, f"--adapter={sentence_weaver}", "--max_steps=1",
            "--batch_size=2", *QUIET]
    line = fails(tw.main, base + ["--boundary=official", f"--out_dir={tmp_path / 'a'}"], capsys)
    assert line.endswith(f"--boundary=official contradicts {sentence_weaver}/weaver.json, which was trained with "
                         "boundary=sentence: drop --boundary (the adapter brings its own) or pass another --adapter")
    assert "--k=4 contradicts" in fails(tw.main, base + ["--k=4", f"--out_dir={tmp_path / 'b'}"], capsys)
    assert "--latent_init=paper contradicts" in fails(
        tw.main, base + ["--latent_init=paper", f"--out_dir={tmp_path / 'c'}"], capsys)
    # without the flags (and with one that agrees) the run goes on under the adapter's rules and saves them again
    res = tw.main(base + ["--n=5", f"--out_dir={tmp_path / 'd'}"])
    assert (res["policy"].boundary, res["policy"].n, res["policy"].latent_init) == ("sentence", 5, "embedding")
    again = json.loads((tmp_path / "d/final/weaver.json").read_text())
    assert (again["boundary"], again["n"], again["latent_init"]) == ("sentence", 5, "embedding")
    show_args = [f"--model={folder}", f"--adapter={sentence_weaver}", f"--data={add_task}", "--max_new_tokens=4",
                 "--dtype=float32", f"--out_dir={tmp_path / 's'}"]
    assert "--boundary=official contradicts" in fails(show.main, show_args + ["--boundary=official"], capsys)
    assert "--n=3 contradicts" in fails(show.main, show_args + ["--n=3"], capsys)
    show.main(show_args)
    about = json.loads((tmp_path / "s/show.json").read_text())["about"]
    assert about["rules"]["boundary"] == "sentence" and about["rules"]["n"] == 5


def test_the_trigger_trains_under_the_weavers_rules_and_saves_them(folder, add_task, sentence_weaver, tmp_path):
    out = tmp_path / "t"
    res = tt.main(["--model", folder, "--data", add_task, "--adapter", sentence_weaver, "--out_dir", str(out),
                   "--max_steps=1", "--limit=2", "--batch_size=2", "--group=2", "--max_new_tokens=2", *QUIET])
    assert (res["policy"].boundary, res["policy"].n) == ("sentence", 5)
    for part in ("weaver", "trigger"):
        info = json.loads((out / "final" / f"{part}.json").read_text())
        assert (info["boundary"], info["n"], info["latent_init"]) == ("sentence", 5, "embedding"), part


def test_an_old_json_without_the_rules_loads_with_the_official_ones(folder, tmp_path):
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    mg = memgen.MemGen(model, tok, k=2, n=1)
    memgen.save(mg, str(tmp_path), parts=("weaver",))
    info = json.loads((tmp_path / "weaver.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("n", "boundary", "delimiters", "latent_init")}
    (tmp_path / "weaver.json").write_text(json.dumps(old))
    loaded = loading.memgen_for(load_model(folder, dtype="float32"), tok, str(tmp_path), "always")
    assert (loaded.k, loaded.n, loaded.boundary, loaded.delimiters, loaded.latent_init) == (
        2, memgen.N, "official", memgen.DELIMITERS, "paper")


def test_memgen_load_refuses_a_weaver_saved_under_other_rules(folder, tmp_path):
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    memgen.save(memgen.MemGen(model, tok, k=2, n=1, boundary="sentence", delimiters=(".",)), str(tmp_path))
    for other, said in ((dict(n=1), "boundary='sentence'"), (dict(boundary="sentence"), "n=1"),
                        (dict(n=1, boundary="sentence"), "delimiters=('.',)")):
        with pytest.raises(ModelError, match=re.escape(f"weaver.json was trained with {said}, this MemGen has")):
            memgen.load(memgen.MemGen(model, tok, k=2, **other), str(tmp_path))
    mg = memgen.MemGen(model, tok, k=2, n=1, boundary="sentence", delimiters=(".",))
    memgen.load(mg, str(tmp_path))
    assert mg.is_delim.sum() < memgen.MemGen(model, tok, k=2).is_delim.sum()  # the delimiters shape the table
    assert os.path.isfile(tmp_path / "trigger.json")


@pytest.mark.parametrize("method,part,then", [("sft", "weaver", "grpo"), ("sft-lora", "sft", "grpo-lora")])
def test_an_adapter_goes_on_with_its_own_lora_shape_and_a_contradicting_one_is_refused(folder, add_task, tmp_path,
                                                                                        capsys, method, part, then):
    """--adapter continues under the adapter's LoRA rank, alpha and targets (a default alpha would silently rescale
    a weaver trained with another); a --lora_* flag that contradicts them is one line."""
    base = ["--model", folder, "--data", add_task, "--max_steps=1", "--batch_size=2", *QUIET]
    first = str(tmp_path / "first")
    tw.main(base + [f"--method={method}", "--lora_rank=4", "--lora_alpha=64", "--lora_targets=q_proj,k_proj",
                    "--lora_dropout=0.0", f"--out_dir={first}"])
    on = base + [f"--method={then}", f"--adapter={first}/final", "--group=2", "--max_new_tokens=4"]
    res = tw.main(on + [f"--out_dir={tmp_path / 'on'}"])
    saved = json.loads((tmp_path / f"on/final/{part}.json").read_text())
    assert (saved["rank"], saved["alpha"], saved["targets"], saved["dropout"]) == (4, 64, ["q_proj", "k_proj"], 0.0)
    model = res["policy"].model if part == "weaver" else res["policy"]
    assert model.lora_meta[part]["alpha"] == 64
    config = json.loads((tmp_path / "on/config.json").read_text())
    assert (config["lora_rank"], config["lora_alpha"], config["lora_targets"]) == (4, 64, "q_proj,k_proj")
    line = fails(tw.main, on + ["--lora_alpha=32", f"--out_dir={tmp_path / 'x'}"], capsys)
    assert line.endswith(f"--lora_alpha contradicts {first}/final/{part}.json, which was trained with lora_alpha=64: "
                         "drop --lora_alpha (the adapter brings its own)")
    assert "--lora_targets contradicts" in fails(tw.main, on + ["--lora_targets=q_proj,v_proj",
                                                                f"--out_dir={tmp_path / 'y'}"], capsys)
    tw.main(on + ["--lora_rank=4", "--lora_dropout=0.1", f"--out_dir={tmp_path / 'z'}"])  # agreeing; dropout may change
    assert json.loads((tmp_path / f"z/final/{part}.json").read_text())["dropout"] == 0.1
