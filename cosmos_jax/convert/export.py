"""Parameters -> the Hub's diffusers safetensors layout, so weights trained here go back to PyTorch users.

Writes `transformer/diffusion_pytorch_model*.safetensors` (+ index when sharded) and `config.json`, and the
same for `vae/` and `sound_tokenizer/` when present, plus `scheduler/`, `text_tokenizer/`, `model_index.json`,
the root reasoner config and, when the reasoner was loaded, the root `model*.safetensors` (+ index) with the keys
the original root files held (the ViT; the language tower and the generator tower when they were there). Keys,
shapes and dtypes are the reference's; tensors are exported in the dtype they are held in, so a `convert` (dtype
kept) then `export` gives back byte-identical tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert import keymap_reasoner, orbax_io
from cosmos_jax.convert.keymap_audio import audio_state_from_params
from cosmos_jax.convert.keymap_transformer import key_table
from cosmos_jax.convert.keymap_vae import vae_state_from_params
from cosmos_jax.convert.safetensors_io import CheckpointIndex, atomic_output_dir, shard_name, write_checkpoint
from cosmos_jax.convert.tree_paths import get_path
from cosmos_jax.convert.load import COMPONENTS, TRANSFORMER_TREES, LoadedModel, load

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # diffusers' "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as diffusers reads them; KiB/MiB/GiB binary); ints pass through."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if raw.endswith(u)), "B")
        number = raw[: len(raw) - len(unit)] if raw.endswith(unit) else raw
        try:
            value = int(float(number) * _UNITS[unit])
        except (ValueError, OverflowError):
            raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def transformer_tensors(params: Mapping[str, Any], config: Cosmos3Config,
                        trees: Sequence[str] = TRANSFORMER_TREES) -> Iterator[tuple[str, np.ndarray]]:
    """The diffusers state dict of `trees` (default both), one tensor at a time (dtypes as held)."""
    for entry in key_table(config):
        if entry.path[0] not in trees:
            continue
        value = get_path(params, entry.path)
        if entry.per_layer:
            for i, key in enumerate(entry.torch_keys(config.num_hidden_layers)):
                yield key, np.ascontiguousarray(entry.to_torch(np.asarray(value[i])))
        else:
            yield entry.torch_key, np.ascontiguousarray(entry.to_torch(np.asarray(value)))


def root_reasoner_tensors(model: LoadedModel, with_towers: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """The root reasoner checkpoint's tensors under their stored names, one at a time (dtypes as held): the ViT,
    then (with_towers) the language tower if the original held it and the generator tower if it was unified."""
    reasoner = model.reasoner
    if reasoner is None:
        raise ValueError("the model was loaded without its root reasoner (components without 'reasoner')")
    contents = reasoner.contents
    parts = keymap_reasoner.PARTS if contents.language_model and with_towers else (keymap_reasoner.VISION,)
    for key, value in keymap_reasoner.iter_state(reasoner.params, reasoner.config, parts):
        yield contents.aliases.get(key, key), np.ascontiguousarray(value)
    if contents.generator and with_towers:
        if not model.params:
            raise ValueError("the root checkpoint held the generator tower, but the transformer was not loaded")
        yield from transformer_tensors(model.params, model.transformer_config, ("generator",))


def _linked_keys(model: LoadedModel) -> list[str]:
    """The transformer/ keys a linked root index names: the language tower (+ the generator tower if unified)."""
    config = model.transformer_config
    trees = ("reasoner", "generator") if model.reasoner.contents.generator else ("reasoner",)
    return [k for e in key_table(config) if e.path[0] in trees for k in e.torch_keys(config.num_hidden_layers)]


def _write_root_reasoner(tmp: Path, model: LoadedModel, max_shard_bytes: int) -> None:
    """The root reasoner files into `tmp`, in the original's layout: root `model*.safetensors` holding every tensor,
    or (linked) the ViT's own files plus a root `model.safetensors.index.json` naming them and transformer/'s
    shards (written before this)."""
    contents = model.reasoner.contents
    if not contents.linked:
        write_checkpoint(tmp / "reasoner.weights", root_reasoner_tensors(model), max_shard_bytes=max_shard_bytes,
                         weights_name="model")
        _merge_into(tmp / "reasoner.weights", tmp)
        return
    vision_dir = tmp / contents.vision_dir
    write_checkpoint(tmp / "vision.weights", root_reasoner_tensors(model, with_towers=False),
                     max_shard_bytes=max_shard_bytes, weights_name="model" if contents.vision_dir else "vision")
    _merge_into(tmp / "vision.weights", vision_dir)
    weight_map, total = {}, 0
    with CheckpointIndex.open(vision_dir) as vision, CheckpointIndex.open(tmp / "transformer") as transformer:
        for index, keys in ((vision, vision.keys()), (transformer, _linked_keys(model))):
            for key in keys:
                weight_map[key] = shard_name(index.info(key).file, tmp)
                total += index.nbytes(key)
    if not contents.vision_dir:
        (tmp / "vision.safetensors.index.json").unlink(missing_ok=True)  # the root index below replaces it
    _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_model(
    model: LoadedModel,
    dst: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    copy_from: Path | None = None,
) -> list[Path]:
    """Write `model` to `dst` in the Hub layout, atomically; returns the files written (relative to `dst`).

    copy_from: a converted folder whose verbatim config files (model_index.json, root files, component
    configs) are copied instead of being re-serialised from the config objects.
    """
    if not model.params:
        raise ValueError("export needs the transformer params (load with 'transformer' in components)")
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        if copy_from is not None:
            _copy_verbatim(copy_from, tmp)
        write_checkpoint(tmp / "transformer", transformer_tensors(model.params, model.transformer_config),
                         max_shard_bytes=max_shard_bytes)
        model.transformer_config.to_json(tmp / "transformer" / "config.json")
        if model.vae_params is not None and model.vae_config is not None:
            write_checkpoint(tmp / "vae.weights", vae_state_from_params(model.vae_params, model.vae_config),
                             max_shard_bytes=max_shard_bytes)
            _merge_into(tmp / "vae.weights", tmp / "vae")
            if not (tmp / "vae" / "config.json").is_file():
                _write_json(tmp / "vae" / "config.json", model.vae_config.to_dict())
        if model.sound_params is not None and model.sound_config is not None:
            state = audio_state_from_params(model.sound_params, model.sound_config)
            write_checkpoint(tmp / "sound.weights", state, max_shard_bytes=max_shard_bytes)
            _merge_into(tmp / "sound.weights", tmp / "sound_tokenizer")
            if not (tmp / "sound_tokenizer" / "config.json").is_file():
                model.sound_config.to_json_file(tmp / "sound_tokenizer" / "config.json")
        if model.reasoner is not None:
            _write_root_reasoner(tmp, model, max_shard_bytes)
        if model.scheduler_config is not None and not (tmp / "scheduler").exists():
            (tmp / "scheduler").mkdir()
            model.scheduler_config.to_json_file(tmp / "scheduler" / "scheduler_config.json")
        if model.tokenizer_dir is not None and not (tmp / "text_tokenizer").exists():
            shutil.copytree(model.tokenizer_dir, tmp / "text_tokenizer")
        if model.model_index and not (tmp / "model_index.json").exists():
            _write_json(tmp / "model_index.json", model.model_index)
        if model.reasoner_config is not None and not (tmp / "config.json").exists():
            _write_json(tmp / "config.json", model.reasoner_config)
        return sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())


def _merge_into(src: Path, dst: Path) -> None:
    """Move every file of the freshly written folder `src` into `dst` (created if needed), then drop `src`."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        os.rename(path, dst / path.name)
    src.rmdir()


def _copy_verbatim(converted: Path, tmp: Path) -> None:
    """Everything of a converted folder except its orbax trees, marker and transformer config."""
    for path in sorted(converted.iterdir()):
        if path.name in (orbax_io.ORBAX_DIR, orbax_io.MARKER, "transformer"):
            continue
        if path.is_dir():
            shutil.copytree(path, tmp / path.name)
        else:
            shutil.copyfile(path, tmp / path.name)


def export_converted(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[Path]:
    """A converted (or Hub-layout) folder -> the Hub layout at `dst`, tensors in their stored dtypes.

    From a converted folder this streams: the transformer and reasoner trees are read one stacked leaf at a time
    and written shard by shard (host memory: one leaf plus the current shard's buffer). A Hub folder is loaded
    whole first.
    """
    converted = orbax_io.is_converted(src)
    model = load(src, dtype=None, components=COMPONENTS, lazy=converted)
    copy_from = Path(src) if converted else None
    return export_model(model, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite, copy_from=copy_from)
