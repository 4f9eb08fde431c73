"""mixtral_ft.model.load's compile helpers: the recompile limit compiled layers get, and the report that proves
the compiled path ran."""

import torch
import torch._dynamo

from mixtral_ft.model.load import RECOMPILE_LIMIT, compile_layers, compile_report
from mixtral_ft.model.shapes import tiny_config


class Doubler(torch.nn.Module):
    def forward(self, x):
        return (x * 2).sin()


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


def test_compiling_the_layers_raises_the_recompile_limit():
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralForCausalLM

    model = get_peft_model(MixtralForCausalLM(tiny_config()), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_layers(model)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT > 8
    assert all(hasattr(layer, "_compiled_call_impl") for layer in model.base_model.model.model.layers)
