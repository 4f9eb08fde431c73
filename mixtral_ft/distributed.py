"""One GPU or many: `mixtral-ft train RECIPE --num-processes N [--accelerate-config FILE]`.

We add no launcher of our own. With N > 1 or a config file, the job goes to `accelerate launch` (torchrun,
FSDP or DeepSpeed underneath) exactly as TRL's CLI does it: `launch_command_parser()` parses the launch
flags plus `-m mixtral_ft.train RECIPE key=value ...`, and `launch_command(args)` runs it. Every process
then loads the recipe and the model itself; `train/run.py` lets rank 0 alone print and write. With N = 1 and
no config, training stays in this process. `accelerate launch -m mixtral_ft.train ...` and
`torchrun --nproc-per-node N -m mixtral_ft.train ...` reach the same code without this module's launcher.

On a machine without CUDA, N > 1 runs as CPU DDP over gloo: accelerate's `--cpu` launches extra
processes only through MPI (without `mpirun` it silently starts one), so we take its torchrun path and set
`ACCELERATE_USE_CPU=true`. FSDP and DeepSpeed need GPUs: accelerate enables FSDP only for GPU-like devices
and quietly runs DDP instead on CPU, so such configs are refused there rather than mislabelled.

The helpers at the bottom are what `train/run.py` needs in every process: who is rank 0 and how to make the
NF4 model safe to wrap (see `prepare_for_distributed`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mixtral_ft.common import fsdp_enabled, under_launcher, world_size
from mixtral_ft.errors import UserError

# distributed_type values that need GPUs (accelerate silently degrades them to DDP on CPU).
GPU_ONLY = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}


def needs_launcher(num_processes: int | None, config_file: str | None) -> bool:
    """True when the job must go through accelerate; checks the flags on the way."""
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {num_processes}: pass the number of GPUs (processes)")
    wants = config_file is not None or (num_processes or 1) > 1
    if wants and under_launcher():  # we are a worker already: launching again would nest jobs
        raise UserError(
            "--num-processes / --accelerate-config are for the launching command: under "
            "accelerate launch or torchrun, pass only the recipe and overrides"
        )
    if config_file is not None and not Path(config_file).is_file():
        raise UserError(
            f"--accelerate-config '{config_file}' not found: pass a file such as accelerate_configs/multi_gpu.yaml"
        )
    return wants


def read_config(config_file: str | None) -> dict:
    """The accelerate config as accelerate itself reads it (its dataclass), as a plain dict."""
    if config_file is None:
        return {}
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        return load_config_from_file(config_file).to_dict()
    except Exception as exc:  # YAML errors, unknown keys: accelerate's message is the useful part
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--accelerate-config '{config_file}' is not a valid accelerate config ({first}): "
            "start from one in accelerate_configs/"
        ) from None


def _kind(config: dict) -> str:
    return str(config.get("distributed_type", "NO")).upper().removeprefix("DISTRIBUTEDTYPE.")


def shards_weights(config_file: str | None) -> bool:
    """Whether the accelerate config splits the weights over the GPUs (FSDP, DeepSpeed), unlike DDP's copies."""
    return _kind(read_config(config_file)) in GPU_ONLY


def launch_args(
    num_processes: int | None, config_file: str | None, *, cuda: bool | None = None, env: dict | None = None
) -> list[str]:
    """`accelerate launch` flags for this machine; also sets what the workers must inherit in `env`."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    env = os.environ if env is None else env
    config = read_config(config_file)
    kind = _kind(config)
    n = num_processes if num_processes is not None else max(int(config.get("num_processes", 1)), 1)
    machines = int(config.get("num_machines", 1) or 1)
    args = ["--config_file", str(config_file)] if config_file else []
    args += ["--num_processes", str(n)]
    if not config_file:
        # Said explicitly so accelerate does not warn about defaults; the recipe decides bf16 anyway.
        args += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if not cuda:
        if kind in GPU_ONLY:
            raise UserError(
                f"--accelerate-config '{config_file}' uses {kind}, which needs CUDA GPUs (on CPU "
                "accelerate would quietly run DDP instead): drop the config to run CPU DDP"
            )
        if config.get("use_cpu") and n > 1:
            raise UserError(
                f"--accelerate-config '{config_file}' sets use_cpu: true, which starts extra processes "
                "only through MPI: set use_cpu: false (mixtral-ft runs CPU jobs over gloo)"
            )
        env["ACCELERATE_USE_CPU"] = "true"  # the workers (and the HF Trainer in them) pick CPU + gloo
    elif machines == 1 and n > torch.cuda.device_count():
        raise UserError(
            f"--num-processes {n} but this machine has {torch.cuda.device_count()} GPU(s): use one process per GPU"
        )
    if n > 1 and kind in ("NO", "MULTI_CPU"):
        args.append("--multi_gpu")  # accelerate's name for its torchrun launcher; on CPU it runs gloo
    if not config.get("main_process_port"):
        # accelerate ignores MASTER_PORT; honour it, else let one node pick a free port (0).
        port = env.get("MASTER_PORT") or ("0" if machines == 1 else None)
        if port:
            args += ["--main_process_port", str(port)]
    return args


def launch(recipe: str, overrides: list[str], num_processes: int | None, config_file: str | None) -> int:
    """Run `python -m mixtral_ft.train RECIPE overrides...` under accelerate; returns the exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    flags = launch_args(num_processes, config_file)
    args = launch_command_parser().parse_args([*flags, "-m", "mixtral_ft.train", recipe, *overrides])
    if os.environ.get("MIXTRAL_FT_VERBOSE", "") in ("", "0"):
        # torch's import sets its loggers to WARNING after quiet.py ran; the elastic agent would log each worker's
        # SIGTERM and exit code around a worker's own one-line error. A signal death is said below instead.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as exc:  # the worker already printed its own error
        code = next((f.exitcode for f in exc.failures.values() if f.exitcode), 1)
        if code < 0:  # killed by a signal (the kernel's OOM killer sends SIGKILL): nothing printed it
            print(f"error: a training process was killed by {signal.Signals(-code).name}", file=sys.stderr)
            return 128 - code
        return code
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


# --- inside each process ---------------------------------------------------------------------------


@contextmanager
def local_main_first():
    """Under a launcher, local rank 0 runs the block (the data: tokenizing and caching it) while the machine's other
    ranks wait, then they run it and read its cache instead of tokenizing the same rows all at once.

    accelerate's own way (PartialState.local_main_process_first); it starts the process group a little before the
    Trainer would, with the Trainer's settings (its default ddp_timeout, gloo under ACCELERATE_USE_CPU), which
    the Trainer's TrainingArguments then reuses."""
    if not under_launcher() or world_size() == 1:
        yield
        return
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    with PartialState(cpu=cpu, timeout=timedelta(seconds=1800)).local_main_process_first():
        yield


def prepare_for_distributed(model: nn.Module) -> nn.Module:
    """Make the PEFT-wrapped NF4 model safe to wrap in DDP or FSDP; harmless in a single process.

    DDP broadcasts every parameter and buffer from rank 0 when it wraps the model. For our frozen base
    that is ~23 GiB of traffic that changes nothing (every rank loaded the same checkpoint the same
    way), and for a 4-bit weight it would be wrong if ranks ever differed: only the packed bytes travel,
    not the `quant_state` statistics that give them meaning. So DDP is told to ignore every frozen
    parameter; the trainable LoRA weights are still broadcast and all-reduced.
    """
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # Buffers (rotary frequencies) are computed identically everywhere; DDP would re-broadcast them each step.
    model._ddp_params_and_buffers_to_ignore = frozen + [n for n, _ in model.named_buffers()]
    if fsdp_enabled():
        prepare_for_fsdp(model)
    return model


def prepare_for_fsdp(model: nn.Module) -> None:
    """Let FSDP shard the NF4 weights (experts included) without losing what makes them 4-bit.

    FSDP flattens each decoder layer's weights into one flat tensor and hands modules back views of it,
    so a weight stops being a `Params4bit` and its `quant_state` (absmax, code, shape) is gone. We keep
    the states on the modules and put them back: attention through bitsandbytes' own recovery hook,
    which reads `Linear4bit.quant_state` (our loader builds the Params4bit outside the module, so it is
    unset), the experts through a pre-forward / pre-state_dict hook. Flattening also needs one dtype
    per layer: the packed bytes are stored as bfloat16 under FSDP (`quant.quant_storage_dtype`), so the
    model must compute in bfloat16 too.
    """
    import bitsandbytes as bnb

    from mixtral_ft.model.quant import NF4Experts, quant_storage_dtype

    storage = quant_storage_dtype()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not storage.is_floating_point or base.dtype != storage:
        raise UserError(
            f"FSDP needs the 4-bit weights stored as the compute dtype (storage {storage}, compute "
            f"{base.dtype}): set model.compute_dtype=bfloat16 and leave MIXTRAL_FT_QUANT_STORAGE unset"
        )
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.quant_state = module.weight.quant_state
        elif isinstance(module, NF4Experts):
            module._nf4_quant_states = {n: getattr(module, n).quant_state for n in ("gate_up_proj", "down_proj")}
            module.register_forward_pre_hook(_reattach_quant_states)
            module.register_state_dict_pre_hook(_reattach_quant_states)
    # transformers' Trainer reads the storage dtype from an HF quantizer, which our loader does not use
    # (update_fsdp_plugin_peft would fail on the missing attribute); this is all it reads.
    if getattr(base, "hf_quantizer", None) is None:
        config = SimpleNamespace(quant_method="bitsandbytes", bnb_4bit_quant_storage=storage)
        base.hf_quantizer = SimpleNamespace(quantization_config=config, is_trainable=True, is_qat_trainable=False)


def _reattach_quant_states(module: nn.Module, *_args) -> None:
    for name, state in module._nf4_quant_states.items():
        weight = getattr(module, name)  # a DTensor shard at rest, a view of the gathered flat tensor in use
        if getattr(weight, "quant_state", None) is None:
            weight.quant_state = state
