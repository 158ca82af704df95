"""The token decoder's fused attention step (`blockrt::small_cache_decode`: rotary, in-place cache
write and attention over the few cached rows). On the CPU: its Triton kernel under Triton's
interpreter against the PyTorch ops, the model's token steps through it against the reference, and
the step compiled by Inductor calling it on the caches it is given; on a GPU, the kernel itself (the
engine end to end: tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.exporter.generate import generate
from blockrt.exporter.model import Attention, rotary_cos_sin
from blockrt.exporter.steps import step_modules
from blockrt.generation import GenerationConfig
from blockrt.runtime import Model
from blockrt.runtime.small_attention import reference, small_cache_decode


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted():
    """`small_attention.fused`, its Triton kernel run by Triton's interpreter on CPU tensors. Triton
    decides when it is imported whether kernels are interpreted, so these tests run in a process
    started with TRITON_INTERPRET=1 (`test_the_kernel_checks_pass_under_the_triton_interpreter`)."""
    if not INTERPRETED:
        pytest.skip("runs in a process started with TRITON_INTERPRET=1 (see the interpreter test)")
    from blockrt.runtime.small_attention import fused

    return fused


def test_the_kernel_checks_pass_under_the_triton_interpreter():
    if INTERPRETED:
        pytest.skip("this process runs the kernel checks itself")
    pytest.importorskip("triton", reason="triton is not installed: the kernel's CPU checks need its interpreter")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def _step_inputs(dtype, new: int, heads: int, head_dim: int, seed: int = 0, batch: int = 6, rows: int = 5):
    """Inputs of one step (on the default device): ragged write indices, strided caches."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(seed)
    qkv = torch.randn(batch * new, 3 * heads * head_dim, generator=gen).to(dtype).view(batch, new, heads, 3 * head_dim)
    write_index = torch.randint(0, rows - new + 1, (batch,), generator=gen)
    write_index[0], write_index[-1] = 0, rows - new  # the first and the last rows a step may write
    positions = write_index[:, None] + torch.arange(new)[None, :]
    cos, sin = rotary_cos_sin(positions, head_dim // 4, 10000.0, dtype)
    # strided caches, as the engine passes slices of its buffers
    caches = [torch.randn(batch + 1, heads, rows, head_dim, generator=gen).to(dtype)[:batch] for _ in range(2)]
    return qkv, cos, sin, caches, write_index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [1, 2])
@pytest.mark.parametrize("heads,head_dim", [(4, 32), (3, 64)])
def test_interpreted_kernel_computes_and_writes_what_the_model_ops_do(interpreted, dtype, new, heads, head_dim):
    _check_kernel(interpreted, _step_inputs(dtype, new, heads, head_dim))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [1, 2])
def test_cuda_kernel_computes_and_writes_what_the_model_ops_do(dtype, new):
    from blockrt.runtime.small_attention import fused

    with torch.device("cuda"):  # block_main_b4_1.2b's token decoder heads, 37 sequences
        _check_kernel(fused, _step_inputs(dtype, new, 16, 128, batch=37))


def _check_kernel(kernel, step_inputs):
    qkv, cos, sin, caches, write_index = step_inputs
    dtype, new, heads, head_dim = qkv.dtype, qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
    mine, want_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    got = kernel(qkv, cos, sin, *mine, write_index, 0.17)
    want = reference(qkv, cos, sin, *want_caches, write_index, 0.17)
    assert got.shape == want.shape == (len(qkv), new, heads, head_dim) and got.dtype == want.dtype
    # fp32: the same arithmetic; bf16: rotary rounded once (as compiled code does) instead of per op
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for before, a, b in zip(caches, mine, want_caches):
        # fp32: the rotation's products and sum rounded as one fused multiply-add on a GPU; bf16: the
        # rotated keys rounded once instead of three times
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
        written = (a != before).any(-1).any(1)  # [B, S]: rows the kernel wrote
        expected = torch.zeros_like(written)
        for row, w in enumerate(write_index.tolist()):
            expected[row, w:w + new] = True
        assert torch.equal(written, expected)


def _install(runtime_or_model, kernel) -> int:
    model = runtime_or_model.engines["token_decoder"].step.model if isinstance(runtime_or_model, Model) else runtime_or_model
    attentions = [m for m in model.token_decoder.modules() if isinstance(m, Attention)]
    for m in attentions:
        m.decode_math, m.small_cache_kernel = True, kernel
    return len(attentions)


@pytest.mark.parametrize("how", ["op", "interpreted_kernel"])
def test_token_steps_through_the_fused_step_give_the_reference_greedy_tokens(request, how):
    model = init_random(build_model(get_preset("tiny_block")), seed=3, std=0.1).eval()
    prompts = [[5, 6, 7, 8, 9], list(range(1, 40)), [3]]
    config = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    ref = generate(model, prompts, config)
    runtime = Model.from_torch(model, dtype="fp32", max_batch=4, max_context=128, device="cpu")
    calls = []
    kernel = small_cache_decode if how == "op" else request.getfixturevalue("interpreted")

    def counted(*args):
        calls.append(args[0].shape[1])
        return kernel(*args)

    layers = _install(runtime, counted)
    assert [r.token_ids for r in runtime.generate(prompts, config)] == ref.tokens
    steps = 48 // 4 * 4  # token steps: 4 per block, the first with 2 new rows
    assert sorted(set(calls)) == [1, 2] and len(calls) == layers * steps


@torch.no_grad()
def test_compiled_token_step_calls_the_op_on_the_given_caches_without_copying_them():
    """Compiled (Inductor, here for the CPU), the token step calls the op once per layer on the
    cache tensors the engine passes, and allocates no buffer of a cache's shape to copy it into."""
    from torch._inductor.utils import run_and_get_code

    from blockrt.runtime.inductor import CompiledStep

    model = init_random(build_model(get_preset("tiny_block")), seed=1).eval()
    layers = _install(model, small_cache_decode)
    step = step_modules(model, "inplace", inplace=True)["token_decoder"]
    cfg, B, S = model.config.token_decoder, 6, model.config.block_len + 1
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(B + 2, cfg.num_heads, S, cfg.head_dim, generator=gen)[:B] for _ in range(2 * cfg.num_layers)]
    inputs = [torch.randint(0, 512, (B, 1), generator=gen), torch.randn(B, 2, cfg.hidden_size, generator=gen),
              torch.tensor([2, 3, 4, 2, 3, 4])]
    eager_caches = [c.clone() for c in caches]
    got, code = run_and_get_code(CompiledStep(step, "token_decoder", symbolic_cache_len=False), inputs, caches)
    want = step(*inputs, *eager_caches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(caches, eager_caches):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    source = "".join(code)
    assert source.count("small_cache_decode") >= layers
    shape = f"({B}, {cfg.num_heads}, {S}, {cfg.head_dim})"
    assert not [line for line in source.splitlines() if "empty_strided" in line and shape in line]

