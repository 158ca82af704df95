"""blockrt.exporter: the PyTorch reference model, presets, checkpoints, the exported step modules
and the ONNX export."""

from .config import BlockConfig, ModelConfig, NeoXConfig, VanillaConfig
from .model import BlockTransformer, GPTNeoXLM, build_model, init_random
from .presets import PRESETS, TINY_PRESETS, get_preset

__all__ = ["BlockConfig", "ModelConfig", "NeoXConfig", "VanillaConfig", "BlockTransformer", "GPTNeoXLM",
           "build_model", "init_random", "PRESETS", "TINY_PRESETS", "get_preset", "export"]

from .export import export  # noqa: E402  (the function; the module is blockrt.exporter.export in sys.modules)
