"""Shared fixtures: tiny random Qwen2 / Llama folders written by transformers (the parity oracle)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMALL_MODEL = os.environ.get("MEMGEN_SMALL_MODEL")  # a real folder from ../shared/tools/get_small_model.py


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
