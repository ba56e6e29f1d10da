"""What an entry belongs to: the identity of the computation that made it, one definition for every user.

An entry is valid only for the function that computed it. :class:`ModelIdentity` names everything that determines
that function, as LMCache's ``CacheEngineKey`` names model, format and content:

* the model's class, ``model_type``, cached layer count, hidden size and dtype;
* ``weights_hash``: an xxh3-128 digest over the name, shape, dtype and *every byte* of every parameter and buffer
  that belongs to no adapter (a sample would miss a fine-tune that retrained five rows of an embedding);
* ``config``: every field of the model's config that affects the forward pass (bookkeeping, generation-only,
  training-only and output-selection fields are left out: they change no computed value), plus the kind of attention
  function (:func:`attention_kind`: transformers' kernels are one kind, a custom registered function another);
* ``adapters``: a digest of each adapter's weights (PEFT, or transformers' adapter API, which uses PEFT's layers).
  Which adapters are *active* is not part of the identity: entries are kept per active adapter set instead (the
  request's key space, see :mod:`hf_layercache.adapters`), so switching adapters does not throw entries away;
* ``storage_dtype``: the cache's own output-affecting field (entries rounded to another dtype serve other values).

Warm-cache headers store it (:meth:`ModelIdentity.to_dict`), loads compare it (:meth:`ModelIdentity.differences`
names each field that differs, config fields one by one), and the shared tier keys Redis on :meth:`ModelIdentity.key`.
In-process, :class:`~hf_layercache.watch.ModelWatch` notices every change of these parts between requests and the
controller computes the identity again.

The digest reads each tensor's bytes in place (a copy only for tensors off the CPU or not contiguous) and runs at
memory speed (docs/benchmarks.md gives the measured ms per GB); it is computed when first needed and kept until the
model changes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import xxhash

DIGEST = "xxh3-128"
_SOFTMAX_KERNELS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})

_IGNORED_CONFIG_FIELDS = frozenset(
    {
        # bookkeeping
        "_name_or_path",
        "_commit_hash",
        "architectures",
        "transformers_version",
        "tokenizer_class",
        "finetuning_task",
        "task_specific_params",
        "id2label",
        "label2id",
        "problem_type",  # chooses the loss only
        "dtype",  # the identity's own field, read from the weights
        "torch_dtype",
        # what the call returns, not what it computes (requests asking for maps or states bypass where needed)
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_cache",
        # initialisation and generation only
        "initializer_range",
        "initializer_factor",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "num_return_sequences",
        "early_stopping",
        "bad_words_ids",
        # chunking the feed-forward along the sequence computes the same rows
        "chunk_size_feed_forward",
    }
)


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Everything that determines an entry's values (see the module docstring); JSON in warm-cache headers."""

    model_class: str
    model_type: str | None
    num_layers: int
    hidden_size: int
    dtype: str | None
    weights_hash: str
    """``xxh3-128:<hex>`` over every non-adapter parameter and buffer, all bytes."""
    config: dict[str, Any]
    """The config fields that affect the forward pass, JSON-compatible."""
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per adapter name, the digest of its weights."""
    storage_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class"] = data.pop("model_class")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        """The identity a header recorded (fields it lacks, from older releases, read as ``None``/empty)."""
        return cls(
            model_class=data.get("class"),
            model_type=data.get("model_type"),
            num_layers=data.get("num_layers"),
            hidden_size=data.get("hidden_size"),
            dtype=data.get("dtype"),
            weights_hash=data.get("weights_hash"),
            config=data.get("config") if isinstance(data.get("config"), dict) else {},
            adapters=data.get("adapters") if isinstance(data.get("adapters"), dict) else {},
            storage_dtype=data.get("storage_dtype"),
        )

    def key(self) -> str:
        """A digest of the whole identity but the adapters (entries carry their adapter set in their key space), for
        keys shared between processes."""
        described = {k: v for k, v in self.to_dict().items() if k != "adapters"}
        text = json.dumps(described, sort_keys=True, default=str).encode()
        return hashlib.blake2b(text, digest_size=16).hexdigest()

    def differences(self, current: ModelIdentity) -> list[str]:
        """Human-readable differences that make entries made by ``self`` (a saved cache) wrong for ``current``."""
        found = [
            f"{name}: cache has {getattr(self, attribute)!r}, model has {getattr(current, attribute)!r}"
            for name, attribute in (
                ("class", "model_class"),
                ("model_type", "model_type"),
                ("num_layers", "num_layers"),
                ("hidden_size", "hidden_size"),
                ("dtype", "dtype"),
                ("weights_hash", "weights_hash"),
            )
            if getattr(self, attribute) != getattr(current, attribute)
        ]
        for name in sorted(set(self.config) | set(current.config)):
            saved, now = self.config.get(name, "<unset>"), current.config.get(name, "<unset>")
            if saved != now:
                found.append(f"config.{name}: cache has {saved!r}, model has {now!r}")
        if self.storage_dtype != current.storage_dtype:
            found.append(
                f"storage_dtype: cache has {self.storage_dtype!r}, this config has {current.storage_dtype!r} (entries "
                "stored in another dtype serve other values)"
            )
        return found


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``xxh3-128:<hex>`` over each tensor's name, shape, dtype and bytes, in name order."""
    h = xxhash.xxh3_128()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        h.update(f"{len(name)}:{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        for chunk in _byte_chunks(tensor):
            h.update(chunk)
    return f"{DIGEST}:{h.hexdigest()}"


def _byte_chunks(tensor: torch.Tensor, chunk_bytes: int = 256 * 2**20) -> Iterator[memoryview]:
    """The tensor's bytes, in place where they can be (a contiguous CPU tensor), else copied to the CPU a chunk at a
    time (so hashing a GPU model never holds a second copy of it). Meta tensors have none."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return
    flat = tensor.detach().reshape(-1)
    per_chunk = max(1, chunk_bytes // flat.element_size())
    for start in range(0, flat.numel(), per_chunk):
        part = flat[start : start + per_chunk]
        if part.device.type != "cpu":
            part = part.cpu()
        yield memoryview(part.contiguous().view(torch.uint8).numpy())


def affects_forward(field: str) -> bool:
    """Whether a config field may change what the forward pass computes (dropout does nothing in inference)."""
    ignored = field in _IGNORED_CONFIG_FIELDS or field.startswith("_attn_implementation")  # see attention_kind
    return not ignored and "dropout" not in field


def forward_config(config: Any) -> dict[str, Any]:
    """The fields of a transformers config that affect the forward pass, JSON-compatible, sub-configs nested."""
    if config is None:
        return {}
    fields = {name: value for name, value in config.to_dict().items() if affects_forward(name)}
    fields["attn_implementation"] = attention_kind(getattr(config, "_attn_implementation", None))
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def attention_kind(implementation: str | None) -> str | None:
    """``"softmax"`` for transformers' own kernels, which compute the same exact attention and differ by rounding
    only (as one kernel does between batch shapes: the lossless tolerance covers it), else the name: a registered
    custom function may compute anything."""
    base = implementation.removeprefix("paged|") if isinstance(implementation, str) else implementation
    return "softmax" if base in _SOFTMAX_KERNELS or base is None else implementation


@functools.cache
def _autocast_device_types() -> tuple[str, ...]:
    """The device types a model can compute on in this process, whose autocast state :func:`autocast_state` reads:
    the CPU and the accelerator torch finds (a model's layers may run on either, e.g. weights offloaded to the CPU and
    computed on the GPU). Read once: an accelerator does not come or go while the process runs."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        current = accelerator.current_accelerator() if accelerator.is_available() else None
        return ("cpu",) if current is None else ("cpu", current.type)
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def autocast_state() -> str:
    """The autocast regions the calling thread computes in, e.g. ``"cpu:bfloat16"`` (``""``: none).

    Not part of the model's identity but of each request's: ``torch.autocast`` is a context the caller opens around
    some calls, and inside it the same weights compute in another precision (on a tiny Llama, bfloat16 autocast moved
    the logits by 1.6e-3, 160 times the lossless tolerance of 1e-5)."""
    device_types = _autocast_device_types()
    if not any(map(torch.is_autocast_enabled, device_types)):  # the common case, without building a string
        return ""
    return ",".join(
        f"{device_type}:{str(torch.get_autocast_dtype(device_type)).removeprefix('torch.')}"
        for device_type in device_types
        if torch.is_autocast_enabled(device_type)
    )


def float32_precision_state() -> str:
    """How float32 matrix products and convolutions compute in this process, ``""`` at torch's defaults.

    ``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.allow_tf32 = True`` and their
    per-backend successors (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) let the same weights compute
    with TF32 or bfloat16 inner products, which moves outputs by far more than the lossless tolerance. Where torch
    has the per-backend settings (>= 2.9) they are what kernels read, also after the legacy calls (which set them);
    each reads its effective value, inherited ones resolved. Older torch has only the legacy settings."""
    read = _precision_reader()
    if read is None:
        matmul, conv_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        if matmul == "highest" and conv_tf32:
            return ""
        return f"matmul:{matmul}" + ("" if conv_tf32 else ",cudnn-conv:ieee")
    values = read()
    if values == _DEFAULT_PER_BACKEND:
        return ""
    values = tuple("ieee" if value == "none" else value for value in values)
    return "" if values == _DEFAULT_RESOLVED else "fp32:" + "/".join(values)


_DEFAULT_PER_BACKEND = ("none", "none", "tf32", "none")
"""torch's defaults for the settings :func:`_precision_reader` reads, in its order."""
_DEFAULT_RESOLVED = ("ieee", "ieee", "tf32", "ieee")
"""The same with "none" read as "ieee": kernels reduce precision only where a setting says "tf32" or "bf16"."""


_FP32_PRECISION_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)
"""What torch's ``fp32_precision`` properties call (torch >= 2.9), read directly when present (see below)."""


@functools.cache
def _precision_reader() -> Callable[[], tuple[str, ...]] | None:
    """Reads the effective per-backend settings of float32 matrix products and convolutions on CUDA and on CPUs
    (oneDNN), or ``None`` before torch 2.9, which has only the legacy ones.

    Through the function torch's ``fp32_precision`` properties call, where it exists: the properties' Python
    wrappers (a module ``__getattr__``, an attribute lookup that fails first) cost a cold cache hit 20 us of its
    400, the function under them 2."""
    backends = torch.backends
    if not hasattr(backends.mkldnn, "matmul"):
        return None
    getter = _FP32_PRECISION_GETTER
    if getter is not None:
        return lambda: (
            getter("cuda", "matmul"),
            getter("mkldnn", "matmul"),
            getter("cuda", "conv"),
            getter("mkldnn", "conv"),
        )
    settings = (backends.cuda.matmul, backends.mkldnn.matmul, backends.cudnn.conv, backends.mkldnn.conv)
    return lambda: tuple(setting.fp32_precision for setting in settings)


def numerics_state() -> str:
    """The numerics a call computes under beyond the model's identity: the autocast regions of the calling thread
    and the process's float32 precision settings, ``""`` when neither departs from torch's defaults.

    The controller keeps entries per numerics state, as per adapter set, so a call is never served values computed
    in another precision. An autocast-only state reads as :func:`autocast_state` alone, so the keys of caches warmed
    under autocast do not change."""
    read = _precision_reader()
    if (
        read is not None
        and read() == _DEFAULT_PER_BACKEND
        and not any(map(torch.is_autocast_enabled, _autocast_device_types()))
    ):
        return ""  # the common case in one pass: a cold cache hit pays for every function it enters
    autocast = autocast_state()
    precision = float32_precision_state()
    return f"{autocast}|{precision}" if precision else autocast


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers with their real values, also those accelerate offloaded to CPU or disk (meta)."""
    for module_name, module in model.named_modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        tensors = list(module._parameters.items()) + list(module._buffers.items())
        for name, tensor in tensors:
            if tensor is None:
                continue
            if tensor.device.type == "meta" and weights_map is not None and name in weights_map:
                tensor = weights_map[name]
            yield f"{module_name}.{name}" if module_name else name, tensor
