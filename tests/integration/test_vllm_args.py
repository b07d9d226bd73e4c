"""The vLLM command line the operator renders is accepted by a real vLLM (on the CPU).

The Deployment is rendered with ``build_deployment`` for a Pool whose model id is the tiny model's
directory; its container args are run as they are, less only the GPU-specific flags, with the
container's environment as Kubernetes would resolve it (the internal key from the upstream-key
Secret as ``VLLM_API_KEY``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpupool.models import parse_pool_spec
from gpupool.workload import build_deployment
from support.vllm import (
    free_port,
    new_api_key,
    start_vllm,
    tiny_model_dir,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# Flags that only make sense with GPUs, each followed by its value.
GPU_ONLY_FLAGS = {"--tensor-parallel-size", "-tp"}
UPSTREAM_SECRET = "tiny-upstream-key"


def without_gpu_flags(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in GPU_ONLY_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def resolve_env(env: list[dict[str, Any]], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's env as the kubelet would set it, from literal values and Secret refs."""
    out: dict[str, str] = {}
    for entry in env:
        if "value" in entry:
            out[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            out[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return out


def test_without_gpu_flags() -> None:
    assert without_gpu_flags(["--a", "--tensor-parallel-size", "2", "--b", "-tp=4", "--c"]) == [
        "--a", "--b", "--c"]


def test_rendered_args_start_a_real_vllm() -> None:
    model = tiny_model_dir()
    port = free_port()
    key = new_api_key()
    spec = parse_pool_spec({
        "model": {"id": str(model)},
        "seats": 1,
        "blocks": {"europe": {"price": "10.00"}},
        # Passed through as the spec's extraArgs: the CPU needs float32 and a short context.
        "runtime": {"port": port, "extraArgs": ["--max-model-len", "256", "--dtype", "float32"]},
    })
    dep = build_deployment("tiny", "default", "uid-1", spec, 1, UPSTREAM_SECRET)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    rendered: list[str] = container["args"]
    args = without_gpu_flags(rendered)
    assert len(args) == len(rendered) - 2, "only the GPU flag and its value are dropped"
    assert all(key not in a for a in args)
    env = resolve_env(container["env"], {(UPSTREAM_SECRET, "apiKey"): key})
    assert env["VLLM_API_KEY"] == key

    server = start_vllm(args, port=port, api_key=key, served_model_name=str(model), env=env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            # The probes' path answers without a key.
            assert client.get("/health").status_code == 200
            # /v1 needs the internal key vLLM read from VLLM_API_KEY.
            assert client.get("/v1/models").status_code == 401
            wrong = {"Authorization": "Bearer sk_wrong"}
            assert client.get("/v1/models", headers=wrong).status_code == 401
            models = client.get("/v1/models", headers=server.auth_headers)
            assert models.status_code == 200
            assert [m["id"] for m in models.json()["data"]] == [str(model)]

            # --enable-force-include-usage: a stream carries usage at its end even when the
            # client did not ask for it.
            body = {"model": str(model), "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4, "stream": True}
            chunks: list[dict[str, Any]] = []
            with client.stream("POST", "/v1/chat/completions", json=body,
                               headers=server.auth_headers) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(json.loads(line.removeprefix("data: ")))
            usage = chunks[-1].get("usage")
            assert usage is not None, "no usage in the last chunk"
            assert usage["prompt_tokens"] > 0
            assert 0 < usage["completion_tokens"] <= 4
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    finally:
        server.stop()
    assert not server.alive()
    # vLLM never wrote the key to its log (the rendered args don't carry it either).
    assert key not in server.log_path.read_text(errors="replace")
    server.log_path.unlink()
