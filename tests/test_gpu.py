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
from blockrt.runtime.torch_engine import CAPTURE_AFTER_CALLS
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


# The compiled path (Model(compile=True)) is opt-in: its tests compile for minutes and run only where
# asked for (BLOCKRT_TEST_COMPILED=1); README "Compiled fast path" says what passed on which GPU.
compiled = pytest.mark.skipif(os.environ.get("BLOCKRT_TEST_COMPILED") != "1",
                              reason="compiled path tests compile for minutes: set BLOCKRT_TEST_COMPILED=1 to run them")


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
    """At most one compilation per step and number of new positions: later batch buckets (8 -> 24
    rows) and attend buckets (contexts of 1 to 96 blocks) reuse the compiled code. (Dynamo keeps
    compiled code per process: a model of the same shapes compiled by an earlier test is reused, so
    the first counts may be 0.)"""
    model = _model("tiny_block")
    runtime = Model.from_torch(model, dtype="fp32", max_batch=32, max_context=512, device="cuda", compile=True)
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    runtime.generate(PROMPTS, config)
    counts = {name: e.compiled.compilations for name, e in runtime.engines.items()}
    assert counts["block_decoder"] <= 1 and counts["token_decoder"] <= 2, counts  # token steps: 2 and 1 new rows
    prompts = [list(range(1, 1 + 7 * i)) for i in range(1, 21)]  # 20 rows, up to 140 prompt tokens
    long = GenerationConfig(max_new_tokens=200, ignore_eos=True)
    ref = generate(model, prompts, long)
    out = [r.token_ids for r in runtime.generate(prompts, long)]
    assert {name: e.compiled.compilations for name, e in runtime.engines.items()} == counts
    if out != ref.tokens:  # say where, and whether the eager engine parts from the reference there too
        eager = [r.token_ids for r in Model.from_torch(model, dtype="fp32", max_batch=32, max_context=512,
                                                         device="cuda", compile=False).generate(prompts, long)]
        first = {i: next(j for j, (a, b) in enumerate(zip(o, r)) if a != b)
                 for i, (o, r) in enumerate(zip(out, ref.tokens)) if o != r}
        raise AssertionError(f"compiled tokens part from the reference at {{row: index}} {first}; eager rows "
                             f"parting: {[i for i, (e, r) in enumerate(zip(eager, ref.tokens)) if e != r]}")


def test_shapes_without_a_graph_run_padded_on_a_larger_one_with_the_reference_tokens():
    model = _model("tiny_block")
    config = GenerationConfig(max_new_tokens=160, ignore_eos=True)
    runtime = Model.from_torch(model, dtype="fp32", max_batch=64, max_context=512, device="cuda", compile=False)
    runtime.generate([list(range(1, 1 + 5 * (i % 4 + 1))) for i in range(16)], config)  # graphs for 16 rows
    captured = {name: e.captures for name, e in runtime.engines.items()}
    out = runtime.generate(PROMPTS, config)  # 4 rows: the 8-row bucket runs on the 16-row graphs, then gets its own
    assert [r.token_ids for r in out] == generate(model, PROMPTS, config).tokens
    # each of the token decoder's two step shapes (a block's first step feeds 2 positions, the others
    # 1; 40 and 120 calls here) stands in for CAPTURE_AFTER_CALLS calls, then gets a graph of its own
    token_decoder = runtime.engines["token_decoder"]
    assert token_decoder.stand_ins == 2 * CAPTURE_AFTER_CALLS and token_decoder.captures == captured["token_decoder"] + 2


def test_graphs_captured_at_start_run_the_first_rounds_with_the_reference_tokens():
    """A server captures the full-batch graphs at start (`Generator.capture_graphs`): the first
    rounds of any batch then run on them (padded) without a capture, and keep the reference tokens."""
    model = _model("tiny_block")
    runtime = Model.from_torch(model, dtype="fp32", max_batch=64, max_context=512, device="cuda", compile=False)
    captured = runtime.generator().capture_graphs()
    engines = runtime.engines.values()
    assert captured == sum(e.captures for e in engines) and captured > 2
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True)  # fewer calls than CAPTURE_AFTER_CALLS
    out = runtime.generate(PROMPTS, config)
    assert [r.token_ids for r in out] == generate(model, PROMPTS, config).tokens
    assert sum(e.captures for e in engines) == captured and all(e.stand_ins > 0 for e in engines)


def test_cuda_graph_runtime_matches_reference_sampling_fp32():
    model = _model("tiny_block")
    config = GenerationConfig(max_new_tokens=64, temperature=0.9, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
    ref = generate(model, PROMPTS, config)
    out = Model.from_torch(model, dtype="fp32", max_batch=8, max_context=512, device="cuda",
                             compile=False).generate(PROMPTS, config)
    assert [r.token_ids for r in out] == ref.tokens


def test_bf16_runtime_tokens_are_top_choices_of_the_fp32_reference():
    """bf16 and fp32 round differently, so greedy paths may part at a near-tie; what must hold is
    that every token the bf16 runtime picks is among the fp32 reference's top choices at that
    point of the runtime's own sequence (teacher forcing along it)."""
    assert_bf16_tokens_are_reference_top_choices("block_main_b4_5", "cuda")


@compiled
def test_compiled_bf16_runtime_tokens_are_top_choices_of_the_fp32_reference_1_2b():
    assert_bf16_tokens_are_reference_top_choices("block_main_b4_1.2b", "cuda", compile=True)


@torch.no_grad()
def test_mlp_gelu_epilogue_errs_no_more_than_bf16_rounding():
    """The engine's bf16 MLPs put bias and GELU in the up-projection's cuBLASLt epilogue (tanh GELU):
    against the fp32 exact-GELU MLP it must err about as the plain bf16 MLP does, and not compute
    the same as without a bias (an epilogue that dropped it)."""
    from blockrt.exporter.model import MLP

    cfg = get_preset("block_main_b4_1.2b").token_decoder
    torch.manual_seed(0)
    with torch.device("cuda"):
        mlp = MLP(cfg)
        torch.nn.init.normal_(mlp.dense_h_to_4h.bias, std=0.5)
        x = torch.randn(300, 2, cfg.hidden_size)
    want = mlp(x)
    plain = mlp.to(torch.bfloat16)(x.bfloat16()).float()
    mlp.gelu_epilogue = True
    fused = mlp(x.bfloat16()).float()

    def rel(y):
        return float((y - want).norm() / want.norm())

    assert rel(fused) < 1.5 * rel(plain) + 1e-3, (rel(fused), rel(plain))
    mlp.dense_h_to_4h.bias.zero_()
    assert rel(mlp(x.bfloat16()).float()) > 10 * rel(fused)


def test_bench_counts_memory_the_allocator_holds_unused_as_free():
    """The auto batch is sized from free memory: blocks PyTorch's caching allocator keeps after their
    tensors die (a preset's fp32 weights before their cast) are free for the run, not taken."""
    from blockrt.runtime.bench import _free_memory

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    before = torch.cuda.mem_get_info(dev)[0]
    held = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    del held  # its 1 GiB stays reserved by the allocator
    assert torch.cuda.mem_get_info(dev)[0] < before - (1 << 29)
    assert _free_memory(dev) > before - (1 << 28)
