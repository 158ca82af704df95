"""`blockrt build`: compile every ONNX graph of an artifact into a TensorRT engine.

Each graph is parsed with TensorRT's ONNX parser into a strongly typed network (the graph's own
dtypes decide precision), gets one optimization profile whose ranges come from the manifest's
limits (`engine_profiles`), and is built; full TensorRT keeps a timing cache in the artifact
directory so rebuilds skip kernel timing (TensorRT-RTX times nothing at build time). The engines
are written beside the graphs and recorded in manifest.json with the library, its version
and the target GPU ("portable" for TensorRT-RTX), which `check_engine_compatible` compares when an
engine is loaded. Engines replace earlier ones only once every graph has built.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from types import ModuleType

from blockrt.errors import UserError
from blockrt.graphs.manifest import EngineEntry, FileEntry, Manifest, sha256_file

from .trt_lib import PORTABLE, TrtLib, current_gpu, library_of, load_trt, portable_capabilities

log = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"
_HARMLESS = re.compile(r"Make sure input .* has Int64 binding")  # the parser's note on int64 inputs


class BuildError(UserError):
    """TensorRT could not parse or build a graph; the message carries TensorRT's own errors."""


def build_engines(artifact_dir: str | os.PathLike, backend: str = "auto", opt_batch: int | None = None,
                  opt_context: int | None = None, timing_cache: str | os.PathLike | None = None) -> Manifest:
    """Build `<graph>.engine` for every graph of the artifact and record them in its manifest.

    `backend`: "tensorrt", "tensorrt-rtx" or "auto". `opt_batch` / `opt_context` (tokens of
    context) are the shapes TensorRT tunes kernels for (default: max batch, half the max context);
    every shape within the export limits still runs. `timing_cache`: a file reused across builds
    of full TensorRT (default: timing.cache in the artifact directory)."""
    directory = Path(artifact_dir)
    manifest = Manifest.load(directory)
    lib = load_trt(backend)
    device, capability = _target(lib)
    profiles = engine_profiles(manifest, opt_batch, opt_context)
    cache_path = Path(timing_cache) if timing_cache is not None else directory / TIMING_CACHE_NAME
    trt = lib.module
    logger = _logger(trt)
    builder = trt.Builder(logger)
    cache = None  # TensorRT-RTX compiles ahead of time without timing kernels: nothing to cache
    if not lib.portable:
        cache = _load_timing_cache(builder, cache_path)
    elif timing_cache is not None:
        log.warning("ignoring --timing-cache %s: %s does not time kernels at build time", timing_cache, lib.name)
    log.info("building %d engine(s) with %s %s for %s", len(manifest.graphs), lib.name, lib.version,
             device if device == PORTABLE else f"{device} (compute capability {capability})")
    engines = {}
    try:
        for name, graph in manifest.graphs.items():
            start = time.perf_counter()
            plan = _build(lib, builder, logger, directory / graph.file.path, profiles[name], cache)
            tmp = directory / f".{name}.engine.tmp"
            tmp.write_bytes(plan)
            engines[name] = (tmp, EngineEntry(name, FileEntry(f"{name}.engine", ""), lib.name, lib.version, device,
                                              capability, profiles[name]))
            log.info("built %s.engine (%.1f MB) in %.1f s", name, len(plan) / 1e6, time.perf_counter() - start)
    except BaseException:
        for tmp, _ in engines.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, (tmp, entry) in engines.items():
        os.replace(tmp, directory / entry.file.path)
        entry.file.sha256 = sha256_file(directory / entry.file.path)
        manifest.engines[name] = entry
    manifest.save(directory)
    if cache is not None:
        cache_path.write_bytes(memoryview(cache.serialize()))
    return manifest


def engine_profiles(manifest: Manifest, opt_batch: int | None = None,
                    opt_context: int | None = None) -> dict[str, dict[str, dict[str, list[int]]]]:
    """graph -> dynamic input -> {"min", "opt", "max"} shapes, from the manifest's limits.

    batch: 1..max_batch. new_tokens: block_decoder 1 block .. cache_len blocks (prefill), tuned
    for one block (decode); token_decoder 1..2; decoder 1..max_context, tuned for 1. Concat graphs
    also get past 0..capacity-1 and total (attention_mask) 1..capacity, tuned for opt_context."""
    lim, L = manifest.limits, manifest.block_len
    opt_batch = lim.max_batch if opt_batch is None else opt_batch
    opt_context = max(1, lim.max_context // 2) if opt_context is None else opt_context
    if not isinstance(opt_batch, int) or not 1 <= opt_batch <= lim.max_batch:
        raise UserError(f"--opt-batch {opt_batch} is outside the exported batch range 1..{lim.max_batch}")
    if not isinstance(opt_context, int) or not 1 <= opt_context <= lim.max_context:
        raise UserError(f"--opt-context {opt_context} is outside the exported context range 1..{lim.max_context}")
    out = {}
    for name, graph in manifest.graphs.items():
        if name == "token_decoder":  # local positions: [prefix0, prefix1] first, then one token per step
            axes = {"new_tokens": (1, 1, 2), "past": (0, min(2, L), L)}
        else:
            step = L if name == "block_decoder" else 1  # tokens per cache row
            past = min(math.ceil(opt_context / step), lim.cache_len - 1)
            axes = {"new_tokens": (step, step, lim.cache_len * step), "past": (0, past, lim.cache_len - 1),
                    "total": (1, past + 1, lim.cache_len)}
        axes["batch"] = (1, opt_batch, lim.max_batch)
        out[name] = {t.name: {k: [axes[d][i] if isinstance(d, str) else d for d in t.shape]
                              for i, k in enumerate(("min", "opt", "max"))}
                     for t in graph.inputs if t.dynamic_axes}
    return out


def check_engine_compatible(manifest: Manifest, entry: EngineEntry, trt: ModuleType | TrtLib,
                            directory: str | os.PathLike | None = None) -> None:
    """Refuse an engine that the loaded TensorRT (module or TrtLib) or this GPU cannot run, saying
    how to rebuild it."""
    lib = trt if isinstance(trt, TrtLib) else library_of(trt)
    where = directory if directory is not None else "DIR"
    rebuild = f"rebuild the engines here with `blockrt build {where} --backend {lib.name}`"
    built = f"{entry.file.path} was built with {entry.library} {entry.library_version}"
    if entry.library != lib.name or entry.library_version != lib.version:
        raise UserError(f"{built}, but this process loaded {lib.name} {lib.version}; {rebuild}")
    gpu = current_gpu()
    if gpu is None:
        return
    name, capability = gpu
    if entry.compute_capability == PORTABLE:
        supported = portable_capabilities(lib)
        if capability not in supported:
            raise UserError(f"{built} (portable), which does not run on {name} (compute capability {capability}; "
                            f"{lib.name} supports {', '.join(supported)}): install TensorRT with "
                            f"pip install 'blockrt[trt]' and run `blockrt build {where} --backend tensorrt`")
    elif entry.compute_capability != capability:
        raise UserError(f"{built} for {entry.device} (compute capability {entry.compute_capability}), but this "
                        f"GPU is {name} (compute capability {capability}); {rebuild}")
    elif entry.device != name:
        log.warning("%s was built on %s and runs on %s: same compute capability, but rebuilding may be faster",
                    entry.file.path, entry.device, name)


def _target(lib: TrtLib) -> tuple[str, str]:
    if lib.portable:
        return PORTABLE, PORTABLE
    gpu = current_gpu()
    if gpu is None:
        raise UserError("TensorRT builds engines for the GPU it runs on, and no CUDA GPU is visible here: build on "
                        "the deployment GPU, or use --backend tensorrt-rtx for portable engines")
    return gpu


def _build(lib: TrtLib, builder, logger, onnx_path: Path, profile: dict, cache) -> bytes:
    trt = lib.module
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    logger.errors.clear()
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        details = "; ".join(f"node '{e.node_name()}' ({e.node_operator()}): {e.desc()}" if e.node_name() else e.desc()
                            for e in errors)
        raise BuildError(f"{lib.name} {lib.version} cannot parse {onnx_path}: {details or 'no details'}")
    _allow_attention_decomposition(trt, network)
    config = builder.create_builder_config()
    if cache is not None:
        config.set_timing_cache(cache, False)
    monitor = _progress(trt, onnx_path.stem) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:  # `monitor` stays referenced until the build returns
        config.progress_monitor = monitor
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name in profile:
            shapes = profile[name]
            opt.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{lib.name} {lib.version} could not build an engine from {onnx_path}: "
                         f"{' | '.join(logger.errors) or 'see the TensorRT log above'}")
    return bytes(memoryview(plan))


def _allow_attention_decomposition(trt, network) -> None:
    """Let TensorRT decompose attention into several kernels where no fused kernel exists (fp32
    graphs: TensorRT-RTX 1.7 fails their build otherwise); fused kernels are still used where they
    exist (fp16 graphs build without this)."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:
        return
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # TensorRT's Python way to downcast a layer
            layer.attention.decomposable = True


def _load_timing_cache(builder, path: Path):
    config = builder.create_builder_config()
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # unreadable (another TensorRT version, or corrupt): start afresh
        log.warning("ignoring timing cache %s: this TensorRT cannot read it", path)
        cache = config.create_timing_cache(b"")
    return cache


def _logger(trt):
    """A TensorRT logger that forwards to Python logging and keeps the errors of the current build."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == int(trt.ILogger.Severity.WARNING) and not _HARMLESS.search(msg):
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def _progress(trt, graph: str):
    """Logs the builder's top-level phases (info) and the nested ones (debug)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            log.log(logging.DEBUG if parent_phase else logging.INFO, "%s: %s ...", graph, phase_name)

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            seconds = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            log.debug("%s: %s done in %.1f s", graph, phase_name, seconds)

    return Progress()
