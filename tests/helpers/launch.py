"""Running the scripts of launch/: local.sh for the multi-process tests, and a stand-in python
(`fake_python`) that records how it was started, so the scripts' commands can be run for real
without JAX, SLURM or XPK."""

import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")


def train_flags(workdir, params, *flags: str) -> list[str]:
    """The trainer's flags for a test run: workdir, no probe, then FLAGS and the gin params."""
    return [f"--workdir={workdir}", "--probe_limit=0", *flags] + [
        f"--gin_param={p}" for p in params
    ]


def run_local(num_processes: int, *args: str, env=None, timeout: float = 600):
    """`launch/local.sh NUM_PROCESSES ARGS...` with this interpreter as HMEM_PYTHON.

    Returns the CompletedProcess (stdout: every process's lines, prefixed `[i] `; stderr:
    local.sh's own). On timeout local.sh gets SIGTERM (which it forwards) before SIGKILL, so no
    trainer outlives the test.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("HMEM_PYTHON", sys.executable)
    command = [os.path.join(LAUNCH, "local.sh"), str(num_processes), *args]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        message = f"local.sh timed out after {timeout} s:\n{out[-3000:]}\n{err[-2000:]}"
        raise AssertionError(message) from expired
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def process_lines(stdout: str, process: int) -> list[str]:
    """The lines process `process` printed, from local.sh's prefixed output."""
    tag = f"[{process}] "
    return [line[len(tag) :] for line in stdout.splitlines() if line.startswith(tag)]


FAKE_PYTHON = '''#!{python}
"""Stands in for python: appends how it was started to $FAKE_LOG (one JSON line), then acts as
the environment says: FAKE_EXIT="ID:STATUS,..." exits at once, FAKE_SLEEP seconds of work, on
SIGTERM/SIGINT prints "stopping" and exits 0 (FAKE_ON_TERM=ignore: keeps going). `-c CODE`
runs in the real python (local.sh picks its port that way)."""
import json, os, signal, sys, time

args = sys.argv[1:]
if args[:1] == ["-c"]:
    os.execv(sys.executable, [sys.executable, *args])
ids = [a.split("=", 1)[1] for a in args if a.startswith("--process_id=")]
me = int(ids[0]) if ids else 0
names = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_LOCAL_DEVICE_IDS", "PYTHONUNBUFFERED")
with open(os.environ["FAKE_LOG"], "a") as log:
    env = {{n: os.environ[n] for n in names if n in os.environ}}
    log.write(json.dumps({{"process": me, "argv": args, "env": env, "pid": os.getpid()}}) + "\\n")
print(f"fake trainer {{me}} started", flush=True)

def stop(signum, frame):
    print(f"stopping on {{signal.Signals(signum).name}}", flush=True)
    sys.exit(0)

on_term = signal.SIG_IGN if os.environ.get("FAKE_ON_TERM") == "ignore" else stop
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
exits = dict(item.split(":") for item in os.environ.get("FAKE_EXIT", "").split(",") if item)
if str(me) in exits:
    print(f"failing with {{exits[str(me)]}}", file=sys.stderr, flush=True)
    sys.exit(int(exits[str(me)]))
deadline = time.time() + float(os.environ.get("FAKE_SLEEP", "0"))
while time.time() < deadline:
    time.sleep(0.05)
print("finished", end="", flush=True)  # no newline: the prefixer keeps a last partial line
'''


def fake_python(folder) -> tuple[str, str]:
    """Write the stand-in python into `folder`; returns (its path, the log it appends to)."""
    path, log = os.path.join(folder, "fake_python"), os.path.join(folder, "fake_python.jsonl")
    with open(path, "w") as out:
        out.write(FAKE_PYTHON.format(python=sys.executable))
    os.chmod(path, 0o755)
    open(log, "w").close()
    return path, log


def fake_starts(log: str) -> list[dict]:
    """What the stand-in python recorded, one dict per start, ordered by process id."""
    with open(log) as lines:
        return sorted((json.loads(line) for line in lines), key=lambda start: start["process"])
