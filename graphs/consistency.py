"""Does a manifest agree with itself, with the graph contract, and with the files it describes?

`check_manifest` needs no files: the model config parses, the top-level fields (kind, block length,
vocabulary, special ids, dtype, cache I/O, opset, limits) agree with it, every graph's inputs and
outputs are exactly `graph_io` of that config, and the file entries are plain names inside the
artifact. `check_files` reads what is cheap to read: each ONNX file's declared inputs and outputs
(without weights) and the safetensors header of the saved weights. Every problem is an
`ArtifactError` naming the field or file, so a damaged manifest never reaches a backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from blockrt.backends import TENSORRT_LIBRARIES
from blockrt.generation import POSITIONS

from .checks import compare_io, graph_io_specs, load_graph
from .contract import CACHE_IO_MODES, DTYPES, OPSET, graph_io, graph_names
from .qdq import QUANT_MODES
from .manifest import WEIGHTS_NAME, ArtifactError, FileEntry, Limits, Manifest

ASSETS = ("weights", "tokenizer", "quantized")


def check_manifest(manifest: Manifest, where: str | os.PathLike = "manifest.json") -> None:
    """Raise ArtifactError naming the first field of `manifest` that contradicts the others."""
    from blockrt.exporter.config import config_from_dict

    def fail(what: str) -> None:
        raise ArtifactError(f"{where}: {what}; re-export the model")

    if manifest.kind not in ("block", "vanilla"):
        fail(f"kind {manifest.kind!r} is neither 'block' nor 'vanilla'")
    try:
        config = config_from_dict(manifest.model)
    except (ValueError, TypeError, AttributeError) as e:
        fail(f"the model config is invalid ({e})")
    for field, value in (("kind", config.kind), ("block_len", config.block_len), ("vocab_size", config.vocab_size),
                         ("eos_token_id", config.eos_token_id), ("pad_token_id", config.pad_token_id)):
        if getattr(manifest, field) != value:
            fail(f"{field} is {getattr(manifest, field)!r}, but the model config says {value!r}")
    if manifest.dtype not in DTYPES:
        fail(f"dtype {manifest.dtype!r} is not one of {', '.join(DTYPES)}")
    if manifest.cache_io not in CACHE_IO_MODES:
        fail(f"cache_io {manifest.cache_io!r} is not one of {', '.join(CACHE_IO_MODES)}")
    if manifest.positions not in POSITIONS:
        fail(f"positions {manifest.positions!r} is not one of {', '.join(POSITIONS)}")
    if manifest.opset != OPSET:
        fail(f"opset {manifest.opset!r} is not {OPSET}")
    lim = manifest.limits
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lim.max_batch, lim.max_context, lim.cache_len)):
        fail(f"limits {lim} are not integers")
    if lim.max_batch < 1 or lim.max_context < config.block_len:
        fail(f"limits max_batch {lim.max_batch} / max_context {lim.max_context} are out of range")
    expected_rows = Limits.for_model(config, lim.max_batch, lim.max_context).cache_len
    if lim.cache_len != expected_rows:
        fail(f"limits.cache_len is {lim.cache_len}, but max_context {lim.max_context} needs {expected_rows} cache rows")
    if sorted(manifest.graphs) != sorted(graph_names(manifest.kind)):
        fail(f"graphs {sorted(manifest.graphs)} are not the {manifest.kind} model's {list(graph_names(manifest.kind))}")
    for name, entry in manifest.graphs.items():
        inputs, outputs = graph_io(config, name, manifest.cache_io, manifest.dtype, lim.cache_len)
        if entry.name != name:
            fail(f"graph '{name}' is named {entry.name!r}")
        for kind, found, want in (("input", entry.inputs, inputs), ("output", entry.outputs, outputs)):
            if found != want:
                bad = next((f"{w.name}: {w.dtype} {list(w.shape)} expected, {f.dtype} {list(f.shape)} listed"
                            for f, w in zip(found, want) if f != w), f"{len(found)} listed, {len(want)} expected")
                fail(f"graph '{name}' {kind}s differ from the graph contract of its model config ({bad})")
    for name, engine in manifest.engines.items():
        if name not in manifest.graphs or engine.graph != name or engine.library not in TENSORRT_LIBRARIES:
            fail(f"engine entry '{name}' names graph {engine.graph!r} and library {engine.library!r}")
    quant = manifest.quantization
    if quant is not None and (not isinstance(quant, dict) or quant.get("mode") not in QUANT_MODES):
        fail(f"quantization {quant!r} does not name one of the modes {', '.join(QUANT_MODES)}")
    if (quant is not None) != ("quantized" in manifest.assets):
        fail("a quantized artifact lists its quantized.safetensors asset, and only a quantized one does")
    unknown = sorted(set(manifest.assets) - set(ASSETS))
    if unknown or "weights" in manifest.assets and manifest.assets["weights"].path != WEIGHTS_NAME:
        fail(f"assets {sorted(manifest.assets)} are not among {ASSETS} (weights in {WEIGHTS_NAME})")
    tokenizer = manifest.assets.get("tokenizer")
    if manifest.tokenizer != (tokenizer.path if tokenizer else None):
        fail(f"tokenizer {manifest.tokenizer!r} is not the tokenizer asset {tokenizer.path if tokenizer else None!r}")
    for entry in manifest.files():
        if not _plain_name(entry):
            fail(f"file {entry.path!r} is not a file name inside the artifact directory")


def check_files(manifest: Manifest, directory: str | os.PathLike) -> None:
    """Raise ArtifactError if an ONNX file's declared I/O or the weights' tensor shapes are not
    what the manifest says (reads no graph weights and no tensor data)."""
    from blockrt.errors import UserError
    from blockrt.exporter.checkpoint import check_checkpoint

    directory = Path(directory)
    for entry in manifest.graphs.values():
        path = directory / entry.file.path
        model = load_graph(path)
        compare_io(path, "input", graph_io_specs(model.graph.input), entry.inputs)
        compare_io(path, "output", graph_io_specs(model.graph.output), entry.outputs)
    if "weights" in manifest.assets:
        try:
            check_checkpoint(directory / manifest.assets["weights"].path, manifest.model_config)
        except UserError as e:
            raise ArtifactError(f"the weights do not fit the manifest's model config: {e}; re-export the model") from None


def _plain_name(entry: FileEntry) -> bool:
    path = Path(entry.path)
    return isinstance(entry.path, str) and not path.is_absolute() and ".." not in path.parts and entry.path != ""
