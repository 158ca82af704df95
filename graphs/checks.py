"""Checks on exported ONNX graphs: valid ONNX, shapes that infer, only ops every backend runs, and
inputs/outputs exactly as the manifest (and so the graph contract) says.

`check_graph` is run by the exporter before an artifact is published and by `blockrt verify`;
everything it finds wrong is an `ArtifactError` that names the file, never a protobuf traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .contract import OPSET, TensorSpec
from .manifest import ArtifactError, GraphEntry, Manifest

DEFAULT_DOMAINS = ("", "ai.onnx")
FORBIDDEN_OPS = ("If", "Loop", "Scan")  # control flow: TensorRT's parser and our contract avoid it

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64",
                onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
                onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph structure of an ONNX file (weights in external data files are not read)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist; re-export the model")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-turned errors, ...: all mean corrupt
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); it is truncated "
                            f"or corrupt, re-export the model") from None


def check_graph(path: str | os.PathLike, entry: GraphEntry | None = None) -> onnx.ModelProto:
    """Check one ONNX graph; with `entry`, also that its I/O equal the manifest's. Returns the
    loaded graph structure (without external weights)."""
    path = Path(path)
    model = load_graph(path)
    try:  # by path: works for graphs with external data (> 2 GB); full_check runs strict shape inference
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"{path} fails the ONNX checker: {_first_line(e)}") from None
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset != OPSET:
        raise ArtifactError(f"{path} uses ONNX opset {opset}, expected {OPSET}; re-export the model")
    bad = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in _all_nodes(model.graph)
                  if n.domain not in DEFAULT_DOMAINS or n.op_type in FORBIDDEN_OPS})
    if bad or model.functions:
        found = ", ".join(bad + [f"function {f.name}" for f in model.functions])
        raise ArtifactError(f"{path} contains ops outside the graph contract ({found}): only standard "
                            f"ONNX ops without control flow are allowed; re-export the model")
    if entry is not None:
        compare_io(path, "input", graph_io_specs(model.graph.input), entry.inputs)
        compare_io(path, "output", graph_io_specs(model.graph.output), entry.outputs)
    return model


def check_artifact(directory: str | os.PathLike) -> Manifest:
    """Load the manifest (verifying every file's SHA-256) and check each of its graphs."""
    manifest = Manifest.load(directory)
    for entry in manifest.graphs.values():
        check_graph(Path(directory) / entry.file.path, entry)
    return manifest


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def graph_io_specs(values) -> list[TensorSpec]:
    """The TensorSpecs an ONNX graph declares for its inputs or outputs."""
    return [_spec(v) for v in values]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    shape = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                  for d in t.shape.dim)
    return TensorSpec(value.name, _ONNX_DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type)), shape)


def compare_io(path: Path, kind: str, found: list[TensorSpec], expected: list[TensorSpec]) -> None:
    names, want = [t.name for t in found], [t.name for t in expected]
    if names != want:
        raise ArtifactError(f"{path}: graph {kind}s are {names}, but the manifest lists {want}")
    for f, e in zip(found, expected):
        if f != e:
            raise ArtifactError(f"{path}: {kind} '{e.name}' is {f.dtype} {list(f.shape)} in the graph, but "
                                f"{e.dtype} {list(e.shape)} in the manifest (a frozen dynamic axis reads as a "
                                f"number where a name is expected); re-export the model")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
