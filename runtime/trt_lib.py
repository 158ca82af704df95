"""Which TensorRT this process uses: NVIDIA's `tensorrt` or TensorRT-RTX's `tensorrt_rtx_bindings`
(same Python API), its name and version, and the GPU an engine is built for or runs on.

Full TensorRT engines are tied to one GPU model (compute capability) and one TensorRT version.
TensorRT-RTX engines are portable: built without a GPU, they run on every compute capability the
library lists in `trt.ComputeCapability` (which, for TensorRT-RTX 1.7, leaves out 9.0: H100/H200).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from blockrt.backends import TENSORRT_LIBRARIES
from blockrt.errors import MissingDependencyError, UserError

# library name (as recorded in manifests and given to --backend) -> Python module, pip extra
LIBRARIES = dict(zip(TENSORRT_LIBRARIES, [("tensorrt", "trt"), ("tensorrt_rtx_bindings", "rtx")]))
LIBRARY_CHOICES = ("auto", *LIBRARIES)
PORTABLE = "portable"


class TrtLib(NamedTuple):
    module: ModuleType
    name: str  # "tensorrt" or "tensorrt-rtx"
    version: str

    @property
    def portable(self) -> bool:
        """Engines of this library are built for any GPU (TensorRT-RTX), not for the one present."""
        return self.name == "tensorrt-rtx"


def load_trt(backend: str = "auto") -> TrtLib:
    """Import TensorRT: `backend` "tensorrt", "tensorrt-rtx", or "auto" (TensorRT if installed,
    else TensorRT-RTX). A missing library is a MissingDependencyError saying what to install."""
    if backend not in LIBRARY_CHOICES:
        raise UserError(f"unknown TensorRT backend {backend!r}: expected one of {', '.join(LIBRARY_CHOICES)}")
    names = list(LIBRARIES) if backend == "auto" else [backend]
    reasons = []
    for name in names:
        module_name, _ = LIBRARIES[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            reasons.append(f"{module_name}: {e}")
            continue
        if not hasattr(module, "Builder"):  # the PyPI `tensorrt` placeholder imports but has no API
            reasons.append(f"{module_name}: installed package has no TensorRT API (a placeholder?)")
            continue
        return TrtLib(module, name, module.__version__)
    install = " or ".join(f"pip install 'blockrt[{LIBRARIES[n][1]}]'" for n in names)
    what = "TensorRT or TensorRT-RTX" if backend == "auto" else backend
    raise MissingDependencyError(f"{what} is not installed ({'; '.join(reasons)}); install it with: {install}")


def library_of(module: ModuleType) -> TrtLib:
    """The TrtLib of an already imported TensorRT module."""
    name = next((n for n, (m, _) in LIBRARIES.items() if module.__name__ == m), None)
    if name is None:
        raise ValueError(f"{module.__name__} is not a TensorRT module ({', '.join(m for m, _ in LIBRARIES.values())})")
    return TrtLib(module, name, module.__version__)


def current_gpu() -> tuple[str, str] | None:
    """(name, compute capability "major.minor") of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def portable_capabilities(lib: TrtLib) -> list[str]:
    """Compute capabilities a portable (TensorRT-RTX) engine runs on, from the library's own list."""
    names = [n for n in dir(lib.module.ComputeCapability) if n.startswith("SM") and n[2:].isdigit()]
    return [f"{n[2:-1]}.{n[-1]}" for n in sorted(names, key=lambda n: int(n[2:]))]
