"""torch.compile for the decoder layers, and the report that proves the compiled path ran (run.json, bench)."""

from __future__ import annotations

# One code object, the decoder layer's forward, serves every layer, and each mode needs its own graph: training,
# evaluation and DPO's no-grad reference pass, each at its first length and then for any length, and their
# grad-mode and requires-grad combinations. A tiny DPO run with evaluation used all of torch's default 8
# (torch 2.13, 2026-11); past the limit new variants run eager without a word.
RECOMPILE_LIMIT = 32


def compile_layers(model) -> None:
    """torch.compile each decoder layer (LoRA and checkpointing inside): one graph, reused by every layer.

    It fuses the memory-bound work between the matmuls (norms, RoPE, routing, SwiGLU, residuals). In bf16
    a layer compiles whole; in fp32 on CPU the per-expert loop's host sync splits it. The grouped GEMM probe
    cannot run inside a trace, so it runs here first and the compiled layers use its decision.
    """
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from mixtral_ft.model.audit import expert_compute

    expert_compute(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # LoRA dropout through inductor's own random kernels broke torch 2.11's partitioner once a length turned
    # dynamic ("Node ... was invalid, but is output", the second length of a run); aten's random ops do not.
    torch._inductor.config.fallback_random = True
    counters.clear()  # compile_report() counts from here
    for layer in model.get_base_model().model.layers:
        layer.compile()


def compile_report() -> dict:
    """What torch.compile did since `compile_layers`: graphs compiled, graph breaks (0 when layers trace whole)
    and recompile-limit hits (0 when every mode got its graph).

    A layer that cannot be traced, or that meets a new mode past the limit, runs eager silently and still
    computes the same numbers; this is the proof that the compiled path ran.
    """
    from torch._dynamo.utils import counters

    limit_hits = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompile_limit_hits": limit_hits,
    }
