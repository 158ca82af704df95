"""`blockrt triton`: the model as a decoupled Triton model (PyTriton's bundled tritonserver, CPU),
streamed over gRPC by samples/triton_client.py, against offline generation."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed: the Triton tests need the 'triton' "
                    "extra (pip install -e '.[triton]'), which CI's '.[dev,rtx]' leaves out because PyTriton pins "
                    "numpy<2 and brings a 55 MB wheel with the tritonserver binary")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install -e '.[triton]')")

from blockrt.exporter import build_model, get_preset, init_random  # noqa: E402
from blockrt.generation import GenerationConfig  # noqa: E402
from blockrt.runtime import Model  # noqa: E402
from blockrt.runtime.serve.triton import TritonServer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "triton_client.py"


def tiny_model() -> Model:
    torch_model = init_random(build_model(get_preset("tiny_block")), seed=0).eval()
    return Model.from_torch(torch_model, dtype="fp32", max_batch=4, max_context=256, device="cpu")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def client():
    spec = importlib.util.spec_from_file_location("triton_client", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def triton():
    http, grpc, metrics = free_ports(3)
    with TritonServer(tiny_model(), model_name="tiny", http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        server.url = f"127.0.0.1:{grpc}"
        yield server


def test_triton_streams_the_offline_tokens_block_by_block(triton, client):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 13]
    offline = tiny_model().generate(prompts, GenerationConfig(max_new_tokens=40, ignore_eos=True))
    tokens, responses, reasons = [[] for _ in prompts], [0] * len(prompts), [None] * len(prompts)
    for index, new, reason in client.stream(triton.url, "tiny", prompts, max_tokens=40, ignore_eos=True):
        tokens[index] += new
        responses[index] += 1
        reasons[index] = reason or reasons[index]
    assert tokens == [r.token_ids for r in offline]
    assert reasons == ["length"] * 3
    assert all(n > 1 for n in responses)  # streamed, not one response at the end


def test_triton_rejects_bad_input_with_the_reason_and_keeps_serving(triton, client):
    with pytest.raises(RuntimeError, match="prompt too long"):
        list(client.stream(triton.url, "tiny", [[1] * 300], max_tokens=8))
    with pytest.raises(RuntimeError, match="temperature must be >= 0"):
        list(client.stream(triton.url, "tiny", [[1]], max_tokens=8, temperature=-1.0))
    out = list(client.stream(triton.url, "tiny", [[1, 2]], max_tokens=4, ignore_eos=True))
    assert sum(len(new) for _, new, _ in out) == 4 and out[-1][2] == "length"


def test_blockrt_triton_rejects_a_bad_model_name(exported, blockrt_cli):
    code, _, err = blockrt_cli("triton", str(exported("tiny_block")), "--model-name", "my model")
    assert code == 2 and "Triton model names may only hold" in err
