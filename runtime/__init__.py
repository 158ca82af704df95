"""blockrt.runtime: run exported artifacts (TensorRT, ONNX Runtime or PyTorch engines) with a
small generation API, plus the engine builder and the verification against PyTorch."""

from blockrt.generation import GenerationConfig

from .model import GenerationResult, Model, StreamChunk

__all__ = ["Model", "GenerationConfig", "GenerationResult", "StreamChunk"]
