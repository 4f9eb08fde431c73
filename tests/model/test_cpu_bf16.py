"""Same numbers on every CPU: `auto` is fp32 on a CPU, and bitsandbytes never repacks our NF4 weights.

bitsandbytes 0.50's `Linear4bit.forward`, on a CPU that reports avx512_bf16, in eval mode with an input
that needs no grad, repacks the weight in place into a bf16 CPU layout. These tests force the detection on
(`MIXTRAL_FT_CPU_BF16=1`), so they check the guard on any CPU, with or without the instructions.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from mixtral_ft.errors import UserError
from mixtral_ft.model import cpu_bf16
from mixtral_ft.model.device import resolve_compute_dtype
from mixtral_ft.model.load import load_model

pytestmark = pytest.mark.numeric


@pytest.fixture(params=["0", "1"], ids=["cpu-without-bf16", "cpu-with-bf16"])
def forced(request, monkeypatch):
    """The libraries' bf16 detection forced to each answer, restored afterwards."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", torch.cpu._is_avx512_bf16_supported)
    monkeypatch.setattr(bnbf, "has_avx512bf16", bnbf.has_avx512bf16)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", bnb_modules.has_avx512bf16)
    monkeypatch.setenv(cpu_bf16.ENV, request.param)
    cpu_bf16.apply_forcing()
    return request.param == "1"


def test_forcing_reaches_torch_and_bitsandbytes(forced):
    assert cpu_bf16.reported() is forced
    plain = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", device="meta")
    assert plain.support_avx512bf16_for_cpu is forced  # bitsandbytes' own layer would repack when True


def test_auto_is_fp32_on_cpu_whatever_the_cpu_reports(forced):
    cpu = torch.device("cpu")
    assert resolve_compute_dtype("auto", cpu) == torch.float32
    assert resolve_compute_dtype(None, cpu) == torch.float32
    assert resolve_compute_dtype("bfloat16", cpu) == torch.bfloat16  # asked for: given


def test_bad_forcing_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(cpu_bf16.ENV, "yes")
    with pytest.raises(UserError, match="MIXTRAL_FT_CPU_BF16"):
        cpu_bf16.forced()


def _snapshot(model) -> dict:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            out[name] = (module.weight.data.clone(), qs.dtype, qs.nested, qs.absmax.clone(), tuple(qs.shape))
    return out


def test_eval_no_grad_forward_keeps_our_nf4_weights_and_fp32(forced):
    model = load_model("tiny", device="cpu", compute_dtype="float32").eval()
    before = _snapshot(model)
    assert len(before) == 4 * model.config.num_hidden_layers
    ids = torch.tensor([[1, 733, 16289, 28793, 22557]])
    with torch.no_grad():
        first = model(ids).logits
        second = model(ids).logits  # bitsandbytes would compute this one from the repacked weights
    after = _snapshot(model)
    for name, (data, dtype, nested, absmax, shape) in before.items():
        module = model.get_submodule(name)
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), name
        d2, dtype2, nested2, absmax2, shape2 = after[name]
        assert dtype2 == dtype == torch.float32 and nested2 == nested and shape2 == shape, name
        assert torch.equal(d2, data) and torch.equal(absmax2, absmax), name
    assert first.dtype == torch.float32 and torch.equal(first, second)


def test_eval_no_grad_forward_with_lora_keeps_the_weights(forced):
    """The path eval, chat and merge --verify take: peft's LoRA layer around our Linear4bit."""
    from mixtral_ft.model.load import apply_lora
    from mixtral_ft.recipe import LoraSection

    lora = LoraSection(r=4, alpha=8, dropout=0.0)  # the recipe's own section, so new LoRA keys come with defaults
    model = apply_lora(load_model("tiny", device="cpu", compute_dtype="float32"), lora).eval()
    before = _snapshot(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 733, 16289, 28793]]))
    after = _snapshot(model)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert after[name][1] == torch.float32 and torch.equal(after[name][0], before[name][0]), name
