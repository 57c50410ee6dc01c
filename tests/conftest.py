"""Shared fixtures: tiny random Qwen2 / Llama folders written by transformers (the parity oracle), and GSM8K served
from the 20 + 20 rows shipped in tests/fixtures/gsm8k (tests never need files outside the repository)."""
import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMALL_MODEL = os.environ.get("MEMGEN_SMALL_MODEL")  # a real folder from ../shared/tools/get_small_model.py
GSM8K_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gsm8k"  # first 20 rows of each file (LICENSE-gsm8k)
SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"  # the full files, if present


@pytest.fixture
def gsm8k_fixture(monkeypatch, tmp_path):
    """data.gsm8k downloads "GSM8K" from the fixture folder (a file:// URL), its sha256 pins swapped for the
    fixture files' own, into a private cache: the whole download path runs, on 20 train and 20 test rows."""
    import data.gsm8k

    files = {}
    for split, (name, _, _) in data.gsm8k.GSM8K_FILES.items():
        raw = (GSM8K_FIXTURE / name).read_bytes()
        files[split] = (name, hashlib.sha256(raw).hexdigest(), raw.count(b"\n"))
    monkeypatch.setattr(data.gsm8k, "GSM8K_FILES", files)
    monkeypatch.setenv("MEMGEN_GSM8K_URL", str(GSM8K_FIXTURE))
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "gsm8k-fixture-cache"))
    return GSM8K_FIXTURE


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared` read the full GSM8K files from ../shared: opt-in (python -m pytest -m shared), and
    skipped with the reason when those files are absent."""
    if SHARED_GSM8K.joinpath("train.jsonl").is_file():
        return
    skip = pytest.mark.skip(reason=f"the full GSM8K files are not at {SHARED_GSM8K}")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


def hf_config(family, vocab_size, tied=False, **over):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    common.update(over)
    if family == "qwen2":
        return Qwen2Config(rope_theta=10000.0, **common)
    return LlamaConfig(rope_theta=100000.0, head_dim=common["hidden_size"] // common["num_attention_heads"], **common)


def build_model_folder(path, family="qwen2", tied=False, shard=False, seed=0, tokenizer=True, **over):
    """Write a random HF model folder (+ a tiny trained tokenizer) and return the transformers model."""
    from transformers import AutoModelForCausalLM

    vocab = 0
    if tokenizer:
        from tiny_tokenizer import build_tokenizer_files

        vocab = build_tokenizer_files(path, family)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(hf_config(family, over.pop("vocab_size", vocab or 320), tied, **over))
    with torch.no_grad():  # random everything: zero biases or unit norms would hide a missing term
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
    return hf


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A cache of (folder, hf_model) by (family, tied, shard)."""
    made = {}

    def get(family="qwen2", tied=False, shard=False):
        key = (family, tied, shard)
        if key not in made:
            path = str(tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}{'-shard' if shard else ''}"))
            made[key] = (path, build_model_folder(path, family, tied, shard))
        return made[key]

    return get


@pytest.fixture(scope="session")
def long_folder(tmp_path_factory):
    """A tiny random Qwen2 folder with room for GSM8K prompts (the `tiny` fixture's models have 256 positions)."""
    path = str(tmp_path_factory.mktemp("tiny-long"))
    build_model_folder(path, max_position_embeddings=1024)
    return path
