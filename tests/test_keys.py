"""CurveZMQ: allow-listed workers train; a stranger's key and a plain client never get in."""

import stat

import pytest
import zmq
import zmq.auth

from common import keys
from common.protocol import Register, encode
from tests.cluster_harness import Harness, one_process_model
from tests.conftest import LOOPBACK_ANY_PORT, load_model, max_difference, run_cli

SMALL_RUN = ("--train-limit", "300", "--test-limit", "100", "--epochs", "1")


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys") / "cluster"
    done = run_cli("coordinator", "keygen", folder, "--workers", "2")
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.slow
def test_keygen_lays_out_an_allow_list(key_folder):
    assert sorted(p.name for p in (key_folder / "allowed").iterdir()) == ["A.key", "B.key"]
    assert sorted(p.name for p in (key_folder / "workers").iterdir()) == ["A.key_secret", "B.key_secret"]
    for secret in (key_folder / "coordinator.key_secret", *(key_folder / "workers").iterdir()):
        assert stat.S_IMODE(secret.stat().st_mode) == keys.SECRET_MODE
    again = run_cli("coordinator", "keygen", key_folder)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already holds keys" in again.stderr


@pytest.mark.slow
def test_allow_listed_workers_train(train_run, key_folder):
    done, run_dir = train_run("--spawn", 2, "--bind", LOOPBACK_ANY_PORT, "--curve-keys", key_folder, *SMALL_RUN)
    assert "epoch 1/1" in done.stdout
    assert "anyone who can reach the port" not in done.stderr
    assert (run_dir / "model.npz").exists()


def _curve(key_folder, secret_folder, name: str) -> tuple:
    """A worker's options to use the key pair `name` of `secret_folder` with the coordinator of `key_folder`."""
    return ("--curve-secret-key", keys.worker_secret_file(secret_folder, name),
            "--curve-server-key", keys.server_public_file(key_folder))


@pytest.mark.slow
def test_unknown_key_and_plain_client_are_refused(tmp_path, key_folder):
    """Started together with an allow-listed worker, which gets in: the others had the same chance."""
    strangers = tmp_path / "strangers"
    keys.generate(strangers, ["A"])
    harness = Harness(tmp_path)
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.linger = 0
    try:
        harness.start_coordinator("--workers", "2", "--wait-timeout", "8", "--curve-keys", key_folder, *SMALL_RUN)
        harness.start_worker("A", *_curve(key_folder, key_folder, "A"))
        harness.start_worker("stranger", *_curve(key_folder, strangers, "A"))
        plain.connect(harness.address)
        plain.send(encode(Register("plain", 1)))
        assert harness.finish(60) == 1, harness.log(harness.coordinator)[-2000:]
        assert not plain.poll(0)
    finally:
        plain.close()
        harness.close()
    log = harness.log(harness.coordinator)
    assert log.strip().splitlines()[-1] == "error: only 1 of 2 workers registered within 8 s"
    assert "worker A joined" in log and "stranger" not in log and "plain" not in log
    stranger_key = zmq.auth.load_certificate(strangers / "allowed" / "A.key")[0].decode()
    assert log.count(f"refused CURVE key {stranger_key}") == 1, log[-2000:]  # once, though it kept trying


@pytest.mark.slow
def test_curve_options_go_together(key_folder):
    done = run_cli("worker", "--curve-secret-key", keys.worker_secret_file(key_folder, "A"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --curve-secret-key and --curve-server-key go together"
    missing = run_cli("worker", "--curve-secret-key", key_folder / "none", "--curve-server-key", key_folder / "none")
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read key file")


@pytest.mark.slow
def test_a_quarantined_key_stays_out_under_another_name(tmp_path, key_folder):
    harness = Harness(tmp_path)
    try:
        # far more epochs than the test lasts, so that the disguised worker finds the run still going however fast
        harness.start_coordinator("--workers", 2, "--curve-keys", key_folder, "--verify", "all", "--rebalance", "never",
                                  "--train-limit", "2000", "--test-limit", "100", "--epochs", "1000", "--batch-size", "10")
        harness.start_worker("A", *_curve(key_folder, key_folder, "A"))
        liar = harness.start_worker("B", *_curve(key_folder, key_folder, "B"), fault="zeros")
        assert liar.wait(60) == 0  # it was told to stop
        disguised = harness.start_worker("innocent", *_curve(key_folder, key_folder, "B"))
        assert disguised.wait(60) == 1
        assert "is quarantined" in harness.log(disguised)
        assert harness.coordinator.poll() is None, harness.log(harness.coordinator)[-3000:]  # the run goes on with A
    finally:
        harness.close()


@pytest.mark.slow
def test_a_worker_whose_key_is_refused_says_so_when_it_gives_up(tmp_path, key_folder):
    strangers = tmp_path / "strangers"
    keys.generate(strangers, ["A"])
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", "1", "--wait-timeout", "60", "--curve-keys", key_folder, *SMALL_RUN)
        done = run_cli("worker", "--connect", harness.address, "--name", "stranger", "--give-up-after", "1",
                       "--curve-secret-key", keys.worker_secret_file(strangers, "A"),
                       "--curve-server-key", keys.server_public_file(key_folder), timeout=60)
        address = harness.address
    finally:
        harness.close()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: no answer from {address}: the coordinator is not running there, or it refused this worker's key; "
        "gave up after 1 s"
    )


@pytest.mark.slow
def test_a_key_registers_only_under_its_own_name(tmp_path, key_folder):
    """Issue 25, item 3, with CURVE: A's key cannot join as B, nor B's key take A's name from the live A."""
    run = (*SMALL_RUN, "--dtype", "float64", "--seed", "4")
    (tmp_path / "local").mkdir()
    undisturbed = one_process_model(tmp_path / "local", *run)
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 2, "--curve-keys", key_folder, *run)
        as_another = harness.start_worker("B", *_curve(key_folder, key_folder, "A"))
        assert as_another.wait(60) == 1
        assert harness.log(as_another).strip().splitlines()[-1] == (
            "error: the coordinator refused this worker: its key is allowed as worker A, not as B")
        harness.start_worker("A", *_curve(key_folder, key_folder, "A"))
        harness.wait_for_log(harness.coordinator, "worker A joined")
        taker = harness.start_worker("A", *_curve(key_folder, key_folder, "B"))
        assert taker.wait(60) == 1
        assert "its key is allowed as worker B, not as A" in harness.log(taker)
        harness.start_worker(None, *_curve(key_folder, key_folder, "B"))  # named after its key file
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        assert "worker B joined" in harness.log(harness.coordinator)
        assert max_difference(load_model(harness.run_dir), undisturbed) < 1e-6
        assert "registered again" not in harness.log(harness.coordinator)
    finally:
        harness.close()
