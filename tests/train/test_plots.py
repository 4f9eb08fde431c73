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


def test_a_long_run_s_loss_plot_shows_the_trend_through_the_noise(tmp_path):
    import random
    import statistics

    from mixtral_ft.train.plots import loss_lines, plot_loss_curve

    rng = random.Random(0)
    history = [{"step": s, "loss": 2.0 - s / 20_000 + rng.uniform(-0.5, 0.5)} for s in range(1, 10_001)]
    history += [{"step": s, "eval_loss": 1.8} for s in range(100, 10_001, 100)]
    raw, smooth, evals = loss_lines(history)
    assert raw[2]["alpha"] < 1 and "smoothed" in smooth[2]["label"]
    # the smoothed line follows the trend (2.0 -> 1.5) with a small fraction of the per-step noise
    residual = [y - (2.0 - s / 20_000) for s, y in zip(smooth[0][1000:], smooth[1][1000:])]
    assert statistics.pstdev(residual) < 0.1 * statistics.pstdev([y for y in raw[1]])
    assert evals[2]["marker"] is None  # 100 eval points: a line, not a row of overlapping dots
    assert plot_loss_curve(history, tmp_path / "loss.png").stat().st_size > 0
    short = [{"step": s, "loss": 1.0} for s in range(1, 21)] + [{"step": 10, "eval_loss": 1.0}]
    assert [line[2]["label"] for line in loss_lines(short)] == ["train loss", "eval loss"]
