"""The compiled fast path's switches where no GPU is needed (its numerics are in test_gpu.py)."""

import logging

import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.runtime import Model
from blockrt.runtime.inductor import cache_dir, skip_reason


def test_compile_on_cpu_runs_eager_steps_and_logs_why(caplog):
    model = init_random(build_model(get_preset("tiny_block"))).eval()
    with caplog.at_level(logging.INFO, logger="blockrt.runtime.torch_engine"):
        runtime = Model.from_torch(model, dtype="fp32", max_batch=2, max_context=64, device="cpu", compile=True)
    assert all(engine.compiled is None for engine in runtime.engines.values())
    assert "not compiling the steps: compilation targets CUDA GPUs" in caplog.text
    assert skip_reason(torch.device("cpu")) is not None


def test_compile_cache_lives_under_blockrt_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKRT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "inductor"
