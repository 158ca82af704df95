"""`blockrt triton`: serve an artifact from Triton Inference Server (PyTriton) as a streaming model."""

from __future__ import annotations

import logging
import re

import click

from blockrt.errors import UserError, require

from .serve import load_model, server_options

log = logging.getLogger("blockrt.triton")


@click.command("triton")
@server_options
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address Triton's HTTP and gRPC endpoints bind to (0.0.0.0 for every interface).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
def command(artifact, backend, device, max_batch, max_queue, compile_steps, model_name, address, http_port, grpc_port,
            metrics_port) -> None:
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
    from blockrt.runtime.serve.triton import TritonServer

    name = model_name or artifact.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"--model-name {name!r}: Triton model names may only hold letters, digits, '.', '_' and '-'")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise UserError(f"--http-port, --grpc-port and --metrics-port must differ, got {http_port}, {grpc_port}, "
                        f"{metrics_port}")
    model = load_model(artifact, backend, device, max_batch, compile_steps)
    log.info("Triton model %r: gRPC %s:%d, HTTP %s:%d, metrics :%d", name, address, grpc_port, address, http_port,
             metrics_port)
    TritonServer(model, model_name=name, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                 address=address, max_queue=max_queue).serve()
