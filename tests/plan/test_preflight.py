"""`mixtral-ft plan`: its prediction against exact measurements, and the command's verdicts and advice.

The measurement counts tensor bytes, not process memory (RSS is mostly libraries): a TorchDispatchMode sees
every tensor an op returns and a weakref finalizer on its storage sees it freed, so `peak` is the most
bytes of tensors alive at once, what `torch.cuda.max_memory_allocated` reports on a GPU. (torch's
MemTracker cannot be used: it hooks every parameter, and a frozen one refuses the hook.) On tiny, the
profiler's memory events give the same peak to 0.01 MiB.
"""

import contextlib
import functools
import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mixtral_ft.bench.throughput import DEFAULT_LEVERS, plan_covers
from mixtral_ft.cli import main
from mixtral_ft.plan.peak import Dims, Run, estimate
from mixtral_ft.plan.preflight import compare_bench
from mixtral_ft.recipe import ATTENTION_TARGETS

ROOT = Path(__file__).resolve().parents[2]
OASST = str(ROOT / "recipes" / "oasst.yaml")
TOLERANCE = 0.10  # the issue's bar; the model lands within 2.5% on every point below (bf16: +2.2%)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: those alive at the start plus every op's new outputs."""

    def __init__(self, alive=()):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}
        for t in alive:
            self._add(t)

    def _add(self, t):
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] == 0 or key in self.sizes:  # a view, an in-place result, or a tensor already counted
            return
        self.sizes[key] = key[1]
        self.live += key[1]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


def held_tensors(model, optimizer):
    """Everything alive between steps: parameters (NF4 statistics too), buffers, optimizer states."""
    out = list(model.buffers())
    for p in model.parameters():
        out.append(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    return out + [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.fixture(scope="module")
def trainer_like():
    """bench.run_benchmark's setup on a small config: NF4 model, LoRA r16 (dropout 0), AdamW; fp32 on CPU."""
    from trl.trainer.utils import add_fused_lm_head

    from mixtral_ft.bench.throughput import build_random_nf4
    from mixtral_ft.model.load import apply_lora
    from mixtral_ft.recipe import LoraSection

    def build(config, dtype=torch.float32, targets=ATTENTION_TARGETS):
        model = build_random_nf4(config, torch.device("cpu"), dtype)
        model.config.use_cache = False
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does; off unless asked
        model = apply_lora(model, LoraSection(r=16, alpha=32, dropout=0.0, target_modules=targets))
        model.train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    return build


def measured_peak(model, optimizer, batch, seq, *, checkpointing=True, fused=False, skip=0, reuse=False) -> int:
    from mixtral_ft.train.levers import set_checkpointed_layers

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    set_checkpointed_layers(model, skip_layers=skip, reuse_dequantized=reuse)  # training's levers (0, False: none)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    kwargs = {"fused_lm_head": True} if fused else {}
    for step in range(2):  # the first step creates the optimizer states; the second is measured
        tracker = LiveBytes(held_tensors(model, optimizer) + [ids])
        with tracker if step else contextlib.nullcontext():
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def predicted(config, batch, seq, dtype_bytes=4, **kwargs) -> int:
    run = Run(
        batch,
        seq,
        dtype_bytes=dtype_bytes,
        loop="trainer" if kwargs.pop("fused", False) else "plain",
        triton=False,
        padded=False,
        **kwargs,
    )  # bench's loop: no autocast, no attention mask
    return estimate(Dims.of(config), run).peak


@pytest.fixture(scope="module")
def tiny(trainer_like):
    from mixtral_ft.model.shapes import tiny_config

    return (tiny_config(), *trainer_like(tiny_config()))


# Two points with different shares of weights and logits (B2 x 128: logits 85% of the peak; B1 x 64: 60%),
# so no constant factor passes both; then TRL's fused LM head (its CPU fallback) and no checkpointing.
@pytest.mark.parametrize(
    "batch, seq, options", [(2, 128, {}), (1, 64, {}), (1, 128, {"fused": True}), (1, 96, {"checkpointing": False})]
)
def test_tiny_peak_within_ten_percent(tiny, batch, seq, options):
    config, model, optimizer = tiny
    measured = measured_peak(model, optimizer, batch, seq, **options)
    error = predicted(config, batch, seq, **options) / measured - 1
    assert abs(error) < TOLERANCE, (
        f"B{batch} x S{seq} {options}: measured {measured / 2**20:.2f} MiB, off by {error:+.1%}"
    )


@pytest.fixture(scope="module")
def wider(trainer_like):
    from mixtral_ft.model.shapes import mixtral_config

    shape = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 448, "num_key_value_heads": 2}
    config = mixtral_config(2, num_attention_heads=8, output_router_logits=False, **shape)
    return config, functools.cache(lambda dtype: trainer_like(config, dtype))  # one model per dtype


# bf16 adds what the GPU run has and fp32 hides: RMSNorm's fp32 input copies, peft's fp32 casts of the LoRA
# inputs, the experts' fp32 output copy. (bf16 matmuls are slow on this CPU: the smallest shape.)
@pytest.mark.parametrize(
    "dtype, seq, checkpointing", [(torch.float32, 64, True), (torch.float32, 64, False), (torch.bfloat16, 32, True)]
)
def test_layer_terms_on_a_wider_model(wider, dtype, seq, checkpointing):
    """Where a layer's recompute and dequantized experts set the peak (as on the GPU), not the logits."""
    config, (model, optimizer) = wider[0], wider[1](dtype)
    c = dtype.itemsize
    run = Run(2, seq, dtype_bytes=c, checkpointing=checkpointing, loop="plain", padded=False)
    assert "gate_up_proj" in estimate(Dims.of(config), run).moment
    measured = measured_peak(model, optimizer, 2, seq, checkpointing=checkpointing)
    error = predicted(config, 2, seq, dtype_bytes=c, checkpointing=checkpointing) / measured - 1
    assert abs(error) < TOLERANCE, f"{dtype} checkpointing={checkpointing}: off by {error:+.1%}"


# train.skip_checkpoint_layers and train.reuse_dequantized, as training applies them (train/levers.py).
@pytest.mark.parametrize("skip, reuse", [(1, False), (2, False), (0, True)])  # plan without them: -15%, -24%
def test_checkpointing_levers_on_a_wider_model(wider, skip, reuse):
    config, (model, optimizer) = wider[0], wider[1](torch.float32)
    measured = measured_peak(model, optimizer, 2, 64, skip=skip, reuse=reuse)  # the next call resets both
    error = predicted(config, 2, 64, skip_layers=skip, reuse_dequantized=reuse) / measured - 1
    assert abs(error) < TOLERANCE, f"skip={skip} reuse={reuse}: off by {error:+.1%}"


# lora.allow_other_targets: LoRA beyond the attention. Each adds r * (in + out) parameters: fp32 weights, Adam's
# two states and (counted whole, though this measurement frees them between steps) fp32 gradients; lm_head keeps
# its input and lora_A's output until its backward, embed_tokens lora_A's output. Plan ignored them before.
@pytest.mark.parametrize(
    "target, width", [("lm_head", 64 + 32000), ("embed_tokens", 32000 + 64), ("gate", 2 * (64 + 4))]
)
def test_lora_beyond_attention_adds_what_it_measures(tiny, trainer_like, target, width):
    config, model, optimizer = tiny
    grads = 4 * 16 * width  # fp32, r = 16
    base = measured_peak(model, optimizer, 2, 128)
    other = measured_peak(*trainer_like(config, targets=ATTENTION_TARGETS + (target,)), 2, 128)
    targets = ATTENTION_TARGETS + (target,)
    added = predicted(config, 2, 128, lora_targets=targets) - predicted(config, 2, 128)
    assert abs(added - (other - base + grads)) < 0.01 * added, f"{target}: plan adds {added}, measured {other - base}"


def test_peft_keeps_lora_fp32_on_a_bf16_nf4_base():
    from mixtral_ft.bench.throughput import build_random_nf4
    from mixtral_ft.model.load import apply_lora
    from mixtral_ft.model.shapes import tiny_config
    from mixtral_ft.recipe import LoraSection

    model = apply_lora(build_random_nf4(tiny_config(), torch.device("cpu"), torch.bfloat16), LoraSection())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


# --- the command -----------------------------------------------------------------------------------


def plan_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_oasst_fits_80_and_matches_the_issue_measurement(capsys):
    code, report = plan_json(capsys, OASST, "--gpu-mem", "80")
    assert code == 0 and report["fits"]
    # benchmarks/NOTES.md budgets 28.6 GiB by adding the logits (1.3) to the layer workspace, but the logits are
    # freed before the last layer's recompute; the issue measured 28.9 GiB for this design in bench's loop.
    assert 25 < report["peak_gib"] < 30
    issue = {
        "model": "mixtral-8x7b-shape",
        "layers": 32,
        "batch": 2,
        "seq": 2048,
        "levers": DEFAULT_LEVERS,
        "dtype": "bfloat16",
        "peak_gib": 28.9,
    }
    assert abs(compare_bench(issue)["error"]) < TOLERANCE
    assert sum(c["bytes"] for c in report["components"]) == report["peak_bytes"]
    names = [c["name"] for c in report["components"]]
    assert "experts (NF4)" in names and any(n.startswith("dequant workspace (gate_up_proj") for n in names)
    assert report["settings"]["batch"] == 2 and report["settings"]["optim"] == "paged_adamw_8bit"
    assert any("room to spare" in a for a in report["advice"])  # 50 GiB free: a bigger batch


def test_oasst_does_not_fit_20_and_says_what_to_do(capsys):
    code = main(["plan", OASST, "--gpu-mem", "20"])
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in out
    assert "train.per_device_train_batch_size=1 train.gradient_accumulation_steps=2" in out  # same global batch
    assert "the weights alone need 22.8 GiB" in out and "FSDP over 2 GPUs" in out


def test_advice_without_checkpointing(capsys):
    code, report = plan_json(capsys, OASST, "--gpu-mem", "40", "train.gradient_checkpointing=false")
    assert code == 1 and report["peak_gib"] > 50
    assert any(a.startswith("train.gradient_checkpointing=true") and a.endswith("(fits)") for a in report["advice"])


def test_advice_turns_off_the_speed_levers_that_cost_memory(capsys):
    # Every layer kept whole is no checkpointing at all: the levers, not the weights, are what does not fit.
    code, report = plan_json(capsys, OASST, "--gpu-mem", "40", "train.skip_checkpoint_layers=32")
    assert code == 1 and report["peak_gib"] > 50
    assert any(a.startswith("train.skip_checkpoint_layers=0:") and a.endswith("(fits)") for a in report["advice"])
    assert not any("weights alone" in a for a in report["advice"]), report["advice"]


def test_bf16_experts_weigh_about_85_gib(capsys):
    code, report = plan_json(capsys, OASST, "model.quantize_experts=false")
    # 32 x 1.41 B expert weights x 2 bytes = 84.0 GiB (90 GB), plus NF4 attention and bf16 embeddings
    assert code == 1 and 84 < report["weights_gib"] < 90 and 86 < report["peak_gib"] < 90
    assert any(a.startswith("model.quantize_experts=true") and a.endswith("(fits)") for a in report["advice"])
    _, h200 = plan_json(capsys, OASST, "model.quantize_experts=false", "--gpu-mem", "141")
    assert h200["fits"]


def test_batch_eight_and_ddp(capsys):
    _, b8 = plan_json(capsys, OASST, "train.per_device_train_batch_size=8")
    _, b2 = plan_json(capsys, OASST, "--num-gpus", "8")
    assert 30 < b8["peak_gib"] < 40 and b8["fits"]
    assert any("DDP" in n and "FSDP" in n for n in b2["notes"])


def test_local_folder_and_offline_hub_fallback(capsys, tmp_path):
    from mixtral_ft.model.shapes import tiny_config

    tiny_config().save_pretrained(tmp_path)
    _, folder = plan_json(capsys, str(ROOT / "recipes" / "tiny.yaml"), f"model.name={tmp_path}")
    _, builtin = plan_json(capsys, str(ROOT / "recipes" / "tiny.yaml"))
    assert folder["peak_bytes"] == builtin["peak_bytes"]
    assert main(["plan", OASST, "model.name=someone/not-a-cached-model"]) == 2  # HF_HUB_OFFLINE (conftest)


@pytest.mark.parametrize(
    "argv",
    [
        ["--gpu-mem", "0"],
        ["--num-gpus", "0"],
        ["lora.rank=8"],
        ["--gpu-mem", "nan"],  # was "does NOT fit in nan GiB", exit 1
        ["--gpu-mem", "inf"],  # was "fits in inf GiB", exit 0
        ["train.skip_checkpoint_layers=33"],  # Mixtral has 32 layers: train refuses it, plan priced it
    ],
)
def test_bad_input_exits_2(capsys, argv):
    assert main(["plan", OASST, *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_compare_bench_sizes_a_tiny_run_at_its_own_depth():
    """bench --tiny --layers N measures N layers (it was always 2); plan must predict those N, not tiny's 2."""
    run = {"model": "tiny", "batch": 2, "seq": 256, "levers": DEFAULT_LEVERS, "dtype": "float32", "peak_gib": 1.0}
    shallow, deep = (compare_bench({**run, "layers": n}) for n in (2, 6))
    assert deep["weights_predicted_gib"] > shallow["weights_predicted_gib"]


def test_gpu_benchmark_results():
    """Plan against every GPU `mixtral-ft bench` run whose levers it models; skipped until one exists (CPU: RSS)."""
    reports = [json.loads(p.read_text()) for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))]
    runs = [
        run
        for report in reports
        if report.get("device", "cpu") != "cpu"
        for run in report.get("runs", [])
        if plan_covers(run["levers"])
    ]
    if not runs:
        pytest.skip("no GPU result in benchmarks/results: run `mixtral-ft bench --batch 2 8` on a GPU")
    for run in runs:
        check = compare_bench(run)
        assert abs(check["error"]) < TOLERANCE, f"{run['layers']} layers B{run['batch']}: {check}"


def test_plan_names_what_a_mixtral_config_lacks(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 64}')
    assert main(["plan", str(ROOT / "recipes" / "tiny.yaml"), f"model.name={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json lacks num_hidden_layers" in err[0] and "hidden_size," not in err[0]
