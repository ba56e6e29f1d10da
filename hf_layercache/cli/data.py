"""The texts of ``--data`` (``.txt``, ``.jsonl`` or ``.csv``) and their batches of token ids."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from .common import CLIError


def read_texts(path: str | os.PathLike, column: str = "text", limit: int | None = None) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line), ``.jsonl`` (field ``column``) or ``.csv`` (column ``column``)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--data {path}: no such file")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CLIError(f"--data {path}: unknown format {path.suffix!r}; use .txt, .jsonl or .csv")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            texts = reader(f, column, path)
    except UnicodeDecodeError:
        raise CLIError(f"--data {path}: not UTF-8 text") from None
    texts = texts[:limit] if limit is not None else texts
    if not texts:
        raise CLIError(f"--data {path}: no texts in it")
    return texts


def _read_txt(lines, column: str, path: Path) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(lines, column: str, path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CLIError(f"--data {path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise CLIError(f"--data {path}, line {number}: no text field {column!r} (set it with --column)")
        texts.append(record[column])
    return texts


def _read_csv(lines, column: str, path: Path) -> list[str]:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise CLIError(f"--data {path}: no column {column!r}; columns are {reader.fieldnames} (set it with --column)")
    return [row[column] for row in reader if row[column] and row[column].strip()]


def tokenize(tokenizer: Any, texts: list[str], batch_size: int, max_length: int, padding: str) -> list[dict]:
    """Batches of ``batch_size`` texts, padded as ``--padding`` says and cut at ``max_length`` tokens."""
    if batch_size < 1 or max_length < 1:
        raise CLIError("--batch-size and --max-length must be positive")
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]
