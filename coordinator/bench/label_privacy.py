"""`python -m coordinator.bench.label_privacy`: test accuracy under label privacy, eps by stages, in one process.

Each cell is a `coordinator train --local` run with the defaults and `--label-privacy EPS --label-privacy-stages
S`; the table gives its test accuracy after the last epoch, the share of its training labels that are the
true ones (all of them, then the first stage's, which plain randomized response drew), and the bound: the
probability that randomized response keeps a label. The attacks on these labels are measured by `coordinator
audit` (see `python -m coordinator.bench.audit --label-privacy`).
"""

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from common.cli import run
from common.data import load_dataset
from common.label_privacy import keep_probability
from coordinator.labels import FIRST

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass
class PrivacyRow:
    eps: float | None
    stages: int
    test_accuracy: float
    labels_true: float  # of every training label trained on
    first_stage_true: float  # of those plain randomized response drew
    bound: float | None


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_BENCH_{envvar}", help=help, **kwargs)


@app.command()
def main(
    eps: Annotated[str, _option("EPS", "Comma list of eps values; `off` trains on the true labels.")] = "0.5,1,2,4,8,off",
    stages: Annotated[str, _option("STAGES", "Comma list of stage counts.")] = "1,2",
    epochs: Annotated[int, _option("EPOCHS", "Epochs of each run.", min=2)] = 20,
    out: Annotated[Path, _option("OUT", "Where to write the rows as JSON.")] = Path("label-privacy-bench.json"),
    options: Annotated[str, _option("OPTIONS", "More `coordinator train` options for every run.")] = "",
):
    """Train with label privacy at each eps and stage count; print accuracy and label figures as a table."""
    true_labels = load_dataset(None).train_labels
    rows = []
    for value in eps.split(","):
        for count in ([1] if value == "off" else [int(part) for part in stages.split(",")]):
            rows.append(_measured(None if value == "off" else float(value), count, epochs, options, true_labels))
            typer.echo(markdown(rows[-1:]).splitlines()[-1], err=True)
    out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    typer.echo(markdown(rows))


def _measured(eps: float | None, stages: int, epochs: int, options: str, true_labels: np.ndarray) -> PrivacyRow:
    with tempfile.TemporaryDirectory(prefix="label-privacy-") as scratch:
        run_dir = Path(scratch) / "run"
        privacy = [] if eps is None else ["--label-privacy", str(eps), "--label-privacy-stages", str(stages)]
        done = subprocess.run([sys.executable, "-m", "coordinator", "train", "--local", "--quiet", "--epochs",
                               str(epochs), "--run-dir", str(run_dir), *privacy, *options.split()],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"coordinator train {' '.join(privacy)} failed: {done.stderr[-2000:]}")
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        if eps is None:
            return PrivacyRow(None, stages, history[-1]["test_accuracy"], 1.0, 1.0, None)
        with np.load(run_dir / "labels.npz") as saved:
            trained, stage = saved["trained_labels"], saved["label_stage"]
    right = trained == true_labels
    return PrivacyRow(eps, stages, history[-1]["test_accuracy"], float(right.mean()),
                      float(right[stage == FIRST].mean()), keep_probability(eps, 10))


def markdown(rows: list) -> str:
    lines = ["| eps | stages | test accuracy | training labels true | first stage's true | bound (RR keeps) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        bound = "-" if row.bound is None else f"{row.bound:.1%}"
        lines.append(f"| {'off' if row.eps is None else f'{row.eps:g}'} | {row.stages} | {row.test_accuracy:.2%} | "
                     f"{row.labels_true:.1%} | {row.first_stage_true:.1%} | {bound} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(app, "coordinator.bench.label_privacy")
