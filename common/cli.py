"""What both command lines share: every failure a user can cause is one `error:` line and an exit code."""

import sys
from typing import NoReturn

import typer

from common.errors import EXIT_USAGE, UserError

# Whichever click typer brings (its own copy or the package), its BadParameter derives from UsageError.
UsageError = typer.BadParameter.__bases__[0]


def run(app: typer.Typer, prog_name: str, **context) -> NoReturn:
    """Run a typer app, turning a bad command line or a UserError into one `error:` line and its exit code;
    `context` becomes the commands' `ctx.obj` (a test's faulty worker state, say)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name=prog_name, standalone_mode=False, obj=context)
    except UsageError as error:
        help_hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        typer.echo(f"error: {error.format_message()}{help_hint}", err=True)
        code = EXIT_USAGE
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        code = error.exit_code
    sys.exit(code or 0)


def tcp_port_checked(address: str | None) -> str | None:
    """The address, if its TCP port is 1..65535 or *: ZeroMQ itself would take port 99999 as 34463."""
    if address is None or not address.startswith("tcp://"):
        return address
    port = address.rsplit(":", 1)[-1]
    if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise typer.BadParameter(f"{address} needs a port from 1 to 65535, or *")
    return address
