"""A browser chat with the deployed model: a Gradio ``ChatInterface`` on any OpenAI-compatible endpoint.

The page keeps the conversation and sends it whole as ``messages``; the server's prepared chat
template turns it into TinyLLM's multi-turn layout. Replies stream token by token through the
``openai`` client. The system prompt, temperature, top-p and max tokens are controls; stop and
clear are Gradio's own buttons. A server that is down or answers with an error shows as a message
in the chat, not a traceback. It binds 127.0.0.1 and makes no public link unless ``share=True``::

    ui = launch(server.openai_client(), server.served_model_name)   # in a notebook: shown inline
    ui.url; ui.close()

Gradio is imported only here, so the rest of the kit does not need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tinyllm_vllm.client import stream_chat
from tinyllm_vllm.model.tokenizer import DEFAULT_SYSTEM

EXAMPLES = ["介绍一下中国。", "世界上最大的动物是什么？", "请介绍一下北京"]


def reply(
    client: Any,
    model: str,
    message: str,
    history: list[dict],
    system: str,
    temperature: float,
    top_p: float,
    max_tokens: int,
) -> Iterator[str]:
    """The growing reply to ``message`` after ``history``; an unreachable or failing server becomes a message."""
    import openai

    messages = [{"role": "system", "content": system or DEFAULT_SYSTEM}]
    messages += [
        {"role": m["role"], "content": _text(m["content"])} for m in history if m["role"] in ("user", "assistant")
    ]
    messages.append({"role": "user", "content": message})
    text = ""
    try:
        for piece in stream_chat(
            client, model, messages, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens)
        ):
            text += piece
            yield text
    except openai.APIConnectionError:
        yield text + f"\n\n⚠️ The server at {client.base_url} is not answering. Is it still running?"
    except openai.APIStatusError as e:
        yield text + f"\n\n⚠️ The server answered {e.status_code}: {_error_message(e)}"


def _text(content: Any) -> str:
    # Gradio hands back message content as a string or as a list of {"type": "text", "text": ...} parts
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _error_message(e: Any) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    return str(body.get("message") or (body.get("error") or {}).get("message") or e.message)


def build(client: Any, model: str, title: str | None = None) -> Any:  # a gradio.ChatInterface
    """The chat page for ``model`` behind ``client`` (an ``openai.OpenAI``)."""
    import gradio as gr

    def respond(
        message: str, history: list[dict], system: str, temperature: float, top_p: float, max_tokens: int
    ) -> Iterator[str]:
        yield from reply(client, model, message, history, system, temperature, top_p, max_tokens)

    return gr.ChatInterface(
        respond,
        title=title or f"TinyLLM on vLLM: {model}",
        description=f"Streaming chat through the OpenAI-compatible API at {client.base_url}",
        examples=[[q] for q in EXAMPLES],
        additional_inputs=[
            gr.Textbox(DEFAULT_SYSTEM, label="System prompt"),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p"),
            gr.Slider(1, 512, value=128, step=1, label="Max tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Sampling", open=True),
        flagging_mode="never",
        api_name="chat",
        analytics_enabled=False,  # no calls home: the page talks to the model's endpoint only
    )


@dataclass
class ChatUI:
    """A running chat page."""

    url: str
    blocks: Any

    def close(self) -> None:
        self.blocks.close()


def launch(
    client: Any,
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = False,
    inline: bool | None = None,
) -> ChatUI:
    """Serve the chat page; ``block=True`` serves until Ctrl-C, otherwise it returns at once (a notebook
    shows it inline)."""
    demo = build(client, model)
    # Gradio's own banner speaks of launch(share=True); the kit says what its command offers instead
    _, url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        inline=inline,
        quiet=True,
        footer_links=[],
    )
    ui = ChatUI(share_url or url, demo)
    print(f"chat page: {url}" + (f" (public link: {share_url})" if share_url else ""), flush=True)
    if block:
        if not share:
            print("a public link: --share; from another machine: --host 0.0.0.0, or an SSH tunnel", flush=True)
        print("Ctrl-C stops it", flush=True)
        demo.block_thread()
    return ui
