"""The README's main job: examples/serve_and_ask.py serves the demo model through vLLM and answers one request."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_and_ask_example_answers_through_a_real_server():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_and_ask.py")], capture_output=True,
                         text=True, timeout=1200)  # a loaded 2-core CPU starts vLLM in minutes
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert lines["prompt"] == "'Q: 37+48=? A:'"
    assert lines["answer"].strip("'").strip() == "85", out.stdout  # the bundled model adds: 37 + 48
    assert "completion tokens" in lines["usage"] and int(lines["usage"].split(" prompt + ")[1].split()[0]) > 0
    diffusion = lines["diffusion"]  # steps and forward tokens vs dense, from the server's metrics
    found = re.search(r"sparse mode, (\d+) steps, (\d+) forward tokens vs (\d+) dense", diffusion)
    assert found, diffusion
    steps, ours, dense = (int(x) for x in found.groups())
    assert steps == 8 and 0 < ours < dense, diffusion
