"""ONNX Runtime engine: one InferenceSession per graph, run with IO binding on the runtime's
tensors (CPU, or CUDA where onnxruntime-gpu is installed). In-place caches bind `present.*` to
the very buffers bound as `past_key_values.*`, so TensorScatter updates them without a copy."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from blockrt.errors import UserError
from blockrt.graphs.manifest import Manifest

from .engine import GraphEngine

log = logging.getLogger(__name__)

NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class OrtEngine(GraphEngine):
    def __init__(self, manifest: Manifest, directory, graph: str, device: torch.device):
        super().__init__(manifest, graph, device)
        import onnxruntime as ort

        if manifest.dtype == "bf16":
            raise UserError("the onnxruntime backend runs fp32 and fp16 artifacts; this one is bf16: "
                            "use --backend torch, or re-export with --dtype fp16")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("onnxruntime has no CUDA provider here; install it with "
                                "pip install 'blockrt[gpu]', or use --device cpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if manifest.quantization is not None:  # run the QDQ graph as written: ORT's DQ->MatMul fusions
            options.add_session_config_entry("session.disable_quant_qdq", "1")  # also quantize activations
        path = Path(directory) / manifest.graphs[graph].file.path
        log.info("loading %s with onnxruntime %s (%s)", path.name, ort.__version__, providers[0] if isinstance(providers[0], str) else providers[0][0])
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def execute(self, feeds, outputs):
        binding = self.session.io_binding()
        for name, t in feeds.items():
            t = t.contiguous()
            feeds[name] = t  # keep alive until the run ends
            binding.bind_input(name, self._device_type, self._device_id, NUMPY_TYPES[t.dtype], list(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, self._device_type, self._device_id, NUMPY_TYPES[t.dtype], list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
