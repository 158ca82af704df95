"""`blockrt verify`: check an artifact's graphs (and engines) against the PyTorch reference.

First the files: the SHA-256 of every file the manifest names (graphs, weights, tokenizer,
engines) is a row of the report; when a graph or the weights changed, nothing runs and the report
fails (an engine that changed fails the report and skips only the TensorRT backend). Then the
graphs (ONNX checker, shape inference, allowed ops, I/O against the manifest). The reference is
rebuilt from the artifact's own `weights.safetensors` (or a given checkpoint) and runs in fp32.
Two kinds of checks per backend:

- steps: each graph runs on the backend and the reference step module runs on the same inputs
  (cast to the export dtype first, so both see identical numbers): a ragged prefill whose prompts
  are not multiples of the block length, the token steps of one block, and decode steps. Every
  output is compared: max abs error and relative error ||a - b|| / ||b|| (caches together).
- generate: greedy generation of `gen_tokens` tokens for several ragged prompts through the
  runtime (`blockrt.runtime.Model`), compared token by token with the reference `generate`.

Relative error limits depend on the export dtype (`REL_TOLERANCE`); in bf16 the generated tokens
are reported but may differ (`TOKENS_REQUIRED`).

A quantized artifact is checked twice: the steps and the generated tokens against the *quantized*
reference (the artifact's `quantized.safetensors` applied to the fp32 model: the same QDQ
arithmetic, so the same limits; looser with FP8 activations in fp16 / bf16, `FP8_REL_TOLERANCE`),
and its quality against the *unquantized* reference,
teacher-forced on fixed sequences (`blockrt.runtime.quality`): mean KL divergence of the
next-token distributions, top-1 agreement (limits per mode, `QUALITY_LIMITS`) and max logit
error (reported). A backend that cannot run here (no GPU, no
TensorRT, no engines, bf16 on ONNX Runtime) is reported as skipped with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from blockrt.backends import GRAPH_BACKENDS
from blockrt.errors import MissingDependencyError, UserError
from blockrt.exporter.checkpoint import load_checkpoint
from blockrt.exporter.generate import generate
from blockrt.exporter.steps import step_modules
from blockrt.generation import GenerationConfig, RequestError, check_prompt
from blockrt.graphs.checks import check_graph
from blockrt.graphs.consistency import check_files
from blockrt.graphs.contract import ONNX_DTYPE_NAMES
from blockrt.graphs.manifest import WEIGHTS_NAME, ArtifactError, Manifest

from .engine import SPEC_DTYPES, load_engines, local_position, prefill_inputs

log = logging.getLogger(__name__)

FILES = "files"  # the backend column of the file-hash checks
REL_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
# With FP8 activations a half-precision graph rounds some activations to the other FP8 step than the
# fp32 reference does (each such element moves by 1/16): measured 2.8e-2 on fp16 logits.
FP8_REL_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}
TOKENS_REQUIRED = {"fp32": True, "fp16": True, "bf16": False}
DEFAULT_PROMPT_LENGTHS = (7, 13, 2, 10, 5)  # none a multiple of the block length 4
DECODE_STEPS = 3  # vanilla decode steps after the prefill


@dataclass
class Check:
    backend: str
    stage: str  # e.g. "block_decoder prefill", "token_decoder steps", "generate"
    output: str  # e.g. "prefix_embeds", "present.* (4)", "tokens"
    passed: bool
    required: bool = True
    max_abs: float | None = None
    rel: float | None = None
    limit: float | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    artifact: str
    kind: str
    dtype: str
    cache_io: str
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> reason
    notes: list[str] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        """At least one backend was checked (beyond the file hashes)."""
        return any(c.backend != FILES for c in self.checks)

    @property
    def passed(self) -> bool:
        """Every required check passed, and at least one backend was checked."""
        return self.ran and all(c.passed for c in self.checks if c.required)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def format_table(self) -> str:
        head = ("backend", "stage", "output", "max abs", "rel err", "limit", "result")
        rows = [(c.backend, c.stage, c.output, _num(c.max_abs), _num(c.rel), _num(c.limit),
                 ("ok" if c.passed else "FAIL" if c.required else "differs (not required)")
                 + (f": {c.detail}" if c.detail else "")) for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        lines = [f"verify {self.artifact} ({self.kind}, {self.dtype}, {self.cache_io} caches)"]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in [head, *rows]]
        lines += [f"{backend}: skipped: {reason}" for backend, reason in self.skipped.items()]
        lines += [f"note: {n}" for n in self.notes]
        files_ok = all(c.passed for c in self.checks if c.backend == FILES)
        lines.append("PASSED" if self.passed else "FAILED" if self.ran or not files_ok
                     else "FAILED: no backend could be checked")
        return "\n".join(lines)


def verify(artifact_dir, *, backends=("onnxruntime",), prompts: list[list[int]] | None = None, gen_tokens: int = 128,
           checkpoint=None) -> VerifyReport:
    """Verify an artifact on `backends` (of GRAPH_BACKENDS: the PyTorch backend runs the reference's
    own step modules, so there is no graph to check); see the module docstring.
    `prompts`: token-id lists (default: seeded random prompts of unaligned lengths)."""
    unknown = [b for b in backends if b not in GRAPH_BACKENDS]
    if unknown or not backends:
        raise UserError(f"unknown backend(s) {unknown or backends}: expected some of {', '.join(GRAPH_BACKENDS)}")
    if not isinstance(gen_tokens, int) or gen_tokens < 1:
        raise UserError(f"gen_tokens must be an integer >= 1, got {gen_tokens!r}")
    directory = Path(artifact_dir)
    manifest = Manifest.load(directory, verify_hashes=False)  # format, digest, fields: unusable input raises
    report = VerifyReport(str(directory), manifest.kind, manifest.dtype, manifest.cache_io)
    report.checks += _file_checks(manifest, directory)
    if not all(c.passed for c in report.checks if c.output not in _engine_files(manifest)):
        report.notes.append("graphs not run: a graph or asset differs from the manifest (re-export the model)")
        return report
    log.info("files match the manifest; checking the graphs")
    check_files(manifest, directory)
    for entry in manifest.graphs.values():
        check_graph(directory / entry.file.path, entry)
    log.info("graphs pass the ONNX checks; rebuilding the fp32 PyTorch reference")
    reference = _reference(manifest, directory, checkpoint)
    unquantized, reference = reference, _quantized(manifest, directory, reference)
    prompts = _prompts(manifest, prompts)
    gen_tokens = _fit_generation(manifest, prompts, gen_tokens, report)
    config = GenerationConfig(max_new_tokens=gen_tokens, ignore_eos=True, positions=manifest.positions)
    expected = None  # reference tokens, generated once the first backend can run
    for backend in backends:
        device = torch.device("cuda" if backend == "tensorrt" else "cpu")
        reason = _unavailable(backend, manifest, directory)
        if reason is None:
            try:
                engines = load_engines(manifest, directory, backend, device)
            except UserError as e:  # e.g. an engine built for another GPU or TensorRT version
                reason = str(e)
        if reason is not None:
            log.info("%s: skipped (%s)", backend, reason)
            report.skipped[backend] = reason
            continue
        log.info("%s: running every graph step by step beside the fp32 reference", backend)
        report.checks += _step_checks(backend, manifest, engines, reference, prompts[:manifest.limits.max_batch], device)
        if manifest.quantization is not None:
            report.checks += _quality_checks(backend, manifest, engines, unquantized, device)
        del engines
        if expected is None:
            log.info("reference: greedy generation of %d tokens for %d prompts", gen_tokens, len(prompts))
            expected = generate(reference, prompts, config).tokens
        log.info("%s: greedy generation of %d tokens for %d prompts through the runtime", backend, gen_tokens,
                 len(prompts))
        report.checks.append(_generation_check(backend, directory, manifest, prompts, config, expected))
        log.info("%s: %s", backend, "ok" if all(c.passed for c in report.checks if c.backend == backend) else "FAILED")
    return report


def _file_checks(manifest: Manifest, directory: Path) -> list[Check]:
    engines = _engine_files(manifest)
    checks = []
    for entry, problem in manifest.file_problems(directory):
        fix = "rebuild: blockrt build" if entry.path in engines else "re-export"
        checks.append(Check(FILES, "sha256", entry.path, problem is None,
                            detail="" if problem is None else f"{problem} ({fix})"))
    return checks


def _engine_files(manifest: Manifest) -> set[str]:
    return {e.file.path for e in manifest.engines.values()}


def _reference(manifest: Manifest, directory: Path, checkpoint) -> torch.nn.Module:
    path = Path(checkpoint) if checkpoint is not None else directory / WEIGHTS_NAME
    if checkpoint is None and "weights" not in manifest.assets:
        raise ArtifactError(f"{directory} has no {WEIGHTS_NAME} to rebuild the PyTorch reference from: re-export it "
                            f"with this blockrt, or pass the checkpoint it was exported from")
    return load_checkpoint(path, config=manifest.model_config, dtype="fp32").eval()


def _quantized(manifest: Manifest, directory: Path, reference: torch.nn.Module) -> torch.nn.Module:
    """The fp32 reference with the artifact's quantized layers, or `reference` itself."""
    if manifest.quantization is None:
        return reference
    import copy

    from blockrt.exporter.quantize import QUANTIZED_NAME, QuantConfig, load_quantized

    if "quantized" not in manifest.assets:
        raise ArtifactError(f"{directory} is quantized but has no {QUANTIZED_NAME}; re-export it")
    config = QuantConfig.from_dict(manifest.quantization)
    return load_quantized(copy.deepcopy(reference), directory / QUANTIZED_NAME, config).float().eval()


def _quality_checks(backend: str, manifest: Manifest, engines, unquantized, device) -> list[Check]:
    from .quality import QUALITY_LIMITS, compare_logits, fixed_sequences, reference_logits, teacher_forced_logits

    mode = manifest.quantization["mode"]
    seqs = fixed_sequences(manifest)
    q = compare_logits(teacher_forced_logits(engines, manifest, seqs, device), reference_logits(unquantized, seqs))
    max_kl, min_top1 = QUALITY_LIMITS[mode]
    stage = f"quality vs unquantized ({mode}, {q.positions} positions)"
    return [Check(backend, stage, "next-token KL (mean)", q.mean_kl <= max_kl, rel=q.mean_kl, limit=max_kl),
            Check(backend, stage, "top-1 agreement", q.confident_top1_agreement >= min_top1,
                  rel=q.confident_top1_agreement, limit=min_top1,
                  detail=f"{q.confident_top1_agreement:.1%} of {q.confident} confident positions (at least "
                         f"{min_top1:.0%}); {q.top1_agreement:.1%} of all"),
            Check(backend, stage, "logits", True, required=False, max_abs=q.max_logit_error,
                  detail="max logit error (reported)")]


def _prompts(manifest: Manifest, prompts) -> list[list[int]]:
    if prompts is None:
        gen = torch.Generator().manual_seed(1234)
        return [torch.randint(0, manifest.vocab_size, (n,), generator=gen).tolist() for n in DEFAULT_PROMPT_LENGTHS]
    if not prompts:
        raise UserError("no prompts given: pass at least one prompt of token ids")
    checked = []
    for i, p in enumerate(prompts):
        try:
            checked.append(check_prompt(p, manifest.vocab_size))
        except RequestError as e:
            raise UserError(f"prompt {i}: {e}") from None
    return checked


def _fit_generation(manifest: Manifest, prompts, gen_tokens: int, report: VerifyReport) -> int:
    """Generation must fit the artifact's context: (block-padded) prompt + new tokens <= max_context."""
    longest = len(prefill_inputs(prompts, manifest.block_len, manifest.pad_token_id)[0][0])
    room = manifest.limits.max_context - longest
    if room < 1:
        raise UserError(f"a prompt of {longest} tokens leaves no room to generate within the artifact's max "
                        f"context of {manifest.limits.max_context} tokens: use shorter prompts")
    if gen_tokens > room:
        report.notes.append(f"generating {room} tokens instead of {gen_tokens}: the longest prompt ({longest} tokens "
                            f"padded) and the artifact's max context {manifest.limits.max_context} leave no more")
        return room
    return gen_tokens


def _unavailable(backend: str, manifest: Manifest, directory: Path) -> str | None:
    """Why `backend` cannot run this artifact here, or None."""
    if backend == "onnxruntime":
        return "the ONNX Runtime CPU provider has no bf16 MatMul kernel; verify an fp32 or fp16 export here" \
            if manifest.dtype == "bf16" else None
    if not manifest.engines:
        return f"the artifact has no TensorRT engines; build them with `blockrt build {directory}`"
    try:
        from .trt_lib import load_trt

        load_trt(next(iter(manifest.engines.values())).library)
    except MissingDependencyError as e:
        return str(e)
    if not torch.cuda.is_available():
        return "TensorRT engines run on an NVIDIA GPU and torch sees none here (torch.cuda.is_available() is False)"
    return None


# ------------------------------------------------------------------------------------------- steps

class _Pair:
    """Runs one graph on a backend engine and the fp32 reference step on the same inputs, and keeps
    the error statistics of each output group ("first output", "present.*") per stage."""

    def __init__(self, backend: str, manifest: Manifest, engines: dict, reference, device: torch.device):
        self.backend, self.manifest, self.engines, self.device = backend, manifest, engines, device
        self.steps = step_modules(reference, manifest.cache_io, positions=manifest.positions)
        self.dtype = SPEC_DTYPES[ONNX_DTYPE_NAMES[manifest.dtype]]
        self.stats: dict[tuple[str, str], list[float]] = {}  # (stage, output) -> [max abs, sum d^2, sum r^2]

    @torch.no_grad()
    def run(self, graph: str, stage: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run both on `inputs` (fp32 / int64, CPU); returns the reference outputs."""
        entry = self.manifest.graphs[graph]
        cast = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        reference = self.steps[graph](*[cast[t.name].to(inputs[t.name].dtype) for t in entry.inputs])
        feeds = {k: v.to(self.device) for k, v in cast.items()}
        num_new = self.engines[graph].new_rows(inputs["input_ids"])
        past = next(v for k, v in inputs.items() if k.startswith("past_key_values."))
        sizes = {"batch": inputs["input_ids"].shape[0], "total": past.shape[2] + num_new}
        outputs = {}
        for spec in entry.outputs:
            past_name = spec.name.replace("present.", "past_key_values.")
            if spec.name.startswith("present.") and self.manifest.cache_io == "inplace":
                feeds[past_name] = feeds[past_name].clone()  # in place: present aliases past
                outputs[spec.name] = feeds[past_name]
            else:
                shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
                outputs[spec.name] = torch.empty(shape, dtype=SPEC_DTYPES[spec.dtype], device=self.device)
        self.engines[graph].execute(feeds, outputs)
        got = [outputs[t.name] for t in entry.outputs]
        self._add(stage, entry.outputs[0].name, got[:1], reference[:1])
        self._add(stage, f"present.* ({len(got) - 1})", got[1:], reference[1:])
        return list(reference)

    def _add(self, stage: str, output: str, got, want) -> None:
        s = self.stats.setdefault((stage, output), [0.0, 0.0, 0.0])
        for a, b in zip(got, want):
            d = a.float().cpu() - b
            s[0] = max(s[0], float(d.abs().max()) if d.numel() else 0.0)
            s[1] += float(d.double().square().sum())
            s[2] += float(b.double().square().sum())

    def checks(self) -> list[Check]:
        fp8 = self.manifest.quantization is not None and self.manifest.quantization["mode"] == "fp8"
        limit = (FP8_REL_TOLERANCE if fp8 else REL_TOLERANCE)[self.manifest.dtype]
        out = []
        for (stage, output), (max_abs, d2, r2) in self.stats.items():
            rel = math.sqrt(d2) / math.sqrt(r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf)
            out.append(Check(self.backend, stage, output, rel < limit, max_abs=max_abs, rel=rel, limit=limit))
        return out


def _step_checks(backend, manifest: Manifest, engines, reference, prompts, device) -> list[Check]:
    pair = _Pair(backend, manifest, engines, reference, device)
    if manifest.kind == "block":
        _block_steps(pair, manifest, prompts)
    else:
        _vanilla_steps(pair, manifest, prompts)
    return pair.checks()


def _empty_caches(manifest: Manifest, graph: str, batch: int) -> dict[str, torch.Tensor]:
    """Zeroed in-place caches, or 0-row concat caches, for the graph's cache inputs."""
    specs = [t for t in manifest.graphs[graph].inputs if t.name.startswith("past_key_values.")]
    return {t.name: torch.zeros([batch if d == "batch" else 0 if d == "past" else d for d in t.shape]) for t in specs}


def _as_caches(manifest: Manifest, graph: str, presents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [t.name for t in manifest.graphs[graph].inputs if t.name.startswith("past_key_values.")]
    return dict(zip(names, presents))


def _block_steps(pair: _Pair, manifest: Manifest, prompts) -> None:
    L, B = manifest.block_len, len(prompts)
    concat = manifest.cache_io == "concat"
    ids, blocks = map(torch.tensor, prefill_inputs(prompts, L, manifest.pad_token_id))
    zero = torch.zeros(B, dtype=torch.long)
    inputs = {"input_ids": ids, "past_len": zero, "new_len": blocks, **_empty_caches(manifest, "block_decoder", B)}
    key_mask = (torch.arange(ids.shape[1] // L)[None] < blocks[:, None]).long()  # concat: valid rows
    if concat:
        inputs["attention_mask"] = key_mask
    prefix, *block_caches = pair.run("block_decoder", "block_decoder prefill", inputs)

    token_caches = _empty_caches(manifest, "token_decoder", B)
    ids, new_block = torch.zeros(B, 2, dtype=torch.long), []
    for k in range(L):  # the first step feeds the two prefix positions, then one token at a time
        local = torch.full((B,), local_position(k), dtype=torch.long)
        inputs = {"input_ids": ids, "prefix_embeds": prefix, "past_len": local, **token_caches}
        logits, *presents = pair.run("token_decoder", "token_decoder steps", inputs)
        token_caches = _as_caches(manifest, "token_decoder", presents)
        ids = logits.argmax(-1)[:, None]
        new_block.append(ids[:, 0])

    inputs = {"input_ids": torch.stack(new_block, dim=1), "past_len": blocks, "new_len": torch.ones_like(blocks),
              **_as_caches(manifest, "block_decoder", block_caches)}
    if concat:
        inputs["attention_mask"] = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    pair.run("block_decoder", "block_decoder decode", inputs)


def _vanilla_steps(pair: _Pair, manifest: Manifest, prompts) -> None:
    B = len(prompts)
    ids, new = map(torch.tensor, prefill_inputs(prompts, 1, manifest.pad_token_id))
    past = torch.zeros(B, dtype=torch.long)
    caches = _empty_caches(manifest, "decoder", B)
    key_mask = torch.zeros(B, 0, dtype=torch.long)
    for i in range(1 + DECODE_STEPS):
        inputs = {"input_ids": ids, "past_len": past, "new_len": new, **caches}
        if manifest.cache_io == "concat":
            key_mask = torch.cat([key_mask, (torch.arange(ids.shape[1])[None] < new[:, None]).long()], dim=1)
            inputs["attention_mask"] = key_mask
        logits, *presents = pair.run("decoder", "decoder prefill" if i == 0 else "decoder decode", inputs)
        caches = _as_caches(manifest, "decoder", presents)
        past, new, ids = past + new, torch.ones_like(new), logits.argmax(-1)[:, None]


# -------------------------------------------------------------------------------------- generation

def _generation_check(backend: str, directory: Path, manifest: Manifest, prompts, config: GenerationConfig,
                      expected: list[list[int]]) -> Check:
    from .model import Model

    model = Model.load(directory, backend=backend, verify_files=False)  # hashes were checked above
    got = [r.token_ids for r in model.generate(prompts, config)]
    differing = [(i, _first_difference(g, e)) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    total = sum(len(e) for e in expected)
    if differing:
        detail = "; ".join(f"prompt {i} differs from token {at}" for i, at in differing[:3])
    else:
        detail = f"{total} tokens identical"
    return Check(backend, f"generate ({len(prompts)} prompts, greedy)", f"tokens ({config.max_new_tokens} each)",
                 not differing, required=_tokens_required(manifest), detail=detail)


def _tokens_required(manifest: Manifest) -> bool:
    """Greedy tokens must match in fp32 / fp16, but not in bf16, nor with FP8 activations (one rounding
    that lands on the other side of an FP8 step between backends moves a value by 1/16 and can flip a
    near-tie)."""
    fp8 = manifest.quantization is not None and manifest.quantization["mode"] == "fp8"
    return TOKENS_REQUIRED[manifest.dtype] and not fp8


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"
