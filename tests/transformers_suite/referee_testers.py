"""Tiny model testers (configs + inputs) for ``ModelTesterMixin``, in the style of transformers' own
``BertModelTester`` / ``LlamaModelTester`` (whose files are not in the sdist), written for this project.

Inputs are deterministic (a seeded ``torch.Generator`` per tester), so every mode of the referee sees the same
batches. Each batch repeats a row (row 1 == row 0), and mixes padded rows: encoders (and the BERT decoder) get
attention masks with holes (first column kept, as upstream's ``random_attention_mask``), always with one right-padded
row and one row with holes among them; decoders get right-padded rows of lengths 1..seq_length (as upstream's
``torch.tril`` masks) plus two left-padded rows. BERT and RoBERTa get random ``token_type_ids``.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    DistilBertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)


class TinyTester:
    """What ``ModelTesterMixin`` reads from ``self.model_tester``: sizes, ``get_config()``,
    ``prepare_config_and_inputs_for_common()``."""

    batch_size = 13
    seq_length = 7
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    intermediate_size = 37
    max_position_embeddings = 512
    type_vocab_size = 16
    num_labels = 3
    num_choices = 4
    pad_token_id = 0
    is_training = True
    use_token_type_ids = False
    causal = False
    seed = 0

    def __init__(self, parent, **overrides):
        self.parent = parent
        for name, value in overrides.items():
            setattr(self, name, value)

    # --- inputs ---------------------------------------------------------------------------------------------------
    def _generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def ids(self, shape, salt: int = 0) -> torch.Tensor:
        # token 0..2 are pad/bos/eos in most configs here: keep them out of the random text
        ids = torch.randint(3, self.vocab_size, shape, generator=self._generator(salt))
        ids[1] = ids[0]  # a repeated row
        return ids

    def mask(self, shape, salt: int = 1) -> torch.Tensor:
        batch, length = shape
        if self.causal:  # right-padded rows of lengths 1..length, two left-padded rows
            lengths = torch.arange(batch) % length + 1
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
            mask[1] = mask[0]
            mask[-1] = mask[-1].flip(0)
            mask[-2] = mask[-2].flip(0)
            return mask
        mask = torch.randint(0, 2, shape, generator=self._generator(salt))
        mask[:, 0] = 1
        mask[1] = mask[0]
        # on purpose, not by chance: rows a cache keys differently side by side (#30: a KV cache's writes of a
        # holed row, stored whole, and of a right-padded one, stored for its real tokens, once failed to join)
        columns = torch.arange(length)
        mask[2] = (columns < (length + 1) // 2).long()  # right-padded: real tokens end before the last column
        mask[3] = (columns % 2 == 0).long()  # holes
        return mask

    def get_config(self):
        raise NotImplementedError

    def prepare_config_and_inputs_for_common(self):
        shape = (self.batch_size, self.seq_length)
        inputs = {"input_ids": self.ids(shape), "attention_mask": self.mask(shape)}
        if self.causal:
            inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, self.pad_token_id)
        if self.use_token_type_ids:
            token_types = torch.randint(0, self.type_vocab_size, shape, generator=self._generator(2))
            token_types[1] = token_types[0]
            inputs["token_type_ids"] = token_types
        return self.get_config(), inputs

    def prepare_config_and_inputs(self):
        return self.prepare_config_and_inputs_for_common()


# --- encoders -------------------------------------------------------------------------------------------------------
class BertTester(TinyTester):
    use_token_type_ids = True
    is_decoder = False
    """``True``: ``BertLMHeadModel`` as upstream's generation tests run it (causal, with a KV cache)."""

    def get_config(self):
        return BertConfig(
            is_decoder=self.is_decoder,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            initializer_range=0.02,
            pad_token_id=self.pad_token_id,
            num_labels=self.num_labels,
        )


class RobertaTester(BertTester):
    pad_token_id = 1  # RoBERTa's padding_idx: positions start after it

    def get_config(self):
        config = super().get_config()
        return RobertaConfig(**{**config.to_dict(), "model_type": "roberta", "bos_token_id": 0, "eos_token_id": 2})


class DistilBertTester(TinyTester):
    def get_config(self):
        return DistilBertConfig(
            vocab_size=self.vocab_size,
            dim=self.hidden_size,
            n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads,
            hidden_dim=self.intermediate_size,
            dropout=0.1,
            attention_dropout=0.1,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=0.02,
            pad_token_id=self.pad_token_id,
            num_labels=self.num_labels,
        )


# --- decoders -------------------------------------------------------------------------------------------------------
class DecoderTester(TinyTester):
    causal = True
    num_key_value_heads = 2
    bos_token_id = 1
    eos_token_id = 2


class GPT2Tester(DecoderTester):
    pad_token_id = 98  # upstream's GPT-2 tester: bos = eos = pad = vocab_size - 1
    bos_token_id = 98
    eos_token_id = 98

    def ids(self, shape, salt: int = 0) -> torch.Tensor:
        ids = torch.randint(0, self.vocab_size - 1, shape, generator=self._generator(salt))
        ids[1] = ids[0]
        return ids

    def get_config(self):
        return GPT2Config(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_inner=self.intermediate_size,
            activation_function="gelu_new",
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            n_positions=self.max_position_embeddings,
            initializer_range=0.02,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            num_labels=self.num_labels,
        )


class LlamaTester(DecoderTester):
    config_class = LlamaConfig

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=0.02,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            num_labels=self.num_labels,
        )


class Qwen2Tester(LlamaTester):
    config_class = Qwen2Config


class Gemma3TextTester(DecoderTester):
    head_dim = 8
    sliding_window = 4  # shorter than seq_length: the sliding layer really slides

    def get_config(self):
        return Gemma3TextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=0.02,
            sliding_window=self.sliding_window,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )


# --- encoder-decoder ------------------------------------------------------------------------------------------------
class T5Tester(TinyTester):
    encoder_seq_length = 7
    decoder_seq_length = 7
    d_kv = 8
    relative_attention_num_buckets = 8
    decoder_start_token_id = 0
    eos_token_id = 1

    @property
    def seq_length(self):  # what the mixin reads for encoder-decoder models' encoder side
        return self.encoder_seq_length

    @property
    def key_length(self):
        return self.encoder_seq_length

    def get_config(self):
        return T5Config(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            d_kv=self.d_kv,
            d_ff=self.intermediate_size,
            num_layers=self.num_hidden_layers,
            num_decoder_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            dropout_rate=0.1,
            initializer_factor=0.002,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.pad_token_id,
            pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        shape = (self.batch_size, self.decoder_seq_length)
        decoder_ids = torch.randint(3, self.vocab_size, shape, generator=self._generator(3))
        decoder_ids[1] = decoder_ids[0]
        inputs["decoder_input_ids"] = decoder_ids
        inputs["decoder_attention_mask"] = torch.ones_like(decoder_ids)
        return config, inputs
