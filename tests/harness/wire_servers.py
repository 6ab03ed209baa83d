"""Local HTTP servers on 127.0.0.1 that speak the Anthropic Messages API and the OpenAI Chat Completions
API well enough for the official SDKs: each replays a script of replies (an HTTP error or a message) and
records every request (path, headers, JSON body) for the test to check."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Script:
    def __init__(self, replies: list[tuple]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self.served: list[tuple] = []  # the replies sent, in order
        self.lock = threading.Lock()

    def next(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any, float, dict[str, str]]:
        """(status, payload (bytes: sent as they are), seconds to wait before answering (a slow reply makes the
        client time out), extra headers)."""
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            if not self.replies:
                return 500, {"type": "error", "error": {"type": "api_error", "message": "script exhausted"}}, 0.0, {}
            reply = self.replies.pop(0)
            self.served.append(reply)
            return (reply[0], reply[1], reply[2] if len(reply) > 2 else 0.0, reply[3] if len(reply) > 3 else {})


def _handler(script: Script, route: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            delay, extra = 0.0, {}
            if not self.path.endswith(route):
                status, payload = 404, {"error": {"message": f"no route {self.path}"}}
            else:
                status, payload, delay, extra = script.next(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                            body)
            time.sleep(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if status == 429 and "retry-after" not in extra:
                self.send_header("retry-after", "0")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def serve(script: Script, route: str) -> Iterator[str]:
    """Serve `script` on 127.0.0.1 (a free port); yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script, route))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- Anthropic Messages API ----------------------------------------------------------------------------
def anthropic_message(content: list[dict[str, Any]], stop_reason: str, tokens: tuple[int, int]) -> tuple[int, dict]:
    return 200, {"id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test", "content": content,
                 "stop_reason": stop_reason, "stop_sequence": None,
                 "usage": {"input_tokens": tokens[0], "output_tokens": tokens[1]}}


def anthropic_tool_use(call_id: str, name: str, args: dict[str, Any], tokens: tuple[int, int] = (100, 20)) -> tuple[int, dict]:
    return anthropic_message([{"type": "text", "text": f"calling {name}"},
                              {"type": "tool_use", "id": call_id, "name": name, "input": args}], "tool_use", tokens)


def slow(reply: tuple[int, dict], seconds: float) -> tuple[int, dict, float]:
    """The same reply, sent only after `seconds` (longer than the client's timeout: a timeout fault)."""
    return (reply[0], reply[1], seconds)


def anthropic_error(status: int, message: str | None = None) -> tuple[int, dict]:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
            529: "overloaded_error"}.get(status, "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": message or f"scripted {status}"}}


def malformed(body: bytes = b'{"id": "msg_test", "type": "message", "content": [') -> tuple[int, bytes]:
    """A 200 whose body is not the protocol's JSON."""
    return 200, body


def retry_after(reply: tuple, seconds: float) -> tuple:
    """`reply` with a Retry-After header."""
    return (reply[0], reply[1], 0.0, {"retry-after": str(seconds)})


# -- OpenAI Chat Completions ---------------------------------------------------------------------------
def openai_reply(content: str | None, tool_calls: list[dict[str, Any]] | None, tokens: tuple[int, int]) -> tuple[int, dict]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return 200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "gpt-test",
                 "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
                 "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                           "total_tokens": tokens[0] + tokens[1]}}


def openai_tool_call(call_id: str, name: str, args: dict[str, Any], tokens: tuple[int, int] = (100, 20)) -> tuple[int, dict]:
    return openai_reply(None, [{"id": call_id, "type": "function",
                                "function": {"name": name, "arguments": json.dumps(args)}}], tokens)


def reply_tokens(reply: tuple) -> tuple[int, int]:
    """(input, output) tokens a scripted reply of either API reports; (0, 0) for an error or a malformed body."""
    usage = reply[1].get("usage") if isinstance(reply[1], dict) else None
    if not usage:
        return 0, 0
    return (int(usage.get("input_tokens", usage.get("prompt_tokens", 0))),
            int(usage.get("output_tokens", usage.get("completion_tokens", 0))))


def openai_error(status: int) -> tuple[int, dict]:
    return status, {"error": {"message": f"scripted {status}", "type": "server_error", "code": None}}
