"""`python -m coordinator.bench.audit`: what one worker learns in each mode, measured by `coordinator audit`, and what recording
costs a worker per request.

Each mode is a real run: a coordinator and 7 worker processes on a Unix socket, the last of them (G) recording;
its recording is then audited against the run. The recording's cost is measured in isolation, on the requests
of that recording: each one decoded, computed and its answer encoded, by a fresh worker state, with and without
writing both frames to a recording, alternately, so both see the same machine.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import msgpack
import typer

from common import protocol
from common.cli import run
from common.protocol import Shard, Welcome
from common.recording import FILE, Recorder
from coordinator.audit import audit_run
from worker.compute import WorkerState

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

MODES = {  # name -> `coordinator train` options
    "default": (),
    "later-layers-workers": ("--later-layers", "workers"),
    "every-step": ("--rekey", "every-step"),
    "dropout": ("--dropout", "0.5"),
    "deep": ("--hidden", "256,128"),
}
WORKERS = "ABCDEFG"
RECORD_LIMIT_MB = 2000  # a whole recording of two epochs in every mode (300 MB a default run's 2 epochs)
RUN_TIMEOUT = 1800  # seconds for one mode's run: a hang, not a slow machine


@dataclass
class ModeRow:
    mode: str
    test_accuracy: float
    units_followed: float  # layer 1's hidden units, across re-keys
    label_from_output_error: float | None  # d2 (the last layer's error), rounds linked, with 10 known labels
    prediction_from_output_error: float | None
    label_from_d1: float  # the better of the two d1 attacks, with 10 known labels
    digit_from_pixels: float  # with 10 known labels
    digit_from_pixels_every_label: float  # the same classifier on every true label: what the pixels alone allow
    highest_control: float  # the largest control of every label attack: chance, if the scoring is sound
    recording_mb: float
    recording_cpu_ratio: float  # the recording worker's CPU over the median of the six others', in the same run
    bound: float | None = None  # with --label-privacy: the probability that randomized response kept a label
    first_stage: dict | None = None  # label attack -> its recovery of the labels randomized response drew


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_BENCH_{envvar}", help=help, **kwargs)


@app.command()
def main(
    epochs: Annotated[int, _option("EPOCHS", "Epochs of each run.", min=1)] = 2,
    train_limit: Annotated[int | None, _option("TRAIN_LIMIT", "Use only the first N training images.", min=1)] = None,
    modes: Annotated[str, _option("MODES", f"Comma list of modes: {', '.join(MODES)}.")] = ",".join(MODES),
    out: Annotated[Path, _option("OUT", "Where to write the rows as JSON.")] = Path("audit-bench.json"),
    options: Annotated[str, _option("OPTIONS", "More `coordinator train` options for every run, such as "
                                    "'--label-privacy 2'.")] = "",
):
    """Audit one worker's recording in each mode, and time what recording costs it."""
    chosen = [mode.strip() for mode in modes.split(",")]
    unknown = [mode for mode in chosen if mode not in MODES]
    if unknown:
        raise typer.BadParameter(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    rows, costs = [], None
    for mode in chosen:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as scratch:
            train_options = (*MODES[mode], *options.split())
            run_dir, recording, cpu_ratio = recorded_run(Path(scratch), train_options, epochs, train_limit)
            rows.append(mode_row(" ".join(train_options) or "defaults", run_dir, recording, cpu_ratio))
            if costs is None:
                costs = recording_cost(recording)
        typer.echo(markdown(rows[-1:]).splitlines()[-1], err=True)  # progress, one row at a time
    out.write_text(json.dumps({"modes": [asdict(row) for row in rows], "recording_cost": costs}, indent=2) + "\n")
    typer.echo(markdown(rows))
    typer.echo(f"\nrecording, per request in isolation ({costs['requests']} requests of the first mode's recording, "
               f"median of {costs['repeats']} alternating passes): {costs['plain_us']:.0f} us without, "
               f"{costs['recording_us']:.0f} us with: {costs['ratio']:.2f}x")


def recorded_run(scratch: Path, options: tuple, epochs: int, train_limit: int | None) -> tuple:
    """(run dir, recording folder, G's CPU seconds over the median of the other workers') of a finished run on 7
    worker processes, G recording: every worker answers the same requests, so the ratio is recording's cost."""
    address, run_dir = f"ipc://{scratch}/workers.sock", scratch / "run"
    limits = () if train_limit is None else ("--train-limit", str(train_limit))
    command = [sys.executable, "-m", "coordinator", "train", "--workers", str(len(WORKERS)), "--bind", address,
               "--run-dir", str(run_dir), "--epochs", str(epochs), "--quiet", *limits, *options]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for name in WORKERS:
        record = ("--record", str(scratch / "recording"), "--record-limit", str(RECORD_LIMIT_MB)) if name == WORKERS[-1] else ()
        processes.append(subprocess.Popen([sys.executable, "-m", "worker", "--connect", address, "--name", name,
                                           "--give-up-after", "60", *record],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        output, _ = processes[0].communicate(timeout=RUN_TIMEOUT)
        if processes[0].returncode != 0:
            raise RuntimeError(f"coordinator train {' '.join(options)} failed:\n{output[-2000:]}")
        cpu = [_cpu_seconds_at_exit(process) for process in processes[1:]]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    others = sorted(cpu[:-1])
    return run_dir, scratch / "recording", cpu[-1] / others[len(others) // 2]


def _cpu_seconds_at_exit(process: subprocess.Popen) -> float:
    """A child's user and system CPU, every thread, read as it is reaped."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def mode_row(mode: str, run_dir: Path, recording: Path, cpu_ratio: float) -> ModeRow:
    (result,) = audit_run(run_dir, recording)
    scores = {score.attack: score for score in result.scores}

    def known(*parts: str):
        """The best with-known score of the attacks whose name holds any of `parts`, or None."""
        found = [score.with_known for name, score in scores.items() if any(part in name for part in parts)]
        return max(found) if found else None

    pixels = next(score for name, score in scores.items() if name.startswith("digit from its own pixels ("))
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    label_attacks = [score for score in result.scores if score.with_known is not None]
    private = {score.attack: score.first_stage for score in label_attacks if score.bound is not None}
    return ModeRow(
        mode, history[-1]["test_accuracy"], scores_starting(scores, "tracking: layer 1's"),
        known("rounds linked"), known("prediction read from"), known("label from d1"),
        pixels.with_known, scores_starting(scores, "digit from its own pixels, every true label"),
        max(score.control for score in label_attacks), (recording / FILE).stat().st_size / 1e6, cpu_ratio,
        label_attacks[0].bound, private or None,
    )


def scores_starting(scores: dict, prefix: str) -> float:
    return next(score.recovered for name, score in scores.items() if name.startswith(prefix))


def recording_cost(recording: Path, repeats: int = 5) -> dict:
    """Microseconds per compute request (decode, compute, encode) without and with recording both frames."""
    unpacker = msgpack.Unpacker(open(recording / FILE, "rb"), raw=False, max_buffer_size=2**31 - 1)
    frames = [record["frame"] for record in unpacker if record.get("direction") == "received"]
    messages = [protocol.decode(frame) for frame in frames]
    welcome = next(message for message in messages if isinstance(message, Welcome))
    shards = [message for message in messages if isinstance(message, Shard)]
    computed = set(WorkerState("float32", 1.0).handlers) - {Shard}
    requests = [frame for frame, message in zip(frames, messages) if type(message) in computed]
    timings = {"plain": [], "recording": []}
    for _ in range(repeats):
        for kind in timings:
            state = WorkerState(welcome.dtype, welcome.input_divisor, welcome.wire)
            for shard in shards:
                state.load_shard(shard)
            with tempfile.TemporaryDirectory(prefix="recording-cost-") as folder:
                recorder = Recorder(Path(folder), 2**40, "G", "bench") if kind == "recording" else None
                started = time.perf_counter()
                for frame in requests:
                    answer = protocol.encode(state.compute(protocol.decode(frame)))
                    if recorder is not None:
                        recorder.record("received", frame)
                        recorder.record("sent", answer)
                if recorder is not None:
                    recorder.close()  # its last writes reach the file inside the timing
                timings[kind].append((time.perf_counter() - started) / len(requests) * 1e6)
    plain, recording_us = (sorted(values)[len(values) // 2] for values in timings.values())
    return {"requests": len(requests), "repeats": repeats, "plain_us": plain, "recording_us": recording_us,
            "ratio": recording_us / plain}


def markdown(rows: list) -> str:
    def percent(value):
        return "-" if value is None else f"{value:.0%}"

    lines = ["| mode | test accuracy | hidden units followed | label from d2 | prediction from d2 | label from d1 | "
             "digit from its pixels (every label) | highest control | recording MB | recording worker's CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.mode} | {row.test_accuracy:.1%} | {percent(row.units_followed)} | "
                     f"{percent(row.label_from_output_error)} | {percent(row.prediction_from_output_error)} | "
                     f"{percent(row.label_from_d1)} | {percent(row.digit_from_pixels)} "
                     f"({percent(row.digit_from_pixels_every_label)}) | {percent(row.highest_control)} | "
                     f"{row.recording_mb:.0f} | {row.recording_cpu_ratio:.2f}x |")
    private = [row for row in rows if row.bound is not None]
    if private:
        attacks = list(private[0].first_stage)
        lines += ["", "Of the labels randomized response drew, against its bound:", "",
                  "| mode | bound | " + " | ".join(attacks) + " |", "|---|---:|" + "---:|" * len(attacks)]
        lines += [f"| {row.mode} | {row.bound:.1%} | " + " | ".join(percent(row.first_stage.get(attack))
                                                             for attack in attacks) + " |" for row in private]
    return "\n".join(lines)


if __name__ == "__main__":
    run(app, "coordinator.bench.audit")
