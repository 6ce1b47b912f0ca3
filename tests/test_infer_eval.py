"""Evaluation: log-likelihood scoring by hand, tasks, and the probe + blocking end to end."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem_jax.config import ModelConfig
from hmem_jax.infer.probe import first_integer, format_probe_table
from hmem_jax.infer.scoring import continuation_logprobs
from hmem_jax.infer.tasks import Item, few_shot_prefix, first_line, normalise, read_task
from hmem_jax.model import Transformer

CFG = ModelConfig(vocab_size=23, num_layers=1, d_model=16, num_heads=2, head_dim=8, d_ff=24)


def test_continuation_logprob_equals_a_hand_computed_log_likelihood():
    model = Transformer(CFG)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids + 1, ids)["params"]
    context, continuation = [3, 7, 1], [9, 2]
    sequence = context + continuation
    # By hand: run the model on the whole sequence, softmax each position, pick the next token.
    logits = np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray([sequence]),
            jnp.ones((1, 5), jnp.int32),
            jnp.arange(5)[None],
        )
    )[0]
    expected = 0.0
    for t in (2, 3):
        row = logits[t].astype(np.float64)
        expected += row[sequence[t + 1]] - math.log(np.exp(row - row.max()).sum()) - row.max()
    scores = continuation_logprobs(
        model, params, [context, [5]], [continuation, [4, 4, 4]], batch_size=4, width_multiple=8
    )
    assert scores.logprob[0] == pytest.approx(expected, abs=1e-5)
    assert scores.tokens.tolist() == [2, 3]
    greedy = all(int(np.argmax(logits[t])) == sequence[t + 1] for t in (2, 3))
    assert bool(scores.greedy[0]) == greedy


def test_greedy_flag_is_true_for_the_argmax_continuation():
    model = Transformer(CFG)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(1), ids, ids + 1, ids)["params"]
    logits = model.apply(
        {"params": params}, jnp.asarray([[4, 6]]), jnp.ones((1, 2), jnp.int32), jnp.arange(2)[None]
    )
    best = int(jnp.argmax(logits[0, -1]))
    assert continuation_logprobs(model, params, [[4, 6]], [[best]]).greedy[0]


def test_task_files_of_both_kinds_are_read_and_formatted(tmp_path):
    choice = tmp_path / "mc.jsonl"
    choice.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "2 plus 2 is", "choices": ["3", "4"], "answer": 1},
                {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
            ]
        )
    )
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "Capital of X:", "answer": ["Ab", "Abc"]}) + "\n")
    items = read_task(str(choice))
    assert items[0] == Item("2 plus 2 is", ("3", "4"), answer=1)
    assert few_shot_prefix(items[:1]) == "2 plus 2 is 4\n\n"
    assert read_task(str(gen))[0].answers == ("Ab", "Abc")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(choice.read_text() + "\n" + gen.read_text())
    with pytest.raises(ValueError, match="one kind"):
        read_task(str(mixed))


def test_answers_are_normalised_and_integers_parsed():
    assert normalise("  The  Answer, ok. ") == "the answer ok"
    assert first_line(" 1071. The element is violet.\nNext") == "1071"
    assert first_line("Paris, France") == "Paris" and first_line("3.5 and 1,071") == "3.5 and 1,071"
    assert first_integer(" 117 and 3") == "117" and first_integer("none") is None
    table = format_probe_table(
        {"anchor": {"per_bucket": [0.5, None], "overall": 0.5, "n_per_bucket": [2, 0]}}
    )
    assert "50.0" in table and "-" in table


def _train_memory_run(data, workdir, extra=()):
    """A 4-step memory run from scratch on the small tree corpus, with its config.gin."""
    import gin

    from hmem_jax.data.loader import Loader
    from hmem_jax.main.common import load_train_config
    from hmem_jax.train.loop import train
    from hmem_jax.train.resume import fingerprint

    prepared, _, params = data
    cfg = load_train_config(
        (),
        params
        + (
            "TrainConfig.batch_size = 8",
            "TrainConfig.steps = 4",
            "TrainConfig.checkpoint_every = 4",
            "TrainConfig.async_checkpointing = False",
            "MemoryConfig.kind = 'ffn'",
            "MemoryConfig.level_sizes = (8, 4)",
            "MemoryConfig.lr = 1e-2",
            "MemoryConfig.generic_probability = 0.25",
            "MeshConfig.fsdp = 1",
        )
        + tuple(extra),
    )
    (workdir / "config.gin").write_text(gin.config_str())
    loader = Loader(prepared, cfg.batch_size, cfg.seq_len, cfg.seed)
    train(cfg, str(workdir), loader, fingerprint(loader.fingerprint), devices=jax.devices()[:1])
    return str(workdir)


@pytest.fixture(scope="module")
def trained_memory_run(small_prepared_tree_data, tmp_path_factory):
    return _train_memory_run(small_prepared_tree_data, tmp_path_factory.mktemp("memory_run"))


@pytest.mark.slow  # trains two small memory runs (~50 s on 2 cores)
def test_a_streamed_bank_serves_the_same_memory_as_the_device_bank(
    trained_memory_run, small_prepared_tree_data, tmp_path
):
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.run import load_run

    streamed_dir = _train_memory_run(
        small_prepared_tree_data, tmp_path, ("MemoryConfig.bank_tier = 'streaming'",)
    )
    device, streamed = Engine(load_run(trained_memory_run)), Engine(load_run(streamed_dir))
    assert streamed.run.bank is None and streamed.run.streamed is not None
    texts = ["The atomic number of Brium is", "Hugo was born in the year"]
    for mode in ("fetched", "generic"):
        a, b = device.memory_for(texts, mode), streamed.memory_for(texts, mode)
        assert float(np.abs(np.asarray(a["down"])).max()) > 0  # trained, not the zero init
        for name in a:
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), atol=1e-5)
    streamed.run.streamed.close()


@pytest.mark.slow  # trains a small memory run, then decodes 4 conditions (~60 s on 2 cores)
def test_probe_and_blocking_run_end_to_end(trained_memory_run):
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import read_probe_file, run_probe
    from hmem_jax.infer.run import load_run

    engine = Engine(load_run(trained_memory_run))
    probes = read_probe_file(f"{engine.run.prepared_dir}/probes.jsonl")[:12]
    prompts = [p.prompt for p in probes]
    own = engine.block_ids(prompts)
    blocked = engine.block_ids(prompts, blocked_level1=(int(own[0, 0]),))
    assert int(blocked[0, 0]) != int(own[0, 0])  # the best subtree is never entered
    results = run_probe(
        engine, probes, ["anchor", "generic", "fetched", "blocked"], max_new_tokens=3
    )
    assert set(results) == {"anchor", "generic", "fetched", "blocked"}
    for row in results.values():
        assert sum(row["n_per_bucket"]) == 12 and 0.0 <= row["overall"] <= 1.0
    # Fetched memory is each prompt's own path: it differs from the anchor's logits.
    memory = engine.memory_for(prompts[:2], "fetched")
    ids = np.array([engine.encode(prompts[0])] * 2, np.int32)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    with_memory = engine.model.apply(
        {"params": engine.run.params}, ids, np.ones_like(ids), positions, memory
    )
    without = engine.model.apply({"params": engine.run.params}, ids, np.ones_like(ids), positions)
    assert float(jnp.abs(with_memory - without).max()) > 0


@pytest.mark.slow  # three CLI processes on a trained run (~60 s on 2 cores)
def test_generate_export_and_evaluate_commands_run_on_a_trained_run(trained_memory_run, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    out = run(
        "hmem_jax.main.generate",
        f"--workdir={trained_memory_run}",
        "--prompt=The atomic number of",
        "--max_new_tokens=4",
    )
    assert "[blocks [" in out and "->" in out
    out = run(
        "hmem_jax.main.evaluate",
        f"--workdir={trained_memory_run}",
        "--limit=10",
        f"--out={tmp_path / 'eval'}",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["probe"]) == {"anchor", "generic", "fetched", "blocked", "oracle"}
    assert "long-tail probe" in out
    pytest.importorskip("safetensors", reason="export needs the 'hf' extra")
    run(
        "hmem_jax.main.export",
        f"--workdir={trained_memory_run}",
        f"--out={tmp_path / 'hf'}",
        "--memory=fetched",
        "--path=1,2",
        f"--bank={tmp_path / 'bank'}",
    )
    record = json.loads((tmp_path / "hf" / "hmem_export.json").read_text())
    assert record["block_ids"] == [1, 6] and record["extra_ffn_units"] == 12
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert set(manifest["levels"]) == {"l1", "l2", "generic"}
