"""Run transformers' own model tests uncached and with each cache strategy on; fail on what the cache breaks.

    python tests/transformers_suite/run_referee.py            # or: python -m tests.transformers_suite.run_referee
    python tests/transformers_suite/run_referee.py --modes none,exact --arch bert,gpt2 --jobs 2

Every mode runs ``pytest`` on ``tests/transformers_suite`` (see conftest.py there) with ``--junitxml``:

* ``none``: no cache, every architecture -- the reference;
* ``exact``: ``strategy="exact"`` on every model the tests build, every architecture;
* ``prefix``: ``strategy="prefix"`` on the decoders (GPT-2, Llama, Qwen2, Gemma3); models it refuses run uncached
  and are counted as refused;
* ``attention``: ``strategy="attention"``, lossless (``attention_position_tolerance=0``) and without the gate
  (``attention_gate_interval=0``: every prefill call takes the cached path), every architecture but T5 (whose
  relative position bias it refuses at the first call).

A test that passes uncached must pass in every cached mode, unless ``known_differences.json`` lists it (test id ->
reason; an id may be prefixed with ``<mode>:`` to apply to one mode only). Otherwise this exits 1 and prints each
offending test with the first lines of its failure. It also exits 1 when a cached mode enabled no model or served
no hit (a harness that never turns the cache on), or when pytest itself crashed.

Environment: ``HF_LAYERCACHE_REFEREE_CACHE`` (where the transformers sdist is downloaded once, default
``<system temp>/hf_layercache_referee``), ``HF_LAYERCACHE_REFEREE_SDIST`` (use this tarball or folder instead),
``HF_LAYERCACHE_REFEREE_CONFIG`` (JSON merged into the cached modes' ``LayerCacheConfig``).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ARCHS = ("bert", "distilbert", "roberta", "t5", "gpt2", "llama", "qwen2", "gemma3")
DECODERS = ("gpt2", "llama", "qwen2", "gemma3")
MODES = {"none": ARCHS, "exact": ARCHS, "prefix": DECODERS, "attention": tuple(a for a in ARCHS if a != "t5")}
TEST_DEPENDENCIES = {"parameterized": "parameterized", "pytest_timeout": "pytest-timeout"}
"""Imported by test_modeling_common.py / needed for --timeout, and not dependencies of the library."""

DESELECT = {
    "eager_matches_sdpa_inference and (fp16 or bf16 or kernels or output_attentions or 11_fp32 or 13_fp32)": (
        "25 precision/padding/kernel variants of one eager-vs-sdpa comparison; fp32 left-padded with mask (09) and "
        "right-padded without mask (15) are kept. Half precision on CPU mostly measures CPU half kernels, and "
        "output_attentions runs uncached anyway."
    ),
    "eager_matches_batched_and_grouped_inference and (fp16 or bf16)": "half-precision variants; fp32 is kept",
}
"""pytest ``-k`` expressions -> why they are left out. Tests needing a GPU, the hub, deepspeed or flash-attn skip
themselves through upstream's decorators and are counted as skipped."""


# --- running ------------------------------------------------------------------------------------------------------
def ensure_dependencies(install: bool) -> None:
    missing = [pkg for module, pkg in TEST_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    if not install:
        sys.exit(f"missing test dependencies {missing}: pip install {' '.join(missing)} (or drop --no-install)")
    print(f"installing test dependencies of transformers' test_modeling_common.py: {' '.join(missing)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def fetch_sdist() -> Path:
    sys.path.insert(0, str(HERE))
    import referee_upstream

    started = time.perf_counter()
    path = referee_upstream.sdist_path()
    seconds = time.perf_counter() - started
    print(f"transformers {referee_upstream.transformers_version()} tests from {path} ({seconds:.1f}s)")
    return path


def keyword_expression(extra: str | None) -> str:
    parts = [f"not ({expr})" for expr in DESELECT]
    if extra:
        parts.append(f"({extra})")
    return " and ".join(parts)


def run_job(job: dict, out: Path, timeout: int, pytest_args: list[str], threads: int) -> dict:
    name = job["name"]
    junit = out / f"{name}.xml"
    report = out / f"{name}.jsonl"
    log = out / f"{name}.log"
    for path in (junit, report):
        path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "HF_LAYERCACHE_REFEREE": "1",
        "HF_LAYERCACHE_REFEREE_STRATEGY": job["mode"],
        "HF_LAYERCACHE_REFEREE_REPORT": str(report),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    files = [str((HERE / f"test_referee_{arch}.py").relative_to(ROOT)) for arch in job["archs"]]
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:subtests", "-rN",
        f"--timeout={timeout}", f"--junitxml={junit}", "-o", "junit_family=xunit1", "-o", "addopts=",
        "-k", keyword_expression(job.get("keyword")), *pytest_args, *files,
    ]  # fmt: skip
    started = time.perf_counter()
    cpu = float("nan")
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if hasattr(os, "wait4"):  # the child's own CPU time: what the run costs, however busy the machine is
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = rc = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
        else:
            rc = process.wait()
    wall = time.perf_counter() - started
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    print(f"  {name:<10} rc={rc} wall {wall:6.1f}s cpu {cpu:6.1f}s  {tail[0][:100]}", flush=True)
    return {**job, "rc": rc, "wall": wall, "cpu": cpu, "junit": junit, "report": report, "log": log}


def plan(modes: list[str], archs: list[str], split: bool) -> list[dict]:
    """One job per mode, or (``split``) per mode and half of its architectures, so two workers stay busy."""
    jobs = []
    for mode in modes:
        selected = [a for a in MODES[mode] if a in archs]
        if not selected:
            continue
        groups = [selected]
        if split and len(selected) > 4:
            groups = [selected[0::2], selected[1::2]]
        for i, group in enumerate(groups):
            suffix = f"-{i + 1}" if len(groups) > 1 else ""
            jobs.append({"name": f"{mode}{suffix}", "mode": mode, "archs": group})
    return jobs


# --- reading results ----------------------------------------------------------------------------------------------
def arch_of(test_id: str) -> str:
    match = re.search(r"test_referee_(\w+?)\.py", test_id)
    return match.group(1) if match else "?"


def read_junit(path: Path) -> dict[str, dict]:
    """test id (``test_referee_bert.py::BertRefereeTest::test_x``) -> outcome and failure text."""
    results: dict[str, dict] = {}
    if not path.exists():
        return results
    for case in ET.parse(path).iter("testcase"):
        module = case.get("classname", "").split(".")
        test_id = f"{module[-2]}.py::{module[-1]}::{case.get('name')}" if len(module) >= 2 else case.get("name")
        outcome, message, text = "passed", "", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message, text = "failed", child.get("message") or "", child.text or ""
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        results[test_id] = {"outcome": outcome, "message": message, "text": text, "time": float(case.get("time", 0))}
    return results


def read_report(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def failure_excerpt(result: dict, lines: int = 12) -> str:
    """The failure message, the ``E`` lines and the innermost frames' locations of a junit failure."""
    text = result["text"].splitlines()
    errors = [line for line in text if line.startswith("E ")][:lines]
    locations = [line for line in text if re.match(r"^\S+\.py:\d+: \w+", line)]
    library = [line for line in text if "hf_layercache/" in line and re.match(r"^\S+\.py:\d+", line)]
    out = [f"    {result['message'].splitlines()[0][:300] if result['message'] else ''}"]
    out += [f"    {line[:200]}" for line in errors]
    for line in (library[-2:] if library else []) + locations[-1:]:
        out.append(f"    at {line[:200]}")
    return "\n".join(out)


def load_allowlist(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def allowed(allowlist: dict[str, str], mode: str, test_id: str) -> str | None:
    return allowlist.get(f"{mode}:{test_id}") or allowlist.get(test_id)


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes", default="none,exact,prefix,attention", help="comma-separated, from none, exact, prefix, attention"
    )
    parser.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="pytest processes at once")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per test (pytest-timeout)")
    parser.add_argument("-k", dest="keyword", default=None, help="extra pytest -k expression (and-ed)")
    parser.add_argument("--out", default=None, help="folder for junit xml, reports, logs (default: a temp dir)")
    parser.add_argument("--allowlist", default=str(HERE / "known_differences.json"))
    parser.add_argument("--no-install", action="store_true", help="do not pip install missing test dependencies")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    archs = [a for a in args.arch.split(",") if a]
    unknown = [m for m in modes if m not in MODES] + [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown mode/arch: {unknown}")
    if "none" not in modes:
        modes.insert(0, "none")  # the reference
    out = Path(args.out or tempfile.mkdtemp(prefix="hf_layercache_referee-"))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    ensure_dependencies(not args.no_install)
    fetch_sdist()
    jobs = plan(modes, archs, split=args.jobs > 1)
    for job in jobs:
        job["keyword"] = args.keyword
    # longest first: cached modes are slower than none, prefix covers half the architectures
    weight = {"exact": 3, "attention": 3, "none": 2, "prefix": 1}
    jobs.sort(key=lambda j: (-weight[j["mode"]] * len(j["archs"]), j["name"]))
    print(f"{len(jobs)} pytest runs, {args.jobs} at a time, results in {out}", flush=True)
    threads = 1 if args.jobs > 1 else max(1, (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda j: run_job(j, out, args.timeout, args.pytest_args, threads), jobs))
    total_wall = time.perf_counter() - started

    results: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    reports: dict[str, list[dict]] = collections.defaultdict(list)
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    problems: list[str] = []
    for job in done:
        results[job["mode"]].update(read_junit(job["junit"]))
        reports[job["mode"]].extend(read_report(job["report"]))
        wall[job["mode"]] += job["wall"]
        cpu[job["mode"]] += job["cpu"]
        if job["rc"] not in (0, 1):
            problems.append(f"pytest run {job['name']} exited {job['rc']} (see {job['log']})")

    allowlist = load_allowlist(Path(args.allowlist))
    reference = results["none"]
    regressions: dict[str, list[tuple[str, str | None]]] = collections.defaultdict(list)
    newly_skipped: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for mode in modes:
        if mode == "none":
            continue
        for test_id, ref in sorted(reference.items()):
            if ref["outcome"] != "passed" or arch_of(test_id) not in MODES[mode]:
                continue
            got = results[mode].get(test_id)
            if got is None or got["outcome"] == "failed":
                regressions[mode].append((test_id, allowed(allowlist, mode, test_id)))
            elif got["outcome"] == "skipped":
                newly_skipped[mode].append((test_id, got["message"]))

    # table per architecture and mode
    print(f"\n{'arch':<11} {'mode':<7} {'passed':>6} {'failed':>6} {'skipped':>7} {'regress':>7} {'allowed':>7} "
          f"{'enabled':>7} {'refused':>7} {'hits':>8} {'lookups':>8} {'time s':>7}")  # fmt: skip
    for arch in archs:
        for mode in modes:
            if arch not in MODES[mode]:
                continue
            rows = {t: r for t, r in results[mode].items() if arch_of(t) == arch}
            count = collections.Counter(r["outcome"] for r in rows.values())
            reg = [x for x in regressions.get(mode, []) if arch_of(x[0]) == arch]
            recs = [r for r in reports[mode] if arch_of(r["nodeid"]) == arch]
            print(
                f"{arch:<11} {mode:<7} {count['passed']:>6} {count['failed']:>6} {count['skipped']:>7} "
                f"{sum(1 for _, a in reg if not a):>7} {sum(1 for _, a in reg if a):>7} "
                f"{sum(len(r['enabled']) for r in recs):>7} {sum(len(r['refused']) for r in recs):>7} "
                f"{sum(r['hits'] for r in recs):>8} {sum(r['lookups'] for r in recs):>8} "
                f"{sum(r['time'] for r in rows.values()):>7.1f}"
            )

    print("\nper mode:")
    for mode in modes:
        recs = reports[mode]
        enabled = collections.Counter(c for r in recs for c in r["enabled"])
        refused = collections.Counter((c, m) for r in recs for c, m in r["refused"])
        hits = sum(r["hits"] for r in recs)
        print(
            f"  {mode:<7} wall {wall[mode]:6.1f}s cpu {cpu[mode]:6.1f}s (sums over its pytest runs)  "
            f"tests {len(results[mode])}  "
            f"models enabled {sum(enabled.values())} (restored from a saved cache "
            f"{sum(r.get('warm', 0) for r in recs)})  refused {sum(refused.values())}  "
            f"already cached {sum(r['preexisting'] for r in recs)}  hits {hits}  lookups "
            f"{sum(r['lookups'] for r in recs)}"
        )
        if mode != "none":
            if enabled:
                print("    enabled: " + ", ".join(f"{c} x{n}" for c, n in sorted(enabled.items())))
            for (cls, message), n in sorted(refused.items()):
                print(f"    refused {cls} x{n}: {message[:160]}")
            if not enabled:
                problems.append(f"mode {mode}: no model was enabled: the harness never turned the cache on")
            elif not hits:
                problems.append(f"mode {mode}: models were enabled but no request was ever served from the cache")

    for mode, items in newly_skipped.items():
        print(f"\n{mode}: {len(items)} tests pass uncached but skip themselves cached (not a failure):")
        for test_id, message in items:
            print(f"  {test_id}: {message[:160]}")

    failing = False
    for mode, items in regressions.items():
        new = [t for t, a in items if not a]
        known = [(t, a) for t, a in items if a]
        if known:
            print(f"\n{mode}: {len(known)} known differences (known_differences.json):")
            for test_id, reason in known:
                print(f"  {test_id}: {reason}")
        if new:
            failing = True
            print(f"\n{mode}: {len(new)} tests pass uncached but fail with strategy={mode!r}:")
            for test_id in new:
                got = results[mode].get(test_id)
                print(f"- {mode}: {test_id}")
                print(failure_excerpt(got) if got else "    (no result: the run crashed or timed out)")
    stale = [
        k for k in allowlist if not any(k in (t, f"{m}:{t}") for m, items in regressions.items() for t, _ in items)
    ]
    if stale:
        print(f"\nknown_differences.json entries that no longer differ (remove them): {stale}")

    total_cpu = sum(cpu.values())
    print(f"\ntotal wall time {total_wall:.1f}s, pytest CPU time {total_cpu:.1f}s ({args.jobs} at a time)")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if failing or problems:
        print("REFEREE: FAILED")
        return 1
    print("REFEREE: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
