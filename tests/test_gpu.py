"""The runtime on a CUDA GPU: the PyTorch engine (CUDA graphs around eager steps, or around steps
compiled by TorchInductor with compile=True; in-place caches, sampling on the device) against the
eager reference. Skipped, with the reason printed, where no GPU is present."""

import os

import pytest
import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.exporter.generate import generate
from blockrt.generation import GenerationConfig
from blockrt.runtime import Model
from bf16_check import assert_bf16_tokens_are_reference_top_choices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

PROMPTS = [[5, 6, 7, 8, 9], list(range(1, 40)), [3], list(range(100, 121))]


def _model(preset, dtype=torch.float32):
    with torch.device("cuda"):
        model = build_model(get_preset(preset))
    return init_random(model, seed=3, std=0.1).to(dtype).eval()


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# The compiled path (Model(compile=True)) is experimental and off by default: its tests compile for
# minutes and run only where asked for (BLOCKRT_TEST_COMPILED=1). On an H100 (2026-11-27, torch
# 2.11) the greedy tests passed for tiny_block and tiny_vanilla; the bucket test below failed (not
# yet diagnosed; its scenario passes with Inductor's CPU code and no CUDA graphs); block_main_b4_5
# and tiny_block_wide were not run after the last fix.
compiled = pytest.mark.skipif(os.environ.get("BLOCKRT_TEST_COMPILED") != "1",
                              reason="compiled path is experimental: set BLOCKRT_TEST_COMPILED=1 to test it")


@pytest.mark.parametrize("preset,compile", [
    ("tiny_block", False), ("tiny_block_wide", False), ("tiny_vanilla", False), ("block_main_b4_5", False),
    *[pytest.param(p, True, marks=compiled) for p in ("tiny_block", "tiny_block_wide", "tiny_vanilla", "block_main_b4_5")]])
def test_cuda_graph_runtime_matches_reference_greedy_fp32(preset, compile):
    model = _model(preset)
    config = GenerationConfig(max_new_tokens=160, ignore_eos=True)
    ref = generate(model, PROMPTS, config)
    runtime = Model.from_torch(model, dtype="fp32", max_batch=8, max_context=512, device="cuda", compile=compile)
    assert all((e.compiled is not None) == compile for e in runtime.engines.values())
    for _ in range(2):  # the second call replays the captured graphs
        out = runtime.generate(PROMPTS, config)
        assert [r.token_ids for r in out] == ref.tokens


@compiled
def test_compiled_steps_serve_every_batch_bucket_and_context_without_recompiling():
    """One compilation per step and number of new positions: later batch buckets (8 -> 24 rows)
    and attend buckets (contexts of 1 to 96 blocks) reuse the compiled code."""
    model = _model("tiny_block")
    runtime = Model.from_torch(model, dtype="fp32", max_batch=32, max_context=512, device="cuda", compile=True)
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    runtime.generate(PROMPTS, config)
    counts = {name: e.compiled.compilations for name, e in runtime.engines.items()}
    assert counts == {"block_decoder": 1, "token_decoder": 2}  # decode; token steps of 2 and 1 new positions
    prompts = [list(range(1, 1 + 7 * i)) for i in range(1, 21)]  # 20 rows, up to 140 prompt tokens
    ref = generate(model, prompts, GenerationConfig(max_new_tokens=200, ignore_eos=True))
    out = runtime.generate(prompts, GenerationConfig(max_new_tokens=200, ignore_eos=True))
    assert [r.token_ids for r in out] == ref.tokens
    assert {name: e.compiled.compilations for name, e in runtime.engines.items()} == counts


def test_cuda_graph_runtime_matches_reference_sampling_fp32():
    model = _model("tiny_block")
    config = GenerationConfig(max_new_tokens=64, temperature=0.9, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
    ref = generate(model, PROMPTS, config)
    out = Model.from_torch(model, dtype="fp32", max_batch=8, max_context=512, device="cuda").generate(PROMPTS, config)
    assert [r.token_ids for r in out] == ref.tokens


def test_bf16_runtime_tokens_are_top_choices_of_the_fp32_reference():
    """bf16 and fp32 round differently, so greedy paths may part at a near-tie; what must hold is
    that every token the bf16 runtime picks is among the fp32 reference's top choices at that
    point of the runtime's own sequence (teacher forcing along it)."""
    assert_bf16_tokens_are_reference_top_choices("block_main_b4_5", "cuda")
