"""A real S3-compatible server on loopback for tests: moto's (`python -m moto.server`).

AWS_ENDPOINT_URL points at it and the credentials are dummies; nothing needs the network.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


@contextlib.contextmanager
def moto_server(env=None):
    """A moto S3 server on a free loopback port (extra environment `env`) -> its endpoint."""
    import portpicker

    port = portpicker.pick_unused_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.time() + 30
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@contextlib.contextmanager
def s3_environment(bucket):
    """A moto S3 server on a free loopback port with `bucket`; the AWS_* variables point at it
    while open (child processes inherit them) -> (endpoint, boto3 client). Stopped at the end."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")

    with moto_server() as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            deadline = time.time() + 30
            while True:
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
            yield endpoint, client
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def upload_jsonl_corpus(client, bucket, prefix, documents):
    """`documents` as 4 jsonl shards under s3://BUCKET/PREFIX/ (plain, gzip and zstandard) plus a
    stray object the pattern must not match; -> their local twin folder's file contents."""
    import gzip

    import zstandard

    shards = {}
    for number in range(4):
        lines = [json.dumps({"id": d.id, "text": d.text}) for d in documents[number::4]]
        data = ("\n".join(lines) + "\n").encode()
        suffix, packed = [
            (".jsonl", data),
            (".jsonl.gz", gzip.compress(data)),
            (".jsonl.zst", zstandard.ZstdCompressor().compress(data)),
            (".jsonl", data),
        ][number]
        client.put_object(Bucket=bucket, Key=f"{prefix}/part-{number}{suffix}", Body=packed)
        shards[f"part-{number}.jsonl"] = data
    client.put_object(Bucket=bucket, Key=f"{prefix}/README.md", Body=b"not a shard")
    return shards
