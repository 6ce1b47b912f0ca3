"""Memory inside the model: exact references for FFN-memories, LoRA and KV memories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.config import HierarchyConfig, MemoryConfig, ModelConfig, model_preset
from hmem_jax.model import Transformer
from hmem_jax.model import memory as memory_lib

CFG = ModelConfig(vocab_size=61, num_layers=2, d_model=32, num_heads=4, head_dim=8, d_ff=48)
B, T = 3, 10


@pytest.mark.parametrize(
    "name, sizes, bank, fetched",
    [
        ("160m", (256, 64, 16, 0), 4.62e9, 18.06e6),
        ("410m", (512, 128, 32, 0), 12.68e9, 49.5e6),
        ("1p4b", (768, 256, 16, 0), 21.14e9, 153.4e6),
    ],
)
def test_paper_bank_and_fetched_sizes(name, sizes, bank, fetched):
    geometry = BankGeometry.from_configs(
        model_preset(name), MemoryConfig(kind="ffn", level_sizes=sizes), HierarchyConfig()
    )
    assert geometry.bank_params == pytest.approx(bank, rel=5e-3)
    assert geometry.fetched_params == pytest.approx(fetched, rel=5e-3)
    # Bank = 3·l·d·Σ 16^l·r_l, fetched = 3·l·d·Σ r_l (docs/method.md).
    model = model_preset(name)
    assert geometry.fetched_params == 3 * model.num_layers * model.d_model * sum(sizes)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 61, (B, T)), jnp.int32)
    return tokens, jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))


def _random_blocks(kind, sizes=(4, 2), seed=1, nonzero=True):
    """Per level: unique blocks [U, layers, ...] with every matrix random (no zero init)."""
    geometry = BankGeometry.from_configs(
        CFG, MemoryConfig(kind=kind, level_sizes=sizes), HierarchyConfig(branching=4, depth=2)
    )
    key = jax.random.key(seed)
    fetched = {}
    for level in geometry.active_levels:
        fetched[level] = {}
        for i, name in enumerate(sorted(geometry.matrices)):
            shape = (3,) + geometry.block_shape(name, level)
            value = jax.random.normal(jax.random.fold_in(key, 10 * level + i), shape) * 0.3
            fetched[level][name] = value if nonzero else jnp.zeros(shape)
    return geometry, fetched


def _model_and_params(lora_scale=1.0):
    model = Transformer(CFG, lora_scale=lora_scale)
    tokens, seg, pos = _inputs()
    return model, model.init(jax.random.key(0), tokens, seg, pos)["params"]


def test_ffn_memory_equals_the_anchor_with_a_widened_ffn():
    geometry, fetched = _random_blocks("ffn")
    slots = {1: jnp.array([0, 2, 1]), 2: jnp.array([1, 1, 0])}
    memory = memory_lib.sequence_memory(
        fetched, slots, {n: m.rank_axis for n, m in geometry.matrices.items()}
    )
    model, params = _model_and_params()
    tokens, seg, pos = _inputs()
    out = model.apply({"params": params}, tokens, seg, pos, memory)

    wide_cfg = ModelConfig(**{**CFG.__dict__, "d_ff": CFG.d_ff + 6})
    wide = Transformer(wide_cfg)
    for b in range(B):
        wide_params = jax.tree.map(lambda x: x, params)
        mlp = dict(params["blocks"]["mlp"])
        blocks = {
            n: jnp.concatenate(
                [fetched[1][n][slots[1][b]], fetched[2][n][slots[2][b]]],
                axis=-1 if n != "down" else 1,
            )
            for n in ("gate", "up", "down")
        }
        for name in ("gate", "up"):
            mlp[f"w_{name}"] = mlp[f"w_{name}"].replace_boxed(
                jnp.concatenate([mlp[f"w_{name}"].value, blocks[name]], axis=-1)
            )
        mlp["w_down"] = mlp["w_down"].replace_boxed(
            jnp.concatenate([mlp["w_down"].value, blocks["down"]], axis=1)
        )
        wide_params["blocks"] = {**params["blocks"], "mlp": mlp}
        reference = wide.apply(
            {"params": wide_params}, tokens[b : b + 1], seg[b : b + 1], pos[b : b + 1]
        )
        np.testing.assert_allclose(np.asarray(out[b]), np.asarray(reference[0]), atol=2e-5)


@pytest.mark.parametrize("kind", ["ffn", "lora_qk", "lora_ov", "lora_ffn", "kv"])
def test_freshly_initialised_memory_has_no_effect(kind):
    geometry = BankGeometry.from_configs(
        CFG, MemoryConfig(kind=kind, level_sizes=(4, 2)), HierarchyConfig(branching=4, depth=2)
    )
    bank = bank_lib.init_bank(geometry, 0, jnp.float32, jnp.float32, with_generic=False)
    fetched = {l: bank_lib.fetch(bank[f"l{l}"], jnp.array([0, 1, 2])).params for l in (1, 2)}
    slots = {1: jnp.array([0, 2, 1]), 2: jnp.array([1, 1, 0])}
    memory = memory_lib.sequence_memory(
        fetched, slots, {n: m.rank_axis for n, m in geometry.matrices.items()}
    )
    model, params = _model_and_params(lora_scale=2.0 / 6)
    tokens, seg, pos = _inputs()
    with_memory = model.apply({"params": params}, tokens, seg, pos, memory)
    np.testing.assert_allclose(
        np.asarray(with_memory),
        np.asarray(model.apply({"params": params}, tokens, seg, pos)),
        atol=1e-6,
    )


@pytest.mark.parametrize("kind", ["ffn", "lora_qk", "lora_ov", "lora_ffn", "kv"])
def test_each_sequence_computes_with_its_own_path_as_if_alone(kind):
    geometry, fetched = _random_blocks(kind)
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    slots = {1: jnp.array([0, 2, 1]), 2: jnp.array([1, 1, 0])}
    model, params = _model_and_params(lora_scale=0.5)
    tokens, seg, pos = _inputs()
    batched = model.apply(
        {"params": params}, tokens, seg, pos, memory_lib.sequence_memory(fetched, slots, rank_axes)
    )
    for b in range(B):
        one = {l: {n: v[slots[l][b]][None] for n, v in fetched[l].items()} for l in fetched}
        alone = model.apply(
            {"params": params},
            tokens[b : b + 1],
            seg[b : b + 1],
            pos[b : b + 1],
            memory_lib.sequence_memory(one, {1: jnp.array([0]), 2: jnp.array([0])}, rank_axes),
        )
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(alone[0]), atol=2e-5)
    plain = model.apply({"params": params}, tokens, seg, pos)
    assert not np.allclose(np.asarray(batched), np.asarray(plain), atol=1e-3)


def test_grouped_matmul_application_equals_the_gather_application():
    geometry, fetched = _random_blocks("ffn")
    slots = {1: jnp.array([2, 0, 2]), 2: jnp.array([1, 1, 0])}
    model, params = _model_and_params()
    tokens, seg, pos = _inputs()
    generic = {
        n: jax.random.normal(
            jax.random.key(5),
            (1,)
            + geometry.block_shape(n, 1)[:1]
            + tuple(6 if s is None else s for s in geometry.matrices[n].shape),
        )
        * 0.3
        for n in ("gate", "up", "down")
    }
    use_generic = jnp.array([False, True, False])
    gather = memory_lib.select_generic(
        memory_lib.sequence_memory(
            fetched, slots, {n: m.rank_axis for n, m in geometry.matrices.items()}
        ),
        generic,
        use_generic,
    )
    grouped = memory_lib.grouped_memory(fetched, slots, generic, use_generic)
    out_gather = model.apply({"params": params}, tokens, seg, pos, gather)
    out_grouped = model.apply({"params": params}, tokens, seg, pos, grouped)
    np.testing.assert_allclose(np.asarray(out_grouped), np.asarray(out_gather), atol=2e-5)


def test_memory_placed_on_the_last_layers_leaves_the_first_layers_alone():
    geometry, fetched = _random_blocks("ffn")
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    slots = {1: jnp.array([0, 2, 1]), 2: jnp.array([1, 1, 0])}
    one_layer = {l: {n: v[:, 1:] for n, v in fetched[l].items()} for l in fetched}
    placed = memory_lib.place_layers(
        memory_lib.sequence_memory(one_layer, slots, rank_axes), (1,), 2
    )
    full = memory_lib.sequence_memory(fetched, slots, rank_axes)
    zeroed_first = jax.tree.map(lambda x: x.at[0].set(0.0), full)
    model, params = _model_and_params()
    tokens, seg, pos = _inputs()
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, tokens, seg, pos, placed)),
        np.asarray(model.apply({"params": params}, tokens, seg, pos, zeroed_first)),
        atol=1e-6,
    )


def test_block_initialisation_depends_only_on_seed_level_and_id():
    geometry = BankGeometry.from_configs(
        CFG, MemoryConfig(kind="ffn", level_sizes=(4, 2)), HierarchyConfig(branching=4, depth=2)
    )
    level = bank_lib.init_level(geometry, 2, 3, jnp.float32, jnp.float32)
    block = bank_lib.init_block(geometry, 2, 3, 2, jnp.int32(7), jnp.float32)
    for name in block:
        np.testing.assert_array_equal(np.asarray(level.params[name][7]), np.asarray(block[name]))
    assert float(jnp.abs(level.params["down"]).max()) == 0.0
    assert float(jnp.std(level.params["gate"])) == pytest.approx(1 / np.sqrt(32), rel=0.1)
