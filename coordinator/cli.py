"""`coordinator`: train the network on workers (or locally), watch a run, evaluate and report on it."""

import dataclasses
import enum
import errno
import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer

from common import cli, settings
from common.cli import tcp_port_checked
from common.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError, UserError
from coordinator.bench.cli import main as bench_main
from coordinator.checkpoint import Interrupted
from coordinator.config import PRESETS, SETTING_OPTIONS
from coordinator.files import remove_temporaries
from coordinator.rundir import LOG_FILE, default_run_dir, discard_if_unstarted, logging_into, restore_model
from coordinator.verify import Verify

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

OPEN_BIND = "tcp://*:5555"  # workers on other machines connect to port 5555 of any of this host's addresses
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}  # the disk's, not ours


class Rebalance(str, enum.Enum):
    epoch = "epoch"
    never = "never"


class LaterLayers(str, enum.Enum):
    workers = "workers"
    coordinator = "coordinator"


class LogFormat(str, enum.Enum):
    plain = "plain"
    json = "json"


def console_script() -> None:
    cli.run(app, "coordinator")


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_{envvar}", help=help, **kwargs)


SettingOverrides = dict  # TrainingConfig field -> the value its option gave, for the options given


def _with_setting_options(command):
    """The command with one option per training setting (coordinator.config.SETTING_OPTIONS) where its `overrides`
    parameter stands; it gets the settings given, as TrainingConfig field -> value, in `overrides`."""
    own = inspect.signature(command)
    setting_parameters = [
        inspect.Parameter(option.option, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            option.option_type | None, _option(option.option.upper(), option.help,
                                               show_default=option.shown_default() or False)])
        for option in SETTING_OPTIONS
    ]
    parameters = []
    for name, parameter in own.parameters.items():
        parameters += setting_parameters if name == "overrides" else [parameter]

    @functools.wraps(command)
    def with_settings(**given):
        values = {option: given.pop(option.option) for option in SETTING_OPTIONS}
        overrides = {option.field: option.field_value(value) for option, value in values.items() if value is not None}
        return command(overrides=overrides, **given)

    with_settings.__signature__ = own.replace(parameters=parameters)
    with_settings.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return with_settings


@app.command()
@_with_setting_options
def train(
    preset: Annotated[str, _option("PRESET", f"Starting settings: {', '.join(PRESETS)}.")] = "default",
    overrides: SettingOverrides = None,  # one option per coordinator.config.SETTING_OPTIONS: see _with_setting_options
    run_dir: Annotated[Path | None, _option("RUN_DIR", "Where to write the run (default runs/<timestamp>).")] = None,
    local: Annotated[bool, _option("LOCAL", "Train in this process, without workers.")] = False,
    workers: Annotated[
        int | None, _option("WORKERS", "Workers to wait for (default: the preset's, 7; xor 2).", min=1)
    ] = None,
    spawn: Annotated[
        int | None, _option("SPAWN", "Start N local worker processes (sets --workers N).", min=1)
    ] = None,
    bind: Annotated[str | None, _option(
        "BIND", f"ZeroMQ address the coordinator binds (default {OPEN_BIND}; with --spawn a Unix socket in the run "
        "directory).",
        callback=tcp_port_checked,
    )] = None,
    wait_timeout: Annotated[float, _option("WAIT_TIMEOUT", "Seconds to wait for the workers.", min=0)] = 60.0,
    heartbeat_timeout: Annotated[
        float, _option("HEARTBEAT_TIMEOUT", "Seconds of silence after which a worker is lost.", min=0.5)
    ] = settings.HEARTBEAT_TIMEOUT,
    rebalance: Annotated[
        Rebalance, _option("REBALANCE", "Give late workers columns at the next epoch, or keep them as standbys.")
    ] = Rebalance.epoch,
    verify: Annotated[
        Verify, _option("VERIFY", "Freivalds-check every result, a secret random sample, or none.")
    ] = Verify.sample,
    verify_rate: Annotated[
        float, _option("VERIFY_RATE", "Fraction of results checked with --verify sample.", min=0.0, max=1.0)
    ] = settings.VERIFY_RATE,
    replicas: Annotated[
        int, _option("REPLICAS", "Workers that compute each share of the work, compared with each other.", min=1)
    ] = 1,
    curve_keys: Annotated[
        Path | None, _option("CURVE_KEYS", "A `coordinator keygen` folder: encrypt, and admit only its workers.")
    ] = None,
    later_layers: Annotated[
        LaterLayers | None, _option("LATER_LAYERS", "Who computes the products of the layers after the first: the "
                                    "coordinator (one round a step, and workers never see a1, W2 or d2), or the workers "
                                    "(1 + 2 rounds per later layer). Default: the preset's, coordinator; seed: workers.")
    ] = None,
    resume: Annotated[
        Path | None, _option("RESUME", "Continue this run directory from its last checkpoint, with its settings.")
    ] = None,
    resume_if_exists: Annotated[
        bool, _option("RESUME_IF_EXISTS", "With --run-dir: continue the run there if it has a checkpoint (its settings "
                      "must be these), start it otherwise.")
    ] = False,
    status_bind: Annotated[
        str | None, _option(
            "STATUS_BIND", "ZeroMQ address of a read-only status socket for `coordinator status`.",
            callback=tcp_port_checked,
        )
    ] = None,
    quiet: Annotated[bool, _option("QUIET", "Plain lines only, no live progress display.")] = False,
    log_format: Annotated[LogFormat, _option("LOG_FORMAT", "plain, or json: one JSON object per line.")] = LogFormat.plain,
):
    """Train the network (784-128-10 sigmoid by default) on MNIST, the matrix products done by workers."""
    from coordinator.cluster_options import ClusterOptions
    from coordinator.spawn import spawn_endpoint

    config, start, run_dir = _what_to_train(preset, overrides, resume, resume_if_exists, run_dir)
    if start is not None:
        remove_temporaries(run_dir)  # what writes cut short by a kill left behind
    if start is not None and start.progress.epoch > config.epochs:  # a second `docker-compose up` after the end
        typer.echo(f"{run_dir} holds a finished run of {config.epochs} epochs: nothing to train")
        if restore_model(run_dir, start.params, config):
            typer.echo(f"wrote {run_dir / 'model.npz'} again from checkpoint {start.number:06d}: it was missing or "
                       "not the final checkpoint's")
        return
    if resume_if_exists and start is not None and start.plan is not None and not spawn:
        # An orchestrator restarts the same command after the cluster was scaled: the run's plan says how many.
        workers = len(start.plan.slots) * replicas
    cluster = None if local else ClusterOptions(
        bind or (spawn_endpoint(run_dir) if spawn else OPEN_BIND), spawn or workers or PRESETS[preset].workers,
        spawn is not None, wait_timeout, heartbeat_timeout=heartbeat_timeout,
        rebalance=rebalance is Rebalance.epoch, verify=verify.value, verify_rate=verify_rate, replicas=replicas,
        curve_keys=curve_keys, status_bind=status_bind,
        later_layers_here=(later_layers or LaterLayers(PRESETS[preset].later_layers)) is LaterLayers.coordinator,
    )
    problems = config.problems() or (cluster.problems(config) if cluster else [])
    if problems:
        raise InputError("; ".join(problems))
    _train(config, start, run_dir, cluster, quiet, log_format)


def _what_to_train(preset: str, overrides: dict, resume: Path | None, resume_if_exists: bool, run_dir: Path | None):
    """(config, checkpoint to continue from or None, run directory) from the preset and options, or from a run."""
    from coordinator.checkpoint import has_checkpoints, resume_point

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if resume_if_exists and (run_dir is None or resume is not None):
        raise InputError("--resume-if-exists continues the run in --run-dir; give --run-dir and no --resume")
    config = PRESETS[preset].config.with_overrides(**overrides)
    if resume is not None:
        if overrides or preset != "default" or run_dir:
            raise InputError("--resume continues the run with its own settings and directory; give neither with it")
        return *resume_point(resume), resume
    if resume_if_exists and has_checkpoints(run_dir):
        saved, start = resume_point(run_dir)
        if saved != config:
            raise UserError(f"{run_dir} holds a run with other settings ({_differences(saved, config)}); "
                            "give another --run-dir, or continue it as it was with --resume")
        return saved, start, run_dir
    return config, None, run_dir or default_run_dir()


def _train(config, start, run_dir: Path, cluster, quiet: bool, log_format: LogFormat) -> None:
    """Run the training with its display and log; a failed start leaves no directory, a bug one line and its log."""
    from coordinator.display import output_for
    from coordinator.run import train

    fresh = not run_dir.exists()
    try:
        with output_for(quiet, log_format.value, config.epochs, config.report_every) as output, logging_into(run_dir):
            train(config, run_dir, cluster, output.epoch, start=start, on_status=output.status)
    except UserError:
        if fresh:  # a start that failed (a port in use, no workers) leaves no directory to wonder about
            discard_if_unstarted(run_dir)
        raise
    except Interrupted as stop:
        typer.echo(f"interrupted: {stop}; continue with `coordinator train --resume {run_dir}`", err=True)
        raise typer.Exit(128 + stop.signal)  # 130 after a Ctrl-C; 143 after SIGTERM, as for any process it stops
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED)
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise UserError(_internal(error, run_dir)) from None
        raise UserError(_write_failure(error, run_dir)) from None
    except Exception as error:  # a bug, ours not the user's, yet shown alike: one line, the traceback in the log
        raise UserError(_internal(error, run_dir)) from None


def _internal(error: Exception, run_dir: Path) -> str:
    text = str(error).partition("\n")[0]
    return f"internal: {type(error).__name__}: {text} (traceback in {run_dir / LOG_FILE})"


def _write_failure(error: OSError, run_dir: Path) -> str:
    """A full disk or a refused write, said with the file, what is safe, and how to go on."""
    from coordinator.checkpoint import FOLDER, read_chain

    links, _ = read_chain(run_dir / FOLDER)
    if links:
        safe = f"the run is safe up to checkpoint {links[-1]['checkpoint']:06d} (step {links[-1]['steps']})"
        then = f"continue with `coordinator train --resume {run_dir}`"
    else:
        safe, then = "no checkpoint was written yet", "start the run again"
    fix = "make room" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return f"cannot write {error.filename or run_dir}: {error.strerror}; {safe}; {fix}, then {then}"


def _differences(saved, given) -> str:
    """The settings in which two TrainingConfigs differ, as `name saved, not given`."""
    names = [field.name for field in dataclasses.fields(saved)
             if getattr(saved, field.name) != getattr(given, field.name)]
    return "; ".join(f"{name} {getattr(saved, name)!r}, not {getattr(given, name)!r}" for name in names)


@app.command()
def keygen(
    folder: Annotated[Path, typer.Argument(envvar="SCATTERPROP_KEYS_DIR", help="Where to write the keys.")],
    workers: Annotated[int, _option("WORKERS", "Worker key pairs to make.", min=1)] = 7,
):
    """Write CurveZMQ key pairs: the coordinator's, and one per worker with its public key on the allow-list."""
    from common.keys import ALLOWED, WORKERS, generate
    from coordinator.spawn import worker_names

    names = worker_names(workers)
    generate(folder, names)
    typer.echo(f"wrote keys for the coordinator and workers {', '.join(names)} into {folder}")
    typer.echo(f"give each worker {folder / WORKERS}/<name>.key_secret and {folder}/coordinator.key;")
    typer.echo(f"the coordinator admits the public keys in {folder / ALLOWED}")


@app.command("verify-chain")
def verify_chain(
    run_dir: Annotated[
        Path, typer.Argument(
            envvar="SCATTERPROP_RUN_DIR", help="A run directory written by `coordinator train`.", exists=True,
            file_okay=False,
        )
    ],
):
    """Check the run's checkpoint hash chain; name the first broken link."""
    from coordinator.checkpoint import FOLDER, read_chain

    links, broken = read_chain(run_dir / FOLDER)
    if broken:
        raise UserError(f"{broken} (after {len(links)} intact)")
    if not links:
        raise UserError(f"no checkpoints in {run_dir / FOLDER}")
    typer.echo(f"chain intact: {len(links)} checkpoints, the last after step {links[-1]['steps']}")


@app.command()
def evaluate(
    model: Annotated[Path, _option("MODEL", "A model.npz written by `coordinator train`.")],
    data: Annotated[Path | None, _option("DATA", "Folder of MNIST-format IDX files (default: embedded MNIST).")] = None,
):
    """Print the test accuracy of a saved model."""
    from coordinator.rundir import evaluate_model

    accuracy = evaluate_model(model, data)
    typer.echo(f"test accuracy {accuracy:.2%}")


@app.command()
def status(
    connect: Annotated[str, _option("STATUS_CONNECT", "The status address of a coordinator started with --status-bind.")],
    timeout: Annotated[float, _option("STATUS_TIMEOUT", "Seconds to wait for the answer.", min=0)] = 5.0,
    log_format: Annotated[LogFormat, _option("LOG_FORMAT", "plain, or json: the status as one JSON object.")] = LogFormat.plain,
):
    """Show a running coordinator's workers, epoch and step (read-only)."""
    from coordinator.display import print_workers
    from coordinator.status import request_status

    snapshot = request_status(connect, timeout)
    if log_format == LogFormat.json:
        typer.echo(snapshot.to_json())
        return
    typer.echo(snapshot.summary())
    if snapshot.workers:
        print_workers(snapshot.workers)


@app.command()
def conformance(
    bind: Annotated[str, _option(
        "CONFORMANCE_BIND", "ZeroMQ address to bind; start the worker under test with --connect to it.",
        callback=tcp_port_checked,
    )] = OPEN_BIND,
    wait_timeout: Annotated[
        float, _option("CONFORMANCE_WAIT_TIMEOUT", "Seconds to wait for the worker to register.", min=0)
    ] = 60.0,
):
    """Check a worker of any language against docs/PROTOCOL.md: one PASS or FAIL line per check."""
    from coordinator.conformance import Probe, run_checks

    probe = Probe(bind)
    typer.echo(f"waiting for a worker on {probe.endpoint}")
    try:
        checks = run_checks(probe, wait_timeout, report=lambda check: typer.echo(str(check)))
    finally:
        probe.close()
    passed = sum(check.passed for check in checks)
    typer.echo(f"{passed} of {len(checks)} checks passed")
    if passed < len(checks):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(
        envvar="SCATTERPROP_RUN_DIR", help="The run directory of the run the worker took part in.", file_okay=False,
    )],
    recording: Annotated[Path, _option("AUDIT_RECORDING", "The folder a `worker --record` wrote.", file_okay=False)],
    known_labels: Annotated[int, _option(
        "AUDIT_KNOWN_LABELS", "Training labels the attacker knows (one image of each class in turn).", min=0,
    )] = 10,
    colluders: Annotated[str | None, _option(
        "AUDIT_COLLUDERS", "Comma list of other workers' recording folders, attacked pooled with RECORDING.",
    )] = None,
):
    """Attack a worker's recording: how much of the labels, hidden units and digits it learnt, against chance."""
    from coordinator.audit import audit_run, save_audits
    from coordinator.display import print_audit

    others = [Path(folder) for folder in colluders.split(",")] if colluders else []
    audits = audit_run(run_dir, recording, others, known_labels)
    for result in audits:
        print_audit(result)
    typer.echo(f"wrote {save_audits(run_dir, audits)}")
    if any(result.partial for result in audits):
        typer.echo(f"partial: {'; '.join(sorted({why for result in audits for why in result.partial}))}", err=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(envvar="SCATTERPROP_RUN_DIR", help="A run directory written by `coordinator train`.")],
    out: Annotated[Path | None, _option("REPORT_OUT", "Where to write the PNGs (default: RUN_DIR/report).")] = None,
):
    """Draw a run's learning curves, exposure map and per-worker time and bytes as PNG files."""
    from coordinator.report import write_report

    written = write_report(run_dir, out or run_dir / "report")
    for path in written:
        typer.echo(str(path))


app.command("bench")(bench_main)  # its options, read also from SCATTERPROP_BENCH_*, are the bench's own
