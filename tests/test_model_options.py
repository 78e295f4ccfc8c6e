"""--quantize / --lora / --merge-lora / --offload-reasoner on `sdg` and `serve` (shared with `generate`): bad
values and combinations refused before anything loads; an sdg run and a server with --quantize int8 give what
`generate --quantize int8` gives (fp32, xla attention, tiny demo checkpoint), and the sdg run's identity
includes the option."""

from __future__ import annotations

import json
import shlex

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import openpi_client, running_server

from cosmos_jax import cli
from cosmos_jax.demo import build_demo_checkpoint, demo_image

COMMON = ["--dtype", "float32", "--attention", "xla"]
JOB = {"id": "pol", "mode": "policy", "prompt": "pick the cube", "image": "frame.png", "domain": "bridge_orig_lerobot",
       "chunk": 4, "resolution_tier": 256, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo checkpoint, its first frame and a one-job, one-sample jobs file."""
    root = tmp_path_factory.mktemp("model_options")
    checkpoint = build_demo_checkpoint(root / "checkpoint")
    demo_image(32, 32).save(root / "frame.png")
    (root / "jobs.jsonl").write_text(json.dumps(JOB) + "\n")
    return {"root": root, "checkpoint": str(checkpoint), "jobs": str(root / "jobs.jsonl")}


def _bad_options(root):
    return [
        (["--quantize", "int4"], ["--quantize 'int4': choose one of int8, fp8"]),
        (["--lora", f"{root}/missing_adapter"], ["--lora", "missing_adapter: not a LoRA folder"]),
        (["--lora", f"{root}/adapter", "--quantize", "int8"], ["--lora cannot be combined with --quantize"]),
        (["--merge-lora"], ["--merge-lora needs at least one --lora"]),
        (["--model", f"{root}/int8", "--quantize", "fp8"], ["quantized as int8, not fp8: use --quantize int8"]),
        (["--model", f"{root}/int8", "--mesh", "data=1"], ["quantized as int8", "load it with --quantize int8"]),
    ]


def test_sdg_and_serve_refuse_bad_model_options_before_loading(tmp_path, capsys, monkeypatch):
    """A model folder and a good jobs file, so that only the option stands between the command and loading
    (which here fails the test)."""
    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    def no_load(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Cosmos3Pipeline, "from_pretrained", no_load)
    root = tmp_path
    (root / "checkpoint").mkdir()
    demo_image(32, 32).save(root / "frame.png")
    (root / "jobs.jsonl").write_text(json.dumps(JOB) + "\n")
    (root / "int8").mkdir()  # the marker of a folder `convert --quantize int8` wrote (checked before loading)
    (root / "int8" / "cosmos_jax.json").write_text(json.dumps({"format": "cosmos-jax-converted", "version": 1,
                                                                "quantize": "int8"}))
    model = str(root / "checkpoint")
    commands = {"sdg": ["sdg", "--model", model, "--jobs", str(root / "jobs.jsonl"), "--out", f"{root}/refused"],
                "serve": ["serve", "--model", model, "--results", f"{root}/refused_results"]}
    for name, argv in commands.items():
        for options, words in _bad_options(root):
            code = cli.main(argv + COMMON + options)
            err = capsys.readouterr().err.strip()
            where = shlex.join([name, *options])
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (where, err)
            assert all(word in err for word in words), (where, err)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint", "frame.png", "int8", "jobs.jsonl"]


@pytest.fixture(scope="module")
def offline(world):
    """`generate --quantize int8` (and without it) on the job: the actions [4, 10] of sample 0."""
    actions = {}
    for name, options in (("int8", ["--quantize", "int8"]), ("full", [])):
        out = world["root"] / f"generate_{name}.npy"
        argv = ["generate", "--model", world["checkpoint"], "--prompt", JOB["prompt"], "--image",
                str(world["root"] / "frame.png"), "--action-mode", "policy", "--domain", JOB["domain"], "--chunk", "4",
                "--resolution-tier", "256", "--steps", "2", "--seed", "5", "--output-type", "latent", "--output",
                str(out), "--no-progress", *COMMON, *options]
        assert cli.main(argv) == 0
        actions[name] = np.load(world["root"] / f"generate_{name}.actions.npy")
    assert np.abs(actions["int8"] - actions["full"]).max() > 1e-4  # the option changes the numbers
    return actions


@pytest.mark.slow
def test_sdg_quantized_episode_equals_generate_quantized_and_is_its_own_run(world, offline, capsys):
    import pyarrow.parquet as pq

    from cosmos_jax.datasets.lerobot_reader import open_lerobot
    from cosmos_jax.sdg.fingerprint import model_fingerprint

    root, model = world["root"], world["checkpoint"]
    out = root / "sdg_int8"
    sdg = ["sdg", "--model", model, "--jobs", world["jobs"], "--no-progress", *COMMON]
    assert cli.main(sdg + ["--out", str(out), "--quantize", "int8"]) == 0
    dataset = open_lerobot(out)
    actions = dataset.episode_columns(dataset.episodes[0], ["action"])["action"][:-1]
    np.testing.assert_allclose(actions, offline["int8"], rtol=0, atol=1e-6)
    rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert (rows["cosmos_sdg/quantize"], rows["cosmos_sdg/lora"], rows["cosmos_sdg/merge_lora"]) == (
        ["int8"], [[]], [False])
    assert rows["cosmos_sdg/model_fingerprint"][0] != model_fingerprint(model)  # the unquantized run's
    report = json.loads((out / "meta/cosmos_sdg/report.json").read_text())
    assert report["model_options"] == {"quantize": "int8", "merge_lora": False, "lora": []}
    episode = json.loads((out / "meta/cosmos_sdg/episodes.jsonl").read_text().splitlines()[0])
    assert episode["quantize"] == "int8"
    capsys.readouterr()
    resumed = root / "sdg_resumed"  # a run stopped after writing its work folder, re-run with another option
    (root / "sdg_resumed.sdg-work").mkdir()
    (root / "sdg_resumed.sdg-work" / "run.json").write_text((out / "meta/cosmos_sdg/run.json").read_text())
    for target, options in ((out, []), (out, ["--quantize", "fp8"]), (resumed, []), (resumed, ["--quantize", "fp8"])):
        assert cli.main(sdg + ["--out", str(target), *options]) == 2
        err = capsys.readouterr().err
        assert "made from other model (or --quantize/--lora/--merge-lora) (model_fingerprint" in err, err
    assert not resumed.exists()


@pytest.mark.slow
def test_serve_quantized_answers_what_generate_quantized_writes(world, offline):
    from cosmos_jax.commands import serve as serve_command

    argv = ["serve", "--model", world["checkpoint"], "--results", str(world["root"] / "results"), "--domain",
            JOB["domain"], "--chunk", "4", "--steps", "2", "--resolution-tier", "256", *COMMON, "--quantize", "int8"]
    state, options = serve_command.build_state(cli.build_parser().parse_args(argv))
    assert options.flags() == ["--quantize", "int8"]
    with running_server(state) as address:
        health = httpx.get(f"http://{address}/healthz").json()
        assert health["model_options"] == {"quantize": "int8", "merge_lora": False, "lora": [],
                                           "offload_reasoner": False}
        client = openpi_client().WebsocketClientPolicy(f"ws://{address}")
        frame = np.asarray(Image.open(world["root"] / "frame.png").convert("RGB"))
        reply = client.infer({"observation/image": frame, "prompt": JOB["prompt"], "seed": 5})
    np.testing.assert_allclose(reply["actions"], offline["int8"], rtol=0, atol=1e-6)


def test_a_lora_option_loads_merged_and_enters_the_sdg_identity(world, tmp_path):
    import jax
    import jax.numpy as jnp

    from cosmos_jax.commands.model_options import check_model_arguments, load_pipeline
    from cosmos_jax.sampling.generate import Cosmos3Pipeline
    from cosmos_jax.sdg.engine import episode_model_options
    from cosmos_jax.sdg.fingerprint import model_fingerprint
    from cosmos_jax.training import lora

    model = world["checkpoint"]
    base = Cosmos3Pipeline.from_pretrained(model, dtype=jnp.float32, attention="xla").params
    config = lora.LoraConfig(2, lora.parse_targets("q_proj"), alpha=4.0)
    adapters = lora.init_adapters(base, config, jax.random.key(0))
    b = adapters["generator"]["layers"]["q_proj"]["kernel"]["b"]
    adapters["generator"]["layers"]["q_proj"]["kernel"]["b"] = 0.1 * jax.random.normal(jax.random.key(1), b.shape)
    folder = lora.save_adapters(tmp_path / "adapter", adapters, config, lora.fingerprint(base))

    def options_of(*flags):
        argv = ["sdg", "--model", model, "--jobs", world["jobs"], "--out", str(tmp_path / "o"), *COMMON, *flags]
        args = cli.build_parser().parse_args(argv)
        return args, check_model_arguments(args)

    args, options = options_of("--lora", f"{folder}:0.5", "--merge-lora")
    record = options.record()
    assert record["merge_lora"] is True and record["quantize"] is None
    assert [(a["path"], a["scale"], len(a["sha256"])) for a in record["lora"]] == [(str(folder), 0.5, 64)]
    assert options.flags() == ["--lora", f"{folder}:0.5", "--merge-lora"]
    assert episode_model_options(record) == {"quantize": None, "merge_lora": True, "lora": [f"{folder}:0.5"]}
    kernel = load_pipeline(args, options).params["generator"]["layers"]["q_proj"]["kernel"]
    a, b = (adapters["generator"]["layers"]["q_proj"]["kernel"][k] for k in ("a", "b"))
    want = base["generator"]["layers"]["q_proj"]["kernel"] + 0.5 * config.scale * jnp.einsum("lir,lro->lio", a, b)
    assert float(jnp.abs(want - base["generator"]["layers"]["q_proj"]["kernel"]).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(want), rtol=0, atol=1e-6)
    fingerprints = {model_fingerprint(model), model_fingerprint(model, record),
                    model_fingerprint(model, options_of("--lora", str(folder))[1].record()),
                    model_fingerprint(model, options_of("--lora", f"{folder}:0.5")[1].record())}
    assert len(fingerprints) == 4  # plain, merged 0.5, attached 1.0, attached 0.5
