"""The README's command: `sparse-lavida serve` with no MODEL serves the bundled demo model, chat included."""

import pytest
import torch

from sparse_lavida_vllm.entrypoints.cli import DEMO_MODEL
from tests.serving_helpers import Server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(), reason="demo model not built yet")]


def test_default_serve_answers_a_chat_request_like_the_reference(tmp_path):
    """...and refuses chat images with a 400 naming the part (the demo model has no vision tower)."""
    import base64

    from openai import BadRequestError, OpenAI
    from transformers import AutoTokenizer

    from sparse_lavida_vllm.diffusion.planners import text_plan
    from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
    from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse
    from sparse_lavida_vllm.model_executor.weights import load_pretrained

    srv = Server(None, log_dir=tmp_path)
    try:
        client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == str(DEMO_MODEL)
        messages = [{"role": "user", "content": "37+48=?"}]
        r = client.chat.completions.create(model=str(DEMO_MODEL), messages=messages, max_tokens=32, temperature=0,
                                           extra_body={"vllm_xargs": {"steps": 16, "block_length": 8},
                                                       "return_token_ids": True})
        pixel = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()  # a PNG signature is enough: refused first
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model=str(DEMO_MODEL), max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
                {"type": "text", "text": "37+48=?"}]}])
        assert "image_url parts are not supported" in str(info.value) and "serves text only" in str(info.value)
        assert info.value.body.get("param") == "messages"
    finally:
        srv.stop()
    model = load_pretrained(DEMO_MODEL)
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tok.encode(prompt, add_special_tokens=False))
    ref = generate_sparse(model, ids, text_plan(32, 8, 16), SamplingConfig(),
                          SparseOptions(num_registers=model.config.num_registers)).tokens.tolist()
    eos = model.config.eos_token_id
    expected = ref[:ref.index(eos) + 1] if eos in ref else ref  # the text stops at EOS (which is returned)
    choice = r.choices[0]
    assert choice.token_ids == expected
    assert choice.message.content.strip() == tok.decode(expected, skip_special_tokens=True).strip()
    assert choice.finish_reason == ("stop" if eos in ref else "length")
    assert r.usage.prompt_tokens == ids.numel() and r.usage.completion_tokens == len(expected)
