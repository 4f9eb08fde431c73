"""Scoring a model on tokenized rows the way training does: next-token NLL on the assistant tokens only.

`eval` reports it as loss and perplexity, base vs adapter; `merge --verify` compares the merged model's
perplexity with adapter-on-base's. One definition, so the two numbers mean the same thing.
"""

from __future__ import annotations

import torch


def assistant_nll(logits: torch.Tensor, ids, mask) -> tuple[float, int]:
    """Summed NLL of each next token the mask marks (1 on assistant content and its `</s>`), and their count.

    `logits` are one row's [T, vocab] outputs for `ids` (length T); position t predicts token t + 1.
    """
    ids = torch.as_tensor(ids, device=logits.device)
    keep = torch.as_tensor(mask, dtype=torch.bool, device=logits.device)[1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float()[keep], ids[1:][keep], reduction="sum")
    return nll.item(), int(keep.sum())
