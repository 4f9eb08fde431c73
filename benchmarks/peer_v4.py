"""The legacy peer for benchmarks/compare.py: transformers 4.57 Mixtral with every expert an NF4 `Linear4bit`.

This is what `load_in_4bit` gave before transformers 5 fused the experts: bitsandbytes quantizes each
expert's w1/w2/w3 `nn.Linear` and each attention projection. Built straight into NF4 on the device with
random weights, like our own benchmark model, then timed by the shared harness (`mixtral_ft.bench.steps`).

It runs in a side environment, never in ours: `compare.py --peer-v4-site DIR` starts
`python benchmarks/peer_v4.py` with DIR (a `pip install --target` of transformers 4.57) first on PYTHONPATH,
then the checkout (for `mixtral_ft.bench.steps`), and reads the `RESULT {json}` line it prints. Only torch,
bitsandbytes, transformers 4 and peft are imported.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mixtral_ft.bench import steps


def build_v4_nf4(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import bitsandbytes as bnb
    from torch import nn
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    config = MixtralConfig(**shape, sliding_window=None, tie_word_embeddings=False)
    std = config.initializer_range
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(dtype)

    def nf4(linear: nn.Linear) -> nn.Module:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=dtype,
            quant_type="nf4",
            compress_statistics=True,
            device="meta",
        )
        weight = steps.random_weight((linear.out_features, linear.in_features), device, dtype, std)
        quantized.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True
        ).to(device)
        return quantized

    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, nf4(getattr(layer.self_attn, name)))
        for expert in layer.block_sparse_moe.experts:
            for name in ("w1", "w2", "w3"):
                setattr(expert, name, nf4(getattr(expert, name)))
    steps.fill_meta_params(model, device, dtype, std)
    model.model.rotary_emb = MixtralRotaryEmbedding(config, device=device)
    return model


def main(argv: list[str] | None = None) -> int:
    import bitsandbytes
    import transformers

    parser = argparse.ArgumentParser(prog="python benchmarks/peer_v4.py")
    parser.add_argument("--shape", required=True, help="MixtralConfig fields as JSON")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    device, dtype, shape = torch.device(args.device), getattr(torch, args.dtype), json.loads(args.shape)

    started = time.perf_counter()
    model = build_v4_nf4(shape, device, dtype)
    steps.sync(device)
    result = {
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "layers": shape["num_hidden_layers"],
        "batch": args.batch,
        "seq": args.seq,
        "build_s": round(time.perf_counter() - started, 2),
        "weights_gib": steps.allocated_gib(device),
    }
    steps.enable_checkpointing(model)
    model = steps.add_lora(model)
    result |= steps.time_qlora_steps(
        model,
        batch=args.batch,
        seq=args.seq,
        vocab_size=shape["vocab_size"],
        steps=args.steps,
        warmup=args.warmup,
        device=device,
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
