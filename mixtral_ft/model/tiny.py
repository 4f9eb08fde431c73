"""The built-in tiny random Mixtral: same architecture and real tokenizer, small enough for a CPU.

`mixtral-ft tiny DIR` writes one; `model.name: tiny` builds it once into the cache and reuses it.
It has 2 layers, 4 experts with top-2 routing, and the full 32,000-token vocabulary, so the data
pipeline, chat format and checkpoint layouts are exactly those of Mixtral-8x7B.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mixtral_ft.common import cache_root
from mixtral_ft.model.shapes import tiny_config

TINY_NAME = "tiny"
TINY_VERSION = "v2"  # bump when the tiny model's shape changes (shapes.tiny_config), so caches rebuild


def write_tiny(out_dir: str | os.PathLike, *, layout: str = "legacy", seed: int = 0) -> Path:
    """Write a tiny random Mixtral and the Mixtral tokenizer to `out_dir` (layouts: `write_random_mixtral`)."""
    return write_random_mixtral(out_dir, tiny_config(), layout=layout, seed=seed)


def write_random_mixtral(out_dir: str | os.PathLike, config, *, layout="legacy", seed=0, device="cpu") -> Path:
    """Write a random bf16 Mixtral of `config`'s shape, drawn on `device`, and the Mixtral tokenizer to `out_dir`.

    `layout="legacy"` is the Hub's per-expert `block_sparse_moe.experts.E.w1/w2/w3` tensors (what
    transformers 5 `save_pretrained` writes); `layout="fused"` is v5's in-memory 3-D `mlp.experts.*`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, MixtralForCausalLM

    from mixtral_ft.data.tokenizer import load_tokenizer, save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):  # a full-width model is drawn in seconds on a GPU, minutes on a CPU
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    if layout == "legacy":
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar for a 10 MB model, often right before a user's error line
        try:
            model.save_pretrained(out)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    elif layout == "fused":
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown layout {layout!r}: use 'legacy' or 'fused'")
    save_tokenizer(load_tokenizer(None), out)
    return out


def cached_tiny_dir() -> Path | None:
    """The cached tiny model's folder if it is built, else None (nothing is built here)."""
    target = cache_root() / f"tiny-{TINY_VERSION}"
    return target if (target / "config.json").exists() else None


def tiny_model_dir() -> Path:
    """The cached tiny model, built on first use. Safe when several processes ask at once."""
    if (cached := cached_tiny_dir()) is not None:
        return cached
    target = cache_root() / f"tiny-{TINY_VERSION}"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
    write_tiny(staging)
    try:
        staging.rename(target)  # atomic: a concurrent builder either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
