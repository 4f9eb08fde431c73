"""`mixtral-ft chat`: one shot and the REPL on a tiny adapter (NF4 base), a plain model folder, and bad input."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_ft.cli import main
from tests.conftest import trained_adapter

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    return trained_adapter(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(adapter_run):
    from mixtral_ft.use.chat import load_for_inference, resolve_target

    return load_for_inference(resolve_target(str(adapter_run)))


def greedy_reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """The reply straight from transformers' greedy `model.generate`, decoded: what temperature 0 must give."""
    import torch

    device = next(p for p in model.parameters() if p.device.type != "meta").device
    prompt = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tokenizer.decode(out[0, prompt.shape[1] :].tolist(), skip_special_tokens=True).strip()


@pytest.mark.slow
def test_one_shot_on_an_adapter_prints_the_greedy_reply(adapter_run, loaded, capsys):
    from mixtral_ft.use.chat import GenerationSettings, build_messages, chat, encode_prompt

    code = main(
        ["chat", str(adapter_run), "--prompt", "Hello, who are you?", "--max-new-tokens", "8", "--temperature", "0"]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "adapter" in captured.err and "NF4" in captured.err  # status goes to stderr, not into the reply
    # What was streamed to stdout is the reply chat() returns, and temperature 0 is transformers' greedy
    # decoding of the same prompt ids on the same adapter.
    reply = chat(str(adapter_run), prompt="Hello, who are you?", settings=GenerationSettings(8, temperature=0))
    assert capsys.readouterr().out.strip() == reply == captured.out.strip()
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, build_messages([{"role": "user", "content": "Hello, who are you?"}], None))
    assert reply == greedy_reference(model, tokenizer, ids, 8)
    assert reply  # a random model's 8 greedy tokens are not all special


@pytest.mark.slow
def test_repl_through_stdin_two_turns_and_exit(adapter_run):
    result = subprocess.run(
        [sys.executable, "-m", "mixtral_ft.cli", "chat", str(adapter_run), "--max-new-tokens", "6", "--seed", "0"],
        input="hello\n/reset\nhi again\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("assistant> ") == 2
    assert "(conversation cleared)" in out
    assert out.index("hello") < out.index("(conversation cleared)") < out.index("hi again")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_repl_keeps_history_resets_it_and_exits_on_eof(loaded, monkeypatch, capsys):
    from mixtral_ft.use import chat

    model, tokenizer = loaded
    prompts, replies = [], []
    real_generate = chat.generate

    def spy(model, tokenizer, ids, settings, streamer=None):
        prompts.append(list(ids))
        replies.append(real_generate(model, tokenizer, ids, settings, streamer=streamer))
        return replies[-1]

    monkeypatch.setattr(chat, "generate", spy)
    settings = chat.GenerationSettings(max_new_tokens=4, temperature=0)
    chat.repl(model, tokenizer, "Be brief.", settings, stdin=io.StringIO("first\nsecond\n/reset\nthird\n"))

    def expected(*turns):
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return chat.encode_prompt(tokenizer, chat.build_messages(history, "Be brief."))

    assert len(prompts) == 3
    assert prompts[0] == expected("first")
    # The second turn sees the first exchange, with the reply the model really gave.
    assert prompts[1] == expected("first", replies[0] or "…", "second")
    # /reset keeps the system prompt only: the third prompt is a fresh one-turn conversation.
    assert prompts[2] == expected("third")
    assert capsys.readouterr().out.rstrip().endswith("you>")  # EOF: a clean return, no error


@pytest.mark.slow
def test_greedy_is_deterministic_and_seeded_sampling_reproducible(loaded):
    from mixtral_ft.use.chat import GenerationSettings, encode_prompt, generate

    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Name a colour."}])
    greedy = GenerationSettings(max_new_tokens=8, temperature=0)
    reply = generate(model, tokenizer, ids, greedy)
    assert reply == generate(model, tokenizer, ids, greedy) == greedy_reference(model, tokenizer, ids, 8)
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)
    first = generate(model, tokenizer, ids, sampled)
    assert first == generate(model, tokenizer, ids, sampled)
    # Temperature 1 really samples: on the near-flat random model, other seeds give other replies.
    others = {generate(model, tokenizer, ids, GenerationSettings(8, temperature=1.0, seed=s)) for s in (4, 5)}
    assert others - {first, reply}


@pytest.mark.slow
def test_plain_model_folder_loads_unquantized(tiny_dir, capsys):
    # `mixtral-ft tiny` output is a plain save_pretrained folder, the shape `mixtral-ft merge` writes.
    code = main(
        [
            "chat",
            str(tiny_dir),
            "--no-quantize",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--system",
            "Answer in French.",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "unquantized" in captured.err
    from transformers import AutoModelForCausalLM

    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.model.device import default_device, resolve_compute_dtype
    from mixtral_ft.use.chat import build_messages, encode_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=resolve_compute_dtype("auto", default_device()))
    tokenizer = load_tokenizer(tiny_dir, mode="test")
    ids = encode_prompt(tokenizer, build_messages([{"role": "user", "content": "hi"}], "Answer in French."))
    assert captured.out.strip() == greedy_reference(model.eval(), tokenizer, ids, 4)


def test_system_prompt_is_folded_into_the_first_user_turn():
    from mixtral_ft.use.chat import build_messages

    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    messages = build_messages(history, "Be brief.")
    assert messages[0] == {"role": "user", "content": "Be brief.\n\nHi"}
    assert messages[1:] == history[1:]
    assert build_messages(history, None) == history


def test_a_system_prompt_is_encoded_as_training_encodes_it():
    """Training strips each turn, the system prompt too: chat's prompt is the training row up to the answer."""
    from mixtral_ft.data.conversations import encode_conversation
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.use.chat import build_messages, encode_prompt

    system, user = "  Be brief.\n", {"role": "user", "content": "Hi"}
    row = encode_conversation(
        [{"role": "system", "content": system}, user, {"role": "assistant", "content": "Yo"}],
        load_tokenizer(mode="finetuning"),
    )
    prompt = row["input_ids"][: row["assistant_masks"].index(1)]
    assert encode_prompt(load_tokenizer(mode="test"), build_messages([user], system)) == prompt


def test_fit_history_drops_the_oldest_exchanges():
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.use.chat import encode_prompt, fit_history

    tokenizer = load_tokenizer(None, mode="test")
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "last"})
    budget = len(encode_prompt(tokenizer, history[-3:])) + 1
    kept = fit_history(tokenizer, history, None, budget)
    assert kept == history[-3:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--seed", "-1"], "--seed"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "0", "--top-p", "0.5"], "--top-p would change nothing (sampling only"),
        (["--temperature", "0", "--seed", "1"], "--seed would change nothing (sampling only"),
        (["--temperature", "0", "--seed", "1", "--top-p", "0.5"], "--top-p and --seed would change nothing"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--adapter", "/nonexistent/adapter"], "not an adapter folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["chat", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_adapter_folder_with_a_second_adapter_is_refused(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert main(["chat", str(tmp_path), "--adapter", str(tmp_path), "--prompt", "hi"]) == 2
    assert "already an adapter folder" in capsys.readouterr().err


def test_adapter_on_a_base_of_another_shape_is_one_line_and_exit_2(adapter_run, tmp_path, capsys):
    from tests.conftest import other_shape_model

    base = other_shape_model(tmp_path / "wide")
    assert main(["chat", str(base), "--adapter", str(adapter_run), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "pass the base model it was trained on" in err[-1], err
    assert not [line for line in err if "Traceback" in line or "size mismatch" in line]


def test_the_adapter_a_merged_folder_holds_is_not_put_on_again(adapter_run, tmp_path, capsys):
    merged, other = tmp_path / "merged", tmp_path / "other"
    assert main(["merge", str(adapter_run), "--out", str(merged)]) == 0
    assert main(["chat", str(merged), "--adapter", str(adapter_run), "--prompt", "hi"]) == 2
    assert "already has adapter" in capsys.readouterr().err
    other.mkdir()  # other LoRA weights (a later run) on the merged model are a choice, not a mistake
    (other / "adapter_config.json").write_bytes((adapter_run / "adapter_config.json").read_bytes())
    (other / "adapter_model.safetensors").write_bytes(b"other weights")
    from mixtral_ft.use.chat import resolve_target

    assert resolve_target(str(merged), str(other)).adapter == other


def test_repl_takes_a_line_that_is_not_utf8(loaded, capsys):
    from mixtral_ft.use.chat import GenerationSettings, repl

    model, tokenizer = loaded
    settings = GenerationSettings(max_new_tokens=2, temperature=0)
    repl(model, tokenizer, None, settings, stdin=io.StringIO("caf\udce9\n/exit\n"))  # b"caf\xe9", surrogateescaped
    assert "assistant>" in capsys.readouterr().out


def one_shot_cli(capsys, monkeypatch, *argv: str) -> tuple[str, str, object]:
    """`mixtral-ft chat ... --prompt` in-process: (stdout reply, stderr, the model it answered with)."""
    from mixtral_ft.use import chat

    real, used = chat.one_shot, []

    def spy(model, *args, **kwargs):  # the real one_shot; only the model it was given is kept
        used.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(chat, "one_shot", spy)
    assert main(["chat", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out.strip(), captured.err, used[-1]


@pytest.mark.slow
def test_top_p_near_zero_is_greedy_and_seed_makes_sampling_reproducible(capsys, monkeypatch):
    base = ["tiny", "--prompt", "Name a colour.", "--max-new-tokens", "8"]
    greedy, _, _ = one_shot_cli(capsys, monkeypatch, *base, "--temperature", "0")
    # Top-p keeps at least the top token: a vanishing --top-p leaves only it, so sampling becomes greedy.
    narrow, _, _ = one_shot_cli(capsys, monkeypatch, *base, "--temperature", "1", "--top-p", "1e-9", "--seed", "1")
    assert narrow == greedy
    sampled = {
        seed: one_shot_cli(capsys, monkeypatch, *base, "--temperature", "1", "--seed", seed)[0] for seed in "123"
    }
    assert one_shot_cli(capsys, monkeypatch, *base, "--temperature", "1", "--seed", "1")[0] == sampled["1"]
    assert set(sampled.values()) - {greedy}  # the default top-p 0.95 really samples on the near-flat random model
    assert len(set(sampled.values())) > 1  # and the seed picks the sample


@pytest.mark.slow
@pytest.mark.parametrize("attn, expected", [([], "sdpa"), (["--attn-implementation", "eager"], "eager")])
def test_attn_implementation_flag_picks_the_kernel(attn, expected, capsys, monkeypatch):
    argv = ["tiny", "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0", *attn]
    _, _, model = one_shot_cli(capsys, monkeypatch, *argv)
    assert model.config._attn_implementation == expected


@pytest.mark.slow
def test_adapter_flag_puts_the_adapter_on_the_base(adapter_run, capsys, monkeypatch):
    from peft import PeftModel

    argv = ["--prompt", "Hello, who are you?", "--max-new-tokens", "8", "--temperature", "0"]
    on_base, err, model = one_shot_cli(capsys, monkeypatch, "tiny", "--adapter", str(adapter_run), *argv)
    assert isinstance(model, PeftModel) and f"loading tiny + adapter {adapter_run} (NF4)" in err
    bare, _, bare_model = one_shot_cli(capsys, monkeypatch, "tiny", *argv)
    assert not isinstance(bare_model, PeftModel)
    # The same reply as the run's own folder, which puts its adapter on its base (the recipe's `tiny`).
    assert on_base == one_shot_cli(capsys, monkeypatch, str(adapter_run), *argv)[0]


@pytest.mark.slow
def test_no_quantize_loads_plain_weights_and_the_default_loads_nf4(tiny_dir, capsys, monkeypatch):
    from mixtral_ft.model.quant import is_4bit

    argv = ["--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"]
    _, _, plain = one_shot_cli(capsys, monkeypatch, str(tiny_dir), "--no-quantize", *argv)
    _, _, nf4 = one_shot_cli(capsys, monkeypatch, str(tiny_dir), *argv)
    assert not [p for p in plain.parameters() if is_4bit(p)]
    assert {p.dtype for p in plain.parameters()} == {torch.float32}  # auto on a CPU
    assert [p for p in nf4.parameters() if is_4bit(p)]
