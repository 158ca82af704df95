"""ONNX export: a model, or a config with seeded random weights, becomes an artifact directory.

An artifact holds one ONNX graph per step module (`block_decoder.onnx` + `token_decoder.onnx`, or
`decoder.onnx`), `weights.safetensors` (the exported state_dict, in the export dtype: `blockrt
verify` and the PyTorch backend rebuild the model from it), an optional `tokenizer.json`, and
`manifest.json`, which lists every graph's I/O (exactly `graphs.contract.graph_io`), the limits,
and the SHA-256 of every file. Graphs whose weights pass ~2 GB keep them in `<graph>.onnx.data`.

The artifact is written into a hidden directory beside `out_dir` and renamed into place only after
every graph passed `graphs.checks.check_graph`: a failed export leaves no artifact that looks valid.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim

from blockrt.errors import UserError
from blockrt.generation import POSITIONS
from blockrt.graphs.checks import check_graph
from blockrt.graphs.qdq import pack_int4
from blockrt.graphs.contract import CACHE_IO_MODES, DTYPES, OPSET, TensorSpec, graph_io
from blockrt.graphs.manifest import (MANIFEST_NAME, TOKENIZER_NAME, WEIGHTS_NAME, FileEntry, GraphEntry, Limits,
                                     Manifest, sha256_file)
from blockrt.tokenizer import load_tokenizer

from .config import TORCH_DTYPES, BlockConfig, ModelConfig, VanillaConfig
from .model import BlockTransformer, GPTNeoXLM, build_model, init_random
from .presets import get_preset
from .qlinear import qdq_translations
from .quantize import (DEFAULT_GROUP_SIZE, QuantConfig, calibration_sequences, quantize_model, quantized_layers,
                       save_quantized)
from .quantize import check_options as quantize_options
from .steps import step_modules

log = logging.getLogger(__name__)

MAX_BATCH = 65536
MAX_CONTEXT = 1 << 20
# Weights above this many bytes go to an external data file: a protobuf cannot exceed 2 GB.
EXTERNAL_DATA_THRESHOLD = (1 << 31) - (1 << 27)

# Sizes of the example inputs that are traced: all different and >= 2, so that torch.export keeps
# every axis symbolic (a size of 0 or 1, or two equal sizes, could be specialised or unified).
_EXAMPLE = {"batch": 3, "new_blocks": 2, "new_tokens": 5, "past": 7, "token_new": 2, "token_past": 5}


def export(config_or_model: ModelConfig | nn.Module | str, out_dir: str | os.PathLike, *, dtype: str = "fp32",
           max_batch: int = 8, max_context: int = 2048, cache_io: str = "inplace", seed: int = 0,
           source: str | None = None, tokenizer: str | os.PathLike | None = None, force: bool = False,
           positions: str = "forward", quantize: str | None = None, kv_cache_dtype: str | None = None,
           group_size: int = DEFAULT_GROUP_SIZE, calibration_prompts: list | None = None,
           calibration_source: str = "calibration prompts") -> Manifest:
    """Export a model to ONNX graphs + manifest in `out_dir`; returns the manifest.

    `config_or_model`: a BlockTransformer / GPTNeoXLM, a ModelConfig or a preset name (random
    weights from `seed`). `max_batch` / `max_context` bound the sequences a runtime may run (the
    in-place caches are sized by them). `cache_io`: "inplace" (TensorScatter into static caches)
    or "concat" (growing caches). `positions`: the token decoder's rotary positions, "forward"
    (training) or "official-generate" (those of the official generate(); recorded in the
    manifest). An existing artifact at `out_dir` is replaced; any other non-empty directory only
    with `force=True`. `quantize`: "fp8", "int8-wo" or "int4-wo" (see `exporter.quantize`); fp8
    calibrates on `calibration_prompts` (token-id lists, or text for the `tokenizer`; described as
    `calibration_source` in the manifest) or built-in random ids."""
    start = time.perf_counter()
    cfg = _config(config_or_model)
    _check_options(cfg, dtype, cache_io, max_batch, max_context, positions)
    quantize_options(quantize, kv_cache_dtype, group_size, calibration_prompts is not None)
    out = Path(out_dir)
    _check_out_dir(out, force)
    tokenizer_path = _check_tokenizer(tokenizer, cfg.vocab_size)
    if isinstance(config_or_model, nn.Module):
        model, src = config_or_model, ""
        if next(model.parameters()).dtype != TORCH_DTYPES[dtype]:  # never change the caller's weights
            model = copy.deepcopy(model)
    else:
        model = init_random(build_model(cfg), seed)
        src = f"preset {config_or_model}" if isinstance(config_or_model, str) else "config"
        src += f" (random weights, seed {seed})"
    model = model.to(TORCH_DTYPES[dtype]).eval()
    limits = Limits.for_model(cfg, max_batch, max_context)
    reference, quant = model, None
    if quantize is not None:
        model, quant = _quantize(model, quantize, group_size, calibration_prompts, calibration_source, tokenizer_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log.info("saving %s (%s) ...", WEIGHTS_NAME, dtype)
        assets = {"weights": _save_weights(reference, tmp)}
        if quant is not None:
            path = save_quantized(model, tmp, quant)
            assets["quantized"] = FileEntry(path.name, sha256_file(path))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
            assets["tokenizer"] = FileEntry(TOKENIZER_NAME, sha256_file(tmp / TOKENIZER_NAME))
        graphs = {}
        for name, step in step_modules(model, cache_io, positions=positions).items():
            graphs[name] = _export_graph(step.eval(), name, cfg, dtype, cache_io, limits, tmp)
        manifest = Manifest.for_model(cfg, dtype=dtype, cache_io=cache_io, limits=limits, graphs=graphs,
                                      assets=assets, tokenizer=TOKENIZER_NAME if tokenizer_path is not None else None,
                                      source=source if source is not None else src, positions=positions,
                                      quantization=None if quant is None else quant.to_dict())
        manifest.save(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("artifact ready: %s (%s, %s caches, %d files, %.1f MB) in %.1f s", out, dtype, cache_io,
             len(manifest.files()) + 1, size / 1e6, time.perf_counter() - start)
    return manifest


def _config(config_or_model) -> ModelConfig:
    if isinstance(config_or_model, str):
        return get_preset(config_or_model)
    if isinstance(config_or_model, (BlockTransformer, GPTNeoXLM)):
        return config_or_model.config
    if isinstance(config_or_model, (BlockConfig, VanillaConfig)):
        return config_or_model
    raise UserError(f"cannot export {type(config_or_model).__name__} {config_or_model!r:.80}: expected a "
                    f"BlockTransformer or GPTNeoXLM, a BlockConfig or VanillaConfig, or a preset name")


def _check_options(cfg: ModelConfig, dtype: str, cache_io: str, max_batch: int, max_context: int,
                   positions: str) -> None:
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}: expected one of {', '.join(POSITIONS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if cache_io not in CACHE_IO_MODES:
        raise UserError(f"unknown cache I/O mode {cache_io!r}: expected one of {', '.join(CACHE_IO_MODES)}")
    if not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise UserError(f"max batch {max_batch!r} is out of range: expected an integer from 1 to {MAX_BATCH}")
    L = cfg.block_len
    if not isinstance(max_context, int) or not L <= max_context <= MAX_CONTEXT:
        what = f"the block length {L}" if cfg.kind == "block" else "1"
        raise UserError(f"max context {max_context!r} is out of range: expected an integer from {what} "
                        f"to {MAX_CONTEXT} (tokens of prompt + generation per sequence)")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file() and not force:
        raise UserError(f"--out {out} is not empty and is not a blockrt artifact: choose a new or empty "
                        f"directory, or pass --force to replace its contents")


def _check_tokenizer(tokenizer, vocab_size: int) -> Path | None:
    """The tokenizer.json to copy in; refused when it is unreadable or has ids the model cannot embed."""
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise UserError(f"--tokenizer {tokenizer}: no such file (expected a Hugging Face tokenizer.json, or a "
                        f"directory holding one)")
    size = load_tokenizer(path, "--tokenizer").get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise UserError(f"--tokenizer {path} has {size} tokens, but the model's vocabulary has {vocab_size}: ids "
                        f"{vocab_size}..{size - 1} ({size - vocab_size} tokens) would be outside the model's "
                        f"embeddings; use the tokenizer the model was trained with")
    return path


def _remove_stale_temporaries(out: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` directories that earlier exports to `out` left behind
    when they were killed (SIGKILL, power loss); those of a running export (its pid is alive) stay."""
    for path in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        parts = path.name[len(out.name) + 2:].split("-")  # "tmp", pid, random (older exports: no pid)
        if len(parts) == 3 and parts[1].isdigit() and _alive(int(parts[1])):
            continue
        log.info("removing %s, left behind by an export that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _quantize(model: nn.Module, mode: str, group_size: int, prompts, source: str, tokenizer_path: Path | None):
    start = time.perf_counter()
    tokenizer = None
    if prompts is not None and tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    sequences, source = calibration_sequences(model.config, prompts, tokenizer, source)
    qmodel = quantize_model(model, mode, group_size=group_size, sequences=sequences)
    quant = QuantConfig(mode, group_size if mode == "int4-wo" else 0, None,
                        source if mode == "fp8" else "none (weight-only)", len(quantized_layers(model, mode)))
    log.info("quantized %d layers to %s in %.1f s", quant.layers, mode, time.perf_counter() - start)
    return qmodel, quant


def _save_weights(model: nn.Module, directory: Path) -> FileEntry:
    path = directory / WEIGHTS_NAME
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it private; the graphs beside it are world-readable
    return FileEntry(WEIGHTS_NAME, sha256_file(path))


def _export_graph(step: nn.Module, name: str, cfg: ModelConfig, dtype: str, cache_io: str, limits: Limits,
                  directory: Path) -> GraphEntry:
    start = time.perf_counter()
    inputs, outputs = graph_io(cfg, name, cache_io, dtype, limits.cache_len)
    args, dynamic = _example_inputs(name, cfg, inputs, dtype, limits)
    from onnxscript import values

    log.info("%s: tracing and converting to ONNX (torch.export + ONNX optimizer)...", name)
    with _quiet_torch_onnx():
        program = torch.onnx.export(
            step, args, None, dynamo=True, opset_version=OPSET, verbose=False, optimize=True,
            input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            dynamic_shapes=(*dynamic[:3], tuple(dynamic[3:])),  # (a, b, c, *caches) of the step's forward
            custom_translation_table={torch.ops.blockrt.kv_write.default: _tensor_scatter(values.Opset("", OPSET)),
                                      **qdq_translations(values.Opset("", OPSET))})
    program.rename_axes(_axis_names(program.model, name, inputs, outputs))
    pack_int4(program.model)
    path = directory / f"{name}.onnx"
    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                       if v.const_value is not None)
    external = []
    log.info("%s: converted in %.1f s; saving %s (%.1f MB of weights)...", name, time.perf_counter() - start,
             path.name, weight_bytes / 1e6)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data = f"{name}.onnx.data"
        ir.save(program.model, path, external_data=data)
        external.append(FileEntry(data, sha256_file(directory / data)))
    else:
        ir.save(program.model, path)
    entry = GraphEntry(name, FileEntry(path.name, sha256_file(path)), inputs, outputs, external)
    log.info("%s: checking %s (ONNX checker, shape inference, ops, I/O)...", name, path.name)
    check_graph(path, entry)
    log.info("%s: exported %s%s in %.1f s", name, path.name, " + external data" if external else "",
             time.perf_counter() - start)
    return entry


def _tensor_scatter(op):
    def kv_write(cache, update, write_index):  # blockrt::kv_write -> in-place KV update in TensorRT
        return op.TensorScatter(cache, update, write_index, axis=-2)

    return kv_write


def _example_inputs(graph: str, cfg: ModelConfig, inputs: list[TensorSpec], dtype: str, limits: Limits):
    """Traced example tensors and their torch.export dynamic shapes, from the contract's specs."""
    token = graph == "token_decoder"
    L = cfg.block_len
    sizes = {"batch": _EXAMPLE["batch"], "past": _EXAMPLE["token_past" if token else "past"]}
    batch = _dim("batch", 1, limits.max_batch, sizes["batch"])
    if graph == "block_decoder":
        sizes["new_tokens"] = L * _EXAMPLE["new_blocks"]
        new = L * _dim("new_blocks", 1, limits.cache_len, _EXAMPLE["new_blocks"])
        past = _dim("past", 0, limits.cache_len - 1, sizes["past"])
    elif token:
        sizes["new_tokens"] = _EXAMPLE["token_new"]
        new = _dim("new_tokens", 1, 2, sizes["new_tokens"])
        past = _dim("past", 0, L, sizes["past"])
    else:
        sizes["new_tokens"] = _EXAMPLE["new_tokens"]
        new = _dim("new_tokens", 1, limits.cache_len, sizes["new_tokens"])
        past = _dim("past", 0, limits.cache_len - 1, sizes["past"])
    num_new = sizes["new_tokens"] // L if graph == "block_decoder" else sizes["new_tokens"]
    sizes["total"] = sizes["past"] + num_new
    dims = {"batch": batch, "new_tokens": new, "past": past, "total": Dim.DYNAMIC}  # total = past + new
    gen = torch.Generator().manual_seed(0)
    args, dynamic = [], []
    for spec in inputs:
        shape = [sizes[s] if isinstance(s, str) else s for s in spec.shape]
        if spec.name == "input_ids":
            t = torch.randint(0, cfg.vocab_size, shape, generator=gen)
        elif spec.name == "new_len":
            t = torch.full(shape, num_new, dtype=torch.int64)
        elif spec.dtype == "int64":  # past_len, attention_mask
            t = torch.zeros(shape, dtype=torch.int64) if spec.name == "past_len" else torch.ones(shape, dtype=torch.int64)
        else:
            t = torch.randn(shape, generator=gen).to(TORCH_DTYPES[dtype])
        args.append(t)
        dynamic.append({axis: dims[s] for axis, s in spec.dynamic_axes.items()})
    return tuple(args), dynamic


def _dim(name: str, lo: int, hi: int, example: int) -> Dim:
    return Dim(name, min=lo, max=max(hi, example))


def _axis_names(model: ir.Model, graph: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, str]:
    """Exported symbol -> contract axis name, for every dynamic axis of the graph's I/O; an axis that
    tracing froze to a number, or two contract axes that became one symbol, is an error."""
    mapping: dict[str, str] = {}
    values = list(model.graph.inputs) + list(model.graph.outputs)
    if [v.name for v in values] != [t.name for t in inputs + outputs]:
        raise RuntimeError(f"exported {graph} has I/O {[v.name for v in values]}, expected the contract's "
                           f"{[t.name for t in inputs + outputs]}")
    for value, spec in zip(values, inputs + outputs):
        for axis, want in spec.dynamic_axes.items():
            dim = value.shape[axis]
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                raise RuntimeError(f"exporting {graph}: axis {axis} ({want}) of {spec.name} was frozen to {dim}")
            if mapping.setdefault(dim.value, want) != want:
                raise RuntimeError(f"exporting {graph}: axes {mapping[dim.value]} and {want} became one symbol "
                                   f"{dim.value!r}")
    return mapping


@contextlib.contextmanager
def _quiet_torch_onnx():
    """The exporter's libraries log every optimizer pass and optional-dependency note, and warn
    about axis renaming: none of it is for our users (failures still raise)."""
    loggers = {logging.getLogger(name): level for name, level in
               (("torch.onnx", logging.ERROR), ("onnxscript", logging.WARNING), ("onnx_ir", logging.WARNING))}
    saved = {logger: logger.level for logger in loggers}
    try:
        for logger, level in loggers.items():
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished artifact into place; whatever was at `out` is removed only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
