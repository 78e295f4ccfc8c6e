"""Batched generation (cosmos_jax.sampling.batch, `Cosmos3Pipeline.run_batch`): a sample's outputs do not depend
on its batch, its position there or the mesh; every mode is at parity with `Cosmos3OmniPipeline` one sample at a
time; the reasoner runs once per distinct prompt; impossible batches are refused with a clear error.

The tiny reference pipeline of test_pipeline_parity (fp32, XLA attention, 2 steps), `output_type="latent"`.
Tolerances (fp32): a sample in any batch / position / mesh equals its run alone within BATCH_REL = 2e-6 of
max(1, the output's max abs value) (final latents and actions; observed up to 1.1e-6, i.e. 1.7e-6 abs at
|x| ~ 4: a few ulp). Bitwise: another position in the same batch, and a data mesh holding on every device the
rows of the solo run (one sample per device, prompts of the same padded length). Not bitwise: another number of
rows per device (XLA:CPU picks another kernel for the small matmuls of these tiny widths, summing in another
order), a longer prompt elsewhere in the batch (a longer padded text), tensor-parallel partial sums. Parity with
the reference within the existing 1e-4 abs.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_pipeline_parity import (  # noqa: F401  (module-scoped fixtures)
    ACTION,
    ATOL,
    PROMPT,
    STEPS,
    _image,
    _materialise,
    _reference_run,
    folder,
    pipeline,
    reference,
)

from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.sampling.batch import Sample, batch_rows, check_batch_size, group_batches
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.sharding import load_mesh_preset, make_mesh

BATCH_REL = 2e-6
PROMPTS = (PROMPT, "A red ball rolls slowly across a wooden floor in the sun", "Waves")  # 3 token lengths
VIDEO = dict(num_frames=9, height=32, width=32)
RNG = np.random.default_rng(21)
ACTIONS = [RNG.standard_normal((5, 9)).astype(np.float32) for _ in range(3)]
CLIP = [_image(32, 32, seed=10 + i) for i in range(7)]

# mode -> three requests sharing one shape: different prompts, seeds, guidance values and conditioning content.
POOLS = {
    "text2video": [dict(VIDEO, guidance=g) for g in (4.0, 2.5, 6.0)],
    "image2video": [dict(VIDEO, guidance=g, image=_image(40, 56, seed=30 + i)) for i, g in enumerate((2.0, 3.0, 5.0))],
    "policy": [dict(ACTION, action_mode="policy", guidance=1.0, image=_image(32, 32, seed=40 + i)) for i in range(3)],
    "forward_dynamics": [dict(ACTION, action_mode="forward_dynamics", guidance=1.0, image=_image(32, 32, seed=3),
                              actions=a) for a in ACTIONS],
    "inverse_dynamics": [dict(ACTION, action_mode="inverse_dynamics", guidance=g, video=CLIP[i:] + CLIP[:i])
                         for i, g in enumerate((2.0, 3.0, 1.5))],
}


def _request(mode: str, i: int) -> GenerationRequest:
    return GenerationRequest(PROMPTS[i], **POOLS[mode][i], steps=STEPS, seed=100 + i, output_type="latent")


@pytest.fixture(scope="module")
def requests():
    return {mode: [_request(mode, i) for i in range(3)] for mode in POOLS}


@pytest.fixture(scope="module")
def solo(pipeline, requests):
    """(mode, request, sample index) -> that sample run alone (a batch of one), computed on first use."""
    cache: dict = {}

    def get(mode: str, r: int, k: int):
        if (mode, r, k) not in cache:
            (cache[mode, r, k],) = pipeline.run_batch([Sample(requests[mode][r], k)], progress=False)
        return cache[mode, r, k]

    return get


def _assert_same_sample(got, want) -> tuple[float, bool]:
    """got == want within BATCH_REL (latents, actions); returns (relative max difference, bitwise equal)."""
    assert (got.seed, got.sample_index, got.mode) == (want.seed, want.sample_index, want.mode)
    pairs = [(got.latents, want.latents)] + ([(got.actions, want.actions)] if want.actions is not None else [])
    err = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0)) for a, b in pairs)
    assert err <= BATCH_REL, f"sample (seed {want.seed}, index {want.sample_index}): relative max diff {err:.3g}"
    bitwise = all(np.array_equal(a, b) for a, b in pairs)
    return err, bitwise


COMPOSITIONS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=4, unique=True)
FAST_MODES = ("text2video",)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=() if m in FAST_MODES else pytest.mark.slow) for m in POOLS])
def test_a_sample_does_not_depend_on_its_batch(pipeline, requests, solo, mode):
    """Random batches of (request, sample index) from the mode's pool, and a fixed one with a repeated request:
    every sample equals its run alone."""

    @settings(max_examples=2, deadline=None)
    @example([(0, 0), (2, 1), (0, 1), (1, 0)])
    @given(COMPOSITIONS)
    def check(composition):
        samples = [Sample(requests[mode][r], k) for r, k in composition]
        results = pipeline.run_batch(samples, progress=False)
        assert len(results) == len(samples)
        for (r, k), got in zip(composition, results):
            _assert_same_sample(got, solo(mode, r, k))

    check()


def test_samples_of_one_request_differ_and_record_their_seed_and_index(solo):
    first, second = solo("text2video", 0, 0), solo("text2video", 0, 1)
    assert (first.seed, first.sample_index, second.seed, second.sample_index) == (100, 0, 100, 1)
    assert np.abs(first.latents - second.latents).max() > 0.1


PARITY = {"text2video": dict(VIDEO, guidance=4.0)}
SLOW_PARITY = {
    "policy": dict(ACTION, action_mode="policy", guidance=1.0, image=(32, 32)),
    "image2video": dict(VIDEO, guidance=2.0, image=(40, 56)),
    "forward_dynamics": dict(ACTION, action_mode="forward_dynamics", guidance=1.0, image=(32, 32), actions=(5, 9)),
    "inverse_dynamics": dict(ACTION, action_mode="inverse_dynamics", guidance=2.0, video=(32, 32, 7)),
}


@pytest.mark.parametrize("name, case", [pytest.param(n, c, id=n) for n, c in PARITY.items()] + [
    pytest.param(n, c, id=n, marks=pytest.mark.slow) for n, c in SLOW_PARITY.items()])
def test_a_batch_matches_the_reference_one_sample_at_a_time(reference, pipeline, name, case):
    """Two samples with different prompts and noise (the reference's own seeded `prepare_latents`) in one batch,
    each equal to the reference run alone (fp32, 1e-4 abs)."""
    kwargs = _materialise(case)
    guidance = kwargs.pop("guidance")
    refs = [_reference_run(reference, dict(kwargs, guidance=guidance), False, seed=s, prompt=PROMPTS[s])
            for s in (0, 1)]
    batch = [Sample(GenerationRequest(PROMPTS[s], **kwargs, steps=STEPS, guidance=guidance, seed=s,
                                      init_noise=ref["start"][0], init_sound_noise=ref["start"][1],
                                      init_action_noise=ref["start"][2], output_type="latent"))
             for s, ref in enumerate(refs)]
    results = pipeline.run_batch(batch, progress=False)
    for result, ref in zip(results, refs):
        np.testing.assert_allclose(result.latents, ref["latents"], atol=ATOL, rtol=0)
        if ref["actions"] is not None:
            np.testing.assert_allclose(result.actions, ref["actions"], atol=ATOL, rtol=0)
    assert np.abs(results[0].latents - results[1].latents).max() > 1e-2 or name == "inverse_dynamics"


def test_the_reasoner_runs_once_per_distinct_prompt(pipeline, requests, monkeypatch):
    """6 samples of 2 requests under guidance = 12 rows, but 3 distinct prompts: the two conditional prompts and
    the shared negative one. The reasoner is traced once over 3 rows and runs once per batch."""
    fresh = Cosmos3Pipeline(pipeline.model, pipeline.params, pipeline.tokenizer, pipeline.scheduler_config)
    traced_rows, runs = [], []
    original = Cosmos3Transformer.encode_reasoner

    def counting(self, params, text):
        traced_rows.append(text.input_ids.shape[0])
        jax.debug.callback(lambda: runs.append(1))
        return original(self, params, text)

    monkeypatch.setattr(Cosmos3Transformer, "encode_reasoner", counting)
    a, b = requests["text2video"][:2]
    samples = [Sample(a, 0), Sample(b, 0), Sample(a, 1), Sample(a, 2), Sample(b, 1), Sample(b, 2)]
    results = fresh.run_batch(samples, progress=False)
    jax.effects_barrier()
    assert traced_rows == [3] and runs == [1]
    assert len(results) == 6
    batch = fresh.prepare_batch(samples)
    rows = batch_rows(fresh.config, batch.preps, [s.request.guidance for s in samples], 0)
    assert rows.distinct_prompts == 3
    assert rows.static["row_prompt"].tolist() == [0, 1, 2, 1, 0, 1, 0, 1, 2, 1, 2, 1]


@pytest.mark.parametrize("mesh_spec, count", [("data=8", 8), ("data=4,tensor=2", 6)])
def test_a_mesh_gives_the_samples_of_one_device(pipeline, requests, solo, mesh_spec, count):
    """8 fake CPU devices (tests/conftest.py); with data=4 and 6 samples the batch is padded to 8 and the two
    padded samples are dropped."""
    sharded = pipeline.on_mesh(make_mesh(mesh_spec), load_mesh_preset("tiny").rules)
    composition = [(i % 3, i // 3) for i in range(count)]
    samples = [Sample(requests["text2video"][r], k) for r, k in composition]
    results = sharded.run_batch(samples, progress=False)
    assert len(results) == count
    for (r, k), got in zip(composition, results):
        _assert_same_sample(got, solo("text2video", r, k))


def test_one_sample_per_device_is_bitwise(pipeline, requests, solo):
    """data=8, 8 samples of one request: every device holds exactly the rows of a solo run."""
    sharded = pipeline.on_mesh(make_mesh("data=8"), load_mesh_preset("tiny").rules)
    results = sharded.run_batch([Sample(requests["text2video"][0], k) for k in range(8)], progress=False)
    for k, got in enumerate(results):
        assert _assert_same_sample(got, solo("text2video", 0, k)) == (0.0, True)


def test_on_step_reports_the_fraction_done_and_leaves_the_samples_unchanged(pipeline, requests, solo):
    """`run_batch(on_step=...)` (the server's progress hook): one call per denoising step, rising to 1.0."""
    request = requests["text2video"][0]
    fractions: list[float] = []
    (got,) = pipeline.run_batch([Sample(request, 0)], progress=False, on_step=fractions.append)
    assert fractions == pytest.approx([(i + 1) / request.steps for i in range(request.steps)])
    assert _assert_same_sample(got, solo("text2video", 0, 0)) == (0.0, True)


@pytest.mark.slow  # two shapes, three compiles: ~15 s quiet, ~40 s on a loaded 2-core host
def test_generate_samples_streams_every_sample_in_same_shape_batches(pipeline, requests, solo):
    mixed = [requests["text2video"][0], requests["policy"][1], requests["text2video"][2]]
    results = list(pipeline.generate_samples(mixed, num_samples=2, batch_size=3, progress=False))
    # text2video: 4 samples -> batches of 3 and 1; policy: 2 samples -> one batch.
    got = [(r.mode, r.seed, r.sample_index) for r in results]
    assert got == [("text2video", 100, 0), ("text2video", 100, 1), ("text2video", 102, 0), ("text2video", 102, 1),
                   ("policy", 101, 0), ("policy", 101, 1)]
    for result in results:
        mode = result.mode
        _assert_same_sample(result, solo(mode, result.seed - 100, result.sample_index))


# -------------------------------------------------------------------------------------------------- errors


def test_impossible_batches_are_refused(pipeline, requests, monkeypatch):
    def no_compute(*args, **kw):
        raise AssertionError("compute started before the batch was checked")

    monkeypatch.setattr(pipeline, "_executable", no_compute)
    base = requests["text2video"][0]
    cases = [
        (GenerationRequest(PROMPT, **VIDEO, guidance=4.0, steps=STEPS + 1, output_type="latent"), "in steps"),
        (GenerationRequest(PROMPT, num_frames=5, height=32, width=32, steps=STEPS, output_type="latent"),
         "in latent frames/size"),
        (GenerationRequest(PROMPT, **VIDEO, guidance=1.0, steps=STEPS, output_type="latent"), "in guidance on/off"),
        (requests["policy"][0], "in mode"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=f"sample 1 differs from sample 0 {message}"):
            pipeline.run_batch([Sample(base), Sample(other)], progress=False)
    with pytest.raises(ValueError, match="a batch needs at least one sample"):
        pipeline.run_batch([], progress=False)
    with pytest.raises(ValueError, match="batch size 3 does not divide over the data axis of size 2"):
        pipeline.on_mesh(make_mesh("data=2", jax.devices()[:2]),
                         load_mesh_preset("tiny").rules).prepare_batches([Sample(base)], batch_size=3)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        list(pipeline.generate_samples([base], num_samples=0))
    with pytest.raises(ValueError, match="batch size must be a positive int, got 0"):
        list(pipeline.generate_samples([base], num_samples=2, batch_size=0))
    with pytest.raises(ValueError, match="sample index must be an int"):
        Sample(base, -1)


# ------------------------------------------------------------------------------------------------- grouping


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=20), st.integers(1, 4), st.integers(1, 3))
def test_group_batches_covers_every_sample_once_in_same_shape_batches(labels, per_data, data):
    batch_size = per_data * data
    batches = group_batches(labels, batch_size, data)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(labels)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({labels[i] for i in batch}) == 1
        assert list(batch) == sorted(batch)
    for label in set(labels):  # only a shape's last batch is short
        sizes = [len(b) for b in batches if labels[b[0]] == label]
        assert all(s == batch_size for s in sizes[:-1])
    if data > 1:
        with pytest.raises(ValueError, match=f"batch size {batch_size + 1} does not divide over the data axis"):
            check_batch_size(batch_size + 1, data)


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_numbered_samples_and_a_listing(folder, solo, tmp_path):
    """`--num-samples 3 --batch-size 2`: clip-00000.npy .. clip-00002.npy, equal to the library's samples 0..2,
    and clip.samples.json with each output's seed and sample index."""
    import json

    from cosmos_jax.cli import main

    out = tmp_path / "out" / "clip.npy"
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--num-frames", "9", "--height", "32",
                 "--width", "32", "--steps", str(STEPS), "--guidance", "4", "--seed", "100", "--num-samples", "3",
                 "--batch-size", "2", "--output-type", "latent", "--output", str(out), "--dtype", "float32",
                 "--attention", "xla", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "clip-00000.npy", "clip-00001.npy", "clip-00002.npy", "clip.samples.json"]
    for k in range(3):
        want = solo("text2video", 0, k).latents
        err = np.abs(np.load(out.parent / f"clip-{k:05d}.npy") - want).max() / np.abs(want).max()
        assert err <= BATCH_REL
    listing = json.loads((out.parent / "clip.samples.json").read_text())
    assert [(s["sample_index"], s["seed"], s["output"]) for s in listing["samples"]] == [
        (k, 100, str(out.parent / f"clip-{k:05d}.npy")) for k in range(3)]


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size: batch size must be a positive int, got 0"),
    (["--batch-size", "3", "--mesh", "data=2"], "--batch-size: batch size 3 does not divide over the data axis"),
    (["--mesh", "data=2,model=4"], "unknown axis 'model'"),
    (["--num-samples", "2", "--init-noise", "NOISE"], "--init-noise fix the starting latents"),
])
def test_cli_refuses_bad_sample_counts_before_loading(tmp_path, capsys, flags, message):
    from cosmos_jax.cli import main

    (tmp_path / "model").mkdir()  # an empty folder: the refusal must come before the model is read
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros((1, 48, 3, 2, 2), np.float32))
    flags = [str(noise) if f == "NOISE" else f for f in flags]
    code = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "x", "--output",
                 str(tmp_path / "o.mp4"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
