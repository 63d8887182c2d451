"""`python -m coordinator.bench.links`: its pure parts (rates, epoch lines, the summary), and one short run behind a slow link."""

import json
import os
import shutil
import subprocess

import pytest
import typer
from typer.testing import CliRunner

from coordinator.bench.links import EpochSample, app, epoch_sample, markdown, median_row, rates_of, summary
from common.errors import InputError
from tests.conftest import run_cli


def test_rates_are_checked_as_tc_writes_them():
    assert rates_of("100mbit, 1Gbit") == ["100mbit", "1gbit"]
    with pytest.raises(typer.BadParameter, match="100mb"):
        rates_of("100mb,1gbit")


def test_only_epoch_lines_are_samples():
    line = json.dumps({"event": "epoch", "epoch": 1, "seconds": 2.5, "test_accuracy": 0.9})
    assert epoch_sample(line, 1000, 2.75) == EpochSample(2.5, 1000, 0.9, 2.75)
    assert epoch_sample(json.dumps({"event": "log", "message": "x"}), 5, 1.0) is None
    assert epoch_sample("not json", 5, 1.0) is None


def test_the_summary_skips_the_first_epoch_and_scales_to_sixty_thousand():
    """Epoch seconds are the spans between epoch lines, which the bytes are counted over; time to target is the
    coordinator's own training time."""
    samples = [EpochSample(9.0, 900, 0.95, 12.0), EpochSample(2.0, 200, 0.976, 2.5), EpochSample(4.0, 400, 0.98, 4.5)]
    figures = summary(samples, train_images=10_000)
    assert figures["epoch_seconds"] == pytest.approx(3.5 * 6)  # median of 2.5 and 4.5, times 60,000 / 10,000
    assert figures["bytes_per_epoch"] == pytest.approx(300 * 6)
    assert (figures["epochs_to_target"], figures["seconds_to_target"]) == (2, 11.0)
    assert summary(samples[:1] + samples[:1], 60_000)["epochs_to_target"] is None


def test_rows_are_medians_and_print_as_markdown():
    figures = [summary([EpochSample(1.0, 10, 0.5, 1.0), EpochSample(s, 10 * s, 0.5, s)], 60_000) for s in (1.0, 3.0, 2.0)]
    row = median_row("100mbit", 128, "--wire float16", 7, figures)
    assert row.epoch_seconds == 2.0 and row.bytes_per_epoch == 20
    assert "| 100mbit | 128 | --wire float16 | 7 | 2.0 |" in markdown([row])


@pytest.mark.slow
def test_a_short_run_behind_a_slow_link(tmp_path):
    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("namespaces and tc need root and iproute2")
    out = tmp_path / "links.json"
    namespaces_before = _namespaces()
    done = run_cli("coordinator.bench.links", "--rates", "20mbit", "--workers", "2", "--batch-sizes", "100", "--epochs", "2",
                   "--train-limit", "1000", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert row["rate"] == "20mbit" and row["workers"] == 2
    # 20 Mbit/s both ways is 5 MB/s at most: no span between epoch lines can have moved its bytes faster than that.
    assert row["bytes_per_epoch"] / row["epoch_seconds"] <= 2 * 20e6 / 8
    assert row["bytes_per_epoch"] > 1e6
    assert _namespaces() == namespaces_before  # all torn down


def _namespaces() -> set:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())


def test_without_root_it_says_so_and_exits_2(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(app, ["--rates", "1mbit"])
    assert isinstance(result.exception, InputError) and result.exception.exit_code == 2
    assert "root" in str(result.exception) and "\n" not in str(result.exception)
