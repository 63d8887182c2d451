"""`python -m bench` on a tiny configuration: it runs, and its JSON holds every key with sane values."""

import json

from tests.conftest import run_cli

KEYS = {"mode", "workers", "batch_size", "epoch_seconds", "ratio_to_floor", "rounds_per_step", "bytes_per_epoch",
        "min_bytes_per_epoch", "coordinator_peak_rss_mb", "worker_peak_rss_mb"}
# first layer (with the last step's gradient), second forward, second backward; or the first layer alone
ROUNDS_PER_STEP = {"workers": 3, "coordinator": 1}


def test_bench_writes_json_for_floor_and_cluster(tmp_path):
    out = tmp_path / "results.json"
    done = run_cli("bench", "--workers", "2", "--batch-sizes", "64", "--epochs", "1", "--repeats", "1",
                   "--train-limit", "640", "--second-layer", "workers,coordinator", "--verify", "off,all", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    placements = [(r["mode"], r["second_layer"], r["verify"], r["workers"]) for r in rows]
    assert placements == [("local", "local", "-", 0), ("cluster", "workers", "off", 2), ("cluster", "workers", "all", 2),
                          ("cluster", "coordinator", "off", 2), ("cluster", "coordinator", "all", 2)]
    for row in rows:
        assert KEYS <= set(row) and row["batch_size"] == 64
        assert row["epoch_seconds"] > 0 and row["coordinator_peak_rss_mb"] > 0
    for row in rows[1:]:
        assert row["bytes_per_epoch"] >= row["min_bytes_per_epoch"] > 0
        assert row["bytes_per_epoch"] <= 1.05 * row["min_bytes_per_epoch"]
        assert row["rounds_per_step"] == ROUNDS_PER_STEP[row["second_layer"]]
        assert row["worker_peak_rss_mb"] > 0
    assert "| cluster | coordinator | all | 2 | 64 |" in done.stdout
