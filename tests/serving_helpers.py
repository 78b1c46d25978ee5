"""Helpers for the serving tests (scheduler/worker/entrypoints): a tiny real checkpoint + tokenizer, a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.config import MDMConfig
from sparse_lavida_vllm.model_executor.weights import load_pretrained, random_model, save_pretrained

# vLLM on this CPU: see DESIGN.md ("Facts about vLLM").
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_CI_ENV": "1",
}

# head_dim 32 (in vLLM CPU's supported set); 4 registers by default.
TINY = MDMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=128,
                 max_sequence_length=512, mask_token_id=254, register_token_id=255, eos_token_id=2, pad_token_id=0,
                 num_registers=4)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def set_vllm_env() -> None:
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)


def save_char_tokenizer(folder: Path, config: MDMConfig) -> None:
    """A character-level HF fast tokenizer: ids 0-2 pad/bos/eos, printable ASCII, then filler, then [mask] [reg]."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in (chr(i) for i in range(32, 127)):
        vocab[c] = len(vocab)
    while len(vocab) < config.vocab_size - 2:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<mask>"] = config.mask_token_id
    vocab["<reg>"] = config.register_token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", additional_special_tokens=["<mask>", "<reg>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


# LLaDA-8B's config.json keys (scaled down): no register token, no registers, no step-causal training
LLADA_KEYS = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 64, "n_layers": 2, "n_heads": 2,
              "n_kv_heads": 2, "mlp_hidden_size": 128, "vocab_size": 256, "embedding_size": 256,
              "mask_token_id": 254, "eos_token_id": 2, "pad_token_id": 0, "rope_theta": 500000.0,
              "max_sequence_length": 512, "rms_norm_eps": 1e-5, "weight_tying": False, "include_bias": False,
              "layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama"}

# LLaDA-8B-Instruct's special tokens by name. Published ids (vocab 126464): 126080 BOS, 126081 EOS (also pad),
# 126336 mask, 126346/126347 header markers, 126348 eot; here scaled into the 256-row tiny vocab, same order.
INSTRUCT_SPECIALS = {"<|startoftext|>": 192, "<|endoftext|>": 193, "<|mdm_mask|>": 240, "<|start_header_id|>": 244,
                     "<|end_header_id|>": 245, "<|eot_id|>": 246}
BOS, EOS, MASK, EOT = 192, 193, 240, 246
# The chat_template of GSAI-ML/LLaDA-8B-Instruct's tokenizer_config.json (the early Llama-3 one): note the
# assistant header is appended whether or not add_generation_prompt is set.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
INSTRUCT_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]  # ids 0..96; 97..191 are filler words


def save_llada_instruct_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """LLaDA-8B-Instruct's tokenizer files in their published form, over a character vocabulary.

    tokenizer.json (a `tokenizers` BPE without merges: one token per character), tokenizer_config.json with the
    special tokens in added_tokens_decoder, BOS/EOS/pad by name, add_bos_token false and the chat template inline,
    and special_tokens_map.json. Ids the published tokenizer leaves unnamed are reserved special tokens here, so
    every id a random tiny model can sample decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {c: i for i, c in enumerate(INSTRUCT_CHARS)}
    vocab.update({f"<w{i}>": i for i in range(len(vocab), BOS)})
    names = {i: n for n, i in INSTRUCT_SPECIALS.items()}
    specials = [names.get(i, f"<|reserved_token_{i - BOS}|>") for i in range(BOS, vocab_size)]
    vocab.update({t: BOS + k for k, t in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for t in specials}
    named = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    # written by hand, not by save_pretrained: transformers 5 would move the template out to chat_template.jinja
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added, **named,
        "chat_template": LLADA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(named, indent=2))


def llada_instruct_checkpoint(folder: Path, seed: int = 0, stop_boost: float = 1.5) -> Path:
    """A tiny LLaDA-8B-Instruct: its config.json keys and ids, sharded weights with an index, generation_config.json
    declaring EOS and eot as end-of-sequence ids, its tokenizer files.

    The lm-head rows of <|eot_id|> and <|endoftext|> are scaled by `stop_boost` so that, like the real model,
    answers end with them (random weights alone rarely pick one of 256 ids).
    """
    folder = Path(folder)
    model = random_model(TINY, seed=seed, std=0.3)  # weights of the LLaDA shapes; the ids come from config.json
    with torch.no_grad():
        model.model.transformer["ff_out"].weight[[EOT, EOS]] *= stop_boost
    save_pretrained(model, folder, max_shard_tensors=8)
    (folder / "config.json").write_text(json.dumps({**LLADA_KEYS, "mask_token_id": MASK, "eos_token_id": EOS,
                                                    "pad_token_id": EOS}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": [EOS, EOT],
                                                               "pad_token_id": EOS}, indent=2))
    save_llada_instruct_tokenizer(folder)
    return folder


def make_checkpoint(folder: Path, config: MDMConfig = TINY, seed: int = 0, std: float = 0.3) -> Path:
    folder = Path(folder)
    save_pretrained(random_model(config, seed=seed, std=std), folder)
    save_char_tokenizer(folder, config)
    return folder


def reference_tokens(folder: Path | torch.nn.Module, prompt_ids: list[int], gen_length: int, block_length: int,
                     steps: int, num_registers: int, sparse: bool = True, temperature: float = 0.0, seed: int = 0,
                     remasking: str = "low_confidence", top_k: int = 0, top_p: float = 1.0,
                     confidence_threshold: float = 0.9) -> list[int]:
    """The pure-PyTorch reference sampler's tokens for the same request (the I4 oracle); `folder` may be a model
    already loaded (e.g. a LaViDa-O checkpoint's)."""
    model = folder if isinstance(folder, torch.nn.Module) else load_pretrained(folder)
    plan = text_plan(gen_length, block_length, steps)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking,
                              confidence_threshold=confidence_threshold, seed=seed)
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    if sparse:
        result = generate_sparse(model, prompt, plan, sampling, SparseOptions(num_registers=num_registers))
    else:
        result = generate_dense(model, prompt, plan, sampling)
    return result.tokens.tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `sparse-lavida serve` process on 127.0.0.1 (started through our console entry)."""

    def __init__(self, model: Path | None, extra_args: list[str] = (), timeout: float = 180.0,
                 log_dir: Path | None = None) -> None:
        """model=None serves the default (the bundled demo model)."""
        self.port = free_port()
        env = dict(os.environ)
        # the server runs as shipped: engine core (and worker) in their own processes
        env.update({k: v for k, v in VLLM_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"})
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        cmd = [sys.executable, "-m", "sparse_lavida_vllm.cli", "serve", *([str(model)] if model else []),
               "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "256", *extra_args]
        self.log = Path(log_dir or model) / f"server-{self.port}.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def metric(self, name: str) -> float:
        """The value of one Prometheus gauge/counter from /metrics (summed over label sets)."""
        import requests

        total, found = 0.0, False
        for line in requests.get(self.base_url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def demo_server_fixtures(log_name: str) -> tuple[Callable, Callable]:
    """Module-scoped `server` (a real `sparse-lavida serve` of the bundled demo model, max-model-len 1024, its log in
    a temporary folder named `log_name`) and `client` (the `openai` client on it) fixtures. A test module takes them
    as `server, client = demo_server_fixtures("images")`."""
    import pytest

    @pytest.fixture(scope="module", name="server")
    def server_fixture(tmp_path_factory) -> Iterator[Server]:
        srv = Server(None, extra_args=["--max-model-len", "1024"], log_dir=tmp_path_factory.mktemp(log_name))
        yield srv
        srv.stop()

    @pytest.fixture(scope="module", name="client")
    def client_fixture(server: Server):
        import openai

        return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)

    return server_fixture, client_fixture


_LLM = None


def shared_llm():
    """One in-process vLLM engine over one tiny checkpoint for every offline test (vLLM keeps process globals)."""
    global _LLM
    if _LLM is None:
        import tempfile

        set_vllm_env()
        from vllm import LLM

        folder = make_checkpoint(Path(tempfile.mkdtemp(prefix="sparse-lavida-ck-")))
        # A small pool (24 blocks of 16 tokens) so that admission control queues requests in the tests.
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                  block_size=16, num_gpu_blocks_override=24)
        _LLM = (llm, folder)
    return _LLM


def engine_scheduler(llm):
    """The DiffusionScheduler inside an in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) LLM."""
    return llm.llm_engine.engine_core.engine_core.scheduler
