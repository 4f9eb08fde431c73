"""`mixtral-ft chat`: talk to a base model, an adapter on its NF4 base, or a merged model.

MODEL is `tiny`, a model folder, a hub id, or a training output folder (one with adapter_config.json:
its base comes from the run's recipe.yaml and the folder is the adapter). By default the model goes
through `load_model`, the NF4 path training used, so an adapter sees the weights it was trained
against and Mixtral fits one GPU; `--no-quantize` loads a plain transformers model instead (a merged
folder at full precision). Prompts use Mixtral's Instruct format through MistralCommonBackend; a
system prompt is folded into the first user turn, as training data is (see `data.conversations.normalize_messages`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mixtral_ft.errors import UserError
from mixtral_ft.export.merge import refuse_merged_twice
from mixtral_ft.model.source import check_adapter_folder

REPL_HELP = "type a message; /reset clears the conversation, /exit (or Ctrl-D) quits"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 0.95
    seed: int | None = None

    def check(self) -> GenerationSettings:
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be >= 1")
        if not self.temperature >= 0:  # NaN too: transformers would stop mid-load with a traceback
            raise UserError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**32:  # numpy's range; set_seed seeds it too
            raise UserError("--seed must be in 0..4294967295")
        return self

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if self.temperature == 0:
            # Explicit None/1.0 so a checkpoint's generation_config cannot turn sampling back on.
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass(frozen=True)
class Target:
    """What to load: a base model, optionally an adapter, and how the run quantized its experts."""

    base: str
    adapter: Path | None
    quantize_experts: bool = True
    compute_dtype: str = "auto"
    revision: str | None = None
    attn_implementation: str | None = None  # None: the run's recipe, else sdpa

    @cached_property
    def source(self):
        """The base's ModelSource: its name checked at once, a hub id downloaded at most once."""
        from mixtral_ft.model.source import model_source

        return model_source(self.base, self.revision)


def is_merged_folder(base: str) -> bool:
    """`base` is a folder `mixtral-ft merge` wrote (its merge.json says so)."""
    return (Path(base) / "merge.json").is_file()


def resolve_target(model: str, adapter: str | None = None) -> Target:
    """MODEL (+ --adapter) -> Target; a training output folder brings its own base and settings."""
    path = Path(model).expanduser()
    if (path / "adapter_config.json").is_file():
        if adapter:
            raise UserError(f"'{model}' is already an adapter folder: drop --adapter, or pass the base model as MODEL")
        return _adapter_target(path)
    if adapter:
        adapter_dir = check_adapter_folder(Path(adapter).expanduser(), "--adapter")
        refuse_merged_twice(path, adapter_dir, model, adapter)
        return Target(base=model, adapter=adapter_dir)
    return Target(base=model, adapter=None)


def _adapter_target(adapter: Path) -> Target:
    from mixtral_ft.model.load import adapter_base

    base, model_cfg = adapter_base(adapter)
    if not base:
        raise UserError(
            f"adapter '{adapter}' does not say which base model it belongs to: "
            f"pass the base as MODEL and the adapter with --adapter"
        )
    return Target(
        base=base,
        adapter=adapter,
        quantize_experts=bool(model_cfg.get("quantize_experts", True)),
        compute_dtype=model_cfg.get("compute_dtype") or "auto",
        revision=model_cfg.get("revision"),
        attn_implementation=model_cfg.get("attn_implementation"),
    )


def load_for_inference(target: Target, *, quantize: bool = True, attn_implementation: str | None = None):
    """(model in eval mode with the KV cache on, tokenizer in test mode) for `target`.

    `attn_implementation` overrides the target's (the run's recipe); neither given: sdpa.
    """
    from mixtral_ft.data.tokenizer import load_tokenizer
    from mixtral_ft.model.device import check_attn_implementation, default_device, resolve_compute_dtype
    from mixtral_ft.model.load import load_model

    attn = check_attn_implementation(attn_implementation or target.attn_implementation)
    path = target.source.local_path()
    if quantize:
        model = load_model(
            target.source,
            quantize_experts=target.quantize_experts,
            compute_dtype=target.compute_dtype,
            attn_implementation=attn,
        )
    else:
        from transformers import AutoModelForCausalLM

        from mixtral_ft.model.loader import read_manifest

        if read_manifest(path) is not None:
            raise UserError(
                f"'{target.base}' is a pre-quantized NF4 folder, which only mixtral_ft's loader "
                "reads: drop --no-quantize"
            )
        device = default_device()
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=resolve_compute_dtype(target.compute_dtype, device),
            device_map="auto" if device.type == "cuda" else None,
            attn_implementation=attn,
        )
    if target.adapter is not None:
        from mixtral_ft.model.load import load_adapter

        model = load_adapter(model, target.adapter)
    # Training turns the cache off (gradient checkpointing); generation wants it on.
    model.config.use_cache = True
    model.eval()
    # The run's own tokenizer when the adapter folder carries one; load_tokenizer falls back to Mixtral's.
    has_tokenizer = target.adapter is not None and any(target.adapter.glob("tokenizer.model.v*"))
    return model, load_tokenizer(target.adapter if has_tokenizer else path, mode="test")


def build_messages(history: list[dict], system: str | None) -> list[dict]:
    """History plus the system prompt folded into the first user turn (Mixtral has no system role)."""
    from mixtral_ft.data.conversations import fold_system

    system = (system or "").strip()  # as training strips every turn (conversations._turn), else other token ids
    if not system or not history:
        return list(history)
    return fold_system([{"role": "system", "content": system}, *history])  # as training folds it


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def fit_history(tokenizer, history: list[dict], system: str | None, budget: int) -> list[dict]:
    """Drop the oldest exchanges until the prompt fits `budget` tokens; the last user turn always stays."""
    while len(history) > 1 and len(encode_prompt(tokenizer, build_messages(history, system))) > budget:
        history = history[2:]
    return history


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], settings: GenerationSettings, streamer=None) -> str:
    """Generate a reply to `prompt_ids`; streams to `streamer` when given; returns the decoded reply."""
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    ids = torch.tensor([prompt_ids], device=device)
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **settings.generate_kwargs(tokenizer)
    )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()


def make_streamer(tokenizer):
    from transformers import TextStreamer

    # TextStreamer decodes with the tokenizer's own decode, which MistralCommonBackend implements,
    # and prints each finished word to stdout with flush=True, so replies appear as they are made.
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def context_budget(model, settings: GenerationSettings) -> int:
    limit = getattr(model.config, "max_position_embeddings", 32768) or 32768
    return max(limit - settings.max_new_tokens, 16)


def one_shot(model, tokenizer, prompt: str, system: str | None, settings: GenerationSettings) -> str:
    history = [{"role": "user", "content": prompt}]
    ids = encode_prompt(tokenizer, build_messages(history, system))
    if len(ids) > context_budget(model, settings):
        raise UserError(f"--prompt is {len(ids)} tokens: more than the model's context minus --max-new-tokens")
    return generate(model, tokenizer, ids, settings, streamer=make_streamer(tokenizer))


def repl(model, tokenizer, system: str | None, settings: GenerationSettings, stdin=None) -> None:
    """Multi-turn chat on stdin/stdout until /exit or end of input."""
    stdin = stdin or sys.stdin
    print(REPL_HELP, flush=True)
    history: list[dict] = []
    while True:
        print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line:  # EOF (Ctrl-D or the end of piped input) is a normal way to leave
            print(flush=True)
            return
        # Bytes that are not UTF-8 arrive as lone surrogates, which the tokenizer cannot take: they become '?'.
        text = line.strip().encode("utf-8", "replace").decode("utf-8")
        if not stdin.isatty():
            print(text, flush=True)  # piped input is not echoed by a terminal; keep the transcript readable
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {REPL_HELP}", flush=True)
            continue
        history = fit_history(
            tokenizer, [*history, {"role": "user", "content": text}], system, context_budget(model, settings)
        )
        print("assistant> ", end="", flush=True)
        reply = generate(
            model,
            tokenizer,
            encode_prompt(tokenizer, build_messages(history, system)),
            settings,
            streamer=make_streamer(tokenizer),
        )
        # Mistral's format needs a non-empty assistant turn; a random model can say nothing at all.
        history.append({"role": "assistant", "content": reply or "…"})


def load_announced(model: str, adapter: str | None, *, quantize: bool, attn_implementation: str | None):
    """(model, tokenizer, what) for `mixtral-ft chat`, terminal or web: checked first, the load announced."""
    from mixtral_ft.model.device import check_attn_implementation

    target = resolve_target(model, adapter)
    check_attn_implementation(attn_implementation or target.attn_implementation)  # before the long load
    target.source  # noqa: B018  (a bad name fails here, before the status line: one line on stderr)
    what = f"{target.base} + adapter {target.adapter}" if target.adapter else target.base
    # Status goes to stderr, so stdout holds only the conversation (one-shot output can be piped).
    print(f"loading {what} ({'NF4' if quantize else 'unquantized'})...", file=sys.stderr, flush=True)
    if quantize and is_merged_folder(target.base):
        requantized = "NF4 quantizes the merged weights again, which rounds away part of what the adapter added"
        print(f"note: {requantized}; --no-quantize loads them as merged (as eval scores them)", file=sys.stderr)
    loaded, tokenizer = load_for_inference(target, quantize=quantize, attn_implementation=attn_implementation)
    return loaded, tokenizer, what


def chat(
    model: str,
    *,
    adapter: str | None = None,
    prompt: str | None = None,
    system: str | None = None,
    settings: GenerationSettings | None = None,
    quantize: bool = True,
    attn_implementation: str | None = None,
) -> str | None:
    """Load, then answer `prompt` once (returning the reply) or run the REPL."""
    settings = (settings or GenerationSettings()).check()
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt is empty: pass some text, or leave it out for interactive chat")
    loaded, tokenizer, _ = load_announced(model, adapter, quantize=quantize, attn_implementation=attn_implementation)
    if prompt is not None:
        return one_shot(loaded, tokenizer, prompt, system, settings)
    repl(loaded, tokenizer, system, settings)
    return None
