"""The README's Python code blocks run as written (in order, in one namespace, in a directory that
holds the files they name), and the demo offers the --force its refusal message suggests."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from blockrt.cli import demo as demo_module

README = Path(__file__).resolve().parents[1] / "README.md"
SERVER_MODULES = ("fastapi", "uvicorn")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_every_readme_python_block_runs_as_written(exported, tmp_path, monkeypatch):
    """artifacts/tiny is the tiny_block export of the Quickstart; the blocks share one namespace,
    as in a Python session that follows the README from the top."""
    (tmp_path / "artifacts").mkdir()
    shutil.copytree(exported("tiny_block"), tmp_path / "artifacts" / "tiny")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        if "blockrt.runtime.serve" in block and not all(importlib.util.find_spec(m) for m in SERVER_MODULES):
            continue  # the serving block needs the serve extra (installed by dev)
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}")


def test_demo_out_that_is_not_an_artifact_is_refused_then_replaced_with_force(blockrt_cli, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stages = [demo_module.Stage("reference model", demo_module.build_reference),
              demo_module.Stage("export ONNX", demo_module.export_onnx)]
    monkeypatch.setattr(demo_module, "STAGES", stages)
    code, _, err = blockrt_cli("demo", "--out", str(out))
    assert code == 2 and "--force" in err and (out / "notes.txt").is_file()
    code, _, err = blockrt_cli("demo", "--out", str(out), "--force")
    assert code == 0, err
    assert (out / "manifest.json").is_file() and not (out / "notes.txt").exists()
