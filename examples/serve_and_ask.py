"""Serve the bundled demo model with `sparse-lavida serve` (vLLM), ask it one question through the openai client, stop.

Run: .venv/bin/python examples/serve_and_ask.py [--model PATH|org/name] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log_path: str, timeout: float = 900.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; log:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"server not healthy after {timeout:.0f}s; log in {log_path}")


@contextmanager
def running_server(model: str | None = None) -> Iterator[str]:
    """`sparse-lavida serve` (the bundled demo model unless `model`) on a free port; yields its /v1 URL, stops it."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="sparse-lavida-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "sparse_lavida_vllm.cli", "serve", *([model] if model else []),
           "--host", "127.0.0.1", "--port", str(port)]
    print("starting:", " ".join(cmd[2:]), f"(log: {log.name})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log.name)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or Hugging Face id org/name (default: the bundled demo model)")
    parser.add_argument("--prompt", default="Q: 37+48=? A:")
    parser.add_argument("--max-tokens", type=int, default=8, help="the response canvas (gen_length)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    with running_server(args.model) as base_url:
        from openai import OpenAI

        client = OpenAI(base_url=base_url, api_key="unused")
        model = client.models.list().data[0].id
        start = time.perf_counter()
        # The demo model answers in an 8-token canvas ("85" then [EOS]), one token per step (its eval setting).
        reply = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                          temperature=0.0,
                                          extra_body={"vllm_xargs": {"steps": args.steps, "block_length": 8}})
        seconds = time.perf_counter() - start
        print(f"prompt: {args.prompt!r}")
        print(f"answer: {reply.choices[0].text!r}")
        print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens, "
              f"{seconds:.2f} s")
        metrics = ((reply.model_extra or {}).get("kv_transfer_params") or {}).get("sparse_lavida_metrics")
        if metrics:  # docs/serving.md "Metrics": rows computed vs what a dense MDM computes for the same steps
            ratio = metrics["dense_forward_tokens"] / max(metrics["forward_tokens"], 1)
            print(f"diffusion: {metrics['mode']} mode, {metrics['steps']} steps, {metrics['forward_tokens']} forward "
                  f"tokens vs {metrics['dense_forward_tokens']} dense ({ratio:.1f}x fewer), "
                  f"{metrics['num_registers']} registers")
        else:
            print("diffusion: no sparse_lavida_metrics in the response")

if __name__ == "__main__":
    main()
