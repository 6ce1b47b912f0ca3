"""Evaluation: log-likelihood scoring by hand, tasks, and the probe + blocking end to end."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem_jax.config import ModelConfig
from hmem_jax.infer.decode import Sampling
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


def _greedy_by_full_recompute(engine, prompts, memory, steps):
    """Greedy continuations without a KV cache or left padding: the model reads each whole
    right-padded sequence again for every new token (causal attention keeps the padding
    after a row's last token out of its logits)."""
    encoded = [engine.encode(p) for p in prompts]
    lengths = [len(ids) for ids in encoded]
    width = max(lengths) + steps
    tokens = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros_like(tokens)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)], segments[row, : len(ids)] = ids, 1
    eot = engine.run.tokenizer.eot_id
    apply = jax.jit(
        lambda t, s, p, m: engine.model.apply({"params": engine.run.params}, t, s, p, m)
    )
    new = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for _ in range(steps):
        positions = np.where(segments > 0, np.arange(width)[None], 0).astype(np.int32)
        logits = np.asarray(apply(tokens, segments, positions, memory))
        for row in range(len(prompts)):
            token = int(logits[row, lengths[row] - 1].argmax())
            stopped[row] = stopped[row] or token == eot
            if not stopped[row]:
                new[row].append(token)
            tokens[row, lengths[row]], segments[row, lengths[row]] = token, 1
            lengths[row] += 1
    return [engine.run.tokenizer.decode(ids) for ids in new]


@pytest.mark.slow  # trains a small memory run, then decodes 4 conditions (~40 s on 2 cores)
@pytest.mark.ci
def test_probe_and_blocking_match_a_decode_without_cache_for_every_condition(trained_memory_run):
    """Each condition's accuracy per bucket is what a plain greedy decode (no KV cache, no
    batching by length) with that condition's memory scores: the prompt's own path, the
    path that avoids the prompt's level-1 subtree, the generic block, or none."""
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import accuracy_by_bucket, read_probe_file, run_probe
    from hmem_jax.infer.retrieval import select_rows
    from hmem_jax.infer.run import load_run

    engine = Engine(load_run(trained_memory_run))
    probes = read_probe_file(f"{engine.run.prepared_dir}/probes.jsonl")[:12]
    prompts = [p.prompt for p in probes]
    own = engine.block_ids(prompts)
    blocked = engine.block_ids(prompts, blocked_level1=own[:, 0])
    assert np.all(blocked[:, 0] != own[:, 0])  # the best subtree is never entered
    memories = {
        "anchor": None,
        "generic": engine.memory(own, "generic"),
        "fetched": engine.memory(own, "fetched"),
        "blocked": engine.memory(blocked, "fetched"),
    }
    results = run_probe(engine, probes, list(memories), max_new_tokens=3)
    buckets = np.array([p.bucket for p in probes])
    texts = {c: _greedy_by_full_recompute(engine, prompts, m, 3) for c, m in memories.items()}
    assert len({tuple(t) for t in texts.values()}) == len(texts)  # each decodes differently
    for condition, reference in texts.items():
        correct = np.array([p.is_correct(t) for p, t in zip(probes, reference)])
        assert results[condition] == accuracy_by_bucket(correct, buckets, int(buckets.max()) + 1)
        # The probe decodes exactly the reference: scored against it, every probe is right.
        assert all(t.strip() for t in reference)
        as_answers = [
            dataclasses.replace(p, answers=(t.strip(),), match="prefix")
            for p, t in zip(probes, reference)
        ]
        row = run_probe(engine, as_answers, [condition], max_new_tokens=3)[condition]
        assert row["overall"] == 1.0, condition
    # Each memory changes the logits: fetched differs from the anchor, blocked from fetched.
    ids = np.array([engine.encode(prompts[0])] * 2, np.int32)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

    def logits(memory):
        rows = None if memory is None else select_rows(memory, np.array([0, 0]))
        return engine.model.apply(
            {"params": engine.run.params}, ids, np.ones_like(ids), positions, rows
        )

    scale = float(jnp.std(logits(None)))
    assert float(jnp.abs(logits(memories["fetched"]) - logits(None)).max()) > 1e-3 * scale
    assert float(jnp.abs(logits(memories["blocked"]) - logits(memories["fetched"])).max()) > 0


@pytest.mark.slow  # three CLI processes on a trained run (~60 s on 2 cores)
@pytest.mark.ci
def test_generate_export_and_evaluate_commands_print_what_the_library_computes(
    trained_memory_run, tmp_path
):
    """`generate` prints each prompt's route and the continuation the engine decodes with its
    memory; `evaluate` writes the probe table `run_probe` computes on the same probes."""
    import os
    import subprocess
    import sys

    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import documents_by_id, read_probe_file, run_probe, sample_probes
    from hmem_jax.infer.run import load_run

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    engine = Engine(load_run(trained_memory_run))
    prompts = ["The atomic number of", "Hugo was born in the year"]
    out = run(
        "hmem_jax.main.generate",
        f"--workdir={trained_memory_run}",
        *(f"--prompt={p}" for p in prompts),
        "--max_new_tokens=4",
    )
    routes = engine.block_ids(prompts)
    continuations = engine.generate(prompts, "fetched", Sampling(max_new_tokens=4))
    expected = "".join(
        f"{p} [blocks {routes[i].tolist()}]\n  -> {continuations[i]}\n"
        for i, p in enumerate(prompts)
    )
    assert out.startswith(expected), out

    run(
        "hmem_jax.main.evaluate",
        f"--workdir={trained_memory_run}",
        "--limit=10",
        f"--out={tmp_path / 'eval'}",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    probes = sample_probes(read_probe_file(f"{engine.run.prepared_dir}/probes.jsonl"), 10)
    conditions = ["anchor", "generic", "fetched", "blocked", "oracle"]
    reference = run_probe(
        engine, probes, conditions, documents=documents_by_id(engine.run.cfg.data)
    )
    assert results["probe"] == reference

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
