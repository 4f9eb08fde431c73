"""`mixtral-ft plan RECIPE`: predict the peak memory per GPU of a recipe's run without loading the model.

Only the model's config.json is read. peak.py estimates the tensors alive at the step's peak, which is what
`torch.cuda.max_memory_allocated` reports; the CUDA context comes on top (RESERVE_GIB). This module turns
a recipe into that estimate's inputs, and the estimate into a verdict and concrete overrides that fit.

Checked against exact measurements: tests/plan/test_preflight.py runs the tiny model on CPU under a tensor-bytes
tracker, and `compare_bench` checks a `mixtral-ft bench` result file from a GPU (bench/throughput.py's plain loop).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from mixtral_ft.errors import UserError
from mixtral_ft.plan.inputs import Dims, Run, dtype_name, optimizer_bytes_per_param
from mixtral_ft.plan.lora import lora_notes
from mixtral_ft.plan.peak import Estimate, estimate

GIB = 2**30
RESERVE_GIB = 1.0  # CUDA context and kernels: on the GPU but outside the allocator's count


# --- from a recipe ---------------------------------------------------------------------------------


def load_dims(name: str, revision: str | None = None) -> tuple[Dims, bool | None, list[str]]:
    """The model's shape from its config.json (no weights), the manifest's quantize_experts, and notes."""
    from mixtral_ft.model.hub_config import ConfigUnavailable
    from mixtral_ft.model.loader import read_manifest
    from mixtral_ft.model.source import model_source

    source = model_source(name, revision)  # the same rules and messages as training
    # A pre-quantized local folder is what it is (as load_model); a hub id is never downloaded here.
    manifest = read_manifest(source.local_path()) if source.kind == "local" else None
    try:
        return Dims.of(source.config_dict()), manifest["quantize_experts"] if manifest else None, []
    except ConfigUnavailable as exc:  # offline, gated, missing: fall back only where the shape is known
        if "mixtral-8x7b" not in name.lower():
            raise UserError(
                f"could not fetch {name}'s config.json ({exc}): check the id and your "
                "network, or set model.name to a local folder with its config.json"
            ) from None
        from mixtral_ft.model.shapes import mixtral_config

        return (
            Dims.of(mixtral_config(32)),
            None,
            [f"{name}'s config.json could not be fetched ({exc}): used the built-in Mixtral-8x7B shape"],
        )


def run_for(recipe, num_gpus: int = 1, quantize_experts: bool | None = None) -> Run:
    t, lo = recipe.train, recipe.lora
    return Run(
        batch=t.per_device_train_batch_size,
        seq=t.max_length,
        rows=2 if t.method == "dpo" else 1,
        dtype_bytes=4 if recipe.model.compute_dtype == "float32" else 2,  # auto: bf16 on a GPU
        checkpointing=t.gradient_checkpointing,
        skip_layers=t.skip_checkpoint_layers,
        reuse_dequantized=t.reuse_dequantized,
        quantize_experts=recipe.model.quantize_experts if quantize_experts is None else quantize_experts,
        lora_r=lo.r,
        lora_targets=tuple(lo.target_modules),
        lora_dropout=lo.dropout,
        optim=t.optim,
        padded=not t.packing,
        num_gpus=num_gpus,
    )


def fsdp_gib(d: Dims, est: Estimate, n: int) -> float:
    """Per GPU under FSDP over n GPUs: the weights sharded, plus the 2 layers it gathers at a time (prefetch)."""
    size = dict(est.rows)
    layer = sum(b for name, b in size.items() if name.startswith(("attention", "experts"))) / d.layers
    return (est.peak - est.weights + est.weights / n + 2 * layer) / GIB


def advise(d: Dims, run: Run, accumulation: int, usable: float) -> list[str]:
    """Concrete overrides, each with its predicted peak: for a run that does not fit, or fits with room."""
    peak = _gib(d, run)
    if peak > usable:
        return _to_fit(d, run, accumulation, usable, peak)
    if peak < 0.6 * usable:  # lots of room: a bigger micro-batch (fewer accumulation steps) runs faster
        return _with_room(d, run, accumulation, usable)
    return []


def _gib(d: Dims, run: Run) -> float:
    return estimate(d, run).peak / GIB


def _levers(d: Dims, run: Run, accumulation: int, usable: float) -> list[tuple[list[str], Run]]:
    """(overrides, the run they give) for each lever that lowers memory, most useful first."""
    B, S = run.batch, run.seq
    tries = []
    if not run.checkpointing:
        tries.append((["train.gradient_checkpointing=true"], replace(run, checkpointing=True)))
    if not run.quantize_experts:
        tries.append((["model.quantize_experts=true"], replace(run, quantize_experts=True)))
    if run.skip_layers:  # speed levers that cost memory: skipped layers keep their activations
        tries.append((["train.skip_checkpoint_layers=0"], replace(run, skip_layers=0)))
    if run.reuse_dequantized:
        tries.append((["train.reuse_dequantized=false"], replace(run, reuse_dequantized=False)))
    smaller = [b for b in range(B - 1, 0, -1) if _gib(d, replace(run, batch=b)) <= usable]
    for b in smaller[:1] or ([1] if B > 1 else []):  # the same global batch: more accumulation steps
        steps = math.ceil(B * accumulation / b)
        tries.append(
            (
                [f"train.per_device_train_batch_size={b}", f"train.gradient_accumulation_steps={steps}"],
                replace(run, batch=b),
            )
        )
    lengths = [s for s in (S // 2, S // 4, S // 8) if s >= 256]
    for s in [s for s in lengths if _gib(d, replace(run, seq=s)) <= usable][:1] or lengths[-1:]:
        tries.append(([f"train.max_length={s}"], replace(run, seq=s)))  # longer rows are truncated
    if optimizer_bytes_per_param(run.optim) > 2:
        tries.append((["train.optim=paged_adamw_8bit"], replace(run, optim="paged_adamw_8bit")))
    return tries


def _to_fit(d: Dims, run: Run, accumulation: int, usable: float, peak: float) -> list[str]:
    out = []
    for keys, r in _levers(d, run, accumulation, usable):
        gib = _gib(d, r)
        if gib < 0.99 * peak:  # a lever that saves under 1% is not advice
            out.append(f"{' '.join(keys)}: {gib:.1f} GiB ({'fits' if gib <= usable else 'does not fit'})")
    least = replace(run, checkpointing=True, skip_layers=0, reuse_dequantized=False, quantize_experts=True)
    least = replace(least, batch=1, seq=min(run.seq, 256), optim="sgd")
    if _gib(d, least) > usable:  # nothing in the recipe helps: the weights themselves are too big
        est = estimate(d, replace(run, checkpointing=True, quantize_experts=True))
        n = next((n for n in range(2, 65) if fsdp_gib(d, est, n) <= usable), None)
        out.append(
            f"the weights alone need {est.weights / GIB:.1f} GiB: "
            + (
                f"shard them with FSDP over {n} GPUs (train --num-processes {n} --accelerate-config "
                f"accelerate_configs/fsdp_qlora.yaml): about {fsdp_gib(d, est, n):.1f} GiB per GPU, or "
                if n
                else ""
            )
            + "use a bigger GPU"
        )
    return out


def _with_room(d: Dims, run: Run, accumulation: int, usable: float) -> list[str]:
    out, B, room = [], run.batch, 0.85 * usable
    bigger = [(b, gib) for b in range(2 * B, 65) if (gib := _gib(d, replace(run, batch=b))) <= room]
    if bigger:
        b, gib = bigger[-1]
        acc = f" train.gradient_accumulation_steps={max(1, B * accumulation // b)}" if accumulation > 1 else ""
        out.append(f"room to spare: train.per_device_train_batch_size={b}{acc}: {gib:.1f} GiB (fits; faster steps)")
    no_recompute = _gib(d, replace(run, checkpointing=False)) if run.checkpointing else None
    if no_recompute is not None and no_recompute <= room:
        out.append(
            f"train.gradient_checkpointing=false: {no_recompute:.1f} GiB (fits; no recompute: about a quarter faster)"
        )
    return out


def plan(recipe, *, gpu_mem: float = 80.0, num_gpus: int = 1) -> dict:
    """Everything `mixtral-ft plan` prints, as a dict (the --json output)."""
    if not gpu_mem > RESERVE_GIB or math.isinf(gpu_mem) or num_gpus < 1:  # `not >`: nan compares false
        raise UserError(
            f"--gpu-mem must be more than the {RESERVE_GIB:g} GiB kept for the CUDA context (GiB per "
            f"GPU, e.g. 80) and --num-gpus at least 1; got {gpu_mem:g} and {num_gpus}"
        )
    d, manifest_experts, notes = load_dims(recipe.model.name, recipe.model.revision)
    skip = recipe.train.skip_checkpoint_layers
    if skip > d.layers:  # as train's check_levers refuses it
        raise UserError(
            f"'train.skip_checkpoint_layers' is {skip} but {recipe.model.name} has {d.layers} decoder layers: "
            f"use 0 to {d.layers} ({d.layers} is the same as train.gradient_checkpointing=false)"
        )
    run = run_for(recipe, num_gpus, manifest_experts)
    est, usable = estimate(d, run), gpu_mem - RESERVE_GIB
    peak = est.peak / GIB
    notes.append("per GPU, for a batch whose longest row is max_length; shorter batches need less")
    notes += lora_notes(run.lora_targets)
    if run.rows == 2:
        notes.append("DPO: chosen and rejected rows go through together (2 sequences per example)")
    if num_gpus > 1:
        notes.append(
            f"DDP (the default launcher) keeps the whole model on each of the {num_gpus} GPUs; FSDP "
            f"(--accelerate-config accelerate_configs/fsdp_qlora.yaml) shards the weights: about "
            f"{fsdp_gib(d, est, num_gpus):.1f} GiB per GPU"
        )
    if usable * 0.9 < peak <= usable:
        notes.append(
            "tight: allocator fragmentation can add a few percent "
            "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps)"
        )
    return {
        "model": recipe.model.name,
        "gpu_mem_gib": gpu_mem,
        "num_gpus": num_gpus,
        "usable_gib": usable,
        "settings": {k: v for k, v in vars(run).items() if k != "triton"},
        "components": [{"name": n, "bytes": int(b), "gib": round(b / GIB, 3)} for n, b in est.rows],
        "peak_bytes": int(est.peak),
        "peak_gib": round(peak, 2),
        "weights_gib": round(est.weights / GIB, 2),
        "peak_at": est.moment,
        "phases_gib": {k: round(v / GIB, 3) for k, v in est.phases.items()},
        "fits": peak <= usable,
        "advice": advise(d, run, recipe.train.gradient_accumulation_steps, usable),
        "notes": notes,
    }


def render(report: dict) -> str:
    s, unit = report["settings"], ("GiB", GIB) if report["peak_bytes"] >= GIB else ("MiB", 2**20)  # tiny: MiB
    lines = [
        f"{report['model']}: batch {s['batch']} x {s['seq']} tokens, {dtype_name(s['dtype_bytes'])}, checkpointing "
        f"{'on' if s['checkpointing'] else 'off'}{_levers_text(s)}, "
        f"experts {'NF4' if s['quantize_experts'] else 'unquantized'}, "
        f"{report['num_gpus']} GPU(s)",
        f"{'component':<44} {unit[0]:>7}",
    ]
    lines += [f"{c['name']:<44} {c['bytes'] / unit[1]:>7.2f}" for c in report["components"]]
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines += [
        f"{'peak per GPU':<44} {report['peak_bytes'] / unit[1]:>7.2f}   at: {report['peak_at']}",
        f"{verdict} in {report['gpu_mem_gib']:g} GiB ({RESERVE_GIB:g} GiB kept for the CUDA context): "
        f"{report['usable_gib'] - report['peak_bytes'] / GIB:+.1f} GiB to spare",
    ]
    lines += [f"note: {n}" for n in report["notes"]] + [f"advice: {a}" for a in report["advice"]]
    return "\n".join(lines)


def _levers_text(s: dict) -> str:
    whole = f" (last {s['skip_layers']} layers kept whole)" if s["checkpointing"] and s["skip_layers"] else ""
    return whole + (", reusing dequantized experts" if s["checkpointing"] and s["reuse_dequantized"] else "")


def run_plan(recipe_path: str, overrides=(), *, gpu_mem: float = 80.0, num_gpus: int = 1, as_json=False) -> int:
    from mixtral_ft.recipe import load_recipe

    report = plan(load_recipe(recipe_path, overrides), gpu_mem=gpu_mem, num_gpus=num_gpus)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["fits"] else 1


# --- against a `mixtral-ft bench` result -----------------------------------------------------------


def compare_bench(run: dict) -> dict:
    """Plan's prediction for one run of a GPU `mixtral-ft bench` result file (its plain loop).

    Of the levers, plan models checkpointing, skipped layers and reuse (bench.throughput.plan_covers).

    Bench resets the peak after building, so the peak is the training step's (issue 3 bounds the build apart).
    """
    from mixtral_ft.model.shapes import mixtral_config, tiny_config

    d = Dims.of(
        tiny_config(num_hidden_layers=run["layers"]) if run["model"] == "tiny" else mixtral_config(run["layers"])
    )
    est = estimate(
        d,
        Run(
            run["batch"],
            run["seq"],
            dtype_bytes=4 if run["dtype"] == "float32" else 2,
            checkpointing=run["levers"]["checkpointing"],
            skip_layers=run["levers"].get("skip_layers", 0),
            reuse_dequantized=run["levers"].get("reuse_dequantized", False),
            loop="plain",
            padded=False,
        ),
    )
    return {
        "predicted_gib": round(est.peak / GIB, 3),
        "measured_gib": run["peak_gib"],
        "error": est.peak / GIB / run["peak_gib"] - 1,
        "weights_predicted_gib": round(est.weights / GIB, 3),
        "weights_measured_gib": run.get("weights_gib"),
        "peak_at": est.moment,
    }
