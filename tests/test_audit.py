"""The recording a worker keeps, and the audit that attacks it: the format round-trips through the protocol's gate,
the scoring is right on made-up guesses, and on real runs the attacks find the labels where d2 is sent while the
shuffled-label control stays at chance."""

import json

import msgpack
import numpy as np
import pytest

from common import protocol
from common.errors import InputError
from common.protocol import KeptFirstLayer, Register, Result, Welcome
from common.recording import FILE, Recorder, RecordingError, read_recording
from coordinator.audit import Key, best_renaming, followed, named_by_known, scored, tracking_accuracy
from tests.cluster_harness import Harness
from tests.conftest import assert_one_line_error, run_cli

CLASSES = 10


def recorded_messages():
    rng = np.random.default_rng(0)
    return [
        ("sent", Register("G", 4)),
        ("received", Welcome(3, "float32", 255.0, "exact")),
        ("received", KeptFirstLayer(7, rng.standard_normal((5, 4)).astype("f4"), "train", np.arange(3, dtype="i4"),
                                    None, None, 0.5)),
        ("sent", Result(7, {"partial": rng.standard_normal((3, 4)).astype("f4")})),
    ]


def record(folder, messages, limit=10**9, on_limit=None):
    recorder = Recorder(folder, limit, "G", "tcp://127.0.0.1:1", on_limit)
    for direction, message in messages:
        recorder.record(direction, protocol.encode(message))
    return recorder


def assert_same_message(first, second):
    assert type(first) is type(second)
    for name, value in vars(first).items():
        other = vars(second)[name]
        if isinstance(value, dict):
            assert value.keys() == other.keys() and all(np.array_equal(value[k], other[k]) for k in value)
        else:
            assert np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other


def test_a_recording_reads_back_message_for_message(tmp_path):
    messages = recorded_messages()
    record(tmp_path, messages).close()
    recording = read_recording(tmp_path)
    assert (recording.worker, recording.ended) == ("G", "closed")
    assert [r.direction for r in recording.messages] == [direction for direction, _ in messages]
    for recorded, (_, message) in zip(recording.messages, messages):
        assert_same_message(recorded.message, message)


def test_the_limit_stops_recording_once_and_says_so(tmp_path):
    told = []
    recorder = record(tmp_path, recorded_messages() * 50, limit=1500, on_limit=told.append)
    recorder.close()
    recording = read_recording(tmp_path)
    assert recording.ended == "limit" and 0 < len(recording.messages) < 200
    assert len(told) == 1 and "--record-limit" in told[0]
    assert (tmp_path / FILE).stat().st_size < 1500 + 200  # the limit and the end record


def test_a_killed_worker_leaves_a_truncated_recording_that_still_reads(tmp_path):
    record(tmp_path, recorded_messages()).file.flush()  # never closed: no end record
    path = tmp_path / FILE
    path.write_bytes(path.read_bytes()[:-7])  # and its last record cut short
    recording = read_recording(tmp_path)
    assert recording.ended == "truncated" and len(recording.messages) == 3


def test_damaged_recordings_are_named(tmp_path):
    record(tmp_path, recorded_messages()).close()
    path = tmp_path / FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xc1" * 40  # never-used msgpack bytes in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="corrupt|not a recorded message|bad frame"):
        read_recording(tmp_path)
    path.write_bytes(msgpack.packb({"format": "something else"}))
    with pytest.raises(RecordingError, match="not a scatterprop recording"):
        read_recording(tmp_path)


def test_a_pickled_array_in_a_recording_is_refused_by_the_gate(tmp_path):
    recorder = Recorder(tmp_path, 10**6, "G", "x")
    evil = {"kind": "result", "request": 1, "products": {"partial": {
        b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1], b"data": b"cos\nsystem\n(S'true'\ntR."}}}
    recorder.record("sent", msgpack.packb(evil))
    recorder.close()
    with pytest.raises(RecordingError, match="bad frame: .*dtype"):
        read_recording(tmp_path)


def test_a_folder_that_holds_a_recording_is_not_overwritten(tmp_path):
    record(tmp_path, recorded_messages()).close()
    with pytest.raises(InputError, match="already holds a recording"):
        Recorder(tmp_path, 10**6, "G", "x")


def test_scores_are_up_to_a_renaming_and_the_control_is_at_chance():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, CLASSES, 20_000)
    renamed = rng.permutation(CLASSES)[truth]  # every label right, under other names
    shuffled = rng.permutation(truth)
    known = np.array([np.flatnonzero(truth == label)[0] for label in range(CLASSES)])
    score = scored("renamed", renamed, truth, shuffled, known, CLASSES)
    assert score.recovered == 1.0 and score.with_known == 1.0
    assert abs(score.control - 0.1) < 0.02
    guessing = scored("guessing", rng.integers(0, CLASSES, len(truth)), truth, shuffled, known, CLASSES)
    assert abs(guessing.recovered - 0.1) < 0.02 and abs(guessing.control - 0.1) < 0.02


def test_named_by_known_names_only_what_it_saw():
    truth = np.repeat(np.arange(CLASSES), 10)
    guesses = (truth + 3) % CLASSES
    renaming = named_by_known(guesses, np.array([0, 10, 20]), truth, CLASSES)  # knows classes 0, 1 and 2
    assert renaming[3] == 0 and renaming[4] == 1 and renaming[5] == 2
    assert sorted(renaming) == list(range(CLASSES))
    assert np.array_equal(best_renaming(guesses, truth, CLASSES)[guesses], truth)


def test_columns_are_followed_across_keys_by_the_weights_the_worker_holds():
    rng = np.random.default_rng(2)
    units = 16
    weights = rng.standard_normal((12, units))
    permutations, keys, held = [], [], None
    for _ in range(6):
        permutation = rng.permutation(units)
        keys.append(Key(len(keys), weights[:, permutation], held))
        permutations.append(permutation)
        held = weights[:, permutation] + 1e-3 * rng.standard_normal((12, units))  # its own small steps
        weights = held[:, np.argsort(permutation)]
    identity = followed(keys)
    assert tracking_accuracy(identity, np.array(permutations)) == 1.0
    wrong = np.array([rng.permutation(units) for _ in permutations])
    assert tracking_accuracy(identity, wrong) < 0.3


# --- real runs ----------------------------------------------------------------------------------------------------

# later layers on the workers, so that every error a worker can be sent is attacked; a test's own option overrides it
SMALL_RUN = ("--later-layers", "workers", "--train-limit", "3000", "--test-limit", "1000", "--epochs", "2", "--quiet")


def recorded_run(tmp_path, *args, workers=3, recorders=1, worker_args=()):
    """A run on `workers` real worker processes, the last `recorders` of them recording; returns (run dir, folders)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", workers, *SMALL_RUN, *args)
        folders = []
        for index in range(workers):
            name = "ABCDEFG"[index]
            extra = ()
            if index >= workers - recorders:
                folders.append(tmp_path / f"recording-{name}")
                extra = ("--record", folders[-1], *worker_args)
            harness.start_worker(name, *extra)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        for process in harness.processes[1:]:
            process.wait(30)
        return harness.run_dir, folders
    finally:
        harness.close()


def audited(run_dir, *args):
    done = run_cli("coordinator", "audit", run_dir, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((run_dir / "audit.json").read_text())


def scores_of(audit: dict) -> dict:
    return {score["attack"]: score for score in audit["scores"]}


@pytest.mark.slow
def test_a_recording_worker_gives_away_the_labels_where_d2_is_sent(tmp_path):
    run_dir, (folder,) = recorded_run(tmp_path)
    done, (result,) = audited(run_dir, "--recording", folder)
    scores = scores_of(result)
    assert "label from d2, rounds linked" in done.stdout
    linked = scores["label from d2, rounds linked"]
    assert linked["recovered"] >= 0.9 and linked["with_known"] >= 0.9 and linked["images"] == 3000
    for score in result["scores"]:
        assert score["control"] <= score["chance"] + 0.10, score  # the control cannot find anything
    tracking = [score for name, score in scores.items() if name.startswith("tracking: layer 1's hidden units")]
    assert tracking[0]["recovered"] > 0.9
    report = run_cli("coordinator", "report", run_dir)
    assert report.returncode == 0 and (run_dir / "report" / "audit.png").stat().st_size > 0, report.stderr


@pytest.mark.slow
def test_with_later_layers_here_only_d1_is_attacked_and_colluders_pool_their_pixels(tmp_path):
    run_dir, folders = recorded_run(tmp_path, "--later-layers", "coordinator", recorders=2)
    _, (alone, pooled) = audited(run_dir, "--recording", folders[0], "--colluders", folders[1])
    assert not any("d2" in score["attack"] for score in alone["scores"])
    clustered = scores_of(alone)["label from d1, clustered"]
    assert clustered["recovered"] > clustered["chance"] + 0.3  # d1 alone tells most labels apart
    assert clustered["control"] <= clustered["chance"] + 0.10
    pixels = [score for score in pooled["scores"] if score["attack"].startswith("digit from its own pixels")]
    assert "(" in pixels[0]["attack"] and pooled["mode"]["colluders"] == 2


@pytest.mark.slow
def test_a_recording_is_audited_only_against_its_own_run(tmp_path):
    run_dir, (folder,) = recorded_run(tmp_path / "one")
    other_run, _ = recorded_run(tmp_path / "two", "--seed", "5")
    assert_one_line_error(run_cli("coordinator", "audit", other_run, "--recording", folder), 2, "not of this run")
    assert_one_line_error(run_cli("coordinator", "audit", tmp_path, "--recording", folder), 2, "has no config.json")
    (folder / FILE).write_bytes((folder / FILE).read_bytes()[:200])  # a recording cut short before any shard
    assert_one_line_error(run_cli("coordinator", "audit", run_dir, "--recording", folder), 2, "no whole training shard")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("coordinator", "audit", run_dir, "--recording", empty), 2, "cannot read recording")


@pytest.mark.slow
def test_a_recording_limit_stops_the_recording_not_the_work(tmp_path):
    run_dir, (folder,) = recorded_run(tmp_path, worker_args=("--record-limit", "3"))
    assert json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    assert read_recording(folder).ended == "limit"
    done, (result,) = audited(run_dir, "--recording", folder)
    assert result["partial"] and "partial: the recording ended early (limit)" in done.stderr


def test_the_bound_check_flags_guesses_that_know_more_than_the_labels_trained_on():
    """The check of the label-private tests below can fail: guesses that are the true labels pass the bound."""
    from coordinator.audit import Scoring, Truth
    from coordinator.labels import PrivateLabels

    rng = np.random.default_rng(5)
    truth = rng.integers(0, CLASSES, 20_000)
    private = PrivateLabels.drawn(truth, 1.0, 1, CLASSES, seed=3)
    run = Truth(None, truth, truth[:100], None, None, {}, {}, private)
    scoring = Scoring(run, 10, rng)
    scoring.labels("the labels trained on", private.labels.copy())
    scoring.labels("the true labels", truth.copy())
    trained, true = scoring.scores
    assert trained.bound == pytest.approx(0.232, abs=1e-3) and not trained.above_bound
    assert true.above_bound and true.first_stage == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("eps", ["1", "2"])
def test_with_label_privacy_the_labels_read_from_d2_stay_within_the_bound(tmp_path, eps):
    """What the worker reads from d2 is the label trained on: right no more often than randomized response keeps
    one. The model's own prediction, which it can read too, is not so bounded: label privacy does not hide what
    the model learnt from the other images."""
    run_dir, (folder,) = recorded_run(tmp_path, "--label-privacy", eps, "--train-limit", "6000", "--epochs", "3")
    _, (result,) = audited(run_dir, "--recording", folder)
    scores = scores_of(result)
    linked = scores["label from d2, rounds linked"]
    assert linked["bound"] == pytest.approx({"1": 0.232, "2": 0.451}[eps], abs=1e-3)
    assert not linked["above_bound"], linked
    assert linked["first_stage"] > linked["bound"] - 0.05  # and it does read them: the trained labels, no fewer
    assert scores["prediction read from d2"]["above_bound"]
    for score in result["scores"]:
        assert score["control"] <= score["chance"] + 0.10, score


def test_a_full_disk_stops_the_recording_not_the_worker(tmp_path):
    told = []
    recorder = record(tmp_path, recorded_messages(), on_limit=told.append)

    class Full:
        def write(self, *data):
            raise OSError(28, "No space left on device")

        flush = close = write

    recorder.file = Full()
    recorder.record("received", protocol.encode(recorded_messages()[1][1]))
    recorder.close()
    assert not recorder.recording and len(told) == 1 and "No space left" in told[0]
