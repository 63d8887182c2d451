"""Bad values a user can give the commands, as options and as environment variables: each is one `error:` line
and a non-zero exit code, from the real programs, before anything is written."""

import pytest

from tests.conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # each case starts a program

TINY = ("--train-limit", "10", "--test-limit", "10")
CASES = [  # (program and arguments, environment, exit code, words of the error line)
    (("coordinator", "train", "--local", *TINY), {"SCATTERPROP_EPOCHS": "abc"}, 2, ["--epochs", "SCATTERPROP_EPOCHS"]),
    (("coordinator", "train", "--local", *TINY), {"SCATTERPROP_DTYPE": "float16"}, 2, ["dtype must be"]),
    (("coordinator", "train", "--local", "--batch-size", "0", *TINY), {}, 2, ["batch size must be at least 1"]),
    (("coordinator", "train", "--local", "--dropout", "1.5", *TINY), {}, 2, ["dropout must be"]),
    (("coordinator", "train", "--local", "--rekey", "sometimes", *TINY), {}, 2, ["rekey must be"]),
    (("coordinator", "train", "--local", *TINY), {"SCATTERPROP_WIRE": "huh"}, 2, ["wire must be one of"]),
    (("coordinator", "train", "--local", "--label-privacy", "-1", *TINY), {}, 2, ["label privacy (eps)"]),
    (("coordinator", "train", "--local", "--label-privacy", "2", "--label-privacy-stages", "3", *TINY), {}, 2,
     ["stages must be 1 or 2"]),
    (("coordinator", "train", "--local", "--checkpoint-every", "-1", *TINY), {}, 2, ["checkpoint every"]),
    (("coordinator", "train", "--workers", "2", "--batch-size", "5000", *TINY), {}, 2,
     ["kept rows (rekey 50)", "at most 4096 images", "rekey every-step"]),
    (("coordinator", "train", "--local", *TINY), {"SCATTERPROP_LOG_FORMAT": "xml"}, 2, ["--log-format"]),
    (("coordinator", "train", "--resume", "/nonexistent/run"), {}, 1, ["no checkpoints in /nonexistent/run"]),
    (("coordinator", "train", "--workers", "2", "--bind", "nonsense", *TINY), {}, 1, ["cannot bind nonsense"]),
    (("coordinator", "train", "--workers", "2", "--verify", "maybe", *TINY), {}, 2, ["--verify", "maybe"]),
    (("coordinator", "train", "--workers", "3", "--replicas", "2", *TINY), {}, 2, ["cannot form replicas of 2"]),
    (("coordinator", "train", "--workers", "2", *TINY), {"SCATTERPROP_WAIT_TIMEOUT": "-5"}, 2, ["--wait-timeout"]),
    (("coordinator", "train", "--workers", "2", "--curve-keys", "/nonexistent", *TINY), {}, 2,
     ["not a folder of allowed worker keys"]),
    (("coordinator", "evaluate", "--model", "/etc/passwd"), {}, 2, ["is not a model file"]),
    (("coordinator", "keygen", "/etc/passwd"), {}, 1, ["cannot write keys into /etc/passwd"]),
    (("worker", "--connect", "nonsense"), {}, 2, ["cannot connect to nonsense"]),
    (("worker",), {"SCATTERPROP_THREADS": "0"}, 2, ["--threads", "SCATTERPROP_THREADS"]),
    (("worker",), {"SCATTERPROP_GIVE_UP_AFTER": "-1"}, 2, ["--give-up-after"]),
    (("worker", "--curve-secret-key", "/x"), {}, 2, ["go together"]),
    (("worker", "--curve-secret-key", "/nonexistent.key_secret", "--curve-server-key", "/nonexistent.key"), {}, 2,
     ["cannot read key file /nonexistent.key_secret"]),
    (("worker", "--record", "/tmp/unused-recording", "--record-limit", "0"), {}, 2, ["--record-limit"]),
]


@pytest.mark.parametrize("command, environment, code, words", CASES, ids=[
    " ".join([*case[0][:2], *case[1]]) + f" #{number}" for number, case in enumerate(CASES)])
def test_a_bad_value_is_one_line_and_a_non_zero_exit(command, environment, code, words, tmp_path):
    done = run_cli(*_in(command, tmp_path), env=environment, timeout=60)
    assert_one_line_error(done, code, *words)
    assert not (tmp_path / "run").exists()  # nothing written


def _in(command: tuple, tmp_path) -> tuple:
    """A training command with its run directory in the test's folder, so that a refusal can be seen to write none."""
    if command[:2] == ("coordinator", "train") and "--resume" not in command:
        return (*command, "--run-dir", str(tmp_path / "run"))
    return command
