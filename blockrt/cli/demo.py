"""`blockrt demo`: the whole job on a built-in tiny preset with random weights, no download needed.

The demo is a list of small named stages run in order on one shared `Demo` state: reference
model -> reference generate -> ONNX export -> verify -> TensorRT build -> generate through the
runtime, checked token for token against the reference. Only the TensorRT build is optional: it is
skipped with a note when no TensorRT library imports (the `rtx` or `trt` extra is not installed).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

log = logging.getLogger("blockrt.demo")

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [42, 43, 44]]  # ragged: 7 and 3 tokens (block length 4)
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx_bindings")


@dataclass
class Demo:
    preset: str
    out_dir: Path
    max_new_tokens: int
    seed: int
    force: bool = False  # replace a non-empty out_dir that is not an artifact
    model: Any = None
    config: Any = None  # GenerationConfig shared by every generate stage
    reference: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Demo], None]
    needs_tensorrt: bool = False

    def missing(self) -> str | None:
        """Why this stage cannot run here, or None."""
        if self.needs_tensorrt and _tensorrt_module() is None:
            return f"no TensorRT library imports (tried {', '.join(TENSORRT_MODULES)})"
        return None


def _tensorrt_module() -> str | None:
    for module in TENSORRT_MODULES:
        try:
            importlib.import_module(module)
            return module
        except ImportError:
            continue
    return None


def _show(label: str, tokens: list[list[int]]) -> None:
    for prompt, out in zip(PROMPTS, tokens):
        click.echo(f"{label}: {' '.join(map(str, prompt))} -> {' '.join(map(str, out))}")


def build_reference(demo: Demo) -> None:
    from blockrt.exporter.checkpoint import load_model
    from blockrt.generation import GenerationConfig

    demo.model = load_model(config=demo.preset, seed=demo.seed)
    demo.config = GenerationConfig(max_new_tokens=demo.max_new_tokens)
    log.info("%s: %s, random weights (seed %d)", demo.preset, demo.model.config.kind, demo.seed)


def reference_generate(demo: Demo) -> None:
    from blockrt.exporter.generate import generate

    demo.reference = generate(demo.model, PROMPTS, demo.config).tokens
    _show("reference", demo.reference)


def export_onnx(demo: Demo) -> None:
    from blockrt.exporter.export import export

    export(demo.model, demo.out_dir, dtype="fp32", max_batch=len(PROMPTS), max_context=64, cache_io="inplace",
           seed=demo.seed, force=demo.force)
    log.info("ONNX graphs and manifest written to %s", demo.out_dir)


def verify_export(demo: Demo) -> None:
    from blockrt.runtime.verify import verify

    report = verify(demo.out_dir)
    click.echo(report.format_table())
    if not report.passed:
        raise click.ClickException(f"the export in {demo.out_dir} does not match the PyTorch reference")


def build_engines(demo: Demo) -> None:
    from blockrt.runtime.build import build_engines

    build_engines(demo.out_dir, backend="auto")
    log.info("engines built in %s with %s", demo.out_dir, _tensorrt_module())


def runtime_generate(demo: Demo) -> None:
    from blockrt.runtime import Model

    results = Model.load(demo.out_dir, backend="onnxruntime").generate(PROMPTS, demo.config)
    tokens = [list(r.token_ids) for r in results]
    _show("onnxruntime", tokens)
    if tokens != demo.reference:
        raise click.ClickException("tokens generated through ONNX Runtime differ from the PyTorch reference")
    log.info("ONNX Runtime tokens match the PyTorch reference")


STAGES = [
    Stage("reference model", build_reference),
    Stage("reference generate (PyTorch)", reference_generate),
    Stage("export ONNX", export_onnx),
    Stage("verify the export against PyTorch", verify_export),
    Stage("build TensorRT engines", build_engines, needs_tensorrt=True),
    Stage("generate through the runtime (ONNX Runtime)", runtime_generate),
]


def run_stages(demo: Demo, stages: list[Stage] = STAGES) -> list[str]:
    """Run the stages in order; returns the names of those that ran."""
    ran = []
    for n, stage in enumerate(stages, 1):
        why_not = stage.missing()
        if why_not:
            log.info("[%d/%d] %s: skipped, %s", n, len(stages), stage.name, why_not)
            continue
        log.info("[%d/%d] %s...", n, len(stages), stage.name)
        stage.run(demo)
        ran.append(stage.name)
    return ran


@click.command("demo")
@click.option("--preset", default="tiny_block", show_default=True, help="A tiny preset (see `blockrt presets`).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Keep the artifacts (ONNX graphs, manifest, engines) in this directory (default: a temporary one).")
@click.option("--force", is_flag=True, help="Replace --out even if it is a non-empty directory that is not an artifact.")
@click.option("--max-new-tokens", default=10, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
def command(preset: str, out: Path | None, force: bool, max_new_tokens: int, seed: int) -> None:
    """Run the whole job on a tiny model with random weights: reference generate, export,
    verify, build, and generate through the runtime, as far as this installation supports."""
    with tempfile.TemporaryDirectory(prefix="blockrt-demo-") as tmp:
        demo = Demo(preset=preset, out_dir=out or Path(tmp), max_new_tokens=max_new_tokens, seed=seed, force=force)
        ran = run_stages(demo, STAGES)
    log.info("demo done: %d of %d stages ran", len(ran), len(STAGES))
