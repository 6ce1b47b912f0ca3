"""Gather the blocks to the sequences, or dispatch the sequences to the blocks? Measured per
block width on 8 fake CPU devices.

One memory level, FFN memories only (the anchor is left out: it is the same for both), L memory
layers applied as x <- x + SwiGLU_block(x), forward and backward, per-device batch S of T
tokens:

- gather (what training does, `bank/exchange.py`): every block split over the 8 devices; each
  shard fetches its sequences' blocks with one `all_to_all`, computes locally, and sends the
  blocks' gradients back to the slices with the transposed `all_to_all` + segment sum.
- dispatch (expert-parallel, as MoE layers do): every block whole on one device (rows split
  over the devices, block b on device b // (N / 8)); at every memory layer each sequence's
  activations go to its block's device by `all_to_all`, are computed there and come back;
  the backward pass does the same with their gradients; block gradients stay where the block is.

Routing is balanced (S = 8 sequences per shard, each going to another device, every device
receiving exactly 8), the best case for dispatch: no capacity padding, nothing dropped. (An
exact dispatch with unbalanced routing needs `ragged_all_to_all`, which XLA:CPU does not run.)
Both compute the same function: the bench checks equal losses and input gradients.

Bytes per device and step (float32): gather moves its C = S blocks in and their gradients out,
2 · C · 3·d·r·L · 4; dispatch moves activations there and back, forward and backward,
4 · S · T · d · L · 4. They cross at r = 2T/3 whatever d, L and S.

    python bench/bench_dispatch.py [--seq_len=128 --d_model=256 --layers=4 --ranks=1,16,48,128,512]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from hmem_jax.bank.exchange import BlockExchange  # noqa: E402

AXIS = "x"
DEVICES = 8


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """x[B, T, d] with per-sequence gate/up [B, d, r], down [B, r, d]."""
    g = jnp.einsum("btd,bdr->btr", x, gate)
    u = jnp.einsum("btd,bdr->btr", x, up)
    return jnp.einsum("btr,brd->btd", jax.nn.silu(g) * u, down)


def gather_fn(mesh, exchange: BlockExchange, layers: int, clusters: int):
    """loss, dx and the block gradients summed onto their slices, by gathering blocks."""
    batch = PartitionSpec(AXIS)

    def local_loss(x, blocks, slots):
        # x [S, T, d]; blocks[name] [1, C, L, ...]; slots [S]: each sequence's block.
        w = {n: jnp.take(b[0], slots, axis=0) for n, b in blocks.items()}
        for layer in range(layers):
            x = x + swiglu(x, w["gate"][:, layer], w["up"][:, layer], w["down"][:, layer])
        return jnp.sum(x * x)[None]

    per_shard = jax.shard_map(
        local_loss, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch, check_vma=False
    )
    loss = lambda *a: jnp.sum(per_shard(*a))  # noqa: E731

    def step(view, x, ids, slots):
        blocks = exchange.fetch(view, ids)
        value, (dx, dblocks) = jax.value_and_grad(loss, argnums=(0, 1))(x, blocks, slots)
        reduced = exchange.reduce(dblocks, ids, clusters, view)
        return value, dx, reduced.grads

    return jax.jit(step)


def dispatch_fn(mesh, layers: int, clusters: int, capacity: int):
    """loss, dx and the bank's gradients (rows where the blocks live), by dispatching tokens."""
    batch = PartitionSpec(AXIS)
    per_device = clusters // DEVICES

    def local_loss(x, bank, ids):
        # x [S, T, d]; bank[name] [N/8, L, ...] (this device's blocks); ids [S] global block ids.
        me = jax.lax.axis_index(AXIS)
        dest = ids // per_device
        # Each sequence's slot among this shard's sequences going to the same device.
        same = dest[:, None] == dest[None, :]
        slot = jnp.sum(jnp.tril(same, -1), axis=1)
        send_ids = jnp.full((DEVICES, capacity), -1, jnp.int32).at[dest, slot].set(ids)
        recv_ids = jax.lax.all_to_all(send_ids, AXIS, 0, 0, tiled=True).reshape(-1)
        valid = (recv_ids >= 0)[:, None, None]
        rows = jnp.clip(recv_ids - me * per_device, 0, per_device - 1)
        w = {n: jnp.take(b, rows, axis=0) for n, b in bank.items()}  # [8 * cap, L, ...]
        for layer in range(layers):
            send = jnp.zeros((DEVICES, capacity) + x.shape[1:], x.dtype).at[dest, slot].set(x)
            got = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=True)
            got = got.reshape((DEVICES * capacity,) + x.shape[1:])
            y = swiglu(got, w["gate"][:, layer], w["up"][:, layer], w["down"][:, layer]) * valid
            back = jax.lax.all_to_all(
                y.reshape((DEVICES, capacity) + x.shape[1:]), AXIS, 0, 0, tiled=True
            )
            x = x + back[dest, slot]
        return jnp.sum(x * x)[None]

    per_shard = jax.shard_map(
        local_loss, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch, check_vma=False
    )
    loss = lambda *a: jnp.sum(per_shard(*a))  # noqa: E731

    def step(bank, x, ids):
        value, (dx, dbank) = jax.value_and_grad(loss, argnums=(0, 1))(x, bank, ids)
        return value, dx, dbank

    return jax.jit(step)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(rank: int, args: argparse.Namespace) -> dict:
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    exchange = BlockExchange(mesh, (AXIS,), (AXIS,))
    d, t, layers, s = args.d_model, args.seq_len, args.layers, DEVICES
    clusters = DEVICES * args.blocks_per_device
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(d)
    bank = {
        "gate": rng.normal(0, scale, (clusters, layers, d, rank)),
        "up": rng.normal(0, scale, (clusters, layers, d, rank)),
        "down": rng.normal(0, 1.0 / np.sqrt(rank), (clusters, layers, rank, d)) * 0.1,
    }
    bank = {n: v.astype(np.float32) for n, v in bank.items()}
    x = rng.normal(0, 1, (DEVICES * s, t, d)).astype(np.float32)
    # Balanced: sequence i of shard k uses a block of device (k + i) % 8, each block once.
    owner = (np.arange(DEVICES)[:, None] + np.arange(s)[None, :]) % DEVICES
    ids = owner * args.blocks_per_device + np.arange(DEVICES)[:, None] % args.blocks_per_device
    ids = ids.astype(np.int32)  # [shard, S]: distinct within a shard
    batch = NamedSharding(mesh, PartitionSpec(AXIS))
    xs = jax.device_put(x, batch)

    view = {
        n: jax.device_put(v, NamedSharding(mesh, exchange.spec(v.shape))) for n, v in bank.items()
    }
    shard_ids = jax.device_put(np.sort(ids, axis=1), batch)  # [8, C]: the shard's blocks
    slots = jax.device_put(
        np.argsort(np.argsort(ids, axis=1), axis=1).reshape(-1).astype(np.int32), batch
    )
    gather = gather_fn(mesh, exchange, layers, clusters)

    rows = {n: jax.device_put(v, batch) for n, v in bank.items()}
    flat_ids = jax.device_put(ids.reshape(-1), batch)
    dispatch = dispatch_fn(mesh, layers, clusters, capacity=1)

    g_loss, g_dx, _ = gather(view, xs, shard_ids, slots)
    d_loss, d_dx, _ = dispatch(rows, xs, flat_ids)
    np.testing.assert_allclose(float(g_loss), float(d_loss), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g_dx), np.asarray(d_dx), rtol=1e-3, atol=1e-3)

    gather_s = dispatch_s = float("inf")
    for _ in range(args.rounds):  # interleaved
        gather_s = min(gather_s, _best(lambda: gather(view, xs, shard_ids, slots), 2))
        dispatch_s = min(dispatch_s, _best(lambda: dispatch(rows, xs, flat_ids), 2))
    gather_bytes = 2 * s * 3 * d * rank * layers * 4
    dispatch_bytes = 4 * s * t * d * layers * 4
    return {
        "rank": rank,
        "gather_s": gather_s,
        "dispatch_s": dispatch_s,
        "gather_mb": gather_bytes / 1e6,
        "dispatch_mb": dispatch_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks_per_device", type=int, default=8)
    parser.add_argument("--ranks", default="1,16,48,128,512")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices; {DEVICES} sequences x "
        f"{args.seq_len} tokens per device, d {args.d_model}, {args.layers} memory layers, "
        f"{DEVICES * args.blocks_per_device} blocks; crossover predicted at r = "
        f"{2 * args.seq_len / 3:.0f}\n"
    )
    print(
        "| block rank r | gather: bytes per device | dispatch: bytes per device | "
        "gather step | dispatch step | dispatch / gather time |"
    )
    print("|---|---|---|---|---|---|")
    for rank in (int(r) for r in args.ranks.split(",")):
        m = measure(rank, args)
        print(
            f"| {rank} | {m['gather_mb']:.2f} MB | {m['dispatch_mb']:.2f} MB | "
            f"{m['gather_s'] * 1e3:.1f} ms | {m['dispatch_s'] * 1e3:.1f} ms | "
            f"{m['dispatch_s'] / m['gather_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
