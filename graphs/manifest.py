"""`manifest.json`: the description of an artifact directory (graphs, engines, limits, model).

Loading a manifest checks its format version and, unless told not to, the SHA-256 of every file
it names, so a runtime never runs graphs or engines that do not match their description.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .contract import TensorSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"  # the exported model's state_dict, in the export dtype
TOKENIZER_NAME = "tokenizer.json"


class ArtifactError(ValueError):
    """An artifact directory that is missing, corrupt or does not match its manifest."""


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
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"manifest format version {version!r} is not supported (expected "
                                f"{FORMAT_VERSION}); re-export the model with this blockrt")
        try:
            fields = {k: v for k, v in d.items() if k not in ("graphs", "engines", "assets", "limits")}
            return cls(**fields, limits=Limits(**d["limits"]),
                       graphs={k: GraphEntry.from_dict(g) for k, g in d["graphs"].items()},
                       engines={k: EngineEntry.from_dict(e) for k, e in d.get("engines", {}).items()},
                       assets={k: FileEntry(**f) for k, f in d.get("assets", {}).items()})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"malformed manifest: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
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
        manifest = cls.from_dict(data)
        if verify_hashes:
            manifest.verify_files(directory)
        return manifest

    def files(self) -> list[FileEntry]:
        out = []
        for g in self.graphs.values():
            out += [g.file, *g.external_data]
        out += [e.file for e in self.engines.values()]
        out += list(self.assets.values())
        return out

    def verify_files(self, directory: str | os.PathLike) -> None:
        """Raise ArtifactError if a file the manifest names is missing or its SHA-256 differs."""
        for entry in self.files():
            path = Path(directory) / entry.path
            if not path.is_file():
                raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-export or rebuild it")
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise ArtifactError(f"{path} does not match manifest.json (sha256 {digest[:12]}... != "
                                    f"{entry.sha256[:12]}...): the file was changed or corrupted; "
                                    f"re-export the model (or `blockrt build` again for engines)")
