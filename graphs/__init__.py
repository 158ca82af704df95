"""blockrt.graphs: the contract between exporter and runtime (graph I/O, the artifact manifest)
and the checks run on exported ONNX graphs."""

from .contract import CACHE_IO_MODES, DTYPES, OPSET, TensorSpec, graph_io, graph_names
from .manifest import ArtifactError, EngineEntry, FileEntry, GraphEntry, Limits, Manifest

__all__ = ["CACHE_IO_MODES", "DTYPES", "OPSET", "TensorSpec", "graph_io", "graph_names", "ArtifactError",
           "EngineEntry", "FileEntry", "GraphEntry", "Limits", "Manifest"]
