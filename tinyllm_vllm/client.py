"""Talking to the server: the ``openai`` client, and raw HTTP that shows the JSON and the curl line.

The raw helpers exist to teach what goes over the wire; the ``openai`` client is what to use in code.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import openai


def openai_client(base_url: str, api_key: str | None = None, timeout: float = 120.0) -> openai.OpenAI:
    """``openai.OpenAI`` bound to a vLLM server; ``max_retries=0`` so failures surface at once."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout)


def stream_chat(client: openai.OpenAI, model: str, messages: list[dict], **params: object) -> Iterator[str]:
    """Stream one chat reply through the ``openai`` client, yielding its text piece by piece."""
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **params)
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            yield piece


def terminal_chat(client: openai.OpenAI, model: str, **params: object) -> None:
    """A chat in the terminal: each reply streamed as it comes, the conversation kept as history."""
    history: list[dict] = []
    print(f"chatting with {model} (empty line or Ctrl-D to quit)", flush=True)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        history.append({"role": "user", "content": question})
        print("tinyllm> ", end="", flush=True)
        answer = ""
        for piece in stream_chat(client, model, history, **params):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": answer})


def curl_line(url: str, payload: dict | None = None, api_key: str | None = None) -> str:
    """The curl command equivalent to a request (what a terminal user would type)."""
    parts = ["curl", "-s", url]
    if api_key:
        parts += ["-H", f"Authorization: Bearer {api_key}"]
    if payload is not None:
        parts += ["-H", "Content-Type: application/json", "-d", json.dumps(payload, ensure_ascii=False)]
    return " ".join(shlex.quote(p) for p in parts)


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_get(base_url: str, path: str, api_key: str | None = None, show: bool = False, timeout: float = 30) -> dict:
    """GET ``base_url + path`` and return the JSON body (raises on HTTP errors)."""
    url = base_url.rstrip("/") + path
    if show:
        print("$", curl_line(url, api_key=api_key))
    r = httpx.get(url, headers=_headers(api_key), timeout=timeout)
    if show:
        print(r.text)  # what curl prints
    r.raise_for_status()
    return r.json()


def http_post(
    base_url: str, path: str, payload: dict, api_key: str | None = None, show: bool = False, timeout: float = 120
) -> dict:
    """POST JSON to ``base_url + path`` and return the JSON body (raises on HTTP errors)."""
    url = base_url.rstrip("/") + path
    if show:
        print("$", curl_line(url, payload, api_key))
    r = httpx.post(url, json=payload, headers=_headers(api_key), timeout=timeout)
    if show:
        print(r.text)  # what curl prints
    r.raise_for_status()
    return r.json()


def http_stream(
    base_url: str, path: str, payload: dict, api_key: str | None = None, timeout: float = 120
) -> Iterator[dict]:
    """POST with ``"stream": true`` and yield each server-sent event's JSON until ``data: [DONE]``."""
    url = base_url.rstrip("/") + path
    with httpx.stream("POST", url, json=payload | {"stream": True}, headers=_headers(api_key), timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)


def delta_text(event: dict) -> str:
    """The text piece of one streamed chunk, for /v1/completions and /v1/chat/completions alike."""
    if not event.get("choices"):
        return ""
    choice = event["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def metric(server: Any, name: str, having: str = "") -> float:
    """Sum of a Prometheus metric from a server's ``/metrics`` (or any root URL's) over the label sets that
    contain ``having``."""
    root = server if isinstance(server, str) else server.url
    text = httpx.get(root + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {" and having in line
    )
