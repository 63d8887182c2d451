"""`worker`: lend this machine's arithmetic to a coordinator."""

import logging
import os
import socket
from typing import Annotated

import typer

from common import cli
from common.cli import EXIT_FAILED, fail

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@app.command()
def main(
    connect: Annotated[
        str, typer.Option(envvar="SCATTERPROP_CONNECT", help="The coordinator's ZeroMQ address.")
    ] = "tcp://localhost:5555",
    name: Annotated[
        str | None, typer.Option(envvar="SCATTERPROP_NAME", help="How the coordinator lists this worker.")
    ] = None,
    threads: Annotated[
        int, typer.Option(envvar="SCATTERPROP_THREADS", min=1, help="BLAS threads for the matrix products.")
    ] = 1,
):
    """Connect to a coordinator and compute partial matrix products for it until it says stop."""
    import zmq

    for variable in BLAS_THREAD_VARIABLES:  # read by the BLAS library when numpy is first imported
        os.environ[variable] = str(threads)
    from worker.connection import CoordinatorLink, Rejected
    from worker.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s", datefmt="%H:%M:%S")
    try:
        link = CoordinatorLink(connect, name or f"{socket.gethostname()}-{os.getpid()}")
    except zmq.ZMQError as error:
        fail(f"cannot connect to {connect}: {error}")
    try:
        reason = serve(link)
    except Rejected as error:
        fail(f"the coordinator refused this worker: {error}", EXIT_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        link.close()
    logging.getLogger("worker").info("stopped: %s", reason)


def console_script() -> None:
    cli.run(app, "worker")
