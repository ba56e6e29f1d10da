"""Block keys: the hash chain of a row's token blocks (rooted per namespace and block size), and token matching."""

from __future__ import annotations

import hashlib
import json

import torch

from ...bank_format import DIGEST_BYTES


def chain_root(namespace: str, block_size: int) -> bytes:
    """The digest block 0 chains from: tenants and block sizes never share a chain."""
    label = json.dumps(["hf_layercache.prefix", 1, namespace, block_size]).encode()
    return hashlib.blake2b(label, digest_size=DIGEST_BYTES).digest()


def chain_step(parent: bytes, tokens: torch.Tensor) -> bytes:
    """The digest of a block of ``tokens`` (1-D) following the block whose digest is ``parent``."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.digest()


def chain_digests(tokens: torch.Tensor, block_size: int, root: bytes) -> list[bytes]:
    """One digest per complete block of ``tokens`` (1-D); block ``i``'s digest covers blocks ``0..i``."""
    digests, previous = [], root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = chain_step(previous, tokens[start : start + block_size])
        digests.append(previous)
    return digests


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two 1-D token tensors share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
