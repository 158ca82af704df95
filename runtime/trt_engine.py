"""TensorRT engine (`tensorrt` or TensorRT-RTX's `tensorrt_rtx_bindings`): deserialises the
engine `blockrt build` wrote, binds the runtime's device tensors with `set_tensor_address` and
runs `execute_async_v3` on the current CUDA stream. In-place caches alias `present.*` to
`past_key_values.*` (TensorScatter is an in-place update in TensorRT)."""

from __future__ import annotations

import logging
import torch

from blockrt.errors import UserError
from blockrt.graphs.manifest import Manifest

from .engine import GraphEngine

log = logging.getLogger(__name__)


class TensorRTEngine(GraphEngine):
    def __init__(self, manifest: Manifest, directory, graph: str, device: torch.device):
        super().__init__(manifest, graph, device)
        from .build import check_engine_compatible
        from .trt_lib import load_trt

        entry = manifest.engines.get(graph)
        if entry is None:
            raise UserError(f"{directory} has no TensorRT engine for graph '{graph}': build one with "
                            f"`blockrt build {directory}`, or use --backend onnxruntime|torch")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise UserError("TensorRT engines run on an NVIDIA GPU and none is available here; "
                            "use --backend onnxruntime or --backend torch")
        path = manifest.verify_engine(directory, graph)  # engines are derived: their hash is checked only here
        trt, _, _ = load_trt(entry.library)
        check_engine_compatible(manifest, entry, trt, directory)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        data = path.read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"TensorRT could not load {entry.file.path} (built with {entry.library} "
                            f"{entry.library_version} for {entry.device}); rebuild with `blockrt build {directory}`")
        self.context = self.engine.create_execution_context()
        log.info("loaded engine %s (%s %s)", entry.file.path, entry.library, entry.library_version)

    def execute(self, feeds, outputs):
        ctx = self.context
        for name, t in feeds.items():
            t = t.contiguous()
            feeds[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.name} failed (see the TensorRT log above)")
