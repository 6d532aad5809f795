"""Hugging Face checkpoint directories: config.json plus safetensors, single file or sharded with an index."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.model.config import DTYPES, Qwen2Config
from align.model.qwen2 import Qwen2ForCausalLM
from align.model.rope import rope_inverse_frequencies

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> Qwen2ForCausalLM:
    """Load a Qwen2/Qwen2.5 checkpoint directory (ours, transformers' or an official release).

    Args:
        path: directory with config.json and model.safetensors or a sharded model.safetensors.index.json.
        dtype: weights dtype; None keeps the checkpoint's `torch_dtype`.
        device: where the weights go.
    Raises:
        FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    path = Path(path)
    config = read_config(path, dtype)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    state = read_safetensors(path, device)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some writers store the tied copy; the embedding is the one kept
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = {name: tensor.to(config.dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The RoPE frequencies are a non-persistent buffer, not in checkpoints: rebuild it off the meta device.
    model.model.inv_freq = rope_inverse_frequencies(config)[0].to(device)
    return model


def read_config(path: str | Path, dtype: torch.dtype | str | None = None) -> Qwen2Config:
    """The architecture in a model directory's config.json, with its weights dtype replaced by `dtype` if given."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (a model directory needs config.json)")
    config = Qwen2Config.from_file(config_file)
    if dtype is not None:
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        config = config.replace(torch_dtype=next(k for k, v in DTYPES.items() if v == dtype))
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: its single file, or every shard its index lists."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            shard_names = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index_file}: not a safetensors index ({err})") from err
        files = [path / name for name in shard_names]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
    return files


def read_safetensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors weights (single file or sharded with an index)."""
    state = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as reader:
                for name in reader.keys():
                    state[name] = reader.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{file}: unreadable safetensors file ({err})") from err
    return state


def tensor_files(path: Path) -> dict[str, Path]:
    """Which safetensors file of a model directory holds each tensor."""
    files = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as reader:
            files.update(dict.fromkeys(reader.keys(), file))
    return files


class TaskVectors(Mapping):
    """tau = theta_SFT - theta_base by parameter name, read from both checkpoints one tensor at a time (float32),
    so neither model is held whole: the Online Merging Optimizer's task vectors (align.optimizers)."""

    def __init__(self, sft_dir: Path, base_dir: Path, model: torch.nn.Module):
        self.files = {"sft": tensor_files(sft_dir), "base": tensor_files(base_dir)}
        self.names = [name for name, _ in model.named_parameters()]
        shapes = {name: p.shape for name, p in model.named_parameters()}
        for name in self.names:
            for side, directory in (("sft", sft_dir), ("base", base_dir)):
                if name not in self.files[side]:
                    raise ValueError(f"{directory}: no weight {name!r}; the base model must match the SFT model")
            with safe_open(self.files["base"][name], framework="pt") as reader:
                shape = tuple(reader.get_slice(name).get_shape())
            if shape != tuple(shapes[name]):
                raise ValueError(f"{base_dir}: {name} has shape {shape}, the SFT model {tuple(shapes[name])}")

    def __getitem__(self, name: str) -> torch.Tensor:
        tensors = []
        for side in ("sft", "base"):
            with safe_open(self.files[side][name], framework="pt") as reader:
                tensors.append(reader.get_tensor(name).float())
        return tensors[0] - tensors[1]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def save_pretrained(model: Qwen2ForCausalLM, output_dir: str | Path, max_shard_size: int = 5 * 2**30) -> None:
    """Write the model's config.json and weights to `output_dir` (see `save_state_dict`)."""
    save_state_dict(model.config, model.state_dict(), output_dir, max_shard_size)


def save_state_dict(
    config: Qwen2Config, state: dict[str, torch.Tensor], output_dir: str | Path, max_shard_size: int = 5 * 2**30
) -> None:
    """Write config.json and the weights of a full (gathered) state dict, sharded above `max_shard_size` bytes.

    Files are written into a temporary directory beside `output_dir` and moved in only when complete, so a
    crash never leaves a half-written checkpoint; other files in `output_dir` (a tokenizer, say) are kept.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; loaders re-tie from config.json
    dtype_name = next(k for k, v in DTYPES.items() if v == next(iter(state.values())).dtype)
    config = config.replace(torch_dtype=dtype_name)

    shards = _split_into_shards(state, max_shard_size)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        metadata = {"format": "pt"}  # transformers expects it
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata=metadata)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
                total += sum(t.numel() * t.element_size() for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        # A previous save with the other layout (single vs sharded) would confuse loaders: remove it.
        for stale in [output_dir / SINGLE_FILE, output_dir / INDEX_FILE, *output_dir.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        for file in sorted(tmp.iterdir()):
            os.replace(file, output_dir / file.name)


def _split_into_shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def copy_tokenizer_files(source_dir: str | Path, output_dir: str | Path) -> None:
    """Copy the tokenizer files of a model directory next to a saved checkpoint."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json", "chat_template.jinja"):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(output_dir) / name)
