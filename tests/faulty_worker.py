"""`python -m tests.faulty_worker FAULT [worker options]`: the real worker, computing with a state of tests.faults
that answers wrongly or dies on purpose."""

import os
import sys

from worker.cli import BLAS_THREAD_VARIABLES

if __name__ == "__main__":
    for variable in BLAS_THREAD_VARIABLES:  # before numpy is imported, as the worker's own start sets them
        os.environ.setdefault(variable, "1")
    from common.cli import run
    from tests.faults import faulty_state
    from worker.cli import app

    try:
        make_state = faulty_state(sys.argv.pop(1))
    except (IndexError, ValueError) as error:
        sys.exit(f"error: {error}")
    run(app, "tests.faulty_worker", make_state=make_state)
