"""`hmem compile` through the real command line: the training loop's step compiled ahead of time
for 8 fake CPU devices from experiments/default.gin alone (no data, checkpoint or tree), its
printed figures those of the same compiled step in this process, and the exit statuses."""

import os
import re
import subprocess
import sys

import jax
import pytest

from hmem_jax.gin_parsing import load_train_config
from hmem_jax.train import aot

DEFAULT_GIN = os.path.join(os.path.dirname(__file__), "..", "experiments", "default.gin")
PARTS = ("arguments", "outputs", "aliased", "temporaries", "generated code")


def _compile(*flags: str) -> subprocess.CompletedProcess:
    """The CLI on the default job for 8 devices, sharing this session's compilation cache (so
    its compile and the in-process one are done once)."""
    cache = {
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    args = [sys.executable, "-m", "hmem_jax.main.compile", f"--gin_file={DEFAULT_GIN}", *flags]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=dict(os.environ, **cache)
    )


def _memory(stdout: str) -> dict[str, int]:
    found = re.findall(r"^  ([a-z][a-z ]*?) +-?[\d.]+ [MG]iB  \((-?\d+) bytes\)", stdout, re.M)
    return {name: int(count) for name, count in found}


def _flops(stdout: str) -> dict[str, float]:
    found = re.findall(
        r"^  (analytic as XLA counts|XLA cost_analysis|analytic) +(\S+)", stdout, re.M
    )
    return {name: float(value) for name, value in found}


@pytest.fixture(scope="module")
def fits():
    done = _compile("--devices=8", "--device_memory_gib=64")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def in_process():
    """The same step compiled here, on the test set-up's 8 devices."""
    cfg = load_train_config([DEFAULT_GIN], ())
    return aot.compile_step(cfg, jax.devices()[:8])


def test_the_printed_memory_is_the_compiled_steps(fits, in_process):
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1, 'memory': 1} on 8 cpu devices" in fits
    printed = _memory(fits)
    assert list(printed) == [*PARTS, "total"]
    memory = in_process.memory
    assert printed == {
        "arguments": memory.arguments,
        "outputs": memory.outputs,
        "aliased": -memory.aliased,
        "temporaries": memory.temporaries,
        "generated code": memory.generated_code,
        "total": memory.total,
    }
    assert printed["total"] == sum(printed[p] for p in PARTS)
    assert min(printed["arguments"], printed["outputs"], printed["temporaries"]) > 0
    # The old state is donated: the new one is written into its buffers.
    assert 0 < -printed["aliased"] <= printed["outputs"]
    assert re.search(r"^fits: [\d.]+ MiB of 64 GiB per device", fits, re.M)


def test_xla_flops_match_the_analytic_count(fits, in_process):
    flops = _flops(fits)
    assert flops["XLA cost_analysis"] == pytest.approx(in_process.xla_flops, rel=1e-3)
    # XLA counts the layer scan's body once; held against the count of what it counts, it is
    # the analytic figure plus a few percent (norms, softmax, the optimizer).
    assert 0.95 < flops["XLA cost_analysis"] / flops["analytic as XLA counts"] < 1.25
    assert 0.2 < flops["XLA cost_analysis"] / flops["analytic"] < 1.0
    tokens = 32 * 128  # TrainConfig.batch_size x seq_len of the default job
    assert flops["analytic"] == pytest.approx(in_process.analytic_flops / 8, rel=1e-3)
    assert in_process.tokens == tokens


def test_a_budget_the_step_does_not_fit_exits_1_with_one_line(fits):
    done = _compile("--devices=8", "--device_memory_gib=0.01")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the step needs"), lines
    assert "--device_memory_gib = 0.01" in lines[0]
    assert _memory(done.stdout) == _memory(fits)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--devices=64"], "does not divide over the 64 batch shards"),
        (["--devices=8", "--gin_param=MeshConfig.dcn_data = 3"], "dcn_* sizes multiply to 3"),
    ],
    ids=["batch-over-64", "slices-over-8"],
)
def test_devices_the_mesh_cannot_use_exit_2_with_one_line(flags, needle):
    done = _compile(*flags)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
