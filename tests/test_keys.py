"""CurveZMQ: allow-listed workers train; a stranger's key and a plain client never get in."""

import os
import socket
import stat
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from common import keys
from common.protocol import Register, encode
from tests.cluster_harness import Harness
from tests.conftest import LOOPBACK_ANY_PORT, run_cli

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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(address: str, name: str, key_folder, secret_file) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--connect", address, "--name", name, "--curve-secret-key", str(secret_file),
         "--curve-server-key", str(keys.server_public_file(key_folder))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_unknown_key_and_plain_client_are_refused(tmp_path, key_folder):
    """Started together with an allow-listed worker, which gets in: the others had the same chance."""
    strangers = tmp_path / "strangers"
    keys.generate(strangers, ["A"])
    address = f"tcp://127.0.0.1:{_free_port()}"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "train", "--workers", "2", "--bind", address, "--wait-timeout", "8",
         "--curve-keys", str(key_folder), "--run-dir", str(tmp_path / "run"), *SMALL_RUN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    workers = [_worker(address, "A", key_folder, keys.worker_secret_file(key_folder, "A")),
               _worker(address, "stranger", key_folder, keys.worker_secret_file(strangers, "A"))]
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(address)
    try:
        plain.send(encode(Register("plain", 1)))
        _, stderr = coordinator.communicate(timeout=60)
        assert not plain.poll(0)
    finally:
        plain.close()
        for worker in workers:
            worker.kill()
            worker.wait()
    assert coordinator.returncode == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: only 1 of 2 workers registered within 8 s"
    assert "worker A joined" in stderr and "stranger" not in stderr and "plain" not in stderr
    stranger_key = zmq.auth.load_certificate(strangers / "allowed" / "A.key")[0].decode()
    assert stderr.count(f"refused CURVE key {stranger_key}") == 1, stderr[-2000:]  # once, though it kept trying


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
    curve = lambda name: ("--curve-secret-key", keys.worker_secret_file(key_folder, name),
                          "--curve-server-key", keys.server_public_file(key_folder))
    try:
        harness.start_coordinator("--workers", 2, "--curve-keys", key_folder, "--verify", "all", "--rebalance", "never",
                                  "--train-limit", "2000", "--test-limit", "100", "--epochs", "3", "--batch-size", "10")
        harness.start_worker("A", *curve("A"))
        liar = harness.start_worker("B", "--fault", "zeros", *curve("B"))
        assert liar.wait(60) == 0  # it was told to stop
        disguised = harness.start_worker("innocent", *curve("B"))
        assert disguised.wait(60) == 1
        assert "is quarantined" in harness.log(disguised)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
    finally:
        harness.close()
