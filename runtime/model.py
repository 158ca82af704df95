"""The public runtime API: `Model.load(artifact_dir, backend=...)`, `model.generate(prompts)`,
`model.stream(prompts)` and, for servers, `model.generator()`.

    from blockrt.runtime import Model, GenerationConfig
    model = Model.load("artifacts/tiny", backend="onnxruntime")
    for r in model.generate([[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=32)):
        print(r.token_ids, r.finish_reason)

Block and vanilla artifacts work the same. More prompts than `max_batch` are queued and run as
rows free up (continuous batching); each prompt's output is independent of its neighbours. Seeds
are per request (see `blockrt.generation`): pass one `GenerationConfig` per prompt to give prompts
of one call different seeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from blockrt.errors import UserError
from blockrt.generation import POSITIONS, GenerationConfig
from blockrt.graphs.contract import graph_io, graph_names
from blockrt.graphs.manifest import FileEntry, GraphEntry, Limits, Manifest
from blockrt.tokenizer import load_tokenizer

from .engine import check_backend, load_engines, pick_backend
from .generator import Generator, Request, collector_off_the_heap

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop id or EOS, included in token_ids), "length", "cancelled"
    text: str | None  # decoded token_ids, when the artifact has a tokenizer
    time_to_first_token_s: float | None
    latency_s: float


@dataclass
class StreamChunk:
    index: int  # which prompt
    token_ids: list[int]  # new tokens since the last chunk of this prompt
    text: str | None
    finished: bool
    finish_reason: str | None


class Model:
    def __init__(self, manifest: Manifest, engines: dict, device: torch.device, max_batch: int,
                 directory: Path | None = None, tokenizer=None, pad_rows: bool = False, backend: str = "torch"):
        self.manifest, self.engines, self.device, self.backend = manifest, engines, device, backend
        self.max_batch, self.directory, self.tokenizer = max_batch, directory, tokenizer
        self.config = manifest.model_config
        self._pad_rows = pad_rows
        self._generator: Generator | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
             max_batch: int | None = None, cuda_graphs: bool = True, verify_files: bool = True,
             compile: bool | None = None) -> "Model":
        """Open an artifact directory written by `blockrt export` (and `blockrt build` for TensorRT).
        `backend`: "torch", "onnxruntime", "tensorrt", or "auto" (`pick_backend`; `model.backend`
        says which). PyTorch backend: `compile` runs the decode steps compiled by TorchInductor inside
        the CUDA graphs (README "Compiled fast path"); None (default) compiles where that runs (CUDA
        with Triton) and runs them eagerly elsewhere, False always eagerly."""
        if backend != "auto":
            check_backend(backend)
        directory = Path(artifact_dir)
        manifest = Manifest.load(directory, verify_hashes=verify_files)
        if backend == "auto":
            backend = pick_backend(manifest)
        dev = _pick_device(backend, device)
        max_batch = _check_batch(max_batch, manifest)
        options = {"cuda_graphs": cuda_graphs, "compile": compile} if backend == "torch" else {}
        engines = load_engines(manifest, directory, backend, dev, **options)
        tokenizer = load_tokenizer(directory / manifest.tokenizer, "the artifact's tokenizer") if manifest.tokenizer else None
        return cls(manifest, engines, dev, max_batch, directory, tokenizer,
                   pad_rows=backend == "torch" and dev.type == "cuda" and cuda_graphs, backend=backend)

    @classmethod
    def from_torch(cls, model: torch.nn.Module, *, dtype: str = "bf16", max_batch: int = 8, max_context: int = 2048,
                   device: str | None = None, cuda_graphs: bool = True, compile: bool | None = None, tokenizer=None,
                   positions: str = "forward", kv_cache_dtype: str | None = None) -> "Model":
        """Run a PyTorch model (e.g. a preset with random weights) on the PyTorch engine without
        exporting it first: what `blockrt bench PRESET` uses. `positions` as in `export`; `compile`
        as for `load`. `model` is not changed: the engine builds modules of its own that use its
        tensors (the very same tensors where dtype and device already match, so no memory is
        copied; cast copies otherwise). `kv_cache_dtype="fp8"`: FP8 block decoder caches (the
        model must have had `runtime.fp8_kv.enable_fp8_kv_cache`)."""
        from .torch_engine import load_torch_engines

        manifest = describe(model.config, dtype=dtype, cache_io="inplace", max_batch=max_batch, max_context=max_context,
                            positions=positions, kv_cache_dtype=kv_cache_dtype)
        dev = _pick_device("torch", device)
        engines = load_torch_engines(manifest, None, dev, model=model, cuda_graphs=cuda_graphs, compile=compile)
        return cls(manifest, engines, dev, max_batch, None, tokenizer, pad_rows=dev.type == "cuda" and cuda_graphs)

    # ------------------------------------------------------------------ generation
    def generator(self) -> Generator:
        """The model's batch loop (one per model: it owns the device buffers)."""
        if self._generator is None:
            self._generator = Generator(self.manifest, self.engines, self.max_batch, self.device, pad_rows=self._pad_rows)
        return self._generator

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids); `config` is one for all, or one per prompt."""
        with collector_off_the_heap():  # submission and results too: they allocate per request
            requests, ids = self._submit(prompts, config)
            gen = self.generator()
            try:
                while gen.has_work:
                    gen.step()
            except BaseException:
                gen.reset()
                raise
            return [self._result(r, p) for r, p in zip(requests, ids)]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               config: GenerationConfig | Sequence[GenerationConfig] | None = None) -> Iterator[StreamChunk]:
        """Yield new tokens of each prompt as its blocks complete (`config` as for `generate`)."""
        with collector_off_the_heap():
            requests, _ = self._submit(prompts, config)
            index = {r.id: i for i, r in enumerate(requests)}
            gen = self.generator()
            try:
                while gen.has_work:
                    for event in gen.step():
                        text = self.decode(event.tokens) if self.tokenizer else None
                        yield StreamChunk(index[event.request.id], event.tokens, text, event.finished,
                                          event.request.finish_reason)
            except BaseException:
                gen.reset()
                raise

    def _submit(self, prompts, config) -> tuple[list[Request], list[list[int]]]:
        batch = self._normalize(prompts)
        if config is None or isinstance(config, GenerationConfig):
            configs = [config or GenerationConfig()] * len(batch)
        else:
            configs = list(config)
            if len(configs) != len(batch) or not all(isinstance(c, GenerationConfig) for c in configs):
                raise UserError(f"config must be one GenerationConfig or one per prompt ({len(batch)}), "
                                f"got {len(configs)} item(s)")
        gen = self.generator()
        if gen.has_work:
            raise UserError("this model is busy with another generate/stream call; finish it first "
                            "(or use model.generator() directly for concurrent requests)")
        requests, queued = [], 0  # prompt positions queued since the last admission
        try:
            for i, (prompt, c) in enumerate(zip(batch, configs)):
                batch[i] = ids = list(prompt)  # the result's copy
                requests.append(gen.add(ids, c))
                queued += -(-len(ids) // gen.L)
                if queued >= gen.prefill_budget:  # a prefill group's worth: the GPU runs it while the
                    gen.admit()  # host checks the next prompts (a refused prompt still undoes them all)
                    queued = 0
        except UserError as e:
            for r in requests:
                gen.cancel(r)
            gen.reset()
            raise UserError(f"prompt {i}: {e}") from None
        return requests, batch

    def _normalize(self, prompts) -> list[Sequence[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise UserError("no prompts given: pass a prompt (text or token ids) or a list of prompts")
        return [self.encode(p) if isinstance(p, str) else p for p in prompts]  # copied while submitted

    def _result(self, r: Request, prompt: list[int]) -> GenerationResult:
        ttft = None if r.first_token_at is None else r.first_token_at - r.submitted_at
        latency = (r.finished_at or r.submitted_at) - r.submitted_at
        text = self.decode(r.tokens) if self.tokenizer else None
        return GenerationResult(prompt, list(r.tokens), r.finish_reason or "length", text, ttft, latency)

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UserError("this artifact has no tokenizer: pass token ids, or re-export with --tokenizer tokenizer.json")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise UserError("this artifact has no tokenizer to decode with")
        return self.tokenizer.decode(ids)


def describe(config, *, dtype: str, cache_io: str, max_batch: int, max_context: int,
             positions: str = "forward", kv_cache_dtype: str | None = None) -> Manifest:
    """A manifest for a model that has no files (yet): graph I/O and limits."""
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}: expected one of {', '.join(POSITIONS)}")
    limits = Limits.for_model(config, max_batch, max_context)
    graphs = {}
    for name in graph_names(config.kind):
        inputs, outputs = graph_io(config, name, cache_io, dtype, limits.cache_len, kv_cache_dtype)
        graphs[name] = GraphEntry(name, FileEntry(f"{name}.onnx", ""), inputs, outputs)
    return Manifest.for_model(config, dtype=dtype, cache_io=cache_io, limits=limits, graphs=graphs, positions=positions)


def _pick_device(backend: str, device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if backend in ("torch", "tensorrt") and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is available; use device='cpu'")
    return dev


def _check_batch(max_batch: int | None, manifest: Manifest) -> int:
    limit = manifest.limits.max_batch
    if max_batch is None:
        return limit
    if not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if max_batch > limit:
        raise UserError(f"max_batch {max_batch} is above the artifact's limit of {limit} (its engine profiles "
                        f"and buffers are sized for that); re-export with --max-batch {max_batch}")
    return max_batch
