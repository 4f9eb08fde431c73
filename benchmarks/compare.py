"""Our NF4 model and its peers, measured in one invocation through the same harness.

    python benchmarks/compare.py --layers 32 --batch 2 8 --peer-v4-site DIR --out-dir DIR   # on a GPU
    python benchmarks/compare.py --device cpu --tiny --seq 64 --peer-v4-site DIR            # CPU smoke run

Every option of `mixtral-ft bench` applies (ours is measured by `mixtral_ft.bench.throughput`'s own
functions), plus the peers' (peers.py): `--peer-v4-site DIR`, a folder holding transformers 4.57 for the
legacy Linear4bit peer (skipped without it), and `--peer-v5-layers N`, the reduced depth of stock
transformers 5 `load_in_4bit` (0: skip). One file per run, `<out-dir>/<date>-<device>[-<tag>].json`:
bench's keys, plus `peers.v4` / `peers.v5`, one entry per batch, each with our speed-up over it.

This script lives outside the package on purpose: it imports mixtral_ft, never the other way round.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import peers  # beside this script: its folder is the first on the path
import torch

from mixtral_ft.bench import args as bench_args
from mixtral_ft.bench import throughput as bench
from mixtral_ft.bench.results import recording
from mixtral_ft.errors import UserError


def parse_args(argv: list[str] | None):
    parser = bench_args.build_parser(prog="python benchmarks/compare.py", description=__doc__.splitlines()[0])
    peer = parser.add_argument_group("peers (measured in the same run)")
    peer.add_argument(
        "--peer-v4-site",
        type=Path,
        metavar="DIR",
        help="folder holding transformers 4.57 (pip install --no-deps --target DIR transformers==4.57.6 "
        "huggingface_hub==0.36.2 tokenizers==0.22.1)",
    )
    peer.add_argument(
        "--peer-v5-layers",
        type=int,
        default=2,
        metavar="N",
        help="depth for stock transformers 5 load_in_4bit, whose experts stay bf16 (0: skip)",
    )
    args = bench_args.check_args(parser.parse_args(argv))
    if args.peer_v5_layers < 0:
        raise UserError("--peer-v5-layers must be 0 (skip the stock v5 peer) or more")
    if args.peer_v4_site and not (args.peer_v4_site / "transformers").is_dir():
        raise UserError(
            f"--peer-v4-site {args.peer_v4_site} holds no transformers package: create it with "
            "pip install --no-deps --target DIR transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.1"
        )
    return args


def run_peers(args, config, batch: int, device: torch.device, dtype: torch.dtype, ours: dict, v5_folder: Path) -> dict:
    """Each peer's figures at this batch, with our speed-up over it (at the v5 peer's reduced depth, ours again)."""
    found = {}
    common = {
        "batch": batch,
        "seq": args.seq,
        "steps_": args.steps,
        "warmup": args.warmup,
        "device": device,
        "dtype": dtype,
    }
    if args.peer_v4_site:
        v4 = peers.run_v4(args.peer_v4_site, config, **common)
        if "tok_per_s" in v4:
            v4["our_speedup"] = round(ours["tok_per_s"] / v4["tok_per_s"], 3)
        found["v4"] = v4
    else:
        found["v4"] = {
            "name": peers.V4_NAME,
            "skipped": "no --peer-v4-site (a pip --target folder of transformers 4.57)",
        }
    if args.peer_v5_layers:
        small = bench_args.model_config(args.tiny, min(args.peer_v5_layers, config.num_hidden_layers))
        v5 = peers.run_stock_v5(small, full_depth=config.num_hidden_layers, folder=v5_folder, **common)
        bench.free_memory(device)
        ours_small = bench.run_ours(args, batch, device, layers=small.num_hidden_layers)
        v5 |= {
            "ours_at_same_depth": {k: ours_small[k] for k in ("tok_per_s", "peak_gib", "weights_gib")},
            "our_speedup": round(ours_small["tok_per_s"] / v5["tok_per_s"], 3),
        }
        found["v5"] = v5
    bench.free_memory(device)
    return found


def summary(ours: dict, found: dict) -> str:
    line = bench.summary(ours)
    for figures in (history[-1] for history in found.values()):
        if "our_speedup" in figures:
            line += (
                f" | {figures['name']} at {figures['layers']} layers: {figures['tok_per_s']:,.0f} tok/s, "
                f"peak {figures['peak_gib']:.2f} GiB, ours {figures['our_speedup']:.2f}x"
            )
        else:
            line += f" | {figures['name']}: {figures.get('error') or figures.get('skipped')}"
    return line


def compare(argv: list[str] | None) -> int:
    from mixtral_ft.model.device import resolve_compute_dtype

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_compute_dtype("auto", device)
    config = bench_args.model_config(args.tiny, args.layers)
    report = bench.new_report(args, device) | {"peers": {}}
    path = bench.open_result(args, report)
    # the file is rewritten after each batch; a stop says why in it (complete: false) and keeps what was measured
    with tempfile.TemporaryDirectory(prefix="mixtral-ft-v5-peer-") as folder, recording(report, path) as progress:
        for batch in args.batch:  # ours, then the peers
            progress.batch = batch
            ours = bench.run_ours(args, batch, device, path)
            bench.record(report, ours)  # kept even if a peer then fails: the file is written below or on the stop
            # the stock peer's random checkpoint is written into `folder` once, then reused for every batch
            for name, figures in run_peers(args, config, batch, device, dtype, ours, Path(folder)).items():
                report["peers"].setdefault(name, []).append(figures)
            print(summary(ours, report["peers"]), flush=True)
            bench.write_report(report, path)
    print(f"wrote {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # upstream deprecations, not the user's to fix
    try:
        return compare(argv)
    except UserError as exc:  # bad options: one line, exit 2, as the mixtral-ft CLI does
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:  # said in one line, and in the file, by recording(): no traceback
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
