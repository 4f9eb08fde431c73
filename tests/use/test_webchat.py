"""`mixtral-ft chat --web`: history handling, streaming, flags, and the page in a real headless browser."""

import shutil
import socket
import sys
from pathlib import Path

import pytest

from mixtral_ft.cli import main
from mixtral_ft.use.chat import GenerationSettings
from mixtral_ft.use.webchat import history_messages, stream_reply

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir):
    from mixtral_ft.use.chat import load_for_inference, resolve_target

    return load_for_inference(resolve_target("tiny"))


def test_history_from_gradio_messages_alternates_and_reads_typed_parts():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
        {"role": "user", "content": "and again"},
    ]
    assert history_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "…"},
        {"role": "user", "content": "again\nand again"},
    ]


def test_stream_reply_yields_growing_text_over_two_turns(tiny_loaded):
    from mixtral_ft.use.chat import build_messages, encode_prompt, generate

    model, tokenizer = tiny_loaded
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    first = list(stream_reply(model, tokenizer, [], "Hello", "Be brief.", settings))
    assert first and all(first[i + 1].startswith(first[i]) or first[i + 1] == "…" for i in range(len(first) - 1))
    # The streamed reply is the terminal chat's greedy reply to the same prompt ("…" when it is empty).
    turns = [{"role": "user", "content": "Hello"}]
    expected = generate(model, tokenizer, encode_prompt(tokenizer, build_messages(turns, "Be brief.")), settings)
    assert first[-1].strip() == (expected or "…")
    # The second turn's prompt holds the first exchange: its reply is the one generated after it.
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first[-1]}]
    second = list(stream_reply(model, tokenizer, history, "And now?", "Be brief.", settings))
    turns = [history[0], {"role": "assistant", "content": first[-1].strip()}, {"role": "user", "content": "And now?"}]
    expected = generate(model, tokenizer, encode_prompt(tokenizer, build_messages(turns, "Be brief.")), settings)
    assert second[-1].strip() == (expected or "…")


def test_web_without_gradio_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert main(["chat", "tiny", "--web"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    fix = "pip install -e '.[web]' -c requirements/lock.txt in the clone (or pip install gradio)"  # not on PyPI
    assert err == [f"error: --web needs gradio: {fix}"]


@pytest.fixture
def served(monkeypatch, tiny_dir):
    """`mixtral-ft chat ... --web` up to gradio's launch, which records the app, host and port instead of serving."""
    pytest.importorskip("gradio")
    from mixtral_ft.use import webchat

    seen = {}

    def record(app, *, host, port, block=True):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr(webchat, "launch", record)
    return seen


def _page_settings(app) -> dict:
    """The values the page's settings open with, by label."""
    return {block.label: block.value for block in app.additional_inputs}


def test_web_flags_default_to_localhost_and_the_page_takes_the_generation_flags(served):
    assert main(["chat", "tiny", "--web"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 7860)
    assert _page_settings(served["app"]) == {
        "System prompt": "",
        "Max new tokens": 256,
        "Temperature (0 is greedy)": 0.7,
        "Top-p": 0.95,
    }
    argv = ["--port", "9000", "--host", "0.0.0.0", "--system", "Be brief.", "--max-new-tokens", "12"]
    assert main(["chat", "tiny", "--web", *argv, "--temperature", "0", "--top-p", "0.5"]) == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 9000)
    # --top-p with --temperature 0 is kept for --web: the page's temperature slider can raise it.
    assert _page_settings(served["app"]) == {
        "System prompt": "Be brief.",
        "Max new tokens": 12,
        "Temperature (0 is greedy)": 0.0,
        "Top-p": 0.5,
    }


@pytest.mark.parametrize(
    "argv", [[], ["--top-p", "0.01"], ["--top-p", "0.123"], ["--max-new-tokens", "4096"], ["--temperature", "3"]]
)
def test_the_page_takes_the_flag_values_it_opens_with(served, argv):
    """Each slider opens at its flag's value and accepts it: a --top-p under the slider's old 0.05 minimum (or a
    --max-new-tokens, --temperature over its maximum) failed every message with gradio's 'Value ... is less than
    minimum value'. Top-p's slider spans 0.01..1 by 0.01, so dragging reaches every step and 1 (off)."""
    assert main(["chat", "tiny", "--web", *argv]) == 0
    sliders = served["app"].additional_inputs[1:]
    given = dict(zip(argv[::2], map(float, argv[1::2]), strict=True))
    for flag, slider in zip(["--max-new-tokens", "--temperature", "--top-p"], sliders, strict=True):
        if flag in given:
            assert slider.value == given[flag], (flag, slider.value)
        assert slider.preprocess(slider.value) == slider.value  # raises when out of the slider's range
    top_p = sliders[2]
    assert (top_p.minimum, top_p.maximum, top_p.step) == (0.01, 1.0, 0.01)


def test_a_top_p_below_the_pages_range_is_one_line_before_the_load(served, capsys):
    """The terminal chat takes any --top-p in (0, 1]; the page's slider starts at 0.01 (a lower minimum would
    shift its 0.01 steps off 1.0), so --web refuses less, naming the way out, instead of failing each message."""
    assert main(["chat", "tiny", "--web", "--top-p", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top-p 0.001" in err[0] and "0.01" in err[0], err
    assert "app" not in served  # refused before the load, not served


@pytest.mark.parametrize("argv", [["--port", "9000"], ["--host", "0.0.0.0"]])
def test_host_and_port_without_web_are_refused(argv, capsys):
    assert main(["chat", "tiny", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{argv[0]} would change nothing (--web only" in err[0] and "add --web" in err[0], err


def test_bad_port_is_a_user_error(capsys):
    assert main(["chat", "tiny", "--web", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_a_port_in_use_or_a_bad_host_is_one_line_before_the_load(host, capsys):
    """Both were gradio's OSError traceback ("Cannot find empty port"), after the model had loaded."""
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["chat", "tiny", "--web", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot serve on {host}:{port}"), err  # nothing loaded


def test_web_and_prompt_do_not_mix(capsys):
    assert main(["chat", "tiny", "--web", "--prompt", "hi"]) == 2
    assert "--web" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_browser_types_a_message_and_sees_a_streamed_reply(tiny_loaded, tmp_path):
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium)")
    from mixtral_ft.use.webchat import build_app, launch

    model, tokenizer = tiny_loaded
    app = build_app(
        model,
        tokenizer,
        title="mixtral-ft test",
        system="Be brief.",
        settings=GenerationSettings(max_new_tokens=12, temperature=0.0),
    )
    port = _free_port()
    url = launch(app, host="127.0.0.1", port=port, block=False)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            page = browser.new_page()
            page.goto(url, timeout=60_000)
            box = page.locator("#message textarea")
            for turn, text in enumerate(["Hello there", "Tell me more"], start=1):
                box.fill(text)
                box.press("Enter")
                bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']")
                page.wait_for_function(
                    "n => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length >= n",
                    arg=turn,
                    timeout=120_000,
                )
                page.wait_for_timeout(500)
                assert bot.last.inner_text().strip()
            user_turns = page.locator("#chatbot [data-testid='user']")
            assert user_turns.count() == 2 and "Tell me more" in user_turns.last.inner_text()
            shot = tmp_path / "webchat.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 1000
    finally:
        app.close()
