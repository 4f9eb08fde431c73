"""mixtral_ft.model.torch_compile: the recompile limit compiled layers get, the report that proves
the compiled path ran, and compiled layers with LoRA dropout training across lengths."""

import torch
import torch._dynamo
import torch._inductor.config

from mixtral_ft.bench import throughput as bench
from mixtral_ft.model.shapes import tiny_config
from mixtral_ft.model.torch_compile import RECOMPILE_LIMIT, compile_layers, compile_report
from tests.conftest import requires_compile


class Doubler(torch.nn.Module):
    def forward(self, x):
        return (x * 2).sin()


@requires_compile
def test_compile_report_counts_calls_past_the_recompile_limit():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = Doubler()
    module.compile(dynamic=False, backend="eager")  # every new length is a new graph
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for length in range(1, 6):
                module(torch.ones(length))
        report = compile_report()
    finally:
        torch._dynamo.reset()
    assert report == {"graphs": 2, "graph_breaks": 0, "recompile_limit_hits": 1}


@requires_compile
def test_compiling_the_layers_raises_the_recompile_limit():
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralForCausalLM

    model = get_peft_model(MixtralForCausalLM(tiny_config()), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_layers(model)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT > 8
    assert all(hasattr(layer, "_compiled_call_impl") for layer in model.base_model.model.model.layers)


@requires_compile
def test_compiled_layers_with_lora_dropout_train_at_a_new_length():
    """The second length makes dynamo trace the layer with dynamic shapes; with LoRA dropout, torch 2.11's
    partitioner failed there unless random ops fall back to aten (benchmarks/gpu_rehearse.sh found it)."""
    from torch._dynamo.utils import counters

    cpu = torch.device("cpu")
    model = bench.build_random_nf4(tiny_config(), cpu, torch.bfloat16)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fallback_random=False):  # as a fresh process has it
            model = bench.apply_levers(model, bench.DEFAULT_LEVERS | {"compile": True, "lora_dropout": 0.1})
            assert torch._inductor.config.fallback_random
            model.train()
            for length in (16, 24):
                ids = torch.randint(3, 32000, (2, length), generator=torch.Generator().manual_seed(length))
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                assert torch.isfinite(loss)
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert graphs == 2 and breaks == 0  # the second length compiled (dynamic), not eager
