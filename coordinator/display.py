"""How `coordinator train` shows a run: a live bar and worker table on a terminal, one plain line per
epoch otherwise (logs, CI, `docker logs`, and the tests read those), or JSON lines for machines."""

import dataclasses
import json
import logging
import sys
import time

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

LIVE_REFRESHES_PER_SECOND = 4  # the worker table changes every batch; faster than this is only flicker
MEGABYTE = 1e6
UNBOUNDED_WIDTH = 500  # characters: wider than any table here, so off a terminal nothing wraps
WORKER_NAME_WIDTH = 12  # characters of a worker's name in the table: with the eight numbers, 80 in all


def epoch_line(report, epochs: int) -> str:
    test = "-" if report.test_accuracy is None else f"{report.test_accuracy:.2%}"
    return (
        f"epoch {report.epoch}/{epochs}  cost {report.cost:.5f}  train {report.train_accuracy:.2%}"
        f"  test {test}  {report.seconds:.1f} s"
    )


def workers_table(workers) -> Table:
    """One row per WorkerStatus: what the worker holds and how it has answered, in 80 columns."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)  # columns two spaces apart
    table.add_column("worker", no_wrap=True, max_width=WORKER_NAME_WIDTH)  # a long name is cut, not the numbers
    for header in ("slot", "pixels", "hidden", "answers", "rtt ms", "busy s", "sent MB", "recv MB"):
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for worker in workers:
        round_trip = "-" if worker.last_round_trip is None else f"{worker.last_round_trip * 1000:.1f}"
        table.add_row(
            worker.name, "standby" if worker.slot is None else str(worker.slot), str(worker.columns),
            str(worker.hidden_units), str(worker.answered), round_trip, f"{worker.busy_seconds:.1f}",
            f"{worker.sent_bytes / MEGABYTE:.1f}", f"{worker.received_bytes / MEGABYTE:.1f}",
        )
    return table


def print_workers(workers) -> None:
    """The workers table on stdout; a pipe or file gets it whole rather than squeezed into 80 columns."""
    Console(width=None if sys.stdout.isatty() else UNBOUNDED_WIDTH).print(workers_table(workers))


class PlainOutput:
    """Log lines on stderr, and every `report_every`th epoch as one line on stdout."""

    def __init__(self, epochs: int, report_every: int):
        self.epochs = epochs
        self.report_every = report_every

    def __enter__(self):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return self

    def __exit__(self, *exception) -> None:
        pass

    def epoch(self, report) -> None:
        if report.epoch % self.report_every == 0 or report.epoch == self.epochs:
            typer.echo(epoch_line(report, self.epochs))

    def status(self, status) -> None:
        pass


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "event": "log", "time": record.created, "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        })


class JsonOutput(PlainOutput):
    """One JSON object per line on stdout: {"event": "epoch", ...} for every epoch, {"event": "log", ...}."""

    def __enter__(self):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonLogFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        return self

    def epoch(self, report) -> None:
        typer.echo(json.dumps({"event": "epoch", "time": time.time(), **dataclasses.asdict(report)}))


class SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} samples/s")


class LiveOutput(PlainOutput):
    """On a terminal: the epoch's progress bar and the worker table, redrawn in place; epoch lines above."""

    def __init__(self, epochs: int, report_every: int):
        super().__init__(epochs, report_every)
        self.console = Console()
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            TextColumn("step {task.fields[step]}/{task.fields[steps]}"), SpeedColumn(), TimeRemainingColumn(),
            console=self.console,
        )
        self.task = None
        self.latest = None
        self.live = Live(
            console=self.console, get_renderable=self._render, refresh_per_second=LIVE_REFRESHES_PER_SECOND,
        )

    def __enter__(self):
        handler = RichHandler(console=self.console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the handler shows the time and level itself
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        self.live.start()
        return self

    def __exit__(self, *exception) -> None:
        self.live.stop()

    def epoch(self, report) -> None:
        if report.epoch % self.report_every == 0 or report.epoch == self.epochs:
            self.console.print(epoch_line(report, self.epochs), highlight=False)

    def status(self, status) -> None:
        fields = dict(epoch=status.epoch, epochs=status.epochs, step=status.step, steps=status.steps_per_epoch)
        if self.task is None:
            self.task = self.progress.add_task("", total=status.samples_per_epoch, **fields)
        elif self.latest.epoch != status.epoch:
            self.progress.reset(self.task, total=status.samples_per_epoch, **fields)
        self.progress.update(self.task, completed=status.samples, **fields)
        self.latest = status

    def _render(self):
        if self.latest is None or not self.latest.workers:
            return self.progress
        return Group(self.progress, workers_table(self.latest.workers))


def output_for(quiet: bool, log_format: str, epochs: int, report_every: int) -> PlainOutput:
    """JSON lines if asked; the live display only on a terminal and without --quiet; plain lines otherwise."""
    if log_format == "json":
        return JsonOutput(epochs, report_every)
    if quiet or not sys.stdout.isatty():
        return PlainOutput(epochs, report_every)
    return LiveOutput(epochs, report_every)


def print_audit(result) -> None:
    """An audit's scores as a table, titled with who was attacked and how the run was set."""
    from coordinator.audit import table

    mode = ", ".join(f"{name} {value}" for name, value in result.mode.items())
    title = f"worker {result.worker} (slot {result.slot}); {mode}; {result.known_labels} known labels"
    audit_table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    headings, rows = table(result)
    for heading in headings:
        audit_table.add_column(heading, justify="left" if heading in ("attack", "how") else "right")
    for row in rows:
        audit_table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else UNBOUNDED_WIDTH).print(audit_table)
