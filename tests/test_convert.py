"""The converter: Hub folder -> converted (orbax) folder -> Hub folder, `load` from either, bad inputs.

A tiny reference pipeline (Nano-style transformer with perturbed norms/biases, tiny residual Wan VAE, tiny sound
tokenizer, the converter's UniPC scheduler, the tiny tokenizer) is saved with diffusers' `save_pretrained`, once as
single files and once with a small `max_shard_size` (many shards). Arrays must match exactly (bit for bit); the
converted model's fp32 forward must match diffusers within the parity suite's relative 2e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer, UniPCMultistepScheduler
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from torch_reference import NANO_STYLE, build_torch_transformer
from transformers import AutoTokenizer

import test_transformer_parity
from cosmos_jax import cli
from cosmos_jax.convert.converter import convert
from cosmos_jax.convert.export import export_model
from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.convert.load import abstract_transformer, load
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.wan_vae import COSMOS3_LATENTS_MEAN, COSMOS3_LATENTS_STD
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

TRANSFORMER = dict(NANO_STYLE, sound_dim=64)
VAE = dict(
    base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=list(COSMOS3_LATENTS_MEAN), latents_std=list(COSMOS3_LATENTS_STD),
)
SOUND = dict(dec_dim=4, enc_dim=8)
REASONER_CONFIG = {"model_type": "cosmos3_omni", "architectures": ["Cosmos3OmniForConditionalGeneration"]}
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Cosmos3OmniPipeline:
    tok_dir = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(tok_dir)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    return Cosmos3OmniPipeline(
        transformer=build_torch_transformer(TRANSFORMER, seed=2),
        text_tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)),
        vae=vae,
        scheduler=UniPCMultistepScheduler(
            use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
            sigma_max=200.0, sigma_min=0.147,
        ),
        sound_tokenizer=Cosmos3AVAEAudioTokenizer(**SOUND).eval(),
        enable_safety_checker=False,
    )


def _save(pipeline: Cosmos3OmniPipeline, folder: Path, **kwargs) -> Path:
    pipeline.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    (folder / "config.json").write_text(json.dumps(REASONER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def hub(pipeline, tmp_path_factory) -> Path:
    return _save(pipeline, tmp_path_factory.mktemp("hub") / "single")


@pytest.fixture(scope="module")
def hub_sharded(pipeline, tmp_path_factory) -> Path:
    return _save(pipeline, tmp_path_factory.mktemp("hub") / "sharded", max_shard_size="40KB")


@pytest.fixture(scope="module")
def converted(hub, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("conv") / "converted"
    assert cli.main(["convert", str(hub), str(dst)]) == 0
    return dst


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_identical(got, want) -> None:
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(safetensors.numpy.load_file(str(path)))
    return state


# ---------------------------------------------------------------------------------------------- round trips


def test_many_shards_convert_identically_to_one_file(hub, hub_sharded, converted, tmp_path) -> None:
    assert len(list((hub_sharded / "transformer").glob("*.safetensors"))) >= 10
    assert len(list((hub / "transformer").glob("*.safetensors"))) == 1
    convert(hub_sharded, tmp_path / "from_shards")
    single = load(converted, dtype=None)
    sharded = load(tmp_path / "from_shards", dtype=None)
    for field in ("params", "vae_params", "sound_params"):
        _assert_trees_identical(getattr(sharded, field), getattr(single, field))
    # and both equal the independent in-memory key map applied to the saved state dict
    cfg = single.transformer_config
    want = params_from_torch_state(_read_folder(hub / "transformer"), cfg, abstract_transformer(cfg))
    _assert_trees_identical(single.params, want)
    assert single.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 96)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_load_hub_equals_load_converted(hub, converted, dtype) -> None:
    from_hub, from_conv = load(hub, dtype=dtype), load(converted, dtype=dtype)
    assert (from_hub.source, from_conv.source) == ("hub", "converted")
    for field in ("params", "vae_params", "sound_params"):
        _assert_trees_identical(getattr(from_conv, field), getattr(from_hub, field))
    for model in (from_hub, from_conv):
        assert model.transformer_config == from_hub.transformer_config
        assert model.vae_config == from_hub.vae_config and model.sound_config == from_hub.sound_config
        assert model.scheduler_config.sigma_max == 200.0 and model.scheduler_config.use_karras_sigmas
        assert model.model_index["_class_name"] == "Cosmos3OmniPipeline"
        assert model.reasoner_config == REASONER_CONFIG
        assert (model.tokenizer_dir / "tokenizer.json").is_file()
        gen = model.params["generator"]
        assert gen["time_embedder"]["linear_1"]["kernel"].dtype == jnp.float32
        assert gen["layers"]["q_proj"]["kernel"].dtype == (jnp.float32 if dtype is None else dtype)


def test_convert_then_export_gives_back_every_tensor_byte_identical(hub, converted, tmp_path) -> None:
    out = tmp_path / "exported"
    assert cli.main(["export", str(converted), str(out), "--max-shard-size", "30KB"]) == 0
    assert (out / "transformer" / f"{WEIGHTS}.index.json").is_file()
    for component in ("transformer", "vae", "sound_tokenizer"):
        want, got = _read_folder(hub / component), _read_folder(out / component)
        assert sorted(got) == sorted(want), component
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert got[key].tobytes() == value.tobytes(), key
    original = json.loads((hub / "transformer" / "config.json").read_text())
    assert json.loads((out / "transformer" / "config.json").read_text()) == original
    for rel in ("model_index.json", "config.json", "vae/config.json", "sound_tokenizer/config.json",
                "scheduler/scheduler_config.json", "text_tokenizer/tokenizer.json"):
        assert (out / rel).read_bytes() == (hub / rel).read_bytes(), rel
    # diffusers itself reads the exported, sharded transformer back to the same weights
    reloaded = Cosmos3OmniTransformer.from_pretrained(str(out / "transformer"))
    want = _read_folder(hub / "transformer")
    for key, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), want[key], err_msg=key)


def test_in_memory_export_writes_the_hub_layout(hub, tmp_path) -> None:
    model = load(hub, dtype=None)
    files = export_model(model, tmp_path / "out", max_shard_bytes=10**9)
    assert Path("transformer") / WEIGHTS in files and Path("vae") / WEIGHTS in files
    for component in ("transformer", "vae", "sound_tokenizer"):
        want, got = _read_folder(hub / component), _read_folder(tmp_path / "out" / component)
        assert sorted(got) == sorted(want)
        assert all(got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes() for k, v in want.items()), component
    for rel in ("transformer/config.json", "vae/config.json", "sound_tokenizer/config.json",
                "scheduler/scheduler_config.json", "model_index.json", "config.json"):
        got = json.loads((tmp_path / "out" / rel).read_text())
        want = json.loads((hub / rel).read_text())
        assert {k: v for k, v in got.items() if k != "_diffusers_version"} == \
            {k: v for k, v in want.items() if k != "_diffusers_version"}, rel
    with pytest.raises(FileExistsError):
        export_model(model, tmp_path / "out")


def test_converted_forward_matches_diffusers(pipeline, converted, monkeypatch) -> None:
    model = load(converted, dtype=jnp.float32, components=("transformer",))
    jmodel = Cosmos3Transformer(model.transformer_config, dtype=jnp.float32, attention="xla")
    monkeypatch.setattr(test_transformer_parity, "_jax_params", lambda *_: (jmodel, model.params))
    case = test_transformer_parity.CASES["policy"]
    errors = test_transformer_parity._run_case(
        "convert-policy", pipeline.transformer, None, case, jnp.float32, torch.float32, cached=False
    )
    assert set(errors) == {"vision", "action"}
    assert max(errors.values()) <= test_transformer_parity.FP32_REL_TOL


# ---------------------------------------------------------------------------------------------- sharded loads


def _last_axis_sharding(mesh, leaf) -> NamedSharding:
    shardable = leaf.ndim >= 1 and leaf.shape[-1] % mesh.size == 0
    return NamedSharding(mesh, P(*([None] * (leaf.ndim - 1)), "x") if shardable else P())


@pytest.mark.parametrize("layout", ["hub", "converted"])
def test_sharded_load_places_only_each_devices_shard(hub, converted, layout) -> None:
    folder = hub if layout == "hub" else converted
    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])
    cfg = load(folder, components=()).transformer_config
    shardings = jax.tree.map(lambda leaf: _last_axis_sharding(mesh, leaf), abstract_transformer(cfg))
    whole = load(folder, dtype=jnp.bfloat16, components=("transformer",))
    sharded = load(folder, dtype=jnp.bfloat16, shardings=shardings, components=("transformer",))
    flat_whole, flat_sharded = _flat(whole.params), dict(jax.tree_util.tree_leaves_with_path(sharded.params))
    split = 0
    for path, array in flat_sharded.items():
        want = flat_whole[jax.tree_util.keystr(path)]
        assert array.sharding == _leaf_sharding(shardings, path)
        np.testing.assert_array_equal(np.asarray(array), want)
        if array.sharding.spec != P():
            split += 1
            assert len(array.addressable_shards) == 8
            for shard in array.addressable_shards:
                assert shard.data.shape == (*want.shape[:-1], want.shape[-1] // 8)
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    assert split >= 20


def _leaf_sharding(shardings, path):
    for key in path:
        shardings = shardings[key.key]
    return shardings


def test_callable_shardings_split_layer_stacks_across_devices(hub) -> None:
    mesh = jax.make_mesh((2,), ("layers",), devices=jax.devices()[:2])

    def by_path(path: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(mesh, P("layers") if "layers" in path else P())

    model = load(hub, dtype=None, shardings=by_path, components=("transformer",))
    whole = load(hub, dtype=None, components=("transformer",))
    up = model.params["reasoner"]["layers"]["mlp"]["up_proj"]["kernel"]
    want = np.asarray(whole.params["reasoner"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert [s.data.shape for s in up.addressable_shards] == [(1, 64, 96), (1, 64, 96)]
    for shard in up.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    _assert_trees_identical(model.params, whole.params)


# ---------------------------------------------------------------------------------------------- bad inputs


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "src"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    state = safetensors.numpy.load_file(str(path))
    edit(state)
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})


def _truncated(hub, sharded, tmp):
    src = _copy(hub, tmp)
    path = src / "transformer" / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    return src, ValueError, f"{path}: tensor"


def _corrupt_header(hub, sharded, tmp):
    src = _copy(hub, tmp)
    path = src / "transformer" / WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"#" * 32
    path.write_bytes(bytes(raw))
    return src, ValueError, f"{path}: corrupt JSON header"


def _header_past_eof(hub, sharded, tmp):
    src = _copy(hub, tmp)
    path = src / "transformer" / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    return src, ValueError, f"{path}: header length {len(raw) * 2} runs past the end of the file"


def _missing_shard(hub, sharded, tmp):
    src = _copy(sharded, tmp)
    victim = sorted((src / "transformer").glob("*.safetensors"))[3]
    victim.unlink()
    return src, ValueError, f"names shard '{victim.name}', which is missing"


def _key_in_two_shards(hub, sharded, tmp):
    src = _copy(sharded, tmp)
    first, second = sorted((src / "transformer").glob("*.safetensors"))[:2]
    stolen = safetensors.numpy.load_file(str(second))
    key = sorted(stolen)[0]
    _rewrite(first, lambda state: state.update({key: stolen[key]}))
    return src, ValueError, f"tensor '{key}' is stored in two shards: {first.name} and {second.name}"


def _wrong_dtype(hub, sharded, tmp):
    src = _copy(hub, tmp)
    _rewrite(src / "transformer" / WEIGHTS, lambda s: s.update({"norm.weight": s["norm.weight"].astype(np.int32)}))
    return src, ValueError, "wrong dtype for norm.weight in"


def _wrong_shape(hub, sharded, tmp):
    src = _copy(hub, tmp)
    bad = {"layers.1.mlp.up_proj.weight": np.zeros((96, 65), np.float32)}
    _rewrite(src / "transformer" / WEIGHTS, lambda state: state.update(bad))
    return src, ValueError, "wrong shape for layers.1.mlp.up_proj.weight: got (96, 65), expected (96, 64)"


def _config_mismatch(hub, sharded, tmp):
    src = _copy(hub, tmp)
    path = src / "transformer" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_hidden_layers=3)))
    return src, ValueError, "missing key layers.2.self_attn.to_q.weight"


class _Booby:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _pickle_checkpoint(hub, sharded, tmp):
    src = _copy(hub, tmp)
    (src / "transformer" / WEIGHTS).unlink()
    torch.save({"norm.weight": _Booby(tmp / "UNPICKLED")}, src / "transformer" / "diffusion_pytorch_model.bin")
    return src, ValueError, "pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused"


BAD_INPUTS = {
    "truncated": _truncated,
    "corrupt_header": _corrupt_header,
    "header_past_eof": _header_past_eof,
    "missing_shard": _missing_shard,
    "key_in_two_shards": _key_in_two_shards,
    "wrong_dtype": _wrong_dtype,
    "wrong_shape": _wrong_shape,
    "config_mismatch": _config_mismatch,
    "pickle": _pickle_checkpoint,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_clearly_and_leaves_no_dst(hub, hub_sharded, tmp_path, case) -> None:
    src, error, message = BAD_INPUTS[case](hub, hub_sharded, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "converted"
    with pytest.raises(error) as info:
        convert(src, dst)
    assert message in str(info.value)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "UNPICKLED").exists()
    with pytest.raises(error) as info:
        load(src)
    assert message in str(info.value)


def test_existing_dst_is_refused_unless_overwrite(hub, tmp_path, capsys) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(hub, dst)
    assert cli.main(["convert", str(hub), str(dst)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert cli.main(["convert", str(hub), str(dst), "--overwrite", "--dtype", "bf16"]) == 0
    summary = capsys.readouterr().out
    assert "generator" in summary and "bfloat16" in summary and "MiB/s" in summary
    assert not (dst / "keep.txt").exists()
    model = load(dst, dtype=None, components=("transformer",))
    assert model.params["reasoner"]["layers"]["q_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    assert model.params["generator"]["time_embedder"]["linear_2"]["bias"].dtype == np.float32


def test_export_from_converted_streams_one_leaf_at_a_time(tmp_path) -> None:
    """A converted folder is exported leaf by leaf: the numpy memory traced at peak stays near the largest stacked
    leaf plus one shard (measured 13.4 MiB of a 61.7 MiB model whose largest leaf is 8 MiB), where loading the
    model whole first holds all of it; the tensors written are byte-identical either way."""
    import tracemalloc

    from cosmos_jax.convert.export import export_converted

    config = dict(NANO_STYLE, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, head_dim=64,
                  rope_axes_dim=[12, 10, 10])
    model = build_torch_transformer(config, seed=4)
    model.save_pretrained(str(tmp_path / "hub" / "transformer"), safe_serialization=True)
    (tmp_path / "hub" / "model_index.json").write_text(json.dumps({"_class_name": "Cosmos3OmniPipeline"}))
    convert(tmp_path / "hub", tmp_path / "converted")
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = 8 * 256 * 1024 * 4  # the stacked MLP kernels
    tracemalloc.start()
    export_converted(tmp_path / "converted", tmp_path / "out", max_shard_bytes=4 * 2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 60 * 2**20 and peak < largest + 4 * 2**20 + 4 * 2**20
    want, got = _read_folder(tmp_path / "hub" / "transformer"), _read_folder(tmp_path / "out" / "transformer")
    assert sorted(got) == sorted(want) and len(list((tmp_path / "out" / "transformer").glob("*.safetensors"))) > 10
    assert all(got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes() for k, v in want.items())
