"""Results that do not depend on whether the CPU has bf16 instructions (avx512_bf16 / AMX).

Two things used to follow the CPU: `model.compute_dtype: auto` (now fp32 on every CPU, see
`model.device.resolve_compute_dtype`), and bitsandbytes' `Linear4bit.forward`, which on a CPU that reports
avx512_bf16, in eval mode with an input that needs no grad, repacks the layer's weight *in place* into a
CPU layout with bf16 absmax and sets `quant_state.dtype = bfloat16` (bitsandbytes 0.50,
`_convert_weight_packed_for_cpu`). From then on that layer computes in bf16 whatever the recipe says, in
eval, chat, `merge --verify`, and in training after an eval pass. `keep_layout` turns that off per module,
so our NF4 weights never change behind our back on any CPU.

`MIXTRAL_FT_CPU_BF16=0|1` forces what torch and bitsandbytes report (unset: what the CPU says), so the
tests can show that nothing depends on the answer: `.ci/run` runs the numeric tests once more with the
opposite answer. Forcing `1` on a CPU without the instructions is safe for our code, which never takes the
bf16 kernels; it only changes what the libraries *believe*.
"""

from __future__ import annotations

import os

ENV = "MIXTRAL_FT_CPU_BF16"


def forced() -> bool | None:
    """The forced answer (True/False), or None when the CPU's own answer stands."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        from mixtral_ft.errors import UserError

        raise UserError(f"{ENV}={value!r} is not 0, 1 or auto: unset it to use what the CPU reports")
    return value == "1"


def reported() -> bool:
    """Whether torch says this CPU runs bf16 natively (after any forcing)."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def apply_forcing() -> None:
    """Make torch's and bitsandbytes' bf16 detection answer `MIXTRAL_FT_CPU_BF16`, if it is set.

    bitsandbytes reads its answer in `Linear4bit.__init__` (`support_avx512bf16_for_cpu`): patching the
    function covers every layer built afterwards. Its import-time choice of CPU kernels (and the log line
    about `kernels`) follows the real CPU; those kernels run only on repacked weights, and ours never are.
    """
    answer = forced()
    if answer is None:
        return
    import bitsandbytes.functional as bnbf
    import bitsandbytes.nn.modules as bnb_modules
    import torch

    def detect() -> bool:
        return answer

    torch.cpu._is_avx512_bf16_supported = detect
    bnbf.has_avx512bf16 = detect
    bnb_modules.has_avx512bf16 = detect


def keep_layout(linear) -> None:
    """Never let bitsandbytes repack this `Linear4bit`'s NF4 weight into its bf16 CPU inference layout."""
    linear.support_avx512bf16_for_cpu = False
