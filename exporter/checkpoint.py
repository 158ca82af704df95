"""Checkpoints: save and load the official safetensors layouts, every key and shape checked.

Two layouts (docs/model.md):

- Block: one `model.safetensors` (a directory holding it, or the file itself) with the module
  names of `BlockTransformer`, plus the block decoder's unused `embed_in` [vocab, h_block].
- Pythia: a Hugging Face directory, `config.json` (GPTNeoXConfig) and `model.safetensors`
  (or shards listed in `model.safetensors.index.json`) with `gpt_neox.*` and `embed_out.weight`.

Loading reads the safetensors headers first, takes the config from the caller, from `config.json`
or from the tensor shapes, then checks every tensor name and shape against a model built for that
config before reading any data. Problems are `CheckpointError`s that name the file and the tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blockrt.errors import UserError

from .config import TORCH_DTYPES, BlockConfig, ModelConfig, NeoXConfig, VanillaConfig
from .model import BlockTransformer, GPTNeoXLM, build_model, init_random
from .presets import get_preset

_HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}

CHECKPOINT_WEIGHTS_NAME = "model.safetensors"  # a checkpoint's weights (Hugging Face name); an artifact's: graphs.manifest.WEIGHTS_NAME
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

BLOCK_UNUSED_EMBED = "block_decoder.gpt_neox.embed_in.weight"
# buffers that older Hugging Face GPT-NeoX files carry; they are recomputed, never loaded
_HF_BUFFERS = re.compile(r"gpt_neox\.(layers\.\d+\.attention\.)?(bias|masked_bias|rotary_emb\.inv_freq)")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching its config."""


# ---------------------------------------------------------------------------------------- save

def save_checkpoint(model: BlockTransformer | GPTNeoXLM, path: str | Path) -> Path:
    """Write `model` in its official layout, in the model's dtype; returns the weights file.

    Block models: `path` is a directory (created) or a `.safetensors` file. Vanilla models: `path`
    is a Hugging Face directory that `transformers.GPTNeoXForCausalLM.from_pretrained` loads."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, BlockTransformer):
        cfg = model.config
        embed = model.embedder.embeddings.weight
        tensors[BLOCK_UNUSED_EMBED] = torch.zeros(cfg.vocab_size, cfg.block_decoder.hidden_size, dtype=embed.dtype)
        file = path if path.suffix == ".safetensors" else path / CHECKPOINT_WEIGHTS_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(file), metadata={"format": "pt"})
        return file
    if path.suffix == ".safetensors":
        raise CheckpointError(f"a vanilla (Pythia) checkpoint is a directory with {CONFIG_NAME} and {CHECKPOINT_WEIGHTS_NAME}; "
                              f"got the file name {path}")
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.embed_out.weight.dtype
    (path / CONFIG_NAME).write_text(json.dumps(_hf_config(model.config, dtype), indent=2) + "\n")
    save_file(tensors, str(path / CHECKPOINT_WEIGHTS_NAME), metadata={"format": "pt"})
    return path / CHECKPOINT_WEIGHTS_NAME


def _hf_config(cfg: VanillaConfig, dtype: torch.dtype) -> dict:
    d = cfg.decoder
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "intermediate_size": d.intermediate_size,
        "vocab_size": d.vocab_size,
        "rotary_pct": d.rotary_pct,
        "rotary_emb_base": d.rotary_base,
        "layer_norm_eps": d.layer_norm_eps,
        "use_parallel_residual": True,
        "hidden_act": "gelu",
        "max_position_embeddings": 2048,
        "bos_token_id": cfg.eos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": _HF_DTYPE_NAMES[dtype],
    }


# ---------------------------------------------------------------------------------------- load

@dataclasses.dataclass
class _Header:
    """What the safetensors headers of a checkpoint say, before any tensor data is read."""

    source: Path  # what the user named: a directory or a file
    files: dict[str, Path]  # tensor name -> file holding it
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    config_path: Path | None  # config.json beside the weights (Pythia: GPTNeoXConfig)

    @functools.cached_property
    def kind(self) -> str:
        return _layout_kind(self.shapes, self.where)

    @property
    def where(self) -> str:
        files = sorted({str(f) for f in self.files.values()})
        return files[0] if len(files) == 1 else str(self.source)


def _layout_kind(shapes, where: str) -> str:
    if any(k.startswith("embedder.") for k in shapes):
        return "block"
    if any(k.startswith("gpt_neox.") for k in shapes):
        return "vanilla"
    raise CheckpointError(f"{where} is neither a Block Transformer checkpoint (tensors 'embedder.*') nor a "
                          f"Pythia one (tensors 'gpt_neox.*'); its first tensors are: {_first(shapes)}")


def _read_header(path: str | Path) -> _Header:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if path.is_dir():
        if (path / CHECKPOINT_WEIGHTS_NAME).is_file():
            weight_files = [path / CHECKPOINT_WEIGHTS_NAME]
        elif (path / INDEX_NAME).is_file():
            index = _read_json(path / INDEX_NAME)
            try:
                weight_files = [path / f for f in sorted(set(index["weight_map"].values()))]
            except (KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{path / INDEX_NAME} has no 'weight_map' of tensor names to files") from None
        else:
            raise CheckpointError(f"{path} is not a checkpoint directory: it has no {CHECKPOINT_WEIGHTS_NAME} "
                                  f"(nor {INDEX_NAME}); only safetensors checkpoints are supported")
    else:
        weight_files = [path]
    files, shapes, dtypes = {}, {}, {}
    for file in weight_files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in files:
                        raise CheckpointError(f"tensor '{name}' is stored twice: in {files[name]} and in {file}")
                    tensor = f.get_slice(name)
                    files[name], shapes[name] = file, tuple(tensor.get_shape())
                    dtypes[name] = _torch_dtype(tensor.get_dtype(), name, file)
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {file} does not exist") from None
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not shapes:
        raise CheckpointError(f"{path} holds no tensors")
    return _Header(path, files, shapes, dtypes, config_path if config_path.is_file() else None)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _torch_dtype(name: str, tensor: str, file: Path) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"tensor '{tensor}' in {file} has unsupported dtype {name}") from None


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(f"'{k}'" for k in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint (from config.json or the tensor shapes), reading no weights."""
    return _infer_config(_read_header(path))


def check_checkpoint(path: str | Path, config: str | ModelConfig) -> None:
    """Check every tensor name, shape and dtype of a checkpoint against `config`, reading only the
    safetensors headers; a mismatch is a CheckpointError naming the tensor."""
    _checked_model(_read_header(path), config)


def _checked_model(header: _Header, config: str | ModelConfig | None) -> BlockTransformer | GPTNeoXLM:
    """A model on the meta device for the config (given, or inferred from the header) whose every
    tensor the header holds with the right shape."""
    kind = header.kind
    cfg = _infer_config(header) if config is None else _resolve_config(config)
    if cfg.kind != kind:
        raise CheckpointError(f"{header.where} is a {kind} checkpoint, but the given config is a {cfg.kind} model")
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = {k for k in header.shapes if _ignored(kind, k)}
    _check_keys(header, expected, ignored, config)
    return model


def load_checkpoint(path: str | Path, config: str | ModelConfig | None = None, dtype: str | None = None,
                    device: str | torch.device = "cpu") -> BlockTransformer | GPTNeoXLM:
    """Load a Block or Pythia checkpoint into the reference model (eval mode).

    `config`: a preset name or a ModelConfig that overrides what the checkpoint says; by default it
    comes from `config.json` (Pythia) or from the tensor shapes. `dtype`: fp32, fp16, bf16, or
    None to keep the checkpoint's own dtype."""
    header = _read_header(path)
    model = _checked_model(header, config)
    expected = model.state_dict()
    target = _target_dtype(header, dtype)
    state = {}
    for file in sorted(set(header.files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name).to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_model(checkpoint: str | Path | None = None, config: str | ModelConfig | None = None,
               dtype: str | None = "fp32", device: str | torch.device = "cpu", seed: int = 0,
               pad_token_id: int | None = None) -> BlockTransformer | GPTNeoXLM:
    """The model a command asks for: a checkpoint if given (`config` overrides its config), else
    random weights (seeded) for `config`. `pad_token_id` replaces the config's pad id."""
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, config, dtype=dtype, device=device)
    elif config is None:
        raise UserError("no model given: pass a checkpoint or a preset")
    else:
        model = init_random(build_model(_resolve_config(config)), seed=seed)
        model = model.to(device=device, dtype=TORCH_DTYPES[dtype or "fp32"]).eval()
    if pad_token_id is not None:
        if not 0 <= pad_token_id < model.config.vocab_size:
            raise UserError(f"pad token id {pad_token_id} is outside the vocabulary [0, {model.config.vocab_size})")
        model.config = dataclasses.replace(model.config, pad_token_id=pad_token_id)
    return model


def _resolve_config(config: str | ModelConfig) -> ModelConfig:
    return get_preset(config) if isinstance(config, str) else config


def _ignored(kind: str, name: str) -> bool:
    if kind == "block":
        return name == BLOCK_UNUSED_EMBED
    return _HF_BUFFERS.fullmatch(name) is not None


def _check_keys(header: _Header, expected: dict, ignored: set, config) -> None:
    where = header.where
    against = f"config {config!r}" if isinstance(config, str) else "the config"
    missing = [k for k in expected if k not in header.shapes]
    if missing:
        raise CheckpointError(f"{where} is missing {len(missing)} tensor(s) that {against} needs: {_first(missing)}")
    unexpected = [k for k in header.shapes if k not in expected and k not in ignored]
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} unexpected tensor(s) for {against}: {_first(unexpected)}")
    for name, shape in expected.items():
        found = header.shapes[name]
        if found != shape:
            raise CheckpointError(f"tensor '{name}' in {header.files[name]} has shape {list(found)}, "
                                  f"but {against} expects {list(shape)}")
        if not header.dtypes[name].is_floating_point:
            raise CheckpointError(f"tensor '{name}' in {header.files[name]} has dtype {header.dtypes[name]}, "
                                  f"expected a floating-point dtype")


def _target_dtype(header: _Header, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
        return TORCH_DTYPES[dtype]
    name = "embedder.embeddings.weight" if header.kind == "block" else "gpt_neox.embed_in.weight"
    return header.dtypes.get(name, torch.float32)


# ------------------------------------------------------------------------------ config inference

def _infer_config(header: _Header) -> ModelConfig:
    if header.kind == "vanilla" and header.config_path is not None:
        return _vanilla_from_hf(_read_json(header.config_path), header.config_path)
    return config_from_shapes(header.shapes, header.where)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str = "the checkpoint") -> ModelConfig:
    """Infer a config from tensor names and shapes: layers from the largest layer index, widths,
    intermediate sizes and vocab from what most of the tensors that carry them say (so one
    mis-shaped tensor is the one named by the shape check, not its consistent neighbours), block
    length h_block / h_e, heads by the head-size rule. Pythia-layout names give a VanillaConfig,
    Block ones a BlockConfig."""
    def shape(name: str) -> tuple[int, ...]:
        try:
            return shapes[name]
        except KeyError:
            raise CheckpointError(f"cannot infer the model config: tensor '{name}' is not in {where}") from None

    def majority(first: tuple[str, int], *others: tuple[str, int]) -> int:
        """The size most of these (tensor, axis) pairs agree on; `first` must exist."""
        sizes = [shape(first[0])[first[1]]]
        sizes += [shapes[n][axis] for n, axis in others if n in shapes and len(shapes[n]) > axis]
        return collections.Counter(sizes).most_common(1)[0][0]

    def stack(prefix: str, vocab_size: int) -> NeoXConfig:
        layer = re.compile(re.escape(prefix) + r"\.layers\.(\d+)\.")
        indices = sorted({int(m.group(1)) for k in shapes if (m := layer.match(k))})
        if not indices:
            raise CheckpointError(f"cannot infer the model config: {where} has no tensors '{prefix}.layers.N.*'")
        layers = [f"{prefix}.layers.{i}." for i in indices]
        hidden = [(f"{p}{n}", 0) for p in layers for n in ("input_layernorm.weight", "input_layernorm.bias",
                                                          "post_attention_layernorm.weight", "attention.dense.bias",
                                                          "mlp.dense_4h_to_h.bias")]
        inner = [(f"{p}{n}", axis) for p in layers for n, axis in (("mlp.dense_h_to_4h.bias", 0),
                                                                  ("mlp.dense_4h_to_h.weight", 1))]
        try:
            return NeoXConfig(num_layers=indices[-1] + 1,
                              hidden_size=majority((f"{prefix}.final_layer_norm.weight", 0), *hidden),
                              vocab_size=vocab_size,
                              intermediate_size=majority((f"{prefix}.layers.{indices[0]}.mlp.dense_h_to_4h.weight", 0),
                                                         *inner))
        except ValueError as e:
            raise CheckpointError(f"cannot infer the model config of {where}: {e}") from None

    if _layout_kind(shapes, where) == "vanilla":
        return VanillaConfig(decoder=stack("gpt_neox", majority(("gpt_neox.embed_in.weight", 0), ("embed_out.weight", 0))))
    vocab = majority(("embedder.embeddings.weight", 0), ("token_decoder.gpt_neox.embed_in.weight", 0),
                     ("token_decoder.embed_out.weight", 0))
    embed_dim = shape("embedder.embeddings.weight")[1]
    block, token = stack("block_decoder.gpt_neox", vocab), stack("token_decoder.gpt_neox", vocab)
    if block.hidden_size % embed_dim:
        raise CheckpointError(f"cannot infer the block length of {where}: block decoder width {block.hidden_size} "
                              f"is not a multiple of the width of 'embedder.embeddings.weight' "
                              f"{list(shape('embedder.embeddings.weight'))}")
    return BlockConfig(block_decoder=block, token_decoder=token, block_len=block.hidden_size // embed_dim)


def _vanilla_from_hf(hf: dict, where: Path) -> VanillaConfig:
    """A VanillaConfig from a Hugging Face GPTNeoXConfig (transformers 4.x or 5.x field names)."""
    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise CheckpointError(f"{where}: model_type is {hf.get('model_type')!r}, only 'gpt_neox' (Pythia) is supported")
    if not hf.get("use_parallel_residual", True):
        raise CheckpointError(f"{where}: use_parallel_residual false is not supported (Pythia uses true)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Pythia uses 'gelu')")
    rope = hf.get("rope_parameters") or {}
    eos = hf.get("eos_token_id", 0)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    try:
        decoder = NeoXConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            vocab_size=int(hf["vocab_size"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            rotary_pct=float(hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))),
            rotary_base=float(hf.get("rotary_emb_base", hf.get("rope_theta", rope.get("rope_theta", 10000.0)))),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks the field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid model config: {e}") from None
    return VanillaConfig(decoder=decoder, eos_token_id=eos if isinstance(eos, int) else 0)
