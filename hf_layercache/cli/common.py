"""What every subcommand shares: the user error, the library set-up, the cache config of the flags, the model and
output directories, loading the model, and byte sizes for people.

Nothing heavy is imported here at module level (``inspect`` and the parser use this module): transformers and the
package's strategies, backends and policies are imported by :func:`library` and :func:`load_model`, when called.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import CONFIG_NAME, LayerCacheConfig
from ..stats import human_bytes  # noqa: F401  (the commands' name for it)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


class CLIError(Exception):
    """A user error (wrong path, unreadable data, bad option): printed as one line, exit status 2."""


def library() -> None:
    """Do what ``import hf_layercache`` does: register the built-in strategies, backends and policies (a config
    names them) and teach ``from_pretrained`` the ``layer_cache=`` argument. Idempotent.

    The ``hf-layercache`` command (``hf_layercache_cli``) imports the package without that part; this completes the
    import, so from here on ``hf_layercache`` is what a bare ``import hf_layercache`` gives. It imports torch,
    transformers and the optional faiss and annoy (seconds), so the command calls it only where a config is
    validated, a model is loaded or the registered names are listed, never to parse its arguments.
    """
    import hf_layercache

    if hf_layercache._partial:
        importlib.reload(hf_layercache)  # the package's code again, now whole: registrations and install()
    from .. import fingerprints  # noqa: F401  (registers the built-in fingerprints, whatever imported the package)
    from ..integration import install

    install()  # idempotent; again in case someone called hf_layercache.uninstall()


def cache_config(args: argparse.Namespace, threshold: float | None = None) -> LayerCacheConfig:
    """The config of ``--config`` with the flags given on top (validated: a bad value is a one-line error)."""
    library()  # the config checks its strategy, backend and policy against the registries
    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            fields = LayerCacheConfig.from_json_file(args.config, strict=True).to_dict()  # the user wrote it
        except (OSError, ValueError) as err:
            raise CLIError(f"--config {args.config}: {err}") from None
    flags = {
        "strategy": args.strategy,
        "backend": args.backend,
        "policy": args.policy,
        "threshold": args.threshold if threshold is None else threshold,
        "max_entries": args.max_entries,
        "max_memory": args.max_memory,
    }
    fields.update({name: value for name, value in flags.items() if value is not None})
    return LayerCacheConfig.from_dict(fields)


def model_directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path}: not a model directory (no config.json)")
    return path


def output_directory(path: str | os.PathLike) -> Path:
    """``--out``, created now: a directory that cannot be written should fail before minutes of work, not after."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {path}: {err.strerror or err}") from None
    return path


def load_model(path: Path, config: LayerCacheConfig, model_class: str = "AutoModel") -> tuple[PreTrainedModel, Any]:
    """Model and tokenizer from one directory, the model with a cold cache of ``config``.

    A warm directory brings its cache along on ``from_pretrained``; it is replaced by a cold one here, so what is
    measured is the flags' config on the data, not whatever the directory held. Its cache is asked for explicitly,
    so one saved for other weights is an error rather than a warning: the user named that directory.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone and every text would become [UNK]
        raise CLIError(f"--model {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there")
    library()  # from_pretrained learns layer_cache=
    import transformers

    from ..integration import disable, enable
    from ..persistence import has_cache

    cls = getattr(transformers, model_class, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise CLIError(f"--model-class {model_class}: not a transformers model class")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders often ship without one; the mask hides padding anyway
    saved = LayerCacheConfig.from_json_file(path / CONFIG_NAME) if has_cache(path) else None
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar before every table
    try:
        model = cls.from_pretrained(path, local_files_only=True, layer_cache=saved).eval()
    finally:
        transformers.utils.logging.enable_progress_bar()
    disable(model)
    return enable(model, config), tokenizer
