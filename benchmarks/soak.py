"""Soak: a bounded run of mixed requests against a real `sparse-lavida serve`, then checks that nothing leaked.

Mixed traffic (dense, sparse, streamed, seeded, ~20% abandoned mid-stream, ~10% bad) from up to --concurrency
clients for --duration seconds. At the end: every KV block free, nothing running or waiting, resident memory of
the server's processes back within a margin, seeded requests' tokens equal to their solo runs, no 5xx.
Usage: python benchmarks/soak.py [--quick] [--duration S] [--concurrency N] [--url URL --model NAME] [--json]
       [--out benchmarks/results/soak.json]
Without --url it serves a tiny random checkpoint itself (a real server process on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOOD = [  # (knobs, stream): the good half of the traffic
    (dict(gen_length=16, block_length=8, steps=8, num_registers=2), False),
    (dict(gen_length=32, block_length=8, steps=16, num_registers=4), True),
    (dict(gen_length=16, block_length=16, steps=8, num_registers=0, sparse=False), False),
    (dict(gen_length=24, block_length=8, steps=12, num_registers=1), True),
]
BAD = [{"steps": 0}, {"steps": float("inf")}, {"num_registers": True}, {"block_length": 5}, {"bogus": 1}]
SEEDED = [(f"seeded prompt {i}", dict(gen_length=16, block_length=8, steps=8, num_registers=2), 100 + i)
          for i in range(4)]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    family, total = {pid}, 0
    changed = True
    while changed:
        changed = False
        for p, parent, _ in rows:
            if parent in family and p not in family:
                family.add(p)
                changed = True
    for p, _, rss in rows:
        if p in family:
            total += rss
    return total / 1024


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def complete(url: str, model: str, prompt: str, knobs: dict, stream: bool, seed: int | None = None,
             temperature: float = 0.0, abandon: bool = False) -> tuple[int, list[int] | None]:
    """One request; (HTTP status, the response token ids or None). `abandon` hangs up after the first chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": knobs.get("gen_length", 16), "stream": stream,
            "temperature": temperature, "ignore_eos": True, "return_token_ids": True, "vllm_xargs": knobs}
    if seed is not None:
        body["seed"] = seed
    if not stream:
        r = httpx.post(url + "/v1/completions", content=json.dumps(body), timeout=300,
                       headers={"content-type": "application/json"})
        return r.status_code, (r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None)
    tokens: list[int] = []
    with httpx.stream("POST", url + "/v1/completions", content=json.dumps(body), timeout=300,
                      headers={"content-type": "application/json"}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return int(event["error"].get("code") or 500), None
                tokens += event["choices"][0].get("token_ids") or []
                if abandon:
                    return 499, None  # the client hung up
    return 200, tokens


def soak(url: str, model: str, server_pid: int | None, duration: float, concurrency: int, seed: int) -> dict:
    solo = {i: complete(url, model, p, k, False, seed=s, temperature=0.8)[1] for i, (p, k, s) in enumerate(SEEDED)}
    for _ in range(3):  # warm-up before the memory baseline
        complete(url, model, "warm", GOOD[0][0], False)
    rss_before = rss_mb(server_pid) if server_pid else None
    counts = {"good": 0, "seeded": 0, "aborted": 0, "bad": 0}
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    mismatches: list[int] = []
    lock = threading.Lock()
    end = time.time() + duration

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        while time.time() < end:
            roll = rng.random()
            start = time.perf_counter()
            if roll < 0.10:
                kind, (status, _) = "bad", complete(url, model, "bad", rng.choice(BAD), rng.random() < 0.5)
                ok = status == 400
            elif roll < 0.30:
                knobs = dict(gen_length=64, block_length=8, steps=32, num_registers=2)
                kind, (status, _) = "aborted", complete(url, model, f"gone {c}", knobs, True, abandon=True)
                ok = status == 499
            elif roll < 0.45:
                i = rng.randrange(len(SEEDED))
                prompt, knobs, s = SEEDED[i]
                status, tokens = complete(url, model, prompt, knobs, rng.random() < 0.5, seed=s, temperature=0.8)
                kind, ok = "seeded", status == 200
                if ok and tokens != solo[i]:
                    with lock:
                        mismatches.append(i)
            else:
                knobs, stream = rng.choice(GOOD)
                kind, (status, _) = "good", complete(url, model, f"soak {c} {rng.random():.3f}", knobs, stream)
                ok = status == 200
            with lock:
                counts[kind] += 1
                key = f"{kind}:{status}" + ("" if ok else ":unexpected")
                outcomes[key] = outcomes.get(key, 0) + 1
                if kind in ("good", "seeded") and ok:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    t0 = time.time()
    for t in threads:
        t.start()
    peak_running = 0.0
    while any(t.is_alive() for t in threads):
        peak_running = max(peak_running, metric(url, "vllm:num_requests_running"))
        time.sleep(0.5)
    wall = time.time() - t0
    settle = time.time() + 30
    while time.time() < settle and (metric(url, "vllm:num_requests_running") or metric(url, "vllm:num_requests_waiting")
                                    or metric(url, "vllm:kv_cache_usage_perc")):
        time.sleep(0.5)
    time.sleep(2)
    rss_after = rss_mb(server_pid) if server_pid else None
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
    served = counts["good"] + counts["seeded"]
    return {
        "duration_s": round(wall, 1), "concurrency": concurrency, "requests": sum(counts.values()), **counts,
        "outcomes": outcomes, "server_errors_5xx": sum(n for k, n in outcomes.items() if k.split(":")[1][0] == "5"),
        "unexpected": sum(n for k, n in outcomes.items() if k.endswith(":unexpected")),
        "peak_running": peak_running,
        "throughput_req_s": round(served / wall, 2),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": p99 and round(p99, 3),
        "seeded_mismatches": len(mismatches),
        "end_running": metric(url, "vllm:num_requests_running"),
        "end_waiting": metric(url, "vllm:num_requests_waiting"),
        "end_kv_cache_usage": metric(url, "vllm:kv_cache_usage_perc"),
        "rss_before_mb": rss_before and round(rss_before), "rss_after_mb": rss_after and round(rss_after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 s at 8 clients (the reduced soak)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of traffic (default 180)")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 32)")
    parser.add_argument("--url", default=None, help="soak a running server instead of starting one")
    parser.add_argument("--model", default=None, help="the served model name (with --url)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    duration = args.duration or (30 if args.quick else 180)
    concurrency = args.concurrency or (8 if args.quick else 32)
    server = None
    if args.url:
        url, model, pid = args.url, args.model, None
    else:
        from tests.serving_helpers import Server, make_checkpoint

        folder = make_checkpoint(Path(tempfile.mkdtemp(prefix="sparse-lavida-soak-")))
        server = Server(folder, ["--max-num-seqs", "64"])
        url, model, pid = server.base_url, str(folder), server.proc.pid
    try:
        result = soak(url, model, pid, duration, concurrency, args.seed)
    finally:
        if server is not None:
            server.stop()
    result["leaks"] = int(bool(result["end_running"] or result["end_waiting"] or result["end_kv_cache_usage"]))
    result = {"benchmark": "soak", "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": " ".join(sys.argv), "load_avg_end": [round(x, 2) for x in os.getloadavg()], **result}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else
          f"{result['requests']} requests ({result['aborted']} abandoned, {result['bad']} bad) in "
          f"{result['duration_s']} s: {result['throughput_req_s']} good req/s, p50 {result['latency_p50_s']} s, "
          f"p99 {result['latency_p99_s']} s; 5xx {result['server_errors_5xx']}, leaks {result['leaks']}, "
          f"seeded mismatches {result['seeded_mismatches']}, RSS {result['rss_before_mb']} -> "
          f"{result['rss_after_mb']} MB")


if __name__ == "__main__":
    main()
