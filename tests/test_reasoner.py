"""The reasoner (Qwen3-VL vision encoder + language tower, KV-cached decoding) against transformers 5.23's
`Cosmos3OmniForConditionalGeneration` on tiny random configs, fp32 on CPU.

Tolerances: fp32 logits max abs error <= 2e-5 (measured 2.4e-6 .. 4.0e-6 with logits up to ~4.7: summation order
only); greedy ids must be identical; bf16 is checked against the reference's own bf16 spread.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from hypothesis import given
from hypothesis import strategies as st
from transformers import Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.convert.keymap_reasoner import state_from_params
from cosmos_jax.convert.load import load_reasoner
from cosmos_jax import cli
from cosmos_jax.modeling.reasoner import Reasoner
from cosmos_jax.sampling import generation_config, reason
from cosmos_jax.sampling.prompts import ChatTokenizer
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

LOGIT_ATOL = 2e-5
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 518, 519, 515, 516  # the tiny tokenizer's ids
TEXT_CONFIG = dict(
    vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
)
VISION_CONFIG = dict(
    depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
    spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=[0, 2],
)
SETTINGS = ri.ProcessorSettings(patch_size=4, min_pixels=8 * 8, max_pixels=40 * 40)


def _perturb(model: torch.nn.Module) -> None:
    """Non-degenerate random weights: norms near 1, biases nonzero, embeddings/LM head large enough that greedy
    decoding does not collapse to one token."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name or "pos_embed" in name:
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


@functools.lru_cache(maxsize=None)
def _reference(tmp_root: str) -> tuple[Cosmos3OmniForConditionalGeneration, str]:
    torch.manual_seed(0)
    config = Cosmos3OmniConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, image_token_id=IMAGE_ID,
                               video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    model = Cosmos3OmniForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    _perturb(model)
    model.save_pretrained(tmp_root)
    write_tiny_tokenizer(tmp_root)
    with open(f"{tmp_root}/preprocessor_config.json", "w") as f:
        json.dump({"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
                   "image_std": [0.5] * 3, "size": {"shortest_edge": 64, "longest_edge": 1600}}, f)
    return model, tmp_root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch_model, folder = _reference(str(tmp_path_factory.mktemp("reasoner")))
    model, params = load_reasoner(folder, dtype=jnp.float32)
    return torch_model, model, params, folder


def _encode(text: str) -> list[int]:
    """A stand-in tokenizer for timestamp text: one id per character."""
    return [ord(c) % 500 for c in text]


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _prompt(model, text_ids, images=(), video=None) -> ri.PreparedPrompt:
    ids = list(text_ids[:3])
    items = []
    for image in images:
        ids += [START_ID, IMAGE_ID, END_ID]
        items.append(ri.preprocess_image(image, SETTINGS))
    if video is not None:
        ids += [START_ID, VIDEO_ID, END_ID]
        items.append(ri.preprocess_video(video, SETTINGS))
    ids += list(text_ids[3:])
    return ri.expand_placeholders(ids, items, model.config, _encode)


def _torch_inputs(prompt: ri.PreparedPrompt) -> dict:
    inputs = {
        "input_ids": torch.tensor([prompt.ids]),
        "mm_token_type_ids": torch.tensor([prompt.token_types]),
        "attention_mask": torch.ones(1, len(prompt.ids), dtype=torch.long),
    }
    for kind, pixels_key, grid_key in ((ri.IMAGE, "pixel_values", "image_grid_thw"),
                                       (ri.VIDEO, "pixel_values_videos", "video_grid_thw")):
        items = [it for it in prompt.items if it.kind == kind]
        if items:
            inputs[pixels_key] = torch.from_numpy(np.concatenate([it.pixels for it in items]))
            inputs[grid_key] = torch.tensor([it.grid for it in items])
    return inputs


def _clip(seed: int, frames: int = 4) -> ri.VideoClip:
    data = np.random.default_rng(seed).integers(0, 256, (frames, 16, 24, 3), dtype=np.uint8)
    return ri.VideoClip(data, tuple(range(0, 3 * frames, 3)), 24.0)


CASES = {
    "text": dict(),
    "image": dict(images=(_image(1, 30, 20),)),
    "two_images": dict(images=(_image(2, 16, 16), _image(3, 24, 40))),
    "video": dict(video=_clip(4)),
    "image_and_video": dict(images=(_image(5, 20, 28),), video=_clip(6, frames=5)),
}
TEXT_IDS = {"text": [5, 17, 42, 99, 7, 300, 12, 1, 77, 8], "image": [5, 17, 42, 99, 7],
            "two_images": [9, 3, 100, 250], "video": [11, 12, 13, 14, 15, 16], "image_and_video": [21, 22, 23, 24]}


@pytest.fixture(scope="module")
def prompts(models):
    _, model, _, _ = models
    return {case: _prompt(model, TEXT_IDS[case], **kwargs) for case, kwargs in CASES.items()}


def test_prompt_logits_match_transformers_in_one_left_padded_batch(models, prompts):
    """Text only, one image, two images of different sizes, a 4-frame video, an image and a 5-frame video: each row
    of one left-padded batch equals transformers run on that prompt alone (fp32, atol 2e-5)."""
    torch_model, model, params, _ = models
    batch = ri.batch_prompts(list(prompts.values()), model.config)
    got = np.asarray(jax.jit(model.prompt_logits)(params, batch))
    for row, (case, prompt) in enumerate(prompts.items()):
        with torch.no_grad():
            expected = torch_model(**_torch_inputs(prompt)).logits[0].numpy()
        pad = int(batch.pad[row])
        np.testing.assert_allclose(got[row, pad:], expected, atol=LOGIT_ATOL, rtol=0, err_msg=case)
        assert np.abs(expected).max() > 1.0  # logits are far from degenerate


def test_greedy_32_tokens_match_transformers_and_stop_on_eos(models, prompts):
    torch_model, model, params, _ = models
    prompts = {case: prompts[case] for case in ("text", "image", "image_and_video")}
    expected = {}
    for case, prompt in prompts.items():
        with torch.no_grad():
            out = torch_model.generate(**_torch_inputs(prompt), max_new_tokens=32, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
        expected[case] = out[0, len(prompt.ids):].numpy()
        assert len(set(expected[case].tolist())) > 4  # greedy did not collapse to one repeated token
    eos = int(expected["image"][9])  # appears in the image row at step 9 (and maybe elsewhere)
    batch = ri.batch_prompts(list(prompts.values()), model.config)
    tokens, lengths = reason.generate(model, params, batch, max_new_tokens=32, eos_ids=(eos,), pad_id=0)
    for row, case in enumerate(prompts):
        ref = expected[case]
        hits = np.flatnonzero(ref == eos)
        stop = int(hits[0]) + 1 if hits.size else 32
        assert lengths[row] == stop, case
        np.testing.assert_array_equal(tokens[row, :stop], ref[:stop], err_msg=case)
        assert (tokens[row, stop:] == 0).all()
    assert lengths[1] <= 10


@functools.lru_cache(maxsize=None)
def _jitted(model):
    return (jax.jit(model.prefill, static_argnums=2), jax.jit(model.decode_step), jax.jit(model.prompt_logits))


@given(st.lists(st.integers(0, 511), min_size=3, max_size=8), st.lists(st.integers(0, 511), min_size=3, max_size=8),
       st.lists(st.integers(0, 511), min_size=5, max_size=5))
def test_kv_cached_decoding_equals_full_recomputation(models, first, second, forced):
    """Feed the same continuation tokens through prefill + cached single-token steps and through one full
    forward over prompt + continuation: logits agree at every step, for two rows of different lengths."""
    _, model, params, _ = models
    prefill, decode_step, full = _jitted(model)
    prompts = [ri.expand_placeholders(ids, [], model.config, _encode) for ids in (first, second)]
    batch = ri.batch_prompts(prompts, model.config)
    width = batch.input_ids.shape[1]
    batch = ri.batch_prompts([ri.PreparedPrompt((1,) * (8 - width) + p.ids, (0,) * (8 - width) + p.token_types)
                              for p in prompts], model.config)
    logits, cache = prefill(params, batch, 8 + len(forced))
    steps = [np.asarray(logits)]
    for i, token in enumerate(forced[:-1]):
        tokens = jnp.full((2,), token, jnp.int32)
        logits, cache = decode_step(params, tokens, batch.next_position + i, cache, jnp.int32(8 + i))
        steps.append(np.asarray(logits))
    whole = [ri.PreparedPrompt(p.ids + tuple(forced[:-1]), p.token_types + (0,) * (len(forced) - 1))
             for p in (ri.PreparedPrompt((1,) * (8 - width) + p.ids, (0,) * (8 - width) + p.token_types)
                       for p in prompts)]
    reference = np.asarray(full(params, ri.batch_prompts(whole, model.config)))
    np.testing.assert_allclose(np.stack(steps, 1), reference[:, 7:], atol=2e-5, rtol=0)


def _greedy_decode(model, params, batch, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill, then `steps` cached greedy decode steps: (tokens [B, steps], logits [steps + 1, B, V])."""
    prefill, decode_step, _ = _jitted(model)
    width = batch.input_ids.shape[1]
    logits, cache = prefill(params, batch, width + steps)
    tokens, history = [], [np.asarray(logits)]
    for i in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        logits, cache = decode_step(params, token, batch.next_position + i, cache, jnp.int32(width + i))
        history.append(np.asarray(logits))
    return np.stack(tokens, 1), np.stack(history)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["blocked", "pallas"])
def test_attention_implementations_equal_xla_in_prompt_logits_and_decoding(models, prompts, attention):
    """The language tower with attention='blocked' or 'pallas' (interpret mode on CPU) against the default
    'xla', fp32, one left-padded batch of three prompts of different lengths (text, image, image + video; GQA,
    4 query heads over 2 kv heads): prompt logits at every non-pad position and the logits of prefill + 12
    cached greedy decode steps within atol 2e-5, and the 12 greedy tokens identical."""
    _, model, params, _ = models
    other = dataclasses.replace(model, attention=attention)
    batch = ri.batch_prompts([prompts[case] for case in ("text", "image", "image_and_video")], model.config)
    assert len(set(batch.pad.tolist())) == 3  # three different pad lengths
    expected, got = (np.asarray(_jitted(m)[2](params, batch)) for m in (model, other))
    for row, pad in enumerate(batch.pad.tolist()):
        np.testing.assert_allclose(got[row, pad:], expected[row, pad:], atol=LOGIT_ATOL, rtol=0)
    (tokens, logits), (other_tokens, other_logits) = (_greedy_decode(m, params, batch, 12) for m in (model, other))
    assert all(len(set(row.tolist())) > 4 for row in tokens)  # greedy did not collapse to one token
    np.testing.assert_array_equal(other_tokens, tokens)
    np.testing.assert_allclose(other_logits, logits, atol=LOGIT_ATOL, rtol=0)


def test_reasoner_attention_choice(models):
    """'xla' is the default; 'auto' resolves as for the transformer (blocked on CPU); a bad name is refused."""
    from cosmos_jax.modeling import attention
    from pallas_kernels.xla import blocked

    _, model, _, _ = models
    assert model.attention == "xla"
    assert attention.cached_attention_function("auto") is blocked.cached_attention
    with pytest.raises(ValueError, match="reasoner attention must be one of"):
        Reasoner(model.config, dtype=jnp.float32, attention="flash")


def test_reason_command_streams_greedy_ids_equal_to_transformers(models, tmp_path, capsys):
    torch_model, model, _, folder = models
    image_path = tmp_path / "scene.png"
    Image.fromarray(_image(7, 28, 36)).save(image_path)
    out = tmp_path / "ids.json"
    rc = cli.main(["reason", "--model", folder, "--prompt", "Describe the robot arm.", "--image", str(image_path),
                   "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32", "--output-ids", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    item = ri.preprocess_image(ri.load_image(image_path), SETTINGS)
    prompt = ri.PreparedPrompt(tuple(record["prompt_ids"]),
                               tuple(ri.IMAGE if t == IMAGE_ID else ri.TEXT for t in record["prompt_ids"]), (item,))
    assert prompt.ids.count(IMAGE_ID) == item.tokens_per_group(2) == 16  # 28x36 -> 32x32 pixels
    with torch.no_grad():
        expected = torch_model.generate(**_torch_inputs(prompt), max_new_tokens=12, do_sample=False,
                                        eos_token_id=514, pad_token_id=512)[0, len(prompt.ids):].tolist()
    assert record["generated_ids"] == expected
    text = ChatTokenizer.from_dir(folder).tokenizer.decode(expected, skip_special_tokens=True)
    assert capsys.readouterr().out == text + "\n"


def test_preprocess_image_equals_qwen2vl_pil_processor():
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3, size={"shortest_edge": 64, "longest_edge": 1600})
    for seed, (h, w) in enumerate([(30, 20), (7, 9), (97, 41), (16, 16)]):
        image = _image(seed, h, w)
        expected = processor(images=[Image.fromarray(image)], return_tensors="np")
        item = ri.preprocess_image(image, SETTINGS)
        np.testing.assert_allclose(item.pixels, expected["pixel_values"], atol=1e-6, rtol=0)
        assert item.grid == tuple(expected["image_grid_thw"][0])


def test_video_patches_equal_qwen3vl_video_patchify():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    frames = np.random.default_rng(0).standard_normal((3, 3, 16, 24)).astype(np.float32)  # odd count: padded
    expected, *grid = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(frames)[None], patch_size=4,
                                                     merge_size=2, temporal_patch_size=2)
    got, got_grid = ri.patchify(frames, SETTINGS)
    np.testing.assert_array_equal(got, expected[0].numpy())
    assert got_grid == tuple(grid) == (2, 4, 6)


@given(st.integers(1, 3000), st.integers(1, 3000))
def test_smart_resize_equals_reference(height, width):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            ri.smart_resize(height, width, 32, 65536, 16777216)
        return
    assert ri.smart_resize(height, width, 32, 65536, 16777216) == smart_resize(height, width, 32, 65536, 16777216)


def test_rope_positions_equal_get_rope_index(models, prompts):
    torch_model = models[0]
    mixed = _prompt(models[1], [4, 5, 6, 7, 8], images=(_image(1, 30, 20),), video=_clip(5, frames=5))
    inputs = _torch_inputs(mixed)
    expected, delta = torch_model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"])
    positions, next_position = ri.rope_positions(mixed, 2)
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert next_position == len(mixed.ids) + int(delta[0, 0])


def test_sampling_rules():
    logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 1.0]] * 2000)
    none = jnp.zeros(logits.shape, bool)
    key = jax.random.key(1)
    greedy = reason.sample_tokens(logits, none, key, reason.SamplingParams())
    assert (np.asarray(greedy) == 1).all()
    penalised = reason.sample_tokens(logits, none.at[:, 1].set(True), key, reason.SamplingParams(presence_penalty=0.5))
    assert (np.asarray(penalised) == 2).all()
    top2 = np.asarray(reason.sample_tokens(logits, none, key, reason.SamplingParams(temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {1, 2} and 0.4 < (top2 == 1).mean() < 0.65
    nucleus = np.asarray(reason.sample_tokens(logits, none, key, reason.SamplingParams(temperature=1.0, top_p=0.3)))
    assert (nucleus == 1).all()
    full = np.asarray(reason.sample_tokens(logits, none, key, reason.SamplingParams(temperature=1.0)))
    assert set(full.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="top_p"):
        reason.SamplingParams(top_p=0.0)


def test_bad_inputs_give_clear_errors(models, tmp_path, capsys):
    _, model, params, folder = models
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        ri.load_image(broken)
    assert cli.main(["reason", "--model", folder, "--prompt", "hi", "--image", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "error: --image" in err and "broken.png: cannot read as an image" in err
    assert cli.main(["reason", "--model", folder, "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompt is empty"):
        ri.expand_placeholders([], [], model.config, _encode)
    with pytest.raises(ValueError, match="more image placeholders than images"):
        ri.expand_placeholders([START_ID, IMAGE_ID, END_ID], [], model.config, _encode)
    prompt = _prompt(model, [1, 2, 3], images=(_image(0, 60, 60),))  # 25 image tokens
    assert len(prompt.ids) == 30
    small = Reasoner(dataclasses.replace(model.config, max_position_embeddings=32), dtype=jnp.float32)
    with pytest.raises(ValueError, match="30 tokens .* max_new_tokens 4 exceeds the model's context of 32 tokens"):
        reason.generate(small, params, ri.batch_prompts([prompt], model.config), max_new_tokens=4, eos_ids=(1,))


def test_edge_text_tower_logits_match_transformers(tmp_path):
    """cosmos3_edge: relu2 MLP (stored as mlp.up_proj/down_proj), no q/k norm, theta 1e8; the SigLIP2 vision
    keys are skipped. fp32, where the LlamaRMSNorm double rounding is exact."""
    from transformers import Cosmos3EdgeConfig, Cosmos3EdgeForConditionalGeneration

    torch.manual_seed(0)
    text = dict(TEXT_CONFIG, vocab_size=300, rms_norm_eps=1e-5, hidden_act="relu2",
                rope_parameters={"rope_type": "default", "rope_theta": 1e8, "mrope_section": [6, 5, 5]})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  num_patches=16)
    torch_model = Cosmos3EdgeForConditionalGeneration(
        Cosmos3EdgeConfig(text_config=text, vision_config=vision, projector_hidden_size=64)).eval()
    _perturb(torch_model)
    torch_model.save_pretrained(tmp_path)
    model, params = load_reasoner(tmp_path, dtype=jnp.float32)
    assert model.config.vision is None and model.config.text.hidden_act == "relu2"
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    prompt = ri.expand_placeholders(ids, [], model.config, _encode)
    got = np.asarray(jax.jit(model.prompt_logits)(params, ri.batch_prompts([prompt], model.config)))[0]
    np.testing.assert_allclose(got, expected, atol=LOGIT_ATOL, rtol=0)


def test_key_map_round_trip_and_errors(models):
    _, model, params, folder = models
    import safetensors.numpy

    stored = safetensors.numpy.load_file(f"{folder}/model.safetensors")
    state = state_from_params(jax.tree.map(np.asarray, params), model.config)
    assert set(state) == set(stored)
    for key, value in stored.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    from cosmos_jax.convert.keymap_reasoner import params_from_state

    unified = dict(stored, **{"layers.0.self_attn.add_q_proj.weight": np.zeros(1), "proj_in.weight": np.zeros(1)})
    params_from_state(unified, model)  # generator tensors of a unified checkpoint are skipped
    broken = {k: v for k, v in stored.items() if k != "blocks.1.attn.qkv.weight"}
    broken["merger.extra.weight"] = np.zeros(2)
    broken["pos_embed.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError) as err:
        params_from_state(broken, model)
    message = str(err.value)
    assert "missing key blocks.1.attn.qkv.weight" in message
    assert "unexpected vision key merger.extra.weight" in message
    assert "wrong shape for pos_embed.weight: got (5, 32), expected (36, 32)" in message


def test_language_model_is_the_transformers_reasoner_tower(models):
    """Text only, the reasoner's logits equal `Cosmos3Transformer.reasoner_logits` over the same params tree."""
    from cosmos_jax.modeling.inputs import TextInputs
    from cosmos_jax.modeling.transformer import Cosmos3Transformer

    _, model, params, _ = models
    ids = [7, 8, 9, 10, 11, 12]
    prompt = ri.expand_placeholders(ids, [], model.config, _encode)
    ours = jax.jit(model.prompt_logits)(params, ri.batch_prompts([prompt], model.config))
    tower = {k: v for k, v in params.items() if k != "vision"}
    mot = Cosmos3Transformer(model.config.text, dtype=jnp.float32, attention="xla")
    text = TextInputs(input_ids=jnp.asarray([ids], jnp.int32), und_len=jnp.asarray([len(ids)], jnp.int32),
                      position_ids=jnp.broadcast_to(jnp.arange(len(ids), dtype=jnp.float32), (1, 3, len(ids))))
    theirs = jax.jit(mot.reasoner_logits)({"reasoner": tower, "generator": {"layers": {}}}, text)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, rtol=0)


def test_bf16_logits_within_the_references_own_bf16_spread(models, prompts):
    """bf16 weights and activations (image prompt): the distance to transformers in bf16 is at most twice
    transformers' own bf16-vs-fp32 distance (plus 0.05). Measured: reference spread 0.117, ours vs reference bf16
    0.078, ours vs reference fp32 0.114."""
    torch_model, _, _, folder = models
    prompt = prompts["image"]
    inputs = _torch_inputs(prompt)
    with torch.no_grad():
        fp32 = torch_model(**inputs).logits[0].numpy()
        bf16_model = Cosmos3OmniForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
        bf16_model.config._attn_implementation = "eager"
        bf16 = bf16_model(**inputs).logits[0].float().numpy()
    model, params = load_reasoner(folder, dtype=jnp.bfloat16)
    assert params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    got = np.asarray(jax.jit(model.prompt_logits)(params, ri.batch_prompts([prompt], model.config)))[0]
    spread = np.abs(bf16 - fp32).max()
    assert 0 < spread < 1.0
    assert np.abs(got - bf16).max() <= 2 * spread + 0.05


def test_per_segment_vision_attention_equals_the_masked_dense_form():
    from cosmos_jax.modeling.vision import segment_attention

    q, k, v = (jax.random.normal(key, (12, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
    segments = jnp.repeat(jnp.arange(3), 4)
    np.testing.assert_allclose(np.asarray(segment_attention(q, k, v, segments, 4)),
                               np.asarray(segment_attention(q, k, v, segments, 0)), atol=1e-6, rtol=0)
    one_segment = np.asarray(segment_attention(q, k, v, jnp.zeros(12, jnp.int32), 12))
    assert not np.allclose(one_segment, np.asarray(segment_attention(q, k, v, segments, 4)), atol=1e-3)


QWEN_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "presence_penalty": 1.5,
                 "eos_token_id": 514}


def _reason_ids(folder, tmp_path, name, *extra) -> tuple[ri.PreparedPrompt, list[int]]:
    out = tmp_path / f"{name}.json"
    assert cli.main(["reason", "--model", str(folder), "--prompt", "Describe the robot arm and the cube.", *extra,
                     "--max-new-tokens", "32", "--dtype", "float32", "--output-ids", str(out)]) == 0
    record = json.loads(out.read_text())
    return record["prompt_ids"], record["generated_ids"]


def test_reason_temperature_0_is_transformers_greedy_under_a_sampling_generation_config(models, tmp_path, capsys):
    """A folder whose generation_config.json asks for Qwen's sampling (presence_penalty 1.5): `--temperature 0`
    alone gives exactly transformers' greedy generate() tokens, 32 of them, for a text and a text+image prompt."""
    import shutil

    torch_model, _, _, source = models
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    (folder / "generation_config.json").write_text(json.dumps(QWEN_SAMPLING))
    image_path = tmp_path / "scene.png"
    Image.fromarray(_image(8, 32, 40)).save(image_path)
    greedy = {}
    for name, extra in (("text", ()), ("image", ("--image", str(image_path)))):
        prompt_ids, generated = _reason_ids(folder, tmp_path, name, "--temperature", "0", *extra)
        items = (ri.preprocess_image(ri.load_image(image_path), SETTINGS),) if extra else ()
        prompt = ri.PreparedPrompt(tuple(prompt_ids),
                                   tuple(ri.IMAGE if t == IMAGE_ID else ri.TEXT for t in prompt_ids), items)
        with torch.no_grad():
            expected = torch_model.generate(**_torch_inputs(prompt), max_new_tokens=32, do_sample=False,
                                            eos_token_id=514, pad_token_id=512)[0, len(prompt_ids):].tolist()
        assert generated == expected, name
        greedy[name] = generated
        assert len(generated) == 32 and len(set(generated)) > 4, name  # no early stop, no collapse
        err = capsys.readouterr().err
        assert "temperature 0 (--temperature)" in err and "presence_penalty 0 (off at temperature 0" in err
    _, penalised = _reason_ids(folder, tmp_path, "penalised", "--temperature", "0", "--presence-penalty", "1.5")
    assert penalised != greedy["text"]  # an explicit penalty still applies at temperature 0


def test_sampling_defaults_come_from_generation_config(tmp_path):
    assert generation_config.resolve(tmp_path).temperature == 0  # no file: greedy, as transformers
    (tmp_path / "generation_config.json").write_text(json.dumps({**QWEN_SAMPLING, "eos_token_id": [3, 4]}))
    s = generation_config.resolve(tmp_path, tokenizer_eos=9)
    assert (s.temperature, s.top_k, s.top_p, s.presence_penalty, s.max_new_tokens) == (0.7, 20, 0.8, 1.5, 512)
    assert s.eos_token_ids == (3, 4, 9) and s.sources["top_k"] == "generation_config.json"
    s = generation_config.resolve(tmp_path, top_k=5, temperature=0.0)
    assert (s.temperature, s.top_k, s.presence_penalty) == (0.0, 5, 0.0) and s.sources["top_k"] == "--top-k"
    assert generation_config.resolve(tmp_path, temperature=0.0, presence_penalty=1.5).presence_penalty == 1.5
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7,
                                                               "repetition_penalty": 1.1}))
    s = generation_config.resolve(tmp_path)
    assert s.temperature == 0 and s.ignored == ("repetition_penalty",)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        generation_config.resolve(tmp_path)
