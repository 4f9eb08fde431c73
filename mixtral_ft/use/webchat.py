"""`mixtral-ft chat MODEL --web`: a small gradio chat page for a model, an adapter or a merged model.

The page streams each reply as it is generated (transformers' TextIteratorStreamer, generation in a
thread), keeps the conversation's history (gradio sends it back with each message), and takes a system
prompt and the generation settings. Prompts are built exactly as the terminal chat builds them
(`chat.build_messages`, `fit_history`, `encode_prompt`). It binds to 127.0.0.1 unless `--host` says
otherwise: there is no authentication. gradio is an optional extra: pip install -e '.[web]' from the clone.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace

from mixtral_ft.errors import UserError
from mixtral_ft.use.chat import (
    GenerationSettings,
    build_messages,
    context_budget,
    encode_prompt,
    fit_history,
    generate,
    load_announced,
)

# The page's Top-p slider: 0.01..1 by 0.01. Its steps count from the minimum, so a lower one (for a smaller --top-p)
# would put them off 1.0 (top-p off); --web refuses a --top-p below it instead (check_page_settings).
TOP_P_MIN = TOP_P_STEP = 0.01
MAX_NEW_TOKENS_SLIDER, TEMPERATURE_SLIDER = 2048, 2.0  # the sliders' usual maxima; a larger flag value extends them


def _import_gradio():
    try:
        import gradio
    except ImportError:
        # mixtral-ft is not on PyPI: the extra installs from the clone, pinned like the rest of the install.
        raise UserError(
            "--web needs gradio: pip install -e '.[web]' -c requirements/lock.txt in the clone (or pip install gradio)"
        ) from None
    return gradio


def _text(content) -> str:
    """A gradio message's content as plain text (a string, or a list of typed parts in gradio 5/6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list | tuple):
        return "".join(_text(part) for part in content)
    return ""


def history_messages(history: list) -> list[dict]:
    """gradio's chat history -> alternating user/assistant messages (empty replies become '…', as in chat)."""
    messages: list[dict] = []
    for item in history or []:
        role, text = item.get("role"), _text(item.get("content")).strip()
        if role not in ("user", "assistant"):
            continue
        if messages and messages[-1]["role"] == role:  # keep turns alternating
            messages[-1]["content"] += "\n" + text
            continue
        messages.append({"role": role, "content": text or "…"})
    if messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    return messages


def stream_reply(model, tokenizer, history: list, message: str, system: str | None, settings: GenerationSettings):
    """Yield the reply so far, token by token, to `message` after `history`."""
    from transformers import TextIteratorStreamer

    turns = [*history_messages(history), {"role": "user", "content": message.strip()}]
    turns = fit_history(tokenizer, turns, system or None, context_budget(model, settings))
    ids = encode_prompt(tokenizer, build_messages(turns, system or None))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure: list[BaseException] = []

    def run():
        try:
            generate(model, tokenizer, ids, settings, streamer=streamer)
        except BaseException as exc:  # surfaced below, in the request, instead of a silent hang
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    worker.join()
    if failure:
        raise failure[0]
    if not reply.strip():
        yield "…"  # a random model can say nothing at all; show that it answered


def check_page_settings(settings: GenerationSettings | None) -> GenerationSettings:
    """`settings` (checked) if the page's sliders can hold them: gradio refuses every message whose slider value is
    out of the slider's range ('Value ... is less than minimum value')."""
    settings = (settings or GenerationSettings()).check()
    if settings.top_p < TOP_P_MIN:
        raise UserError(
            f"--top-p {settings.top_p:g} is below the web page's Top-p range ({TOP_P_MIN}..1): "
            f"give --top-p {TOP_P_MIN} or more with --web (the terminal chat takes any value in (0, 1])"
        )
    return settings


def build_app(model, tokenizer, *, title: str, system: str | None = None, settings: GenerationSettings | None = None):
    """The gradio Blocks app: chat box, system prompt and generation settings."""
    gr = _import_gradio()
    settings = check_page_settings(settings)
    max_tokens, max_temperature = (
        max(MAX_NEW_TOKENS_SLIDER, settings.max_new_tokens),
        max(TEMPERATURE_SLIDER, settings.temperature),
    )

    def respond(message, history, system_prompt, max_new_tokens, temperature, top_p):
        if not (message or "").strip():
            yield ""
            return
        chosen = replace(
            settings, max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p)
        ).check()
        yield from stream_reply(model, tokenizer, history, message, system_prompt, chosen)

    inputs = [
        gr.Textbox(value=system or "", label="System prompt", lines=2, elem_id="system-prompt"),
        gr.Slider(1, max_tokens, value=settings.max_new_tokens, step=1, label="Max new tokens"),
        gr.Slider(0.0, max_temperature, value=settings.temperature, step=0.05, label="Temperature (0 is greedy)"),
        gr.Slider(TOP_P_MIN, 1.0, value=settings.top_p, step=TOP_P_STEP, label="Top-p"),
    ]
    return gr.ChatInterface(
        respond,
        additional_inputs=inputs,
        title=title,
        flagging_mode="never",
        chatbot=gr.Chatbot(elem_id="chatbot", height=420),
        textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", show_label=False),
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
    )


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `app` on host:port; returns the local URL (block=False returns at once; app.close() stops it)."""
    _, url, _ = app.queue().launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        share=False,
        inbrowser=False,
        quiet=True,
        ssr_mode=False,
    )
    return url


def check_can_listen(host: str, port: int) -> None:
    """A UserError unless host:port can be bound now: gradio says so only after the model has loaded."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            probe.bind(address)
    except OSError as exc:  # in use, not an address of this machine, not a host name at all
        raise UserError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}): choose a free --port, "
            "and a --host this machine has (default 127.0.0.1)"
        ) from None


def serve_web(
    model_name: str,
    *,
    adapter: str | None = None,
    system: str | None = None,
    settings: GenerationSettings | None = None,
    quantize: bool = True,
    attn_implementation: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
) -> None:
    """Load MODEL (+ adapter) as `mixtral-ft chat` does, then serve the chat page until Ctrl-C."""
    settings = check_page_settings(settings)
    if not 0 < port < 65536:
        raise UserError("--port must be in 1..65535")
    _import_gradio()  # before the (long) model load
    check_can_listen(host, port)
    model, tokenizer, what = load_announced(
        model_name, adapter, quantize=quantize, attn_implementation=attn_implementation
    )
    app = build_app(model, tokenizer, title=f"mixtral-ft: {what}", system=system, settings=settings)
    shown = "localhost" if host in ("127.0.0.1", "localhost") else host
    print(f"chat page on http://{shown}:{port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    launch(app, host=host, port=port, block=True)
