"""The bundled demo models add at any max_tokens 4..64 through a real server at its defaults (issue 24)."""

from __future__ import annotations

import pytest

from sparse_lavida_vllm.training.data import DEMO_ROOT, final_number, is_held_out, text_prompt
from tests.serving_helpers import Server

pytestmark = pytest.mark.slow

# 40 held-out sums (never trained on), fixed: the README's 37+48 first, then a seeded draw (random.Random(24))
SUMS = [(37, 48), (27, 21), (92, 98), (21, 62), (84, 4), (43, 95), (12, 31), (85, 76), (26, 39), (86, 97), (50, 2),
        (75, 27), (97, 10), (84, 94), (36, 29), (82, 79), (48, 79), (35, 39), (80, 76), (29, 65), (2, 9), (62, 98),
        (35, 86), (99, 91), (29, 27), (92, 66), (14, 35), (0, 45), (41, 92), (93, 76), (77, 55), (50, 49), (96, 18),
        (49, 52), (39, 50), (61, 37), (25, 68), (76, 3), (33, 35), (47, 90)]
MAX_TOKENS = (4, 8, 16, 32, 64)  # every canvas the server builds for 4..64 (one block of 4..32, or two of 32)


def test_the_fixed_sums_are_held_out() -> None:
    assert len(set(SUMS)) == 40 and all(is_held_out(pair) for pair in SUMS)


# the sparse checkpoint: what `sparse-lavida serve` serves by default (the dense one misses 3 of these 40 at
# max_tokens 32, 0.925, against 0.963 on its card's 300 sums: hundreds after a carry)
@pytest.mark.parametrize("kind", ["sparse"])
def test_served_demo_model_adds_at_every_max_tokens(kind: str, tmp_path) -> None:
    """Only max_tokens and temperature 0: the server's default plan (scheduler/params.py) and the checkpoint's
    sampler; at least 0.95 exact match at each length."""
    from openai import OpenAI

    folder = DEMO_ROOT / kind
    srv = Server(folder, log_dir=tmp_path, timeout=600.0)  # a loaded 2-core CPU starts vLLM in minutes
    try:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        prompts = [text_prompt(f"{a}+{b}=?") for a, b in SUMS]
        accuracy, wrong = {}, {}
        for max_tokens in MAX_TOKENS:
            r = client.completions.create(model=str(folder), prompt=prompts, max_tokens=max_tokens, temperature=0)
            texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
            assert len(texts) == len(SUMS)
            misses = [(f"{a}+{b}", text) for (a, b), text in zip(SUMS, texts) if final_number(text) != str(a + b)]
            accuracy[max_tokens] = 1 - len(misses) / len(SUMS)
            wrong[max_tokens] = misses
    finally:
        srv.stop()
    assert all(acc >= 0.95 for acc in accuracy.values()), (accuracy, wrong)
