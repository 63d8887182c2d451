"""The one kind of failure a user can cause or mend: shown as one `error:` line, ending with its exit code."""

EXIT_FAILED = 1  # the command was fine, the run could not go on
EXIT_USAGE = 2  # what typer itself returns for a bad option: input problems exit alike
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class UserError(Exception):
    """A failure whose text is one line for the user; `common.cli.run` prints it and exits with `exit_code`."""

    exit_code = EXIT_FAILED


class InputError(UserError):
    """What the user handed in (an option's value, a data folder, a model or key file) cannot be used: exit 2,
    as typer exits for a bad option."""

    exit_code = EXIT_USAGE
