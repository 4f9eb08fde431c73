"""Grouped GEMM for the experts, and the runtime check that decides whether torch's can be trusted here.

`expert_matmul` multiplies each expert's block of rows by its weight: one `F.grouped_mm` call where torch has a
correct one (no host sync, so torch.compile traces it whole), else one matmul per expert. `expert_compute_mode`
decides which, once per device type and dtype, by checking `F.grouped_mm` against an fp32 reference in the exact
layouts the NF4 experts pass (pytorch#186365: a transposed bf16 view miscomputed silently on some builds).
"""

from __future__ import annotations

import sys

import torch

from mixtral_ft.common import is_main_process

EXPERT_MODES = ("grouped", "grouped-contiguous", "loop")
_MODES: dict[tuple[str, torch.dtype], str] = {}  # decided once per device type and dtype, in eager mode
_PROBE_COUNTS = (37, 0, 21, 64, 5, 30, 19, 48)  # rows per expert: uneven, one expert empty
_PROBE_TOLERANCE = {torch.float32: 1e-4}  # of max |reference|; bf16/fp16: 2e-2 (CPU bf16 rounds to ~3e-3)


def decide_expert_mode(grouped_mm, device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    """How experts compute with this `grouped_mm` here, and why when it is not plain "grouped".

    Checks it against an fp32 per-expert reference on random data in the layouts we pass: a transposed
    view of a contiguous [E, N, K] weight (forward) and a contiguous one (backward). A layout bug (pytorch
    #186365: a transposed bf16 view miscomputed silently on some builds and GPUs) is off by the values
    themselves, far above rounding. K and N keep grouped_mm's 16-byte stride rule.
    """
    if grouped_mm is None or (device_type == "cuda" and dtype != torch.bfloat16):
        return "loop", f"this torch has no grouped GEMM for {device_type} {dtype}: one matmul per expert"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(_PROBE_COUNTS), 256, generator=generator).to(device_type, dtype)
    weight = torch.randn(len(_PROBE_COUNTS), 192, 256, generator=generator).to(device_type, dtype)  # [E, N, K]
    counts = torch.tensor(_PROBE_COUNTS)
    ends = counts.cumsum(0, dtype=torch.int32)
    reference = expert_matmul(x.float().cpu(), weight.float().cpu().transpose(1, 2), counts, "loop")
    bound = _PROBE_TOLERANCE.get(dtype, 2e-2) * reference.abs().max()

    def problem(weight_t: torch.Tensor, layout: str) -> str:
        try:
            error = (grouped_mm(x, weight_t, offs=ends.to(device_type)).float().cpu() - reference).abs().max()
        except (RuntimeError, NotImplementedError) as exc:
            return f"fails on a {layout} weight ({type(exc).__name__})"
        return "" if error <= bound else f"miscomputes a {layout} weight"  # NaN compares False: wrong

    transposed = problem(weight.transpose(1, 2), "transposed")
    contiguous = problem(weight.transpose(1, 2).contiguous(), "contiguous")
    where = f"on this torch build ({torch.__version__}, {device_type} {str(dtype).removeprefix('torch.')})"
    if contiguous:
        return "loop", f"grouped GEMM {contiguous} {where}: one matmul per expert"
    if transposed:
        return "grouped-contiguous", f"grouped GEMM {transposed} {where}: using a contiguous copy"
    return "grouped", ""


def expert_compute_mode(device: torch.device | str, dtype: torch.dtype) -> str:
    """How NF4 experts compute on this device type and dtype: one of `EXPERT_MODES`.

    Decided by `decide_expert_mode` on first use (a few ms), then cached; a fallback is said once, on rank 0.
    """
    key = (torch.device(device).type, dtype)
    if key not in _MODES:
        mode, reason = decide_expert_mode(getattr(torch.nn.functional, "grouped_mm", None), *key)
        if reason and is_main_process():
            print(f"experts: {reason}", file=sys.stderr, flush=True)
        _MODES[key] = mode
    return _MODES[key]


def compile_problem(option: str, turn_off: str) -> str | None:
    """Why `option` (train.compile, --compile) cannot work with this torch, as a one-line error; None when it can.

    A layer is one graph only through `F.grouped_mm` (torch >= 2.10): without it the experts' per-expert loop syncs
    the host and splits the graph, and dynamo's `recompile_limit` that compile_layers raises has another name.
    """
    if hasattr(torch.nn.functional, "grouped_mm"):
        return None
    return f"{option} needs torch >= 2.10 (this is torch {torch.__version__}): upgrade torch, or {turn_off}"


def stride_aligned(itemsize: int, *dims: int) -> bool:
    """grouped_mm's stride rule: rows of `dims` elements of `itemsize` bytes each span a multiple of 16 bytes."""
    return all(n * itemsize % 16 == 0 for n in dims)


def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    return expert_compute_mode(device_type, dtype) != "loop"


def expert_matmul(
    x: torch.Tensor, weight_t: torch.Tensor, counts: torch.Tensor, mode: str | None = None
) -> torch.Tensor:
    """Row block e of `x` (rows sorted by expert, `counts[e]` rows each) times `weight_t[e]` [K, N].

    `mode` (None: `expert_compute_mode`'s) is one grouped GEMM where torch has a correct one: no host sync,
    so torch.compile traces it whole. Else one matmul per expert, which reads the counts on the host once.
    """
    if mode is None and torch.compiler.is_compiling():  # no probe in a trace: the eager decision (see compile_layers)
        # grouped_mm's compiled (meta) form takes bf16 only
        mode = _MODES.get((x.device.type, x.dtype), "grouped") if x.dtype == torch.bfloat16 else "loop"
    mode = mode or expert_compute_mode(x.device, x.dtype)
    if mode != "loop" and stride_aligned(x.element_size(), x.shape[-1], *weight_t.shape[-2:]):
        weight_t = weight_t.contiguous() if mode == "grouped-contiguous" else weight_t
        return torch.nn.functional.grouped_mm(x, weight_t, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    out = x.new_empty(x.shape[0], weight_t.shape[-1])
    start = 0
    for expert, n in enumerate(counts.tolist()):  # one host sync for the whole layer
        if n:
            torch.mm(x[start : start + n], weight_t[expert], out=out[start : start + n])
            start += n
    return out
