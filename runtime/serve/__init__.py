"""blockrt.runtime.serve: serving a model to many clients.

- `core`: the engine core that drives `model.generator()` (continuous batching), in a thread or in a
  process of its own (`ModelSpec` says how that process loads the model).
- `scheduler`: a front end's handle on engine cores (`Scheduler`, `EngineGroup`: least-loaded routing).
- `app`: the OpenAI-compatible HTTP server (`create_app`, `Server`, `Workers`, `serve`, `HTTPLimits`; extra
  `serve`).
- `metrics`: its Prometheus metrics.
- `loadgen`: a load generator for it (client processes, TTFT/TPOT percentiles); `bench`: served vs
  offline on one workload (`blockrt bench --serve`).
- `triton`: the same model as a streaming (decoupled) Triton Inference Server model via PyTriton
  (extra `triton`).

Modules load on first use, so the Triton front end does not need FastAPI and the reverse.
"""

from __future__ import annotations

import importlib
import importlib.util

from blockrt.errors import MissingDependencyError

_EXPORTS = {"create_app": "app", "Server": "app", "serve": "app", "HTTPLimits": "app", "Workers": "app",
            "Scheduler": "scheduler", "EngineGroup": "scheduler", "ModelSpec": "core", "Metrics": "metrics"}
_NEEDS = {"app": ("fastapi", "uvicorn", "prometheus_client"), "metrics": ("prometheus_client",), "scheduler": (),
          "core": ()}

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
