"""`worker`: lend this machine's arithmetic to a coordinator."""

import logging
import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import zmq

from common import cli, keys
from common.errors import EXIT_INTERRUPTED, InputError, UserError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@app.command()
def main(
    ctx: typer.Context,
    connect: Annotated[
        str, typer.Option(envvar="SCATTERPROP_CONNECT", help="The coordinator's ZeroMQ address.")
    ] = "tcp://localhost:5555",
    name: Annotated[
        str | None, typer.Option(envvar="SCATTERPROP_NAME",
                                 help="How the coordinator lists this worker (default: the name of its "
                                 "--curve-secret-key file, the only name that key may register as; else HOST-PID).")
    ] = None,
    threads: Annotated[
        int, typer.Option(envvar="SCATTERPROP_THREADS", min=1, help="BLAS threads for the matrix products.")
    ] = 1,
    curve_secret_key: Annotated[
        Path | None,
        typer.Option(envvar="SCATTERPROP_CURVE_SECRET_KEY", help="This worker's key pair file (.key_secret)."),
    ] = None,
    curve_server_key: Annotated[
        Path | None,
        typer.Option(envvar="SCATTERPROP_CURVE_SERVER_KEY", help="The coordinator's coordinator.key (public key)."),
    ] = None,
    give_up_after: Annotated[
        float | None,
        typer.Option(envvar="SCATTERPROP_GIVE_UP_AFTER", min=0,
                     help="Seconds without a word from the coordinator after which to exit with an error "
                     "(default: keep trying)."),
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(envvar="SCATTERPROP_RECORD", file_okay=False,
                     help="Also write every message received and sent into this folder, for `coordinator audit` "
                     "(what a curious operator of this machine could keep; see docs/RECORDING.md)."),
    ] = None,
    record_limit: Annotated[
        float, typer.Option(envvar="SCATTERPROP_RECORD_LIMIT", min=1,
                            help="Megabytes the recording may take; then recording stops and the work goes on."),
    ] = 300.0,
):
    """Connect to a coordinator and compute partial matrix products for it until it says stop."""
    for variable in BLAS_THREAD_VARIABLES:  # read by the BLAS library when numpy is first imported
        os.environ[variable] = str(threads)
    from common.recording import Recorder
    from worker.compute import WorkerState

    if (curve_secret_key is None) != (curve_server_key is None):
        raise InputError("--curve-secret-key and --curve-server-key go together")
    make_state = (ctx.obj or {}).get("make_state", WorkerState)  # tests.faulty_worker passes another

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s", datefmt="%H:%M:%S")
    curve = None if curve_secret_key is None else (curve_secret_key, curve_server_key)
    name = name or _default_name(curve_secret_key)
    recorder = None if record is None else Recorder(
        record, round(record_limit * 1e6), name, connect, on_limit=logging.getLogger("worker").warning
    )
    context = zmq.Context()
    try:
        _work(context, connect, name, curve, make_state, give_up_after, recorder)
    finally:  # closes what a failed start left open, and waits (up to its linger) for a deregistration to leave
        context.destroy(linger=0)
        if recorder is not None:
            recorder.close()


def _default_name(curve_secret_key: Path | None) -> str:
    """The name a CURVE key is allowed under (its file's, as `coordinator keygen` names it), else HOST-PID."""
    if curve_secret_key is not None:
        return keys.worker_name(curve_secret_key)
    return f"{socket.gethostname()}-{os.getpid()}"


class Terminated(BaseException):
    """SIGTERM: `docker stop`, `docker-compose stop` or `kill` asks the worker to leave. A BaseException, as
    KeyboardInterrupt is: raised wherever the signal lands, it must pass the `except Exception` of the decode gate
    (a SIGTERM during msgpack's unpacking was taken for a bad frame, and the worker outlived its coordinator)."""


def _leave(signal_number, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one request is enough: the leaving is not to be interrupted
    raise Terminated


@contextmanager
def _sigterm_leaves():
    """While serving, SIGTERM raises Terminated; before, it ends the process as usual; after, the worker is leaving."""
    signal.signal(signal.SIGTERM, _leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _work(context, connect: str, name: str, curve, make_state, give_up_after: float | None, recorder) -> None:
    from common.phases import worker_clock
    from worker.connection import CoordinatorLink, GaveUp, Rejected
    from worker.serve import serve

    clock = worker_clock(name)
    try:
        link = CoordinatorLink(connect, name, context, curve=curve, give_up_after=give_up_after, recorder=recorder,
                               clock=clock)
    except zmq.ZMQError as error:
        raise InputError(f"cannot connect to {connect}: {error}") from None
    try:
        with _sigterm_leaves():
            reason = serve(link, make_state=make_state, clock=clock)
    except Rejected as error:
        link.close()
        raise UserError(f"the coordinator refused this worker: {error}") from None
    except GaveUp as error:
        link.close()
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        link.close("interrupted")  # deregister, so the coordinator reassigns our columns at once
        raise typer.Exit(EXIT_INTERRUPTED)
    except Terminated:
        reason = "terminated"
        link.close(reason)  # as for a Ctrl-C; but leaving on request is no failure, so the exit code is 0
    else:
        link.close()
    logging.getLogger("worker").info("stopped: %s", reason)


def console_script() -> None:
    cli.run(app, "worker")
