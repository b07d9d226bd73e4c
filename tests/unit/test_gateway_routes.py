"""The allowlist, the token reservation of each request, and usage read from responses."""

from __future__ import annotations

import json

import pytest

from gpupool.gateway.routes import (
    PROMPT_OVERHEAD_TOKENS,
    ROUTES,
    BadRequest,
    family_of,
    plan_request,
)
from gpupool.gateway.usage import JsonTap, SseTap

CHAT = ROUTES["/v1/chat/completions"]
COMPLETIONS = ROUTES["/v1/completions"]
MESSAGES = ROUTES["/anthropic/v1/messages"]


def body(**kw: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       **kw}).encode()


def test_the_allowlist() -> None:
    assert {p: (r.method, r.upstream_path) for p, r in ROUTES.items()} == {
        "/v1/models": ("GET", "/v1/models"),
        "/v1/chat/completions": ("POST", "/v1/chat/completions"),
        "/v1/completions": ("POST", "/v1/completions"),
        "/v1/embeddings": ("POST", "/v1/embeddings"),
        "/anthropic/v1/messages": ("POST", "/v1/messages"),
        "/anthropic/v1/messages/count_tokens": ("POST", "/v1/messages/count_tokens"),
    }
    assert family_of("/anthropic/v1/x") == "anthropic"
    assert family_of("/anthropicx") == "openai"


def test_estimate_is_prompt_bound_plus_max_tokens() -> None:
    b = body(max_tokens=100)
    plan = plan_request(CHAT, b, max_model_len=None)
    assert plan.estimate == len(b) + PROMPT_OVERHEAD_TOKENS + 100
    assert plan.body == b
    assert not plan.stream


def test_estimate_is_capped_by_the_context_length() -> None:
    assert plan_request(CHAT, body(max_tokens=200), max_model_len=256).estimate == 256
    b = body(max_tokens=5)
    assert plan_request(CHAT, b, max_model_len=4096).estimate == len(b) + 64 + 5
    # n choices share one prompt
    b = body(max_tokens=5, n=3)
    assert plan_request(CHAT, b, max_model_len=4096).estimate == len(b) + 64 + 15


def test_no_max_tokens_reserves_the_rest_of_the_context() -> None:
    assert plan_request(CHAT, body(), max_model_len=2048).estimate == 2048
    b = body()
    assert plan_request(CHAT, b, max_model_len=None,
                        default_max_tokens=1000).estimate == len(b) + 64 + 1000
    # max_completion_tokens wins for chat
    b = body(max_completion_tokens=7, max_tokens=100)
    assert plan_request(CHAT, b, max_model_len=None).estimate == len(b) + 64 + 7


def test_completions_default_to_16_tokens_like_vllm() -> None:
    b = json.dumps({"model": "m", "prompt": "hi"}).encode()
    assert plan_request(COMPLETIONS, b, max_model_len=None).estimate == len(b) + 64 + 16
    b = json.dumps({"model": "m", "prompt": "hi", "max_tokens": None}).encode()
    assert plan_request(COMPLETIONS, b, max_model_len=512).estimate == 512


def test_models_and_count_tokens_reserve_nothing() -> None:
    assert plan_request(ROUTES["/v1/models"], b"", max_model_len=None).estimate == 0
    assert plan_request(ROUTES["/anthropic/v1/messages/count_tokens"], body(),
                        max_model_len=None).estimate == 0


def test_embeddings_reserve_the_prompt() -> None:
    b = json.dumps({"model": "m", "input": ["a", "b"]}).encode()
    assert plan_request(ROUTES["/v1/embeddings"], b, max_model_len=None).estimate == len(b) + 64


@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b"1",
                                 body(max_tokens=-1), body(max_tokens="5"), body(n=True)])
def test_bad_bodies(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        plan_request(CHAT, raw, max_model_len=None)


def test_stream_usage_is_requested_and_marked_for_stripping() -> None:
    plan = plan_request(CHAT, body(stream=True, max_tokens=3), max_model_len=None)
    assert plan.stream and plan.strip_usage_chunk
    assert json.loads(plan.body)["stream_options"] == {"include_usage": True}
    plan = plan_request(CHAT, body(stream=True, stream_options={"continuous_usage_stats": True}),
                        max_model_len=None)
    assert json.loads(plan.body)["stream_options"] == {"continuous_usage_stats": True,
                                                       "include_usage": True}
    b = body(stream=True, stream_options={"include_usage": True})
    plan = plan_request(CHAT, b, max_model_len=None)
    assert plan.body == b and not plan.strip_usage_chunk
    plan = plan_request(MESSAGES, body(stream=True, max_tokens=3), max_model_len=None)
    assert plan.stream and not plan.strip_usage_chunk


# -- usage taps -----------------------------------------------------------------------------------
def chunk(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
STREAM = [chunk({"choices": [{"delta": {"content": "a"}}]}),
          chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
          chunk({"choices": [], "usage": USAGE}),
          b"data: [DONE]\n\n"]


def test_sse_tap_strips_the_usage_chunk_only_when_asked() -> None:
    tap = SseTap(anthropic=False, strip_usage_chunk=True)
    out = b"".join(tap.feed(c) for c in STREAM) + tap.close()
    assert out == STREAM[0] + STREAM[1] + STREAM[3]
    assert tap.usage is not None and tap.usage.total == 7

    tap = SseTap(anthropic=False, strip_usage_chunk=False)
    out = b"".join(tap.feed(c) for c in STREAM) + tap.close()
    assert out == b"".join(STREAM)
    assert tap.usage is not None and tap.usage.total == 7


def test_sse_tap_handles_events_split_anywhere() -> None:
    whole = b"".join(STREAM)
    for size in (1, 2, 7, 50):
        tap = SseTap(anthropic=False, strip_usage_chunk=True)
        parts = [whole[i:i + size] for i in range(0, len(whole), size)]
        out = b"".join(tap.feed(p) for p in parts) + tap.close()
        assert out == STREAM[0] + STREAM[1] + STREAM[3]
        assert tap.usage is not None and tap.usage.total == 7


def test_sse_tap_crlf_events() -> None:
    tap = SseTap(anthropic=False, strip_usage_chunk=False)
    tap.feed(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n')
    assert tap.usage is not None and tap.usage.total == 3


def test_anthropic_stream_usage() -> None:
    tap = SseTap(anthropic=True, strip_usage_chunk=True)
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":11,"output_tokens":1}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":5}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    out = b"".join(tap.feed(e) for e in events)
    assert out == b"".join(events)  # nothing is removed from Anthropic streams
    assert tap.usage is not None
    assert (tap.usage.prompt, tap.usage.completion) == (11, 9)


def test_json_tap() -> None:
    tap = JsonTap(anthropic=False)
    raw = json.dumps({"choices": [], "usage": USAGE}).encode()
    assert tap.feed(raw[:5]) + tap.feed(raw[5:]) == raw
    tap.close()
    assert tap.usage is not None and tap.usage.total == 7
    tap = JsonTap(anthropic=True)
    tap.feed(json.dumps({"usage": {"input_tokens": 2, "output_tokens": 3,
                                   "cache_read_input_tokens": 1}}).encode())
    tap.close()
    assert tap.usage is not None and tap.usage.total == 6
    tap = JsonTap(anthropic=False)
    tap.feed(b"not json")
    tap.close()
    assert tap.usage is None


def test_vllm_force_include_usage_stream() -> None:
    # vLLM 0.32 with --enable-force-include-usage: usage on every chunk, then the usage-only one
    def c(content: str, n: int, finish: str | None = None) -> bytes:
        return (b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":'
                b'{"content":"' + content.encode() + b'"},"finish_reason":'
                + (b'"' + finish.encode() + b'"' if finish else b"null")
                + b'}],"usage":{"prompt_tokens":12,"total_tokens":' + str(12 + n).encode()
                + b',"completion_tokens":' + str(n).encode() + b"}}\n\n")
    final = (b'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":12,'
             b'"total_tokens":15,"completion_tokens":3}}\n\n')
    stream = [c("a", 1), c("b", 2), c("c", 3, "length"), final, b"data: [DONE]\n\n"]
    tap = SseTap(anthropic=False, strip_usage_chunk=True)
    out = b"".join(tap.feed(s) for s in stream) + tap.close()
    assert out == b"".join(stream[:3]) + stream[4]
    assert tap.usage is not None
    assert (tap.usage.prompt, tap.usage.completion) == (12, 3)
    tap = SseTap(anthropic=False, strip_usage_chunk=False)
    assert b"".join(tap.feed(s) for s in stream) == b"".join(stream)
    assert tap.usage is not None and tap.usage.total == 15
    # a stream cut before its end still shows the usage seen last
    tap = SseTap(anthropic=False, strip_usage_chunk=True)
    tap.feed(stream[0] + stream[1])
    assert tap.usage is not None and tap.usage.total == 14
