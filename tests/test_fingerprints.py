"""Fingerprints: shapes, mask-awareness, what their similarity means, and determinism across processes."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_layercache import LayerCacheConfig, available_fingerprints, get_fingerprint
from hf_layercache.fingerprints import MeanEmbedding, MinHash, Probe, SimHash

NAMES = ["mean_embedding", "minhash", "probe", "simhash"]


def inputs(seed: int = 0, batch: int = 3, length: int = 9, hidden: int = 48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask, torch.randn(batch, length, hidden, generator=g)


def cosine(a, b):
    return float(F.cosine_similarity(a, b, dim=-1))


def test_builtins_are_registered():
    assert set(NAMES) <= set(available_fingerprints())


@pytest.mark.parametrize("name", NAMES)
def test_keys_have_the_declared_shape_and_are_finite(name):
    fingerprint = get_fingerprint(name)()
    ids, mask, embeddings = inputs()
    keys = fingerprint(ids, mask, embeddings)
    assert keys.shape == (3, fingerprint.key_dim(48))
    assert torch.isfinite(keys).all()


@pytest.mark.parametrize("name", ["mean_embedding", "simhash", "minhash"])
def test_padding_does_not_move_a_key(name):
    fingerprint = get_fingerprint(name)()
    ids, mask, embeddings = inputs()
    padded_ids, padded = ids[1:2].clone(), embeddings[1:2].clone()
    padded_ids[:, -3:] = 0
    padded[:, -3:] = 100.0  # whatever sits at padded positions must not count
    short = fingerprint(ids[1:2, :-3], None, embeddings[1:2, :-3])
    torch.testing.assert_close(fingerprint(padded_ids, mask[1:2], padded), short)


def test_mean_embedding_projects_only_large_hidden_sizes():
    small, large = MeanEmbedding(dim=64), MeanEmbedding(dim=16)
    _, mask, embeddings = inputs(hidden=32)
    torch.testing.assert_close(small(None, mask, embeddings)[0], embeddings[0].mean(0))
    assert large(None, mask, embeddings).shape == (3, 16) and large.key_dim(32) == 16


def test_simhash_cosine_tracks_the_angle():
    fingerprint = SimHash(bits=1024)
    base = torch.randn(1, 5, 64)
    near, far = base + 0.1 * torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    keys = [fingerprint(None, None, x) for x in (base, near, far)]
    assert set(keys[0].unique().tolist()) <= {-1.0, 1.0}
    assert cosine(keys[0], keys[1]) > 0.8 > 0.4 > abs(cosine(keys[0], keys[2]))


def test_minhash_cosine_estimates_jaccard():
    fingerprint = MinHash(num_perm=1024, shingle=1)
    a = torch.arange(10, 30).unsqueeze(0)  # 20 tokens
    b = torch.arange(20, 40).unsqueeze(0)  # shares 10 of 30 distinct tokens: Jaccard 1/3
    c = torch.arange(100, 120).unsqueeze(0)
    dummy = torch.zeros(1, 20, 8)
    ka, kb, kc = (fingerprint(x, None, dummy) for x in (a, b, c))
    assert cosine(ka, fingerprint(a.flip(1), None, dummy)) == pytest.approx(1.0)  # a set: order does not matter
    assert cosine(ka, kb) == pytest.approx(1 / 3, abs=0.1)
    assert abs(cosine(ka, kc)) < 0.1


def test_minhash_needs_token_ids():
    with pytest.raises(ValueError, match="input_ids"):
        MinHash()(None, None, torch.zeros(1, 3, 8))


def test_probe_runs_after_its_layers():
    assert Probe(layers=2).after_layers == 2
    assert MeanEmbedding().after_layers == 0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("mean_embedding", {"dim": 0}), ("simhash", {"bits": -3}), ("minhash", {"shingle": 0}), ("probe", {"layers": 0})],
)
def test_bad_kwargs_are_a_value_error(name, kwargs):
    with pytest.raises(ValueError):
        get_fingerprint(name)(**kwargs)


def test_config_checks_fingerprint_kwargs():
    with pytest.raises(ValueError, match="fingerprint_kwargs"):
        LayerCacheConfig(strategy="semantic", fingerprint="minhash", fingerprint_kwargs={"bitz": 3})
    with pytest.raises(ValueError, match="dim"):
        LayerCacheConfig(strategy="semantic", fingerprint_kwargs={"dim": 0})
    assert LayerCacheConfig(strategy="semantic", fingerprint="probe", fingerprint_kwargs={"layers": 2})


_CHILD = """
import json, torch
from hf_layercache.fingerprints import MeanEmbedding, MinHash, SimHash, Probe
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 1000, (2, 9), generator=g)
embeddings = torch.randn(2, 9, 600, generator=g)
print(json.dumps({type(f).__name__: f(ids, None, embeddings).tolist()
                  for f in (MeanEmbedding(), MinHash(), SimHash(), Probe())}))
"""


def test_keys_are_identical_in_another_process():
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    theirs = json.loads(child.stdout)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 9), generator=g)
    embeddings = torch.randn(2, 9, 600, generator=g)
    for fingerprint in (MeanEmbedding(), MinHash(), SimHash(), Probe()):
        assert torch.equal(fingerprint(ids, None, embeddings), torch.tensor(theirs[type(fingerprint).__name__]))


def test_minhash_confirms_with_the_exact_jaccard_similarity_of_its_shingles():
    fingerprint = MinHash(shingle=2)
    old = [1, 2, 3, 4, 5, 6]
    new = [1, 2, 3, 9, 5, 6]  # one token changed: pairs (3, 4) and (4, 5) lost, (3, 9) and (9, 5) gained
    assert fingerprint.confirm(new, old) == pytest.approx(3 / 7)
    assert fingerprint.confirm(old, list(old)) == 1.0
    assert fingerprint.confirm([1, 2], [3, 4]) == 0.0
    assert fingerprint.confirm([7], [7]) == 1.0  # shorter than a shingle: the tokens themselves
    assert MeanEmbedding().confirm(new, old) is None  # an embedding key is its own similarity


def test_minhash_estimate_is_close_to_the_exact_jaccard_on_long_rows():
    g = torch.Generator().manual_seed(1)
    old = torch.randint(3, 5000, (120,), generator=g)
    new = old.clone()
    new[[10, 50, 90]] = torch.tensor([1, 2, 3])  # a few tokens changed in a long document
    fingerprint = MinHash()
    keys = torch.nn.functional.normalize(fingerprint(torch.stack([old, new]), None, torch.zeros(2, 120, 8)), dim=-1)
    exact = fingerprint.confirm(new.tolist(), old.tolist())
    assert 0.85 < exact < 0.95
    assert float(keys[0] @ keys[1]) == pytest.approx(exact, abs=0.1)  # 256 slots: standard deviation about 0.02


def test_minhash_containment_is_the_share_of_the_old_rows_shingles_in_the_new_one():
    fingerprint = MinHash(shingle=2)
    old = [1, 2, 3, 4, 5, 6]
    appended = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # three tokens added: every pair of old kept, three gained
    assert fingerprint.contained(appended, old) == 1.0
    assert fingerprint.confirm(appended, old) == pytest.approx(5 / 8)
    assert fingerprint.contained([1, 2, 3, 9, 5, 6], old) == pytest.approx(3 / 5)  # (3, 4) and (4, 5) lost
    assert MeanEmbedding().contained(appended, old) is None


def test_minhash_floor_keeps_every_row_that_adds_up_to_the_allowed_share_to_an_entry():
    fingerprint = MinHash()
    g = torch.Generator().manual_seed(2)
    threshold, max_added = 0.85, 0.25
    floor = fingerprint.containment_floor(threshold, 1 / (1 - max_added))
    assert floor < threshold - 0.2  # far below: appending a quarter costs Jaccard about that much
    for length in (20, 60, 120):
        old = torch.randint(3, 5000, (length,), generator=g)
        added = int(max_added * length / (1 - max_added))  # the largest addition max_added allows
        new = torch.cat([old, torch.randint(3, 5000, (added,), generator=g)])
        assert fingerprint.contained(new.tolist(), old.tolist()) == 1.0
        keys = fingerprint(torch.stack([old, new[:length]]), None, torch.zeros(2, length, 8))
        longer = fingerprint(new.unsqueeze(0), None, torch.zeros(1, len(new), 8))
        cosine = torch.nn.functional.cosine_similarity(keys[0], longer[0], dim=0)
        assert floor < float(cosine) < threshold


@pytest.mark.parametrize("shingle", [1, 2, 3])
def test_minhash_keys_a_batch_as_it_keys_each_row_alone(shingle):
    fingerprint = MinHash(shingle=shingle)
    g = torch.Generator().manual_seed(shingle)
    ids = torch.randint(3, 30000, (6, 40), generator=g)
    mask = torch.ones(6, 40, dtype=torch.long)
    mask[1, 25:] = 0  # right padding
    mask[2, :30] = 0  # left padding
    mask[3, 10:14] = 0  # a hole
    mask[4, shingle:] = 0  # as short as a shingle
    batch = fingerprint(ids, mask, torch.zeros(6, 40, 8))
    for row in range(6):
        real = ids[row, mask[row].bool()]
        alone = fingerprint(real.unsqueeze(0), None, torch.zeros(1, 1, 8))
        assert torch.equal(batch[row], alone[0]), row
        assert torch.equal(batch[row], fingerprint._row(real)), row  # the one-row path short rows take


def test_minhash_keys_an_empty_batch_as_no_rows():
    keys = MinHash(num_perm=64)(torch.zeros(0, 5, dtype=torch.long), None, torch.zeros(0, 5, 8))
    assert tuple(keys.shape) == (0, 64)
