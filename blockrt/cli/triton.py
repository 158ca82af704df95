"""`blockrt triton`: serve an artifact from Triton Inference Server (PyTriton) as a streaming model."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import click

from blockrt.errors import UserError, require

log = logging.getLogger("blockrt.triton")


@click.command("triton")
@click.argument("artifact", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]), default="auto",
              show_default=True, help="auto: tensorrt if engines were built and a GPU is present, torch on a GPU, "
              "else onnxruntime.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt/torch when present).")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address Triton's HTTP and gRPC endpoints bind to (0.0.0.0 for every interface).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-batch", type=click.IntRange(1), default=None,
              help="Sequences generated at once (default and limit: the artifact's max batch).")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="Requests allowed to wait for a batch row; beyond it requests fail with 'server busy'.")
@click.option("--model-name", default=None, help="Triton model name (default: the artifact directory's name).")
def command(artifact, backend, device, address, http_port, grpc_port, metrics_port, max_batch, max_queue,
            model_name) -> None:
    """Serve the artifact in DIR from Triton Inference Server as a decoupled (streaming) model.

    Each request carries one prompt (`input_ids`, INT64 [-1]) and optional `max_tokens`,
    `temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed`, `ignore_eos`, `stop_token_ids`;
    it gets one response per generated block (`token_ids`), the last with `finish_reason`. All
    requests share one continuously batched generator. Needs the `triton` extra (PyTriton, which
    ships the tritonserver binary; Linux x86-64 or arm64, glibc 2.35+).

    \b
    Examples:
      blockrt triton artifacts/tiny --backend torch --grpc-port 8001
      python samples/triton_client.py --url localhost:8001 --model tiny --prompt-ids 1,2,3
    """
    require("pytriton", "triton", "blockrt triton")
    from blockrt.runtime import Model
    from blockrt.runtime.serve.triton import TritonServer

    from .run import pick_backend

    name = model_name or artifact.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"--model-name {name!r}: Triton model names may only hold letters, digits, '.', '_' and '-'")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise UserError(f"--http-port, --grpc-port and --metrics-port must differ, got {http_port}, {grpc_port}, "
                        f"{metrics_port}")
    if backend == "auto":
        backend = pick_backend(artifact)
    model = Model.load(artifact, backend=backend, device=device, max_batch=max_batch)
    log.info("serving %s as Triton model %r (%s on %s, batch %d): gRPC %s:%d, HTTP %s:%d, metrics :%d", artifact, name,
             backend, model.device, model.max_batch, address, grpc_port, address, http_port, metrics_port)
    TritonServer(model, model_name=name, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                 address=address, max_queue=max_queue).serve()
