"""Tiny randomly initialised models of every architecture the layer discovery supports (built from configs)."""

from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 99


def _configs() -> dict[str, tf.PreTrainedConfig]:
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    decoder = dict(
        common,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return {
        "bert": tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            **common,
        ),
        "distilbert": tf.DistilBertConfig(
            dim=32, n_layers=3, n_heads=4, hidden_dim=37, max_position_embeddings=64, **common
        ),
        "roberta": tf.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=70,
            **common,
        ),
        "mpnet": tf.MPNetConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=70,
            **common,
        ),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common),
        "llama": tf.LlamaConfig(**decoder),
        "qwen2": tf.Qwen2Config(**decoder),
        "gemma3": tf.Gemma3TextConfig(**decoder, head_dim=8, sliding_window=4),
        "t5": tf.T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0, **common),
    }


CONFIGS = _configs()
ARCHITECTURES = list(CONFIGS)
DECODERS = ["gpt2", "llama", "qwen2", "gemma3"]


def _decoder_families() -> dict[str, tf.PreTrainedConfig]:
    """Causal decoders of the families people serve, for the prefix strategy: windows wider than the tests' prompts
    (Mistral's and Gemma 3's sliding layers then attend to everything, as in their first thousands of tokens)."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    decoder = dict(common, **sizes, num_key_value_heads=2)
    return {
        "llama": tf.LlamaConfig(**decoder),
        "mistral": tf.MistralConfig(**decoder, sliding_window=48),
        "qwen2": tf.Qwen2Config(**decoder),
        "qwen3": tf.Qwen3Config(**decoder, head_dim=8),
        "gemma3": tf.Gemma3TextConfig(**decoder, head_dim=8, sliding_window=48),
        "phi3": tf.Phi3Config(**decoder),
        "smollm3": tf.SmolLM3Config(**decoder),
        "olmo2": tf.Olmo2Config(**decoder),
        "granite": tf.GraniteConfig(**decoder),
        "gpt_neox": tf.GPTNeoXConfig(**common, **sizes),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common),
    }


DECODER_FAMILIES = _decoder_families()


def tiny_decoder(family: str, config: dict | None = None, seed: int = 0) -> tf.PreTrainedModel:
    """A tiny random causal LM of ``family`` (:data:`DECODER_FAMILIES`), with ``config`` overrides."""
    torch.manual_seed(seed)
    base = DECODER_FAMILIES[family]
    return tf.AutoModelForCausalLM.from_config(type(base)(**{**base.to_dict(), **(config or {})})).eval()


def tiny_model(arch: str, head: type | None = None, seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cls = head or tf.AutoModel
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    return build(copy.deepcopy(CONFIGS[arch])).eval()  # a config of its own: strategies may change it


def tiny_batch(arch: str, batch: int = 3, length: int = 7, seed: int = 1, padding: str = "right") -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        if padding == "right":
            mask[1, -2:] = 0
        else:
            mask[1, :2] = 0
        ids[mask == 0] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        out["decoder_input_ids"] = ids[:, :4].clone()
    return out
