"""A model as a streaming (decoupled) Triton Inference Server model, through PyTriton.

PyTriton starts the `tritonserver` binary of its wheel and forwards requests to a Python callable
in this process. Ours submits each request to the same engine thread as the HTTP server
(scheduler.py), so requests from every Triton client share one continuously batched generator,
and yields one response per completed block: `token_ids` (the new tokens) and, in the last
response, `finish_reason`.

Inputs (one sequence per request; every input but `input_ids` is optional):

| name | dtype | shape | default |
|---|---|---|---|
| input_ids | INT64 | [-1] | (required) |
| max_tokens | INT32 | [1] | 16 |
| temperature | FP32 | [1] | 0 (greedy) |
| top_p | FP32 | [1] | 1 |
| top_k | INT32 | [1] | 0 (off) |
| repetition_penalty | FP32 | [1] | 1 |
| seed | INT64 | [1] | 0 |
| ignore_eos | BOOL | [1] | false |
| stop_token_ids | INT64 | [-1] | none |

Outputs: `token_ids` INT64 [-1], `finish_reason` BYTES [1] ("" until the last response, then
"stop" or "length").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sysconfig
import threading

import numpy as np

from blockrt.errors import require
from blockrt.generation import GenerationConfig

from .scheduler import Scheduler, Update

log = logging.getLogger(__name__)

INPUTS = [  # name, numpy dtype, shape, default (None: required)
    ("input_ids", np.int64, (-1,), None),
    ("max_tokens", np.int32, (1,), 16),
    ("temperature", np.float32, (1,), 0.0),
    ("top_p", np.float32, (1,), 1.0),
    ("top_k", np.int32, (1,), 0),
    ("repetition_penalty", np.float32, (1,), 1.0),
    ("seed", np.int64, (1,), 0),
    ("ignore_eos", np.bool_, (1,), False),
    ("stop_token_ids", np.int64, (-1,), ()),
]


def _pytriton():
    return require("pytriton.triton", "triton", "blockrt triton")


def _stub_finds_this_python() -> None:
    """Triton runs Python models in a stub process linked against `libpython3.X.so`; the dynamic
    loader finds the system's copy first, and when this interpreter is another build of the same
    version (pyenv, conda, a venv of either) the stub crashes loading PyTriton's code (seen:
    "'_thread.RLock' object has no attribute '_recursion_count'" with pyenv 3.11.7 over Debian's
    3.11.2). Put this interpreter's library directory first for the server processes."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _request_inputs(request) -> tuple[list[int], GenerationConfig]:
    values = {}
    for name, _, shape, default in INPUTS:
        array = request.data.get(name)
        if array is None:
            if default is None:
                raise ValueError(f"input '{name}' is required")
            values[name] = default
        else:
            flat = np.asarray(array).reshape(-1)
            values[name] = flat.tolist() if shape == (-1,) else flat[0].item()
    config = GenerationConfig(max_new_tokens=int(values["max_tokens"]), temperature=float(values["temperature"]),
                              top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                              repetition_penalty=float(values["repetition_penalty"]), seed=int(values["seed"]),
                              stop_token_ids=[int(t) for t in values["stop_token_ids"]],
                              ignore_eos=bool(values["ignore_eos"]))
    return [int(t) for t in values["input_ids"]], config


def infer_function(scheduler: Scheduler):
    """The PyTriton callable: an async generator over the requests of one call, yielding one
    response per request each time any of them has new tokens."""

    async def infer(requests):
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        parsed = [_request_inputs(r) for r in requests]
        for prompt, config in parsed:
            scheduler.check(prompt, config)  # InvalidRequest -> an error response naming the input
        jobs = []
        try:
            for i, (prompt, config) in enumerate(parsed):
                jobs.append(scheduler.submit(prompt, config, lambda u, i=i: loop.call_soon_threadsafe(
                    updates.put_nowait, (i, u))))
            open_jobs = set(range(len(jobs)))
            while open_jobs:
                batch = [await updates.get()]
                while not updates.empty():
                    batch.append(updates.get_nowait())
                tokens = [[] for _ in requests]
                reasons = [""] * len(requests)
                for i, update in batch:
                    if update.error is not None:
                        raise RuntimeError(update.error)
                    tokens[i] += update.tokens
                    if update.finished:
                        reasons[i] = update.finish_reason
                        open_jobs.discard(i)
                yield [{"token_ids": np.asarray(t, dtype=np.int64), "finish_reason": np.asarray([r.encode()], dtype=object)}
                       for t, r in zip(tokens, reasons)]
        finally:
            for job in jobs:  # a failure or a stop of this call: free the rows
                scheduler.cancel(job)

    return infer


def bind(triton, scheduler: Scheduler, model_name: str) -> None:
    """Bind the model to a `pytriton.triton.Triton` instance as a decoupled model."""
    from pytriton.model_config import ModelConfig, Tensor

    inputs = [Tensor(name=name, dtype=dtype, shape=shape, optional=default is not None)
              for name, dtype, shape, default in INPUTS]
    outputs = [Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
               Tensor(name="finish_reason", dtype=bytes, shape=(1,))]
    triton.bind(model_name=model_name, infer_func=infer_function(scheduler), inputs=inputs, outputs=outputs,
                config=ModelConfig(batching=False, decoupled=True))


class TritonServer:
    """Triton with the model bound, its engine thread running:

        with TritonServer(model, grpc_port=8001) as server:
            ...  # clients stream from localhost:8001

    `serve()` blocks until interrupted instead."""

    def __init__(self, model, model_name: str = "blockrt", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1", max_queue: int = 256):
        triton_module = _pytriton()
        _stub_finds_this_python()
        self.model_name = model_name
        self.scheduler = Scheduler(model, max_queue=max_queue)
        config = triton_module.TritonConfig(http_address=address, http_port=http_port, grpc_address=address,
                                            grpc_port=grpc_port, metrics_port=metrics_port, allow_gpu_metrics=False)
        self.triton = triton_module.Triton(config=config)

    def start(self) -> "TritonServer":
        self.scheduler.start()
        bind(self.triton, self.scheduler, self.model_name)
        self.triton.run()
        return self

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM (what Kubernetes sends), then stop Triton cleanly."""
        self.scheduler.start()
        bind(self.triton, self.scheduler, self.model_name)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):  # PyTriton stops on KeyboardInterrupt only
                previous[sig] = signal.signal(sig, _interrupt)
        try:
            self.triton.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.scheduler.stop()

    def stop(self) -> None:
        self.triton.stop()
        self.scheduler.stop()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
