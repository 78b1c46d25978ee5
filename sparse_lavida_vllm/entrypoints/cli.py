"""`sparse-lavida serve` (vLLM's OpenAI server with our plugin) and `sparse-lavida generate` (vLLM's offline LLM)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sparse_lavida_vllm.entrypoints.hub import add_hub_arguments, resolve_model_arg, resolve_serve_argv

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo" / "sparse"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# vLLM on CPU needs these (see DESIGN.md); a value the user set wins.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
# Seconds a SIGTERM lets running requests finish (vLLM's drain mode) before they are aborted; vLLM's default, 0,
# aborts them at once. `--shutdown-timeout N` overrides it.
DEFAULT_SHUTDOWN_TIMEOUT = 30


# vLLM loads endpoint plugins (our /v1/images/* routes) only when VLLM_PLUGINS names them, and then loads only
# the general plugins it names too: serve names both of ours, keeping whatever else the user listed.
OUR_PLUGINS = ("sparse_lavida", "sparse_lavida_images", "sparse_lavida_ray_cpu")  # ray_cpu: off unless asked


def set_cpu_env() -> None:
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)


def allow_our_plugins() -> None:
    if "VLLM_PLUGINS" not in os.environ:
        os.environ["VLLM_PLUGINS"] = ",".join(OUR_PLUGINS)
        return
    listed = [p for p in os.environ["VLLM_PLUGINS"].split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(listed + [p for p in OUR_PLUGINS if p not in listed])


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def vllm_serve_argv(args: list[str]) -> list[str]:
    """`vllm serve` argv: MODEL defaults to the bundled demo, a Hugging Face id is served from its local snapshot
    under the id's name; float32 unless --dtype is given (exact I4); SIGTERM drains for DEFAULT_SHUTDOWN_TIMEOUT
    seconds unless --shutdown-timeout is given."""
    if not args or args[0].startswith("-"):
        if not DEMO_MODEL.exists() and not _has_flag(args, "--help", "-h"):
            raise SystemExit(f"no MODEL given and the bundled demo model is missing ({DEMO_MODEL})")
        args = [str(DEMO_MODEL), *args]
    args = resolve_serve_argv(args)
    model = Path(args[0])
    if model.is_dir() and not (model / "config.json").exists():
        raise SystemExit(f"{model}: no config.json (not a checkpoint folder)")
    tokenizer_free = model.is_dir() and not any((model / f).exists() for f in TOKENIZER_FILES)
    if tokenizer_free and not _has_flag(args, "--tokenizer", "--skip-tokenizer-init"):
        # vLLM would die on transformers' "Couldn't instantiate the backend tokenizer"; serve token ids instead
        print(f"sparse-lavida: {model} has no tokenizer ({', '.join(TOKENIZER_FILES)}): serving token-id prompts "
              "only; pass --tokenizer FOLDER to serve text", file=sys.stderr)
        args = [*args, "--skip-tokenizer-init"]
    if not _has_flag(args, "--dtype"):
        args = [*args, "--dtype", "float32"]
    if not _has_flag(args, "--shutdown-timeout"):
        args = [*args, "--shutdown-timeout", str(DEFAULT_SHUTDOWN_TIMEOUT)]
    return ["vllm", "serve", *args]


def serve(ns: argparse.Namespace) -> int:
    argv = vllm_serve_argv(list(ns.vllm_args))  # a bad MODEL ends here, before vLLM is imported
    set_cpu_env()
    allow_our_plugins()
    # The `vllm` console script fails with vllm-cpu: its CLI asks importlib.metadata for the version of a
    # distribution named "vllm", installed as "vllm-cpu". Answer as vLLM's platform probe does, then call the
    # entry function.
    import importlib.metadata

    from vllm.entrypoints.cli.main import main as vllm_main

    version = importlib.metadata.version

    def vllm_version(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    importlib.metadata.version = vllm_version
    sys.argv = argv
    vllm_main()
    return 0


def checkpoint_and_prompts(ns: argparse.Namespace) -> tuple[str, list[str]]:
    """The model folder (a Hugging Face id: its snapshot) and the prompts; a first "prompt" that is a folder is the
    model, never a prompt."""
    prompts = list(ns.prompt)
    model = ns.model
    first = Path(prompts[0])
    if first.exists():
        if ns.model is not None or not (first / "config.json").exists():
            raise SystemExit(f"{prompts[0]!r} is a path, not a prompt: give the checkpoint with --model and the "
                             "prompt text as the argument")
        model, prompts = prompts[0], prompts[1:]
        if not prompts:
            raise SystemExit(f"no prompt: sparse-lavida generate {model} \"TEXT\" (or --model {model} \"TEXT\")")
    model = resolve_model_arg(model or str(DEMO_MODEL), ns)
    if not (Path(model) / "config.json").exists():
        raise SystemExit(f"--model: no config.json in {model}")
    if ns.tokenizer is None and not any((Path(model) / f).exists() for f in TOKENIZER_FILES):
        raise SystemExit(f"{model} has no tokenizer ({', '.join(TOKENIZER_FILES)}): pass --tokenizer FOLDER "
                         "(e.g. the published model's tokenizer)")
    return model, prompts


def generate(ns: argparse.Namespace) -> int:
    model, prompts = checkpoint_and_prompts(ns)
    set_cpu_env()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, tokenizer=ns.tokenizer, dtype=ns.dtype, enforce_eager=True,
              max_model_len=ns.max_model_len, additional_config={"batch_invariant": not ns.flat_batch})
    knobs = {"steps": ns.steps, "block_length": ns.block_length, "num_registers": ns.num_registers,
             "sparse": False if ns.dense else None, "remasking": ns.remasking}
    params = SamplingParams(max_tokens=ns.gen_length, temperature=ns.temperature, seed=ns.seed,
                            ignore_eos=ns.ignore_eos, extra_args={k: v for k, v in knobs.items() if v is not None})
    if ns.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for out in outputs:
        if ns.json:
            print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                              "token_ids": list(out.outputs[0].token_ids)}))
        else:
            print(out.outputs[0].text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    # '+' as the option prefix: every '-'/'--' flag goes to `vllm serve` untouched.
    serve_parser = subparsers.add_parser(
        "serve", prefix_chars="+", add_help=False,
        help="serve a checkpoint (folder or Hugging Face id) with vLLM's OpenAI server: sparse-lavida serve [MODEL] "
             "[vllm serve flags]")
    serve_parser.add_argument("vllm_args", nargs="*")
    serve_parser.set_defaults(func=serve)

    gen = subparsers.add_parser("generate", help="generate text offline through vLLM (vllm.LLM)")
    gen.add_argument("prompt", nargs="+", help="one or more prompts (a checkpoint folder first is taken as --model)")
    gen.add_argument("--model", default=None,
                     help=f"checkpoint folder or Hugging Face id org/name (default: {DEMO_MODEL})")
    add_hub_arguments(gen)
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder, for a checkpoint that has none")
    gen.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    gen.add_argument("--gen-length", type=int, default=64)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--block-length", type=int, default=None)
    gen.add_argument("--num-registers", type=int, default=None)
    gen.add_argument("--remasking", default=None)
    gen.add_argument("--dense", action="store_true",
                     help="vanilla MDM sampling (no cache, no truncation); the default for a checkpoint not trained "
                          "with the step-causal mask")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--flat-batch", action="store_true",
                     help="plain GEMMs and batched attention (faster; tokens may change with the batch)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=generate)
