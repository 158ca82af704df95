"""Benchmarks: the same named metrics every time, as a table and as JSON.

A run generates `gen_len` tokens after `prompt_len`-token random prompts for `batch` sequences
with EOS ignored, and reports time to first token (TTFT: a batch generating one token), time per
output token (TPOT), output and total tokens/s, peak GPU memory, the GPU time of every engine step
(CUDA events), the share of wall time the host spent not overlapped with GPU work, and for each
step the fraction of its hardware floor: max(bytes it must move / measured copy bandwidth,
FLOPs / measured bf16 matrix rate).

Baselines run in the same process on the same workload: another blockrt model (`--against`) or
Hugging Face transformers `generate` on the vanilla model's weights (`--against hf`).
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blockrt.errors import UserError, require
from blockrt.exporter.config import TORCH_DTYPES
from blockrt.generation import GenerationConfig, padded_len
from blockrt.graphs.manifest import Manifest
from blockrt.parsing import parse_int_list

from .engine import SPEC_DTYPES
from .kernel_profile import format_step_kernels, profile_kernels
from .tracing import SLOW_COLLECTION_S, Trace, step_summary

log = logging.getLogger(__name__)

WORKLOADS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 2048)}
PROFILE_TOKENS = 16  # tokens a profiled generation makes (4 rounds of a block model), after its prefill
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class Hardware:
    device: str
    copy_bandwidth_gbs: float | None  # measured device-to-device, bytes read + written (None: not measured, CPU)
    matmul_tflops: float | None  # measured bf16 matrix rate (None: not measured, CPU)

    def describe(self) -> str:
        if self.copy_bandwidth_gbs is None or self.matmul_tflops is None:
            return f"{self.device}: copy bandwidth and matmul rate not measured (no GPU): no hardware floors"
        return f"{self.device}: copy {self.copy_bandwidth_gbs:,.0f} GB/s, matmul {self.matmul_tflops:,.0f} TFLOP/s"


@dataclass
class StepStats:
    calls: int
    gpu_ms_median: float
    gpu_ms_total: float
    floor_ms: float | None = None  # hardware floor of a median call
    floor_fraction: float | None = None  # floor / measured


@dataclass
class BenchResult:
    name: str
    engine: str  # "blockrt-torch-compiled", "blockrt-torch", "blockrt-onnxruntime", "hf-transformers"
    kind: str
    dtype: str
    batch: int
    prompt_len: int
    gen_len: int
    wall_s: float
    ttft_s: float
    tpot_ms: float
    output_tok_s: float
    total_tok_s: float
    peak_mem_gib: float | None
    host_overhead: float | None = None  # share of wall time the GPU waited for the host
    steps: dict[str, StepStats] = field(default_factory=dict)
    workload: str = "custom"
    after_profile: bool = False  # measured after a --profile run in this process (slower: see profile_kernels)
    # blockrt runs, from the measured run's `tracing.Trace` (generator steps, garbage collections):
    step_host_ms: float | None = None  # mean host time of a step outside device waits (launch + token reads)
    step_wait_ms: float | None = None  # mean time a step waited for the device (near 0: the GPU waited for the host)
    graphs_captured: int | None = None  # CUDA graphs captured during the measured run (0 after a good warm-up)
    gc_ms: float | None = None  # time in Python's garbage collector during the measured run
    gc_full: int | None = None  # full collections among them
    kernels: list[dict] | None = None  # --profile: per step, its kernels per call (kernel_profile.StepKernels)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.node(),
           "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   compute_capability=f"{p.major}.{p.minor}")
    for mod in ("onnxruntime", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def measure_hardware(device: torch.device) -> Hardware:
    """Copy bandwidth and matrix rate, measured once (medians of CUDA-event timings)."""
    if device.type != "cuda":
        return Hardware(str(device), None, None)
    n = 1 << 30  # 1 GiB copies
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    copy_ms = _median_ms(torch.empty_like(src).copy_, 20, src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = _median_ms(torch.matmul, 20, a, torch.randn_like(a))
    return Hardware(torch.cuda.get_device_name(device), 2 * n / copy_ms / 1e6, 2 * 8192**3 / mm_ms / 1e9)


def _median_ms(fn, repeats: int, *args) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()  # no EOS (0) in prompts


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ttft(first_token, device, repeats: int = 3) -> float:
    """Median wall time of `first_token()` (the batch generating one token), then a clean slate
    for the measured run: synchronized, peak-memory counter reset."""
    ttft = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        first_token()
        _sync(device)
        ttft.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    return statistics.median(ttft)


def bench_blockrt(model, name: str, batch: int, prompt_len: int, gen_len: int, hw: Hardware, engine: str) -> BenchResult:
    """One measured run of a blockrt Model (after a warm-up that captures graphs and fills pools)."""
    device = model.device
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    full = GenerationConfig(max_new_tokens=gen_len, ignore_eos=True)
    first = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    model.generate(prompts, full)  # warm-up: captures every CUDA graph the run needs, fills allocator pools
    ttft_s = _median_ttft(lambda: model.generate(prompts, first), device)
    gen = model.generator()
    trace = Trace(gen)
    captured = sum(e.captures for e in model.engines.values())
    t0 = time.perf_counter()
    try:
        with gen.record_timings() as timings:
            outputs = model.generate(prompts, full)
            _sync(device)
    finally:
        t1, recorded = time.perf_counter(), trace.stop()
    wall = t1 - t0
    summary = step_summary(recorded, t0, t1, batch)
    for stack in summary["gc_slow_stacks"][:3]:
        log.info("%s: a garbage collection over %.0f ms in the measured run, from:\n%s", name,
                 1e3 * SLOW_COLLECTION_S, stack)
    captured = sum(e.captures for e in model.engines.values()) - captured
    assert all(len(o.token_ids) == gen_len for o in outputs), "a sequence stopped early with EOS ignored"
    steps, busy_ms = {}, 0.0
    for step, pairs in timings.items():
        ms = [s.elapsed_time(e) for s, e in pairs]
        busy_ms += sum(ms)
        steps[step] = StepStats(len(ms), statistics.median(ms), sum(ms))
    _add_floors(steps, model, batch, prompt_len, gen_len, hw)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return BenchResult(name, engine, model.manifest.kind, model.manifest.dtype, batch, prompt_len, gen_len, wall,
                       ttft_s, 1e3 * max(wall - ttft_s, 0) / max(gen_len - 1, 1), batch * gen_len / wall,
                       batch * (prompt_len + gen_len) / wall, peak,
                       host_overhead=max(0.0, 1 - busy_ms / 1e3 / wall) if timings else None, steps=steps,
                       step_host_ms=summary.get("host_ms"), step_wait_ms=summary.get("device_wait_ms"),
                       graphs_captured=captured, gc_ms=summary["gc_ms"], gc_full=summary["gc_full"])


def _add_floors(steps: dict[str, StepStats], model, batch: int, prompt_len: int, gen_len: int, hw: Hardware) -> None:
    """Hardware floor of the median decode-phase call of each step (mid-generation context)."""
    if hw.copy_bandwidth_gbs is None or hw.matmul_tflops is None:
        return
    cfg, size = model.config, BYTES[model.manifest.dtype]
    L = model.manifest.block_len
    context = prompt_len + gen_len // 2  # tokens cached at the median call
    if cfg.kind == "block":
        costs = {"block_decoder": _stack_cost(cfg.block_decoder, batch, 1, context // L, size, kv_size=_main_cache_bytes(model)),
                 "token_decoder": _stack_cost(cfg.token_decoder, batch, 1, (L + 1) // 2 + 1, size, lm_head=True)}
    else:
        costs = {"decoder": _stack_cost(cfg.decoder, batch, 1, context, size, lm_head=True, kv_size=_main_cache_bytes(model))}
    for step, (flops, nbytes) in costs.items():
        if step in steps:
            floor = 1e3 * max(nbytes / (hw.copy_bandwidth_gbs * 1e9), flops / (hw.matmul_tflops * 1e12))
            steps[step].floor_ms = floor
            steps[step].floor_fraction = floor / steps[step].gpu_ms_median


def _main_cache_bytes(model) -> int:
    """Bytes per element of the block decoder's (decoder's) KV cache: the dtype's, or 1 for FP8."""
    graph = model.manifest.graphs["block_decoder" if model.manifest.kind == "block" else "decoder"]
    return SPEC_DTYPES[graph.input("past_key_values.0.key").dtype].itemsize


def _stack_cost(stack, batch: int, new: int, attend: int, size: int, lm_head: bool = False,
                kv_size: int | None = None) -> tuple[float, float]:
    """(FLOPs, bytes) of one step of a NeoX stack: weights read once, KV cache read once, new
    KV rows written, matmuls 2 * params per token, attention 4 * attend * h per token per layer."""
    h, layers = stack.hidden_size, stack.num_layers
    params = stack.non_embedding_params() + (stack.vocab_size * h if lm_head else 0)
    tokens = batch * new
    flops = 2 * tokens * params + 4 * tokens * attend * h * layers
    kv = 2 * layers * batch * attend * h * (size if kv_size is None else kv_size)
    logits = batch * stack.vocab_size * 4 if lm_head else 0
    return flops, params * size + kv + logits


def bench_hf(weights_model, batch: int, prompt_len: int, gen_len: int, dtype: str = "bf16", device="cuda") -> BenchResult:
    """Hugging Face transformers `generate` (greedy, EOS ignored) on a vanilla model's weights."""
    transformers = require("transformers", "hf", "--against hf")
    cfg = weights_model.config.decoder
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base, layer_norm_eps=cfg.layer_norm_eps, use_parallel_residual=True,
        hidden_act="gelu", max_position_embeddings=prompt_len + gen_len, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch_dtype = TORCH_DTYPES[dtype]
    with torch.device(device):
        hf = transformers.GPTNeoXForCausalLM(hf_config).to(torch_dtype)
    state = dict(weights_model.state_dict())
    if "lm_head.weight" in hf.state_dict():  # transformers 5 names the output layer lm_head
        state["lm_head.weight"] = state.pop("embed_out.weight")
    hf.load_state_dict(state, strict=True)
    hf = hf.to(device).eval()
    dev = torch.device(device)
    ids = torch.tensor(random_prompts(batch, prompt_len, cfg.vocab_size), device=dev)
    mask = torch.ones_like(ids)

    def run(new):
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    run(2)
    ttft_s = _median_ttft(lambda: run(1), dev)
    t0 = time.perf_counter()
    out = run(gen_len)
    _sync(dev)
    wall = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + gen_len
    result = BenchResult("hf:" + getattr(weights_model, "preset_name", "vanilla"), "hf-transformers-" + transformers.__version__,
                         "vanilla", dtype, batch, prompt_len, gen_len, wall, ttft_s,
                         1e3 * (wall - ttft_s) / max(gen_len - 1, 1), batch * gen_len / wall,
                         batch * (prompt_len + gen_len) / wall,
                         torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    return result


def per_row_bytes(model, prompt_len: int, gen_len: int) -> int:
    """Device memory one sequence needs: caches, logits and a share of step activations."""
    cfg, size = model.config, BYTES[model.manifest.dtype]
    stack = cfg.block_decoder if cfg.kind == "block" else cfg.decoder
    cache = 2 * stack.num_layers * stack.hidden_size * model.manifest.limits.cache_len * _main_cache_bytes(model)
    if cfg.kind == "block":
        t = cfg.token_decoder
        cache += 2 * t.num_layers * t.hidden_size * (cfg.block_len + 1) * size
    logits = 3 * cfg.vocab_size * 4  # logits, sampling temporaries
    activations = 16 * max(stack.hidden_size, getattr(cfg, "token_decoder", stack).hidden_size) * 4 * size
    return cache + logits + activations


def _free_memory(device: torch.device) -> int:
    """Device memory a run can have: what the driver reports free once PyTorch's caching allocator
    has handed back the blocks it holds unused (the hardware measurement's buffers, a preset's fp32
    weights before their cast: some 8 GB for block_main_b4_1.2b, which made the first workload's auto
    batch 1216 where the second's was 1280). A CPU: 8 GiB."""
    if device.type != "cuda":
        return 8 << 30
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def auto_batch(model_bytes_free: int, row_bytes: int, limit: int) -> int:
    """Largest batch (a multiple of 64 when >= 64) that fits 90% of the free memory."""
    n = int(0.9 * model_bytes_free // row_bytes)
    if n >= 64:
        n = 64 * (n // 64)
    return max(1, min(n, limit))


def format_table(results: list[BenchResult]) -> str:
    head = ["model", "engine", "dtype", "batch", "prompt", "gen", "TTFT s", "TPOT ms", "out tok/s", "total tok/s",
            "peak GiB", "host ovh", "step host/wait ms", "GC ms (full)", "step GPU ms (floor %)"]
    rows = []
    for r in results:
        steps = ", ".join(f"{k} {v.gpu_ms_median:.2f}" + (f" ({100 * v.floor_fraction:.0f}%)" if v.floor_fraction else "")
                          for k, v in r.steps.items())
        rows.append([r.name + (" (after profile)" if r.after_profile else ""), r.engine, r.dtype, str(r.batch), str(r.prompt_len), str(r.gen_len), f"{r.ttft_s:.3f}",
                     f"{r.tpot_ms:.2f}", f"{r.output_tok_s:,.0f}", f"{r.total_tok_s:,.0f}",
                     "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}",
                     "-" if r.host_overhead is None else f"{100 * r.host_overhead:.1f}%",
                     "-" if r.step_host_ms is None else f"{r.step_host_ms:.1f}/{r.step_wait_ms:.1f}",
                     "-" if r.gc_ms is None else f"{r.gc_ms:.0f} ({r.gc_full})", steps or "-"])
    return text_table(head, rows)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, separated by ' | ', with a rule under the head."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def to_json(results: list[BenchResult], hw: Hardware, ratios: list[dict]) -> dict:
    """The results as a JSON-ready dict; a value that is not a finite number is null (JSON has no NaN)."""
    return _finite({"environment": environment(), "hardware": asdict(hw), "results": [asdict(r) for r in results],
                    "ratios": ratios})


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------- orchestration
MAX_AUTO_BATCH = 4096  # --batch auto on a GPU for presets and transformers (artifacts: their own limit)
CPU_AUTO_BATCH = 8  # --batch auto on a CPU: memory is not the limit there, and larger batches only wait longer


@dataclass
class Target:
    """What to benchmark: an artifact directory, a preset (random weights, PyTorch engine) or "hf"."""

    spec: str
    backend: str = "torch"

    @property
    def is_hf(self) -> bool:
        return self.spec == "hf" or self.spec.startswith("hf:")


@dataclass
class _Plan:
    """What one target needs, worked out before anything runs."""

    target: Target
    batch_spec: str
    kind: str  # "block" or "vanilla"
    preset: str | None = None  # random weights of this preset (presets, hf:PRESET, hf from a preset)
    manifest: Manifest | None = None  # the artifact's (artifacts, and hf from a vanilla artifact)
    max_batch: int = MAX_AUTO_BATCH
    hf_source: str | None = None  # hf: where the weights come from

    @property
    def max_context(self) -> int | None:
        return None if self.manifest is None or self.target.is_hf else self.manifest.limits.max_context


def _weights(preset: str, dtype: str, device: torch.device, seed: int = 0):
    from blockrt.exporter import build_model, get_preset, init_random

    with torch.device(device):
        model = build_model(get_preset(preset))
    init_random(model, seed=seed)
    model = model.to(TORCH_DTYPES[dtype]).eval()
    model.preset_name = preset
    return model


def _quantized(weights, quantize: str | None, kv_cache_dtype: str | None):
    """A preset's weights quantized in memory as `blockrt export --quantize` would (default calibration)."""
    from blockrt.exporter.quantize import calibration_sequences, quantize_model

    from .fp8_kv import enable_fp8_kv_cache

    sequences, _ = calibration_sequences(weights.config)
    if quantize:
        weights = quantize_model(weights, quantize, sequences=sequences)
    if kv_cache_dtype:
        enable_fp8_kv_cache(weights, sequences)
    return weights


def _artifact_weights(plan: _Plan, device: torch.device):
    """The reference model of a vanilla artifact, in its own dtype (for transformers)."""
    from blockrt.exporter.checkpoint import load_checkpoint
    from blockrt.graphs.manifest import WEIGHTS_NAME

    manifest = plan.manifest
    model = load_checkpoint(Path(plan.hf_source) / WEIGHTS_NAME, config=manifest.model_config, dtype=manifest.dtype,
                            device=device)
    model.preset_name = plan.hf_source
    return model


def plan_targets(targets: list[Target], batch_specs: list[str]) -> list[_Plan]:
    """Resolve every target (preset, artifact, hf) and parse its batch spec, so that a bad flag is
    refused before the first benchmark runs."""
    from blockrt.exporter import PRESETS

    plans = []
    for target, spec in zip(targets, batch_specs):
        if target.is_hf:
            plans.append(_Plan(target, spec, "vanilla"))
        elif target.spec in PRESETS:
            plans.append(_Plan(target, spec, PRESETS[target.spec].kind, preset=target.spec))
        elif Path(target.spec).is_dir():
            manifest = Manifest.load(target.spec, verify_hashes=False)
            plans.append(_Plan(target, spec, manifest.kind, manifest=manifest, max_batch=manifest.limits.max_batch))
        else:
            raise UserError(f"{target.spec} is neither a preset (see `blockrt presets`) nor an artifact directory")
    vanilla = next((p for p in plans if not p.target.is_hf and p.kind == "vanilla"), None)
    for plan in plans:
        if plan.target.spec.startswith("hf:"):
            preset = plan.target.spec[3:]
            if preset not in PRESETS or PRESETS[preset].kind != "vanilla":
                raise UserError(f"--against {plan.target.spec}: expected hf:<vanilla preset>, e.g. hf:vanilla_410")
            plan.preset, plan.hf_source = preset, preset
        elif plan.target.is_hf:
            if vanilla is None:
                raise UserError("--against hf runs Hugging Face transformers on the weights of the vanilla model given "
                                "with it, and none is given (the models are: "
                                f"{', '.join(f'{p.target.spec} ({p.kind})' for p in plans if not p.target.is_hf)}): "
                                "add a vanilla preset or artifact, e.g. --against tiny_vanilla --against hf, or "
                                "use --against hf:PRESET")
            plan.preset, plan.manifest = vanilla.preset, vanilla.manifest
            plan.hf_source = vanilla.target.spec
    if any(p.target.is_hf for p in plans):
        require("transformers", "hf", "--against hf")
    for plan in plans:
        _batches(plan.batch_spec, 0, 1, plan.max_batch, check_only=True)
    return plans


def fit_workloads(workloads: list[tuple[str, int, int]], plans: list[_Plan]) -> list[tuple[str, int, int]]:
    """Workloads every artifact's context holds: a named workload that does not fit is shortened
    (its longer part: the generation of decode-heavy, the prompt of prefill-heavy) with a warning
    saying why; a custom one, whose lengths the user chose, is refused."""
    fitted = []
    for name, prompt_len, gen_len in workloads:
        for plan in plans:
            limit, L = plan.max_context, (plan.manifest.block_len if plan.manifest is not None else 1)
            if limit is None:
                continue
            padded = padded_len(prompt_len, L)
            if padded + gen_len <= limit:
                continue
            why = (f"prompt {prompt_len} (padded to {padded}) + generate {gen_len} = {padded + gen_len} tokens exceed "
                   f"the max context {limit} of {plan.target.spec}")
            if name == "custom":
                raise UserError(f"--prompt-len/--gen-len: {why}; use shorter lengths, or re-export with "
                                f"--max-context {padded + gen_len}")
            if gen_len >= prompt_len:
                new_prompt, new_gen = prompt_len, limit - padded
            else:
                new_prompt, new_gen = (limit - gen_len) // L * L, gen_len
            if new_prompt < 1 or new_gen < 1:
                raise UserError(f"{name}: {why}, and no shorter workload of this shape fits; use --workload custom")
            log.warning("%s: %s; running prompt %d, generate %d instead (re-export with --max-context %d for the "
                        "full workload)", name, why, new_prompt, new_gen, padded + gen_len)
            prompt_len, gen_len = new_prompt, new_gen
        fitted.append((name, prompt_len, gen_len))
    return fitted


def _engine_label(model) -> str:
    """"blockrt-<backend>", with "-compiled" where its decode steps ran compiled."""
    compiled = any(getattr(e, "compiled", None) is not None for e in model.engines.values())
    return f"blockrt-{model.backend}" + ("-compiled" if compiled else "")


def _open(plan: _Plan, weights, dtype: str, device: torch.device, max_batch: int, workloads, compile: bool | None = None,
          kv_cache_dtype: str | None = None):
    from .model import Model

    if weights is not None:  # room for the longest workload, its prompt padded to whole blocks
        L = weights.config.block_len
        max_context = max(padded_len(p, L) + g for _, p, g in workloads)
        return Model.from_torch(weights, dtype=dtype, max_batch=max_batch, max_context=max_context, device=str(device),
                                compile=compile, kv_cache_dtype=kv_cache_dtype)
    return Model.load(plan.target.spec, backend=plan.target.backend, device=str(device), max_batch=max_batch,
                      compile=compile)


def _batches(spec: str, model_free: int, row_bytes: int, limit: int, cpu: bool = False,
             check_only: bool = False) -> list[int]:
    """The batch sizes of a spec: 'auto' (largest that fits the free memory, at most `limit`; on a
    CPU at most CPU_AUTO_BATCH) or comma-separated sizes, each at most `limit`."""
    if spec == "auto":
        if check_only:
            return []
        return [min(limit, CPU_AUTO_BATCH)] if cpu else [auto_batch(model_free, row_bytes, limit)]
    values = parse_int_list(spec, "--batch (auto or sizes)", minimum=1, item="batch size")
    if max(values) > limit:
        raise UserError(f"batch {max(values)} is above the max batch {limit} of the model it is for; "
                        f"use --batch auto, or re-export with --max-batch {max(values)}")
    return values


def run_bench(targets: list[Target], workloads: list[tuple[str, int, int]], batch_specs: list[str], dtype: str,
              device: str | None = None, profile: bool = False, compile: bool | None = None, quantize: str | None = None,
              kv_cache_dtype: str | None = None, trace_dir: Path | None = None,
              on_result: Callable[[list[BenchResult], Hardware], None] | None = None,
              ) -> tuple[list[BenchResult], Hardware, list[dict]]:
    """Benchmark every target on every workload (name, prompt_len, gen_len), one target at a time
    in this process; the first target is compared with each of the others. Every flag is checked
    and every workload fitted to the artifacts' context before the first run. `compile`: PyTorch
    engines run compiled decode steps (see `Model.load`; None: where they can). `quantize` / `kv_cache_dtype` apply to
    the first target, a preset (quantized in memory, default calibration). `profile`: log the heaviest
    kernels of a short run of each blockrt model first; `trace_dir`: also save that run's timeline
    there, one file per model, workload and batch (implies `profile`). `on_result(results, hw)`: called
    after every run with the results so far (the CLI saves them, so a run stopped midway keeps them)."""
    plans = plan_targets(targets, batch_specs)
    workloads = fit_workloads(workloads, plans)
    if (quantize or kv_cache_dtype) and plans[0].preset is None:
        raise UserError(f"--quantize / --kv-cache-dtype apply to a preset; {targets[0].spec} is not one (export it "
                        f"with --quantize instead)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hw = measure_hardware(dev)
    log.info("hardware: %s", hw.describe())
    results: list[BenchResult] = []
    profiled = False  # a profile ran in this process: later measurements are slowed
    by_target: list[dict[str, BenchResult]] = []
    for plan in plans:
        target = plan.target
        best: dict[str, BenchResult] = {}
        if plan.preset is not None:
            weights = _weights(plan.preset, dtype, dev)
        elif target.is_hf:
            weights = _artifact_weights(plan, dev)
        else:
            weights = None
        hf_dtype = plan.manifest.dtype if target.is_hf and plan.manifest is not None else dtype
        kv = quant = None  # the first target's quantization
        if plan is plans[0] and (quantize or kv_cache_dtype):
            weights, kv, quant = _quantized(weights, quantize, kv_cache_dtype), kv_cache_dtype, quantize
        for name, prompt_len, gen_len in workloads:
            free = _free_memory(dev)
            if target.is_hf:
                row = _hf_row_bytes(weights, prompt_len + gen_len, hf_dtype)
            else:
                probe = _open(plan, weights, dtype, dev, 1, workloads, compile=False, kv_cache_dtype=kv)  # sizes only: never compiled
                row = per_row_bytes(probe, prompt_len, gen_len)
                del probe
            for batch in _batches(plan.batch_spec, free, row, plan.max_batch, cpu=dev.type != "cuda"):
                log.info("%s on %s: batch %d, prompt %d, generate %d", target.spec, name, batch, prompt_len, gen_len)
                try:
                    if target.is_hf:
                        r = bench_hf(weights, batch, prompt_len, gen_len, hf_dtype, str(dev))
                        r.after_profile = profiled
                    else:
                        model = _open(plan, weights, dtype, dev, batch, workloads, compile, kv)
                        label = target.spec if weights is not None else f"{target.spec} ({model.manifest.source})"
                        label += "".join(f" {k} {v}" for k, v in (("quantized", quant), ("kv cache", kv)) if v)
                        r = bench_blockrt(model, label, batch, prompt_len, gen_len, hw, _engine_label(model))
                        r.after_profile = profiled
                        if profile or trace_dir is not None:  # after the measured run: see profile_kernels
                            if not profiled and dev.type == "cuda":
                                log.warning("profiling now; runs measured after this one are slowed by the profiler, "
                                            "which stays attached to CUDA (marked 'after profile')")
                            profiled = dev.type == "cuda"
                            trace = None if trace_dir is None else trace_dir / _trace_name(label, name, batch)
                            prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
                            table, per_step = profile_kernels(model, prompts, min(gen_len, PROFILE_TOKENS), trace=trace)
                            log.info("kernel profile of %s, batch %d, prompt %d, %d tokens:\n%s\nper step:\n%s", label,
                                     batch, prompt_len, min(gen_len, PROFILE_TOKENS), table,
                                     format_step_kernels(per_step))
                            r.kernels = [asdict(k) for k in per_step]
                except torch.OutOfMemoryError:
                    log.warning("%s: batch %d does not fit in GPU memory, skipped", target.spec, batch)
                    continue
                finally:
                    model = None  # also after an out-of-memory error, so that the next run gets the memory back
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                r.workload = name
                results.append(r)
                log.info("  %.0f output tok/s, TTFT %.3f s", r.output_tok_s, r.ttft_s)
                if on_result is not None:
                    on_result(results, hw)
                if name not in best or r.output_tok_s > best[name].output_tok_s:
                    best[name] = r
        by_target.append(best)
        del weights
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ratios = []
    for other, target in zip(by_target[1:], targets[1:]):
        for name, mine in by_target[0].items():
            if name in other:
                ratios.append({"workload": name, "model": targets[0].spec, "against": target.spec,
                               "model_batch": mine.batch, "against_batch": other[name].batch,
                               "output_tok_s_ratio": mine.output_tok_s / other[name].output_tok_s,
                               "ttft_ratio": other[name].ttft_s / mine.ttft_s})
    return results, hw, ratios


def _trace_name(label: str, workload: str, batch: int) -> str:
    """A file name for a profiled run's timeline: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}_{workload}_b{batch}").strip("_") + ".trace.json.gz"


def _hf_row_bytes(weights, context: int, dtype: str) -> int:
    cfg = weights.config.decoder
    return 2 * cfg.num_layers * cfg.hidden_size * context * BYTES[dtype] * 2 + 4 * cfg.vocab_size * 4


def format_ratios(ratios: list[dict]) -> str:
    return "\n".join(f"{r['workload']}: {r['model']} (batch {r['model_batch']}) vs {r['against']} (batch "
                     f"{r['against_batch']}): {r['output_tok_s_ratio']:.1f}x output tokens/s, "
                     f"TTFT {r['ttft_ratio']:.2f}x" for r in ratios)
