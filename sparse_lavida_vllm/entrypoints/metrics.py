"""Diffusion metrics on the server's /metrics: Prometheus counters fed by each finished request's engine output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Histogram
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import PrefillStats

from sparse_lavida_vllm.scheduler.output import METRICS_KEY

# Created once per process, in prometheus_client's default registry: the one vLLM's /metrics route serves when
# it runs a single API server (with several, vLLM switches to its multiprocess registry; see docs/serving.md).
REQUESTS = Counter("sparse_lavida:requests", "Finished diffusion requests.", ["mode"])
STEPS = Counter("sparse_lavida:steps", "Unmasking steps run by finished requests.", ["mode"])
FORWARD_TOKENS = Counter("sparse_lavida:forward_tokens",
                         "Rows the model computed for finished requests (prefill, commit, decode and register rows).",
                         ["mode"])
DENSE_FORWARD_TOKENS = Counter("sparse_lavida:dense_forward_tokens",
                               "Rows a dense MDM would compute for the same requests and steps: steps x (prompt + "
                               "response). dense_forward_tokens / forward_tokens is the sparsity saving.", ["mode"])
REQUEST_STEPS = Histogram("sparse_lavida:request_steps", "Unmasking steps per finished request.", ["mode"],
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))


def record(metrics: dict[str, Any]) -> None:
    mode = str(metrics["mode"])
    REQUESTS.labels(mode).inc()
    STEPS.labels(mode).inc(metrics["steps"])
    FORWARD_TOKENS.labels(mode).inc(metrics["forward_tokens"])
    DENSE_FORWARD_TOKENS.labels(mode).inc(metrics["dense_forward_tokens"])
    REQUEST_STEPS.labels(mode).observe(metrics["steps"])


def _fill_prefill_stats(request_states: dict, output: Any) -> None:
    """vLLM counts vllm:prompt_tokens_total from the PrefillStats on a request's first output, which its own
    scheduler fills when it schedules the prefill. The diffusion scheduler admits and prefills its own way and
    leaves them unset, so the API server fills them here: the whole prompt computed, nothing from a cache (prefix
    caching is off for diffusion checkpoints)."""
    state = request_states.get(output.request_id)
    if state is None or not state.is_prefilling or output.prefill_stats is not None:
        return
    if output.finish_reason == FinishReason.ERROR:  # refused before its prefill ran
        return
    output.prefill_stats = PrefillStats()
    output.prefill_stats.set(num_prompt_tokens=state.prompt_len, num_local_cached_tokens=0,
                             num_external_cached_tokens=0)


def count_diffusion_metrics(process_outputs: Callable) -> Callable:
    """Wrap OutputProcessor.process_outputs (API-server side): record the metrics a finished request carries and
    fill in the prompt-token stats vLLM's standard series need."""

    @functools.wraps(process_outputs)
    def wrapper(self, engine_core_outputs, *args, **kwargs):
        for output in engine_core_outputs:
            params = output.kv_transfer_params
            if params and METRICS_KEY in params:
                record(params[METRICS_KEY])
            _fill_prefill_stats(self.request_states, output)
        return process_outputs(self, engine_core_outputs, *args, **kwargs)

    wrapper.__sparse_lavida__ = True
    return wrapper
