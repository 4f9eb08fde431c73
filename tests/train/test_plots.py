"""End-of-run plots on what a long run leaves: a router_stats.jsonl of thousands of Mixtral-sized records."""

import json
import tracemalloc

from mixtral_ft.train.plots import first_and_last, plot_router_heatmap

LAYERS, EXPERTS = 32, 8  # Mixtral-8x7B: a record is about 4 KB


def write_stats(path, steps):
    with path.open("w") as f:
        for step in steps:
            load = [[round((i + j + step) % 7 / 28, 6) for j in range(EXPERTS)] for i in range(LAYERS)]
            f.write(json.dumps({"step": step, "expert_fraction": load, "entropy": [2.0] * LAYERS}) + "\n")
    return path


def test_heatmap_reads_two_records_of_a_long_run_not_all(tmp_path):
    # 2,000 records (20k steps at router_stats_steps 10): parsing them all peaked at ~29 MB; the first and last
    # record alone are a few kilobytes whatever the run's length.
    stats = write_stats(tmp_path / "router_stats.jsonl", [1, *range(10, 20_000, 10)])
    assert stats.stat().st_size > 5_000_000
    tracemalloc.start()
    try:
        first, last = first_and_last(stats)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (first["step"], last["step"]) == (1, 19_990)
    assert peak < 1_000_000, f"{peak / 1e6:.1f} MB traced to find the first and last of 2,000 records"
    assert plot_router_heatmap(stats, tmp_path / "heatmap.png").stat().st_size > 0


def test_one_record_is_both_ends_and_an_empty_file_none(tmp_path):
    stats = write_stats(tmp_path / "one.jsonl", [1])
    first, last = first_and_last(stats)
    assert first is last and first["step"] == 1
    (tmp_path / "empty.jsonl").write_text("\n")
    assert first_and_last(tmp_path / "empty.jsonl") is None
    assert plot_router_heatmap(tmp_path / "empty.jsonl", tmp_path / "x.png") is None
