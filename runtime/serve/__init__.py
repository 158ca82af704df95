"""blockrt.runtime.serve: serving a model to many clients.

- `scheduler`: the engine thread that owns `model.generator()` (continuous batching; any front end).
- `app`: the OpenAI-compatible HTTP server (`create_app`, `Server`, `serve`; extra `serve`).
- `metrics`: its Prometheus metrics.
- `triton`: the same model as a streaming (decoupled) Triton Inference Server model via PyTriton
  (extra `triton`).

Modules load on first use, so the Triton front end does not need FastAPI and the reverse.
"""

from __future__ import annotations

import importlib
import importlib.util

from blockrt.errors import MissingDependencyError

_EXPORTS = {"create_app": "app", "Server": "app", "serve": "app", "Scheduler": "scheduler", "Metrics": "metrics"}
_NEEDS = {"app": ("fastapi", "uvicorn", "prometheus_client"), "metrics": ("prometheus_client",), "scheduler": ()}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for dependency in _NEEDS[module]:
        if importlib.util.find_spec(dependency) is None:
            raise MissingDependencyError(f"blockrt.runtime.serve.{name} needs the Python module '{dependency}', "
                                         "which is not installed; install it with: pip install 'blockrt[serve]'")
    return getattr(importlib.import_module(f".{module}", __name__), name)
