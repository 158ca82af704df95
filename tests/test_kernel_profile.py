"""The per-step kernel breakdown of `blockrt bench --profile` (runtime/kernel_profile.py)."""

import pytest
import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.runtime import Model
from blockrt.runtime.kernel_profile import format_step_kernels, profile_kernels, step_kernels


def _event(cat, name, ts, dur, tid=1, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_kernels_are_attributed_to_the_step_range_that_launched_them():
    """A hand-written trace in the Chrome format torch.profiler exports (our parsing only): a CUDA
    graph launch inside a step's range carries its kernels' correlation id; kernels launched outside
    any step range, or by another thread's launch at the same time, belong to no step."""
    trace = {"traceEvents": [
        _event("user_annotation", "token_decoder", 0, 100),
        _event("cuda_runtime", "cudaGraphLaunch", 10, 5, correlation=1),
        _event("kernel", "gemm", 20, 30, tid=99, correlation=1),
        _event("kernel", "gelu", 50, 10, tid=99, correlation=1),
        _event("user_annotation", "token_decoder", 200, 100),
        _event("cuda_driver", "cuLaunchKernelEx", 210, 5, correlation=2),  # a Triton launch
        _event("kernel", "gemm", 220, 50, tid=99, correlation=2),
        _event("user_annotation", "block_decoder", 400, 100),
        _event("cuda_runtime", "cudaGraphLaunch", 410, 5, correlation=3),
        _event("kernel", "attention", 420, 70, tid=99, correlation=3),
        _event("cuda_runtime", "cudaLaunchKernel", 600, 5, correlation=4),  # outside every range
        _event("kernel", "copy", 610, 9, tid=99, correlation=4),
        _event("cuda_runtime", "cudaLaunchKernel", 15, 5, tid=2, correlation=5),  # another thread
        _event("kernel", "other", 30, 9, tid=99, correlation=5),
    ]}
    token, block = step_kernels(trace, ("block_decoder", "token_decoder", "sampling"))[::-1]
    assert (token.step, token.calls, token.us_per_call) == ("token_decoder", 2, 45.0)
    assert [(k.name, k.us_per_call, k.per_call) for k in token.kernels] == [("gemm", 40.0, 1.0), ("gelu", 5.0, 0.5)]
    assert token.kernels[0].share == pytest.approx(80 / 90)
    assert (block.step, block.calls, [k.name for k in block.kernels]) == ("block_decoder", 1, ["attention"])
    table = format_step_kernels([token, block])
    assert "token_decoder: 2 calls, 0.045 ms of kernels per call" in table and "attention" in table


def test_profiled_generation_names_every_step():
    """On any device the profiled generation runs every engine step and sampling inside ranges of
    their names (on a CPU no GPU kernels are recorded, so the steps have none)."""
    torch.manual_seed(0)
    model = init_random(build_model(get_preset("tiny_block"))).eval()
    runtime = Model.from_torch(model, dtype="fp32", max_batch=4, max_context=64, device="cpu")
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    _, steps = profile_kernels(runtime, prompts, gen_len=8)
    calls = {s.step: s.calls for s in steps}
    # 8 tokens: 2 rounds of 4 token steps (each followed by sampling), the block step between them
    # (none after the last round), and one prefill of both prompts
    assert calls == {"prefill": 1, "block_decoder": 1, "token_decoder": 8, "sampling": 8}
