"""Replica B of the shared-store tests: a separate Python process with a cold local bank.

``python tests/shared_replica.py JOBS.json OUT.safetensors``: for each job (a model, a config, inputs saved as
safetensors), enable the cache with the config, run the inputs once in inference mode, and write each job's output
(``<job>.out``) into OUT, with every job's ``stats()["shared"]`` and total hits as JSON metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

import hf_layercache


def _model(spec: str):
    from tiny import tiny_model
    from transformers import AutoModel, AutoModelForCausalLM

    kind, _, name = spec.partition(":")
    if kind == "tiny":
        arch, _, seed = name.partition("@")
        return tiny_model(arch, seed=int(seed or 0))
    if kind == "decoder":  # a tiny random causal LM of a family in tiny.DECODER_FAMILIES
        from tiny import tiny_decoder

        return tiny_decoder(name)
    if kind == "causal":
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    if kind == "lora":  # "lora:<base model dir>|<PEFT adapter dir>": the causal LM with the adapter injected, active
        from peft import PeftModel

        base, _, adapter = name.partition("|")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).base_model.model.eval()
    return AutoModel.from_pretrained(name).eval()


def main(jobs_path: str, out_path: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    outputs, report = {}, {}
    for job in jobs:
        model = hf_layercache.enable(_model(job["model"]), job["config"])
        inputs = load_file(job["inputs"])
        with torch.inference_mode():
            out = model(**inputs)
        field = "logits" if "logits" in out else "last_hidden_state"
        outputs[f"{job['name']}.out"] = out[field].contiguous()
        stats = model.layer_cache.stats()
        report[job["name"]] = {**stats["shared"], "hits": stats["total"]["hits"], "misses": stats["total"]["misses"]}
        model.layer_cache.shared.flush(10)
    save_file(outputs, out_path, metadata={"report": json.dumps(report)})


if __name__ == "__main__":
    main(*sys.argv[1:3])
