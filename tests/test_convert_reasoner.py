"""The root reasoner files through load / convert / export / reason, against transformers 5.23 on tiny models.

A tiny `Cosmos3OmniForConditionalGeneration` (perturbed weights, as in test_reasoner.py) and a tiny diffusers
`Cosmos3OmniTransformer` with the same language tower are saved the Hub way: transformer/ by diffusers, the root
config.json + model*.safetensors by transformers' `save_pretrained`. Four root layouts:
- shared: root LM byte-identical to transformer/'s (the published case): held once, taken from the transformer;
- own: the transformer's LM is different, the root is sharded: the root LM is kept as its own copy;
- vision_only: the root holds only the ViT: the LM comes from the transformer;
- unified: the root holds the whole transformer state (LM + generator) plus the ViT, in shards;
- linked: a root `model.safetensors.index.json` names transformer/'s shards for the LM and generator and
  `vision_encoder/model.safetensors` for the ViT (no copies on disk; what the Nano converter appears to write).
Round trips must be bit-exact; logits of the converted reasoner equal transformers within test_reasoner.py's fp32
tolerance (max abs 2e-5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from test_reasoner import (
    IMAGE_ID,
    LOGIT_ATOL,
    TEXT_CONFIG,
    VISION_CONFIG,
    _image,
    _perturb,
    _prompt,
    _torch_inputs,
)
from torch_reference import NANO_STYLE, build_torch_transformer
from transformers import Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration

from cosmos_jax import cli
from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.convert.converter import convert, planned_bytes
from cosmos_jax.convert import orbax_io
from cosmos_jax.convert.export import export_converted
from cosmos_jax.convert.keymap_reasoner import is_generator_key
from cosmos_jax.convert.safetensors_io import CheckpointIndex, write_checkpoint
from cosmos_jax.convert.load import COMPONENTS, ROOT_TREE, load
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

TEXT = dict(TEXT_CONFIG, num_hidden_layers=2)
TRANSFORMER = dict(NANO_STYLE, vocab_size=600, intermediate_size=128)
START_ID, END_ID = 515, 516
LAYOUTS = ("shared", "own", "vision_only", "unified", "linked")
VISION_PREFIXES = ("blocks.", "merger.", "patch_embed.", "pos_embed.", "deepstack_merger_list.")


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, following its index (which may name files in subfolders)."""
    with CheckpointIndex.open(folder) as index:
        return {key: index.read(key) for key in index.keys()}


def _torch_reasoner() -> Cosmos3OmniForConditionalGeneration:
    torch.manual_seed(0)
    config = Cosmos3OmniConfig(text_config=TEXT, vision_config=VISION_CONFIG, image_token_id=IMAGE_ID,
                               video_token_id=519, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    model = Cosmos3OmniForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    _perturb(model)
    return model


def _hub(folder: Path, reasoner: Cosmos3OmniForConditionalGeneration, layout: str) -> Path:
    """A Hub-layout folder: transformer/ (LM equal to the reasoner's except for 'own'), root reasoner files."""
    reasoner.save_pretrained(folder, max_shard_size="100KB" if layout == "own" else "50GB")
    root_state = _read_folder(folder)
    transformer = build_torch_transformer(TRANSFORMER, seed=3)
    if layout != "own":
        lm = {k: torch.from_numpy(v) for k, v in root_state.items() if not k.startswith(VISION_PREFIXES)}
        missing, unexpected = transformer.load_state_dict(lm, strict=False)
        assert not unexpected and all(is_generator_key(k) for k in missing)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True,
                                max_shard_size="200KB" if layout == "linked" else "50GB")
    if layout == "linked":
        for path in list(folder.glob("model*.safetensors*")):
            path.unlink()
        vision = {k: v for k, v in root_state.items() if k.startswith(VISION_PREFIXES)}
        (folder / "vision_encoder").mkdir()
        safetensors.numpy.save_file(vision, str(folder / "vision_encoder" / "model.safetensors"), {"format": "pt"})
        index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        weight_map = {k: f"transformer/{v}" for k, v in index["weight_map"].items()}
        weight_map.update(dict.fromkeys(vision, "vision_encoder/model.safetensors"))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if layout in ("vision_only", "unified"):
        for path in list(folder.glob("model*.safetensors*")):
            path.unlink()
        vision = {k: v for k, v in root_state.items() if k.startswith(VISION_PREFIXES)}
        extra = _read_folder(folder / "transformer") if layout == "unified" else {}
        write_checkpoint(folder / "root.weights", {**extra, **vision}, max_shard_bytes=60_000, weights_name="model")
        for path in (folder / "root.weights").iterdir():
            path.rename(folder / path.name)
        (folder / "root.weights").rmdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Cosmos3OmniPipeline"}))
    write_tiny_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"shortest_edge": 64, "longest_edge": 1600}}))
    return folder


@pytest.fixture(scope="module")
def torch_reasoner() -> Cosmos3OmniForConditionalGeneration:
    return _torch_reasoner()


@pytest.fixture(scope="module")
def folders(torch_reasoner, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """layout -> (Hub folder, converted folder)."""
    out = {}
    for layout in LAYOUTS:
        hub = _hub(tmp_path_factory.mktemp(layout) / "hub", torch_reasoner, layout)
        converted = hub.parent / "converted"
        assert cli.main(["convert", str(hub), str(converted)]) == 0
        out[layout] = hub, converted
    return out


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


EXPECTED = {  # layout -> (language_model_from, root holds the LM, root holds the generator)
    "shared": ("transformer", True, False),
    "own": ("root", True, False),
    "vision_only": ("transformer", False, False),
    "unified": ("transformer", True, True),
    "linked": ("transformer", True, True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_hub_equals_load_converted_and_shares_the_language_tower(folders, layout) -> None:
    hub, converted = folders[layout]
    from_hub, from_conv = (load(p, dtype=None, components=COMPONENTS) for p in (hub, converted))
    lm_from, has_lm, has_generator = EXPECTED[layout]
    for model in (from_hub, from_conv):
        reasoner = model.reasoner
        assert reasoner.language_model_from == lm_from
        assert (reasoner.contents.language_model, reasoner.contents.generator) == (has_lm, has_generator)
        linked = layout == "linked"
        assert (reasoner.contents.linked, reasoner.contents.vision_dir) == (linked, "vision_encoder" if linked else "")
        assert reasoner.params["vision"]["blocks"]["qkv"]["kernel"].shape == (4, 32, 96)
        shared = reasoner.params["layers"] is model.params["reasoner"]["layers"]
        assert shared == (lm_from == "transformer")  # one copy of the LM in memory when they are the same
    got, want = _flat(from_conv.reasoner.params), _flat(from_hub.reasoner.params)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype == np.float32 and got[key].tobytes() == value.tobytes(), key
    marker = orbax_io.read_marker(converted)
    assert marker["root_reasoner"]["language_model_from"] == lm_from
    assert set(marker["trees"]) == {"reasoner", "generator", ROOT_TREE}
    assert (converted / "preprocessor_config.json").read_bytes() == (hub / "preprocessor_config.json").read_bytes()
    assert (converted / "generation_config.json").is_file() and (converted / "config.json").is_file()
    assert load(hub).reasoner is None  # not a default component: generation never reads the ViT
    with pytest.raises(ValueError, match="lazy=True needs a converted folder"):
        load(hub, dtype=None, lazy=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_then_export_gives_back_every_root_tensor_byte_identical(folders, layout, tmp_path) -> None:
    hub, converted = folders[layout]
    out = tmp_path / "exported"
    export_converted(converted, out, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    linked = layout == "linked"
    assert bool(list(out.glob("*.safetensors"))) != linked
    assert (len(list((out / "vision_encoder").glob("model*.safetensors"))) > 1) == linked
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["blocks.0.attn.qkv.weight"].startswith("vision_encoder/model-000" if linked else "model-000")
    if linked:
        assert weight_map["layers.0.self_attn.to_q.weight"].startswith("transformer/diffusion_pytorch_model-000")
    for folder in ("", "transformer"):
        want, got = _read_folder(hub / folder), _read_folder(out / folder)
        assert sorted(got) == sorted(want), folder
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert got[key].tobytes() == value.tobytes(), key
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (hub / name).read_bytes(), name
    if layout == "shared":  # transformers itself reads the exported root back
        reloaded = Cosmos3OmniForConditionalGeneration.from_pretrained(str(out)).eval()
        original = _read_folder(hub)
        state = {k: v for k, v in reloaded.state_dict().items()}
        assert state["model.visual.blocks.1.attn.qkv.weight"].numpy().tobytes() == \
            original["blocks.1.attn.qkv.weight"].tobytes()


@pytest.mark.parametrize("layout", ["own", "vision_only"])
def test_converted_reasoner_logits_match_transformers(folders, torch_reasoner, layout) -> None:
    """fp32, an image and text prompt: the converted model's logits equal transformers' (max abs 2e-5)."""
    _, converted = folders[layout]
    reasoner = load(converted, dtype=jnp.float32, components=("reasoner",)).reasoner
    model = reasoner.model()
    prompt = _prompt(model, [5, 17, 42, 99, 7], images=(_image(1, 30, 20),))
    got = np.asarray(jax.jit(model.prompt_logits)(reasoner.params, ri.batch_prompts([prompt], model.config)))[0]
    with torch.no_grad():
        expected = torch_reasoner(**_torch_inputs(prompt)).logits[0].numpy()
    np.testing.assert_allclose(got, expected, atol=LOGIT_ATOL, rtol=0)
    assert np.abs(expected).max() > 1.0


def test_bf16_convert_casts_the_vision_tree_and_reads_what_it_planned(folders, tmp_path) -> None:
    hub, _ = folders["shared"]
    summary = convert(hub, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert (summary.tensors_read, summary.bytes_read) == planned_bytes(hub) == (135, 1_771_168)
    reasoner = load(tmp_path / "bf16", dtype=None, components=COMPONENTS).reasoner
    assert reasoner.params["vision"]["merger"]["linear_fc1"]["kernel"].dtype == ml_dtypes.bfloat16
    assert reasoner.params["layers"]["q_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    assert reasoner.model().dtype == jnp.bfloat16


@pytest.mark.parametrize("layout", ["shared", "own", "linked"])
def test_reason_command_on_hub_and_converted_folders_equals_transformers(folders, torch_reasoner, layout, tmp_path,
                                                                        capsys) -> None:
    from PIL import Image

    image_path = tmp_path / "scene.png"
    Image.fromarray(_image(7, 28, 36)).save(image_path)
    records = []
    for folder in folders[layout]:
        out = tmp_path / f"{folder.name}.json"
        assert cli.main(["reason", "--model", str(folder), "--prompt", "Describe the robot arm.", "--image",
                         str(image_path), "--temperature", "0", "--max-new-tokens", "8", "--dtype", "float32",
                         "--output-ids", str(out)]) == 0
        records.append(json.loads(out.read_text()))
    capsys.readouterr()
    assert records[0] == records[1]
    settings = ri.ProcessorSettings(patch_size=4, min_pixels=8 * 8, max_pixels=40 * 40)
    item = ri.preprocess_image(ri.load_image(image_path), settings)
    ids = records[0]["prompt_ids"]
    prompt = ri.PreparedPrompt(tuple(ids), tuple(ri.IMAGE if t == IMAGE_ID else ri.TEXT for t in ids), (item,))
    with torch.no_grad():
        expected = torch_reasoner.generate(**_torch_inputs(prompt), max_new_tokens=8, do_sample=False,
                                           eos_token_id=514, pad_token_id=512)[0, len(ids):].tolist()
    assert records[0]["generated_ids"] == expected


# ---------------------------------------------------------------------------------------------- bad inputs


def _rewrite_root(src: Path, edit) -> Path:
    path = src / "model.safetensors"
    state = safetensors.numpy.load_file(str(path))
    edit(state)
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})
    return path


def _broken_keys(src: Path) -> tuple[str, ...]:
    def edit(state):
        del state["blocks.1.attn.qkv.weight"]
        state["merger.extra.weight"] = np.zeros(2, np.float32)
        state["pos_embed.weight"] = np.zeros((5, 32), np.float32)
        state["merger.norm.bias"] = state["merger.norm.bias"].astype(np.int32)

    path = _rewrite_root(src, edit)
    return (f"{src} (model.safetensors): 4 problem(s)", "missing key blocks.1.attn.qkv.weight",
            "unexpected vision key merger.extra.weight",
            "wrong shape for pos_embed.weight: got (5, 32), expected (36, 32)",
            f"wrong dtype for merger.norm.bias in {path}: int32")


def _text_config_mismatch(src: Path) -> tuple[str, ...]:
    raw = json.loads((src / "config.json").read_text())
    raw["text_config"]["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(raw))
    return (f"{src} (model.safetensors)", "wrong shape for layers.0.mlp.up_proj.weight")


def _not_a_reasoner_config(src: Path) -> tuple[str, ...]:
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return (str(src / "config.json"), "model_type 'cosmos3_omni' or 'cosmos3_edge'")


def _generator_differs(src: Path) -> tuple[str, ...]:
    with CheckpointIndex.open(src) as index:
        path = index.info("proj_in.weight").file
    state = safetensors.numpy.load_file(str(path))
    state["proj_in.weight"] = state["proj_in.weight"] + np.float32(1.0)
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})
    return (f"{src}: its generator tensors are not those of {src / 'transformer'} (e.g. proj_in.weight)",)


BAD_ROOTS = {
    "broken_keys": ("shared", _broken_keys),
    "text_config_mismatch": ("shared", _text_config_mismatch),
    "not_a_reasoner_config": ("shared", _not_a_reasoner_config),
    "generator_differs": ("unified", _generator_differs),
}


@pytest.mark.parametrize("case", sorted(BAD_ROOTS))
def test_bad_root_files_are_refused_naming_the_file_and_every_key(folders, tmp_path, case) -> None:
    layout, make = BAD_ROOTS[case]
    src = tmp_path / "src"
    shutil.copytree(folders[layout][0], src)
    expected = make(src)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out" / "converted")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ValueError) as info_load:
        load(src, components=COMPONENTS)
    for message in (str(info.value), str(info_load.value)):
        for part in expected:
            assert part in message
