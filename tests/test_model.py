"""The reasoner against transformers on tiny random configs: logits, padding, cache, generate, loading errors."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import SMALL_MODEL, build_model_folder
from model import KVCache, ModelError, generate, load_model
from tokenizer import load_tokenizer

FAMILIES = [("qwen2", False), ("llama", True)]  # Qwen2: biases, untied head; Llama: no biases, tied head


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_logits_match_transformers(tiny, family, tied):
    path, hf = tiny(family, tied)
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours, hidden = model(ids)
    assert ours.shape == ref.shape and hidden.shape == (2, 40, model.cfg.hidden_size)
    assert max_diff(ours, ref) <= 1e-4
    # the hidden state returned is the final-norm output the head reads
    assert max_diff(model.head(hidden), ref) <= 1e-4


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_left_padded_batch_matches_transformers(tiny, family, tied):
    path, hf = tiny(family, tied)
    model = load_model(path, dtype="float32")
    g = torch.Generator().manual_seed(2)
    lens = [30, 17, 5]
    ids = torch.randint(0, model.cfg.vocab_size, (3, 30), generator=g)
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, 30 - n:] = True
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, _ = model(ids, mask=mask)
        for b, n in enumerate(lens):  # each row alone, unpadded, is the reference
            ref = hf(ids[b:b + 1, 30 - n:]).logits[0]
            assert max_diff(ours[b, 30 - n:], ref) <= 1e-4
        # and transformers' own padded batch with explicit positions agrees too
        ref = hf(ids, attention_mask=mask.long(), position_ids=pos).logits
    assert max_diff(ours[mask], ref[mask]) <= 1e-4


@pytest.mark.parametrize("family,tied", FAMILIES)
@pytest.mark.parametrize("prealloc", [True, False])
def test_cached_equals_uncached(tiny, family, tied, prealloc):
    path, _ = tiny(family, tied)
    model = load_model(path, dtype="float32")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :6] = False  # row 1 is left-padded
    with torch.no_grad():
        full, _ = model(ids, mask=mask)
        cache = KVCache(model.cfg, 2, 24 if prealloc else None)
        chunks = [10, 1, 1, 5, 7]  # a prefill, single steps and a multi-token chunk
        got, t = [], 0
        for n in chunks:
            logits, _ = model(ids[:, t:t + n], mask=mask[:, t:t + n], cache=cache)
            got.append(logits)
            t += n
    assert max_diff(torch.cat(got, 1)[mask], full[mask]) <= 1e-4


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 5, 7), (1, 200, 7)])  # 1, 3, 10 rows (W x^T route); 200 rows
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(monkeypatch, shape, bias):
    """model.linear is F.linear in value; at most FEW_ROWS rows on a CPU it takes the W x^T route, never F.linear."""
    import model as model_lib
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(11, 7, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    plain, f_linear = [], model_lib.F.linear
    monkeypatch.setattr(model_lib.F, "linear", lambda *a: plain.append(1) or f_linear(*a))
    got = model_lib.linear(x, w, b)
    assert got.shape == want.shape and max_diff(got, want) <= 1e-5
    assert bool(plain) == (x.numel() // 7 > model_lib.FEW_ROWS)


def test_rows_with_different_valid_slots(tiny):
    """Invalid slots in the middle of one row (as when another row inserts latents) change nothing for it."""
    path, _ = tiny("qwen2")
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, _ = model(ids)
        cache = KVCache(model.cfg, 1, 20)
        a, _ = model(ids[:, :5], cache=cache)
        junk = torch.randn(1, 4, model.cfg.hidden_size) * 10
        model(inputs_embeds=junk, mask=torch.zeros(1, 4, dtype=torch.bool), cache=cache)
        b, _ = model(ids[:, 5:], cache=cache)
    assert max_diff(torch.cat([a, b], 1), ref) <= 1e-4


def test_inputs_embeds_path_equals_ids(tiny):
    path, _ = tiny("llama", True)
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(inputs_embeds=model.embed(ids))
    assert torch.equal(a, b)


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True)])
def test_sharded_and_tied_checkpoints_load(tiny, family, tied):
    path, hf = tiny(family, tied, shard=True)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = load_model(path, dtype="float32")
    ids = torch.arange(20)[None] % model.cfg.vocab_size
    with torch.no_grad():
        assert max_diff(model(ids)[0], hf(ids).logits) <= 1e-4
    assert (model.lm_head is None) == tied


def test_bfloat16_load(tiny):
    path, hf = tiny("qwen2")
    model = load_model(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = torch.arange(16)[None]
    with torch.no_grad():
        ours = model(ids)[0].float()
        ref = hf(ids).logits
    # bf16 keeps ~3 significant digits; a broken layer would be off by far more
    assert max_diff(ours, ref) <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_greedy_generate_matches_transformers(tiny, family, tied):
    path, hf = tiny(family, tied)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    prompts = [tok.chat([{"role": "user", "content": t}]) for t in
               ["What is 2+3?", "Hello there, how are you doing today?", "x", "Count: 1, 2, 3,"]]
    seqs, texts = generate(model, tok, prompts, max_new_tokens=24)
    for p, s, text in zip(prompts, seqs, texts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_ids,
                              pad_token_id=tok.pad_id)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in tok.eos_ids), len(ref))
        assert s == ref[:cut]
        assert text == tok.decode(s)
    # batch of 4 == 4 single runs
    for p, s in zip(prompts, seqs):
        assert generate(model, tok, [p], max_new_tokens=24)[0][0] == s


def test_generate_stops_at_eos_per_row(tiny):
    path, _ = tiny("qwen2")
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    prompts = [tok.encode("a b c"), tok.encode("hello world, again")]
    with torch.no_grad():
        first = model(torch.tensor([prompts[0]]))[0][0, -1].argmax().item()
    tok.eos_ids = sorted(set(tok.eos_ids) | {first})  # row 0 must stop at once
    seqs, _ = generate(model, tok, prompts, max_new_tokens=10)
    assert seqs[0] == [] and len(seqs[1]) > 0
    # later steps leave the finished row out (on a CPU): the other row gets what it gets alone
    assert seqs[1] == generate(model, tok, prompts[1:], max_new_tokens=10)[0][0]


def test_sampling_is_seeded(tiny):
    path, _ = tiny("llama", True)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    p = [tok.encode("one two three")] * 3
    a = generate(model, tok, p, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]
    b = generate(model, tok, p, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)[0]
    assert a == b and len({tuple(s) for s in a}) > 1  # same seed, same samples; rows differ from each other


def test_shared_prompts_finds_each_distinct_prompt_once():
    import model as M

    assert M.shared_prompts([(1, 2), (3,), (4, 5)], "cpu") is None  # all different: the plain prefill
    first, of_row = M.shared_prompts([(1, 2), (3,), (1, 2), (1, 2), (3,)], "cpu")
    assert first.tolist() == [0, 1] and of_row.tolist() == [0, 1, 0, 0, 1]


@pytest.mark.parametrize("graphs", [False, True])
def test_a_repeated_prompt_is_read_once_and_the_samples_do_not_change(tiny, monkeypatch, graphs):
    """GRPO's groups and pass@k repeat each prompt: the prefill reads it once and copies the cache rows. Sampled
    completions equal those of reading every row (sharing patched out), token for token."""
    import model as M

    path, _ = tiny("qwen2")
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    prompts = [tok.encode(x) for x in ("a b c", "hello world, again", "a b c", "x", "hello world, again", "a b c")]
    copied = []
    real_copy = KVCache.copy_rows
    monkeypatch.setattr(KVCache, "copy_rows", lambda self, src, dst: (copied.append(src.tolist()),
                                                                      real_copy(self, src, dst)))
    shared = generate(model, tok, prompts, max_new_tokens=20, temperature=1.0, seed=11, graphs=graphs)
    assert copied == [[0, 1, 0, 3, 1, 0]]  # every row from the first row of its prompt
    monkeypatch.setattr(M, "shared_prompts", lambda keys, device: None)
    each = generate(model, tok, prompts, max_new_tokens=20, temperature=1.0, seed=11, graphs=graphs)
    assert shared == each and len({tuple(x) for x in shared[0]}) > 3  # (and the repeats drew different samples)


# ---- bad inputs: one clear error each


def test_missing_folder(tmp_path):
    # load_model takes local folders only (scripts resolve hub ids first): a clear ModelError, never a download
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelError, match=re.escape(f"model folder {missing} not found; pass a local Hugging Face folder")):
        load_model(missing)
    with pytest.raises(ModelError, match="not found.*hub id to a script"):
        load_model("Qwen/Qwen2.5-1.5B-Instruct")


def test_model_imports_neither_data_nor_tokenizer():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, model; bad = sorted(m for m in sys.modules if m == 'data' or m.startswith('data.') "
            "or m == 'tokenizer'); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_folder_without_safetensors(tmp_path):
    build_model_folder(str(tmp_path), "qwen2", tokenizer=False, vocab_size=50)
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            os.remove(tmp_path / f)
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    build_model_folder(str(tmp_path), "llama", tokenizer=False, vocab_size=50)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(str(tmp_path))


def test_config_weight_mismatch(tmp_path):
    build_model_folder(str(tmp_path), "qwen2", tokenizer=False, vocab_size=50)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="shapes do not match.*mlp"):
        load_model(str(tmp_path))
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="missing.*layers.2"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("key", ["hidden_size", "architectures"])
def test_config_missing_key_or_unknown_arch(tmp_path, key):
    build_model_folder(str(tmp_path), "qwen2", tokenizer=False, vocab_size=50)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=f"'{key}'.*config.json|config.json.*'{key}'"):
        load_model(str(tmp_path))
    cfg[key] = ["GPT2LMHeadModel"] if key == "architectures" else 64
    if key == "architectures":
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match="GPT2LMHeadModel.*not supported"):
            load_model(str(tmp_path))


def test_prompt_longer_than_max_positions(tiny):
    path, _ = tiny("qwen2")
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    with pytest.raises(ModelError, match="at most 256 positions"):
        generate(model, tok, [[5] * 300], max_new_tokens=4)


# ---- opt-in: a real small model folder (MEMGEN_SMALL_MODEL=path)


@pytest.mark.skipif(not SMALL_MODEL, reason="set MEMGEN_SMALL_MODEL to a folder from get_small_model.py")
def test_real_model_parity_and_coherent_answer():
    from transformers import AutoModelForCausalLM

    model, tok = load_model(SMALL_MODEL, dtype="float32"), load_tokenizer(SMALL_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(SMALL_MODEL, dtype=torch.float32).eval()
    prompt = tok.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    with torch.no_grad():
        assert max_diff(model(torch.tensor([prompt]))[0], hf(torch.tensor([prompt])).logits) <= 1e-3
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_ids,
                          pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    seqs, texts = generate(model, tok, [prompt], max_new_tokens=16)
    cut = next((i for i, t in enumerate(ref) if t in tok.eos_ids), len(ref))
    assert seqs[0] == ref[:cut]
    assert "paris" in texts[0].lower()
