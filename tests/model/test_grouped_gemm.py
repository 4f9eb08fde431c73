"""The grouped GEMM probe: it picks how NF4 experts compute, and every pick computes the same experts.

The stand-ins for a broken `grouped_mm` are passed to the pure decision helper only (the GPU-bug scenario
cannot happen on this CPU); torch itself is never patched. Modes are forced through the probe's own cache.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixtral_ft.bench import steps
from mixtral_ft.bench import throughput as bench
from mixtral_ft.model import grouped_gemm, quant
from mixtral_ft.model.audit import audit_model
from mixtral_ft.model.shapes import mixtral_config, tiny_config
from mixtral_ft.model.torch_compile import compile_layers

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
if not hasattr(torch.nn.functional, "grouped_mm"):
    pytest.skip(
        "this torch has no F.grouped_mm (torch < 2.10): experts use the per-expert loop", allow_module_level=True
    )
grouped_mm = torch.nn.functional.grouped_mm


def reads_memory_as_contiguous(x, weight_t, offs):
    """A layout bug: the weight's strides are ignored, so a transposed view reads the wrong elements."""
    return grouped_mm(x, weight_t.as_strided(weight_t.shape, torch.empty(weight_t.shape).stride()), offs=offs)


def ignores_offsets(x, weight_t, offs):
    """Wrong in every layout: each row is multiplied by expert 0."""
    return x @ weight_t[0]


def wrong_when_contiguous(x, weight_t, offs):
    return ignores_offsets(x, weight_t, offs) if weight_t.is_contiguous() else grouped_mm(x, weight_t, offs=offs)


def no_kernel(x, weight_t, offs):
    raise RuntimeError("grouped_mm: no kernel for this device")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probe_picks_grouped_on_this_cpu(dtype):
    assert grouped_gemm.decide_expert_mode(grouped_mm, "cpu", dtype) == ("grouped", "")
    assert grouped_gemm.expert_compute_mode("cpu", dtype) == "grouped"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "stand_in, mode, says",
    [
        (reads_memory_as_contiguous, "grouped-contiguous", "miscomputes a transposed weight"),
        (ignores_offsets, "loop", "miscomputes a contiguous weight"),
        (wrong_when_contiguous, "loop", "miscomputes a contiguous weight"),  # backward's layout
        (no_kernel, "loop", "fails on a contiguous weight (RuntimeError)"),
        (None, "loop", "no grouped GEMM"),
    ],
)
def test_probe_falls_back_when_grouped_mm_is_wrong(stand_in, mode, says, dtype):
    decided, reason = grouped_gemm.decide_expert_mode(stand_in, "cpu", dtype)
    assert decided == mode and says in reason
    assert reason.endswith("using a contiguous copy" if mode == "grouped-contiguous" else "one matmul per expert")


def test_a_fallback_is_said_once_on_rank_0(monkeypatch, capsys):
    monkeypatch.setattr(grouped_gemm, "_MODES", {})
    monkeypatch.setattr(grouped_gemm, "decide_expert_mode", lambda fn, device, dtype: ("loop", f"broken on {device}"))
    assert [grouped_gemm.expert_compute_mode("cpu", torch.float32) for _ in range(2)] == ["loop", "loop"]
    assert capsys.readouterr().err == "experts: broken on cpu\n"
    monkeypatch.setenv("RANK", "1")
    assert grouped_gemm.expert_compute_mode("cpu", torch.bfloat16) == "loop"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("mode", grouped_gemm.EXPERT_MODES)
def test_grouped_mm_in_each_mode_equals_per_expert_matmuls(mode):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(20, 32, generator=generator), torch.randn(3, 24, 32, generator=generator)
    counts = torch.tensor([7, 0, 13])
    expected = torch.cat([x[:7] @ weight[0].T, x[7:] @ weight[2].T])
    torch.testing.assert_close(grouped_gemm.expert_matmul(x, weight.transpose(1, 2), counts, mode), expected)  # forward
    grad = torch.randn(20, 24, generator=generator)
    expected = torch.cat([grad[:7] @ weight[0], grad[7:] @ weight[2]])
    torch.testing.assert_close(grouped_gemm.expert_matmul(grad, weight, counts, mode), expected)  # backward


class GroupedCalls(TorchDispatchMode):
    """Records, for every grouped GEMM torch runs, whether its weight was contiguous."""

    def __init__(self):
        super().__init__()
        self.contiguous = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            self.contiguous.append(args[1].is_contiguous())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=str)
def test_experts_forward_and_backward_agree_across_modes(monkeypatch, dtype, tolerance):
    experts = bench.build_random_nf4(tiny_config(), CPU, dtype).model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(24, experts.hidden_dim, generator=generator).to(dtype)
    top_k = torch.randint(0, experts.num_experts, (24, 2), generator=generator)
    top_k[:, 1] = (top_k[:, 0] + 1) % experts.num_experts  # two distinct experts per token
    weights = torch.rand(24, 2, generator=generator).to(dtype)
    results, calls = {}, {}
    for mode in grouped_gemm.EXPERT_MODES:
        monkeypatch.setitem(grouped_gemm._MODES, ("cpu", dtype), mode)
        assert experts.compute_mode(dtype) == mode
        x = hidden.clone().requires_grad_(True)
        with GroupedCalls() as recorded:
            out = experts(x, top_k, weights)
            out.float().square().sum().backward()
        results[mode], calls[mode] = (out.float(), x.grad.float()), recorded.contiguous
    # forward (gate_up, down), then backward (down, gate_up): only plain grouped passes transposed views
    assert calls == {"grouped": [False, False, True, True], "grouped-contiguous": [True] * 4, "loop": []}
    for mode in ("grouped-contiguous", "loop"):
        for ours, reference in zip(results[mode], results["grouped"]):
            torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)


def test_audit_records_the_expert_path_and_compiling_decides_it_first(monkeypatch):
    model = bench.build_random_nf4(tiny_config(), CPU, torch.float32)
    monkeypatch.setattr(grouped_gemm, "_MODES", {})
    compile_layers(steps.add_lora(model))  # marks the layers for compiling; nothing is traced yet
    assert dict(grouped_gemm._MODES) == {("cpu", torch.float32): "grouped"}  # decided before any trace
    report = audit_model(model)
    assert report.expert_compute == "grouped" and '"expert_compute": "grouped"' in report.to_json()
    quant.configure_experts(model, grouped_mm=False)  # the --experts loop lever
    assert audit_model(model).expert_compute == "loop"


@pytest.mark.parametrize("mode", ["grouped", "grouped-contiguous"])
def test_a_trace_uses_the_eager_decision(monkeypatch, mode):
    """Under torch.compile the probe cannot run: the traced graph follows what eager decided, whole."""
    monkeypatch.setitem(grouped_gemm._MODES, ("cpu", torch.bfloat16), mode)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(20, 32, generator=generator), torch.randn(3, 24, 32, generator=generator)
    x, weight, counts = x.bfloat16(), weight.bfloat16(), torch.tensor([7, 0, 13])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda *a: grouped_gemm.expert_matmul(*a), backend=backend, fullgraph=True)
        out = compiled(x, weight.transpose(1, 2), counts)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, grouped_gemm.expert_matmul(x, weight.transpose(1, 2), counts, "loop"))
    assert len(graphs) == 1 and "grouped_mm" in graphs[0]
    assert ("contiguous" in graphs[0]) == (mode == "grouped-contiguous")


@pytest.mark.parametrize("width", [32, 30])  # 30 fp32 columns break grouped_mm's 16-byte stride rule: the loop runs
def test_grouped_mm_matches_per_expert_matmuls(width):
    x, weight_t = torch.randn(10, width), torch.randn(3, width, 8)
    counts = torch.tensor([4, 0, 6])  # an expert with no rows too
    expected = torch.cat([x[:4] @ weight_t[0], x[4:] @ weight_t[2]])
    torch.testing.assert_close(grouped_gemm.expert_matmul(x, weight_t, counts), expected)


def test_grouped_and_looped_experts_agree_on_cpu():
    assert grouped_gemm.grouped_mm_works("cpu", torch.float32) == hasattr(torch.nn.functional, "grouped_mm")
    model = bench.build_random_nf4(tiny_config(), CPU, torch.float32)
    ids = torch.randint(3, 32000, (2, 48), generator=torch.Generator().manual_seed(2))
    outputs = []
    for grouped in (True, False):
        quant.configure_experts(model, grouped_mm=grouped)
        with torch.no_grad():
            outputs.append(model(input_ids=ids, use_cache=False).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_and_looped_experts_agree_in_bf16():
    config = mixtral_config(1)
    config.hidden_size, config.intermediate_size = 1024, 3584
    model = bench.build_random_nf4(config, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(3, 32000, (2, 256), device="cuda")
    outputs = []
    for grouped in (True, False):
        quant.configure_experts(model, grouped_mm=grouped)
        with torch.no_grad():
            outputs.append(model(input_ids=ids, use_cache=False).logits.float())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
