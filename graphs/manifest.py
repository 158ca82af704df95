"""`manifest.json`: the description of an artifact directory (graphs, engines, limits, model).

A saved manifest carries its own SHA-256 (`manifest_sha256`, over every other field), so a
hand-edited manifest is refused instead of ending in a traceback deep inside ONNX Runtime or
torch. Loading checks the format version, that digest and that the fields agree with each other
and with the graph contract (`graphs.consistency`); unless told not to, also the SHA-256 of every
graph and asset and that the ONNX files' declared I/O and the weights' shapes are what the
manifest says. Engines are derived files: their hashes are checked only when the TensorRT backend
loads them (`verify_engine`), so a corrupt engine never blocks ONNX Runtime, PyTorch or a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockrt.errors import UserError

from .contract import TensorSpec

FORMAT_VERSION = 2
DIGEST_KEY = "manifest_sha256"  # the manifest's own SHA-256, over the canonical JSON of every other field
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"  # the exported model's state_dict, in the export dtype
TOKENIZER_NAME = "tokenizer.json"


class ArtifactError(UserError):
    """An artifact directory that is missing, corrupt or does not match its manifest."""


def manifest_digest(data: dict) -> str:
    """SHA-256 of a manifest's fields (without the digest itself), independent of JSON formatting."""
    fields = {k: v for k, v in data.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileEntry:
    path: str  # relative to the artifact directory
    sha256: str


@dataclass
class GraphEntry:
    name: str
    file: FileEntry
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[FileEntry] = field(default_factory=list)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphEntry":
        return cls(d["name"], FileEntry(**d["file"]), [TensorSpec.from_dict(t) for t in d["inputs"]],
                   [TensorSpec.from_dict(t) for t in d["outputs"]],
                   [FileEntry(**e) for e in d.get("external_data", [])])

    def to_dict(self) -> dict:
        return {"name": self.name, "file": asdict(self.file), "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "external_data": [asdict(e) for e in self.external_data]}


@dataclass
class EngineEntry:
    graph: str
    file: FileEntry
    library: str  # "tensorrt" or "tensorrt-rtx"
    library_version: str
    device: str  # GPU name, or "portable"
    compute_capability: str  # "9.0", or "portable"
    profiles: dict[str, dict[str, list[int]]]  # input name -> {"min", "opt", "max"} shapes

    @classmethod
    def from_dict(cls, d: dict) -> "EngineEntry":
        return cls(d["graph"], FileEntry(**d["file"]), d["library"], d["library_version"], d["device"],
                   d["compute_capability"], d["profiles"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["file"] = asdict(self.file)
        return d


@dataclass
class Limits:
    max_batch: int
    max_context: int  # tokens (prompt + generated) one sequence may hold
    cache_len: int  # static cache rows of the block decoder (blocks) or decoder (tokens)

    @classmethod
    def for_model(cls, config, max_batch: int, max_context: int) -> "Limits":
        rows = math.ceil(max_context / config.block_len) if config.kind == "block" else max_context
        return cls(max_batch, max_context, rows)


@dataclass
class Manifest:
    kind: str  # "block" or "vanilla"
    model: dict[str, Any]  # blockrt.exporter.config.config_to_dict
    dtype: str  # fp32 | fp16 | bf16
    cache_io: str  # inplace | concat
    limits: Limits
    graphs: dict[str, GraphEntry]
    opset: int
    block_len: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    cache_layout: str = "[batch, heads, seq, head_dim]"
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    assets: dict[str, FileEntry] = field(default_factory=dict)  # "weights", "tokenizer" -> file
    tokenizer: str | None = None  # path of tokenizer.json in the artifact, if one was given
    source: str = ""  # preset name or checkpoint path
    positions: str = "forward"  # token decoder rotary positions baked into the graphs (blockrt.generation.POSITIONS)
    quantization: dict | None = None  # blockrt.exporter.quantize.QuantConfig, for a quantized export
    format_version: int = FORMAT_VERSION
    blockrt_version: str = ""

    @classmethod
    def for_model(cls, config, *, dtype: str, cache_io: str, limits: Limits, graphs: dict[str, GraphEntry],
                  **fields) -> "Manifest":
        """A manifest for a model config: the fields that follow from the config filled in."""
        from blockrt import __version__
        from blockrt.exporter.config import config_to_dict

        from .contract import OPSET

        return cls(kind=config.kind, model=config_to_dict(config), dtype=dtype, cache_io=cache_io, limits=limits,
                   graphs=graphs, opset=OPSET, block_len=config.block_len, vocab_size=config.vocab_size,
                   eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                   blockrt_version=__version__, **fields)

    @property
    def model_config(self):
        from blockrt.exporter.config import config_from_dict

        return config_from_dict(self.model)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("graphs", "engines")}
        d["graphs"] = {k: g.to_dict() for k, g in self.graphs.items()}
        d["engines"] = {k: e.to_dict() for k, e in self.engines.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        _check_version(d)
        try:
            fields = {k: v for k, v in d.items() if k not in ("graphs", "engines", "assets", "limits", DIGEST_KEY)}
            return cls(**fields, limits=Limits(**d["limits"]),
                       graphs={k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()},
                       engines={k: EngineEntry.from_dict(e) for k, e in d.get("engines", {}).items()},
                       assets={k: FileEntry(**f) for k, f in d.get("assets", {}).items()})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ArtifactError(f"malformed manifest: {type(e).__name__}: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        data = self.to_dict()
        data[DIGEST_KEY] = manifest_digest(data)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, verify_hashes: bool = True) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a blockrt artifact: {MANIFEST_NAME} not found "
                                f"(create one with `blockrt export --out {directory}`)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the model") from None
        from .consistency import check_files, check_manifest

        _check_version(data)
        if data.get(DIGEST_KEY) != manifest_digest(data):
            raise ArtifactError(f"{path} was changed after blockrt wrote it (its {DIGEST_KEY} does not match its "
                                f"contents): the manifest describes the exported graphs and may not be edited by "
                                f"hand; re-export the model (`blockrt export ... --out {directory}`)")
        manifest = cls.from_dict(data)
        check_manifest(manifest, path)
        if verify_hashes:
            manifest.verify_files(directory)
            check_files(manifest, directory)
        return manifest

    def files(self, engines: bool = True) -> list[FileEntry]:
        """Every file the manifest names: graphs, external data, assets and (optionally) engines."""
        out = []
        for g in self.graphs.values():
            out += [g.file, *g.external_data]
        out += list(self.assets.values())
        if engines:
            out += [e.file for e in self.engines.values()]
        return out

    def file_problems(self, directory: str | os.PathLike, engines: bool = True) -> list[tuple[FileEntry, str | None]]:
        """(entry, problem or None) for every file the manifest names: missing, or a SHA-256 that differs."""
        return [(entry, _file_problem(directory, entry)) for entry in self.files(engines)]

    def verify_files(self, directory: str | os.PathLike) -> None:
        """Raise ArtifactError if a graph or asset the manifest names is missing or its SHA-256
        differs. Engines are not checked here (see `verify_engine`)."""
        for entry, problem in self.file_problems(directory, engines=False):
            path = Path(directory) / entry.path
            if problem == "missing":
                raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-export the model")
            if problem is not None:
                raise ArtifactError(f"{path} does not match manifest.json ({problem}): the file was changed or "
                                    f"corrupted; re-export the model")

    def verify_engine(self, directory: str | os.PathLike, graph: str) -> Path:
        """The path of `graph`'s engine, or ArtifactError (missing or changed) saying how to rebuild it."""
        entry = self.engines[graph]
        path = Path(directory) / entry.file.path
        problem = _file_problem(directory, entry.file)
        if problem is not None:
            state = "is missing" if problem == "missing" else f"does not match manifest.json ({problem})"
            raise ArtifactError(f"TensorRT engine {path} {state}: engines are derived files, rebuild them with "
                                f"`blockrt build {directory}` (the onnxruntime and torch backends do not use them)")
        return path


def _check_version(d) -> None:
    if not isinstance(d, dict):
        raise ArtifactError(f"malformed manifest: expected a JSON object, got {type(d).__name__}")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"manifest format version {version!r} is not supported (expected "
                            f"{FORMAT_VERSION}); re-export the model with this blockrt")


def _file_problem(directory: str | os.PathLike, entry: FileEntry) -> str | None:
    path = Path(directory) / entry.path
    if not path.is_file():
        return "missing"
    digest = sha256_file(path)
    return None if digest == entry.sha256 else f"sha256 {digest[:12]}... != {entry.sha256[:12]}... in manifest.json"
