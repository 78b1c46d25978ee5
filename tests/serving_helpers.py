"""Helpers for the serving tests (scheduler/worker/entrypoints): a tiny real checkpoint + tokenizer, a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_lavida_vllm.diffusion.planners import text_plan
from sparse_lavida_vllm.diffusion.reference import SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
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


def make_checkpoint(folder: Path, config: MDMConfig = TINY, seed: int = 0, std: float = 0.3) -> Path:
    folder = Path(folder)
    save_pretrained(random_model(config, seed=seed, std=std), folder)
    save_char_tokenizer(folder, config)
    return folder


def reference_tokens(folder: Path, prompt_ids: list[int], gen_length: int, block_length: int, steps: int,
                     num_registers: int, sparse: bool = True, temperature: float = 0.0, seed: int = 0,
                     remasking: str = "low_confidence", top_k: int = 0, top_p: float = 1.0,
                     confidence_threshold: float = 0.9) -> list[int]:
    """The pure-PyTorch reference sampler's tokens for the same request (the I4 oracle)."""
    model = load_pretrained(folder)
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
