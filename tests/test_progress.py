"""Long work shows progress as it goes: export logs each graph's stages, verify each of its stages,
through `logging` at INFO, which the CLI shows by default."""

from __future__ import annotations

import logging
import subprocess
import sys

from blockrt.runtime.verify import verify


def test_cli_export_logs_every_graphs_stages_by_default(tmp_path):
    blockrt = [sys.executable, "-c", "from blockrt.cli import main; main()"]  # a fresh process, default logging
    proc = subprocess.run([*blockrt, "export", "--preset", "tiny_vanilla", "--max-batch", "1",
                           "--max-context", "16", "--out", str(tmp_path / "art")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    stages = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if " INFO blockrt.exporter.export: " in line]
    graph = [s for s in stages if s.startswith("decoder: ")]
    assert [s.split(" ")[1] for s in graph] == ["tracing", "converted", "checking", "exported"], stages
    assert stages[0].startswith("saving weights.safetensors") and stages[-1].startswith("artifact ready")


def test_verify_logs_each_stage_as_it_starts(exported, caplog):
    caplog.set_level(logging.INFO, logger="blockrt.runtime.verify")
    verify(exported("tiny_vanilla"), backends=("onnxruntime", "tensorrt"), gen_tokens=4)
    messages = [r.getMessage() for r in caplog.records if r.name == "blockrt.runtime.verify"]
    assert [m.split(" ")[0] for m in messages] == ["files", "graphs", "onnxruntime:", "reference:", "onnxruntime:",
                                                   "onnxruntime:", "tensorrt:"], messages
