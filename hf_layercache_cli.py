"""The ``hf-layercache`` console script, kept outside the ``hf_layercache`` package so that it starts in a fraction
of a second.

``import hf_layercache`` registers the built-in strategies, backends and policies and installs the transformers
integration, which imports torch, transformers, faiss and annoy: seconds, on every call of the command, for
``--help``, ``--version``, a mistyped option or ``inspect`` (which reads JSON and safetensors headers only). While
:func:`main` imports the command line, the package sees :data:`importing_command_line` and imports only its
torch-free part (the config and the registries); a subcommand that needs the library completes the import
(:func:`hf_layercache.cli.common.library`), after which the package is exactly what ``import hf_layercache`` gives.
Nothing changes for anyone else: a bare ``import hf_layercache`` still imports and installs everything at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

importing_command_line = False
"""True only while :func:`main` imports ``hf_layercache.cli``; read by ``hf_layercache/__init__.py``."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hf-layercache`` command line (see :func:`hf_layercache.cli.main`); return its exit status."""
    global importing_command_line
    importing_command_line = True
    try:
        from hf_layercache.cli import main as command_line
    finally:
        importing_command_line = False
    return command_line(argv)


if __name__ == "__main__":  # python -m hf_layercache_cli: run as the module the package looks for, not as __main__
    from hf_layercache_cli import main as _main

    sys.exit(_main())
