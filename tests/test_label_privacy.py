"""Label privacy: randomized response draws with the probabilities it promises, the labels are drawn once and kept
through resumes bit for bit, and every bad setting is one line."""

import json
import signal
import subprocess

import numpy as np
import pytest
from scipy.stats import chisquare

from common.label_privacy import keep_probability, prior_from_outputs, randomized_response, rr_with_prior, top_classes
from coordinator import checkpoint
from coordinator.config import TrainingConfig
from coordinator.labels import FIRST, SECOND, UNDRAWN, PrivateLabels
from tests.conftest import assert_one_line_error, load_model, max_difference, run_cli, start
from tests.cluster_harness import wait_for

CLASSES = 10
DRAWS = 200_000
SIGNIFICANCE = 1e-4  # a correct sampler fails one check in ten thousand


def test_the_bound_is_the_keep_probability():
    assert keep_probability(1, 10) == pytest.approx(0.2320, abs=1e-4)
    assert keep_probability(2, 10) == pytest.approx(0.4509, abs=1e-4)
    assert keep_probability(4, 10) == pytest.approx(0.8585, abs=1e-4)


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_randomized_response_keeps_and_replaces_as_promised(eps):
    labels = np.full(DRAWS, 3)
    drawn = randomized_response(labels, eps, CLASSES, np.random.default_rng(1))
    kept = keep_probability(eps, CLASSES)
    expected = np.full(CLASSES, (1 - kept) / (CLASSES - 1) * DRAWS)
    expected[3] = kept * DRAWS
    assert chisquare(np.bincount(drawn, minlength=CLASSES), expected).pvalue > SIGNIFICANCE


def test_a_wrong_sampler_fails_the_same_check():
    """The check above can fail: a draw that keeps labels a little too often is caught."""
    rng = np.random.default_rng(2)
    too_often = np.where(rng.random(DRAWS) < keep_probability(2, CLASSES) + 0.01, 3, rng.integers(0, CLASSES, DRAWS))
    kept = keep_probability(2, CLASSES)
    expected = np.full(CLASSES, (1 - kept) / (CLASSES - 1) * DRAWS)
    expected[3] = kept * DRAWS
    assert chisquare(np.bincount(too_often, minlength=CLASSES), expected).pvalue < SIGNIFICANCE


@pytest.mark.parametrize("label", [0, 2, 7])  # the likeliest, in the top k, outside it
def test_rr_with_prior_answers_among_the_top_k_as_promised(label):
    eps = 1.0
    prior = np.array([0.4, 0.25, 0.2, 0.05, 0.04, 0.02, 0.02, 0.01, 0.005, 0.005])
    k = int(top_classes(prior[None], eps)[0])
    assert k == 3  # mass 0.85 at e / (e + 2): better than 0.4 alone or 0.9 at e / (e + 3)
    drawn = rr_with_prior(np.full(DRAWS, label), np.tile(prior, (DRAWS, 1)), eps, np.random.default_rng(3))
    expected = np.zeros(CLASSES)
    if label < k:
        expected[:k] = 1 / (np.e + k - 1)
        expected[label] = np.e / (np.e + k - 1)
    else:
        expected[:k] = 1 / k
    counts = np.bincount(drawn, minlength=CLASSES)
    assert counts[k:].sum() == 0
    assert chisquare(counts[:k], expected[:k] * DRAWS).pvalue > SIGNIFICANCE


def test_the_prior_undoes_the_known_channel():
    """A network that learnt the replaced labels' distribution exactly gives back the true class."""
    kept, other = keep_probability(2, CLASSES), (1 - keep_probability(2, CLASSES)) / (CLASSES - 1)
    noisy = np.full((3, CLASSES), other)
    noisy[np.arange(3), [4, 0, 9]] = kept
    assert np.allclose(prior_from_outputs(noisy, 2), np.eye(CLASSES)[[4, 0, 9]])


def test_two_stages_draw_a_seeded_half_first_and_the_rest_from_the_prior():
    truth = np.random.default_rng(4).integers(0, CLASSES, 1000)
    labels = PrivateLabels.drawn(truth, 2.0, 2, CLASSES, seed=9)
    again = PrivateLabels.drawn(truth, 2.0, 2, CLASSES, seed=9)
    assert np.array_equal(labels.labels, again.labels) and np.array_equal(labels.stage, again.stage)
    assert np.count_nonzero(labels.stage == FIRST) == 500 and np.count_nonzero(labels.stage == UNDRAWN) == 500
    assert len(labels.rows_of_epoch(2, 4)) == 500 and len(labels.rows_of_epoch(3, 4)) == 1000
    assert not labels.second_stage_due(2, 4) and labels.second_stage_due(3, 4)
    confident = np.eye(CLASSES)[truth[labels.undrawn]]  # a perfect prior: RR among one class keeps every label
    labels.draw_second_stage(truth, confident, seed=9)
    assert np.array_equal(labels.labels[labels.stage == SECOND], truth[labels.stage == SECOND])
    assert not labels.second_stage_due(3, 4)


@pytest.mark.parametrize("settings, problem", [
    ({"label_privacy": 0.0}, "positive"), ({"label_privacy": -1.0}, "positive"),
    ({"label_privacy": float("nan")}, "positive"), ({"label_privacy": float("inf")}, "positive"),
    ({"label_privacy": 1.0, "label_privacy_stages": 3}, "1 or 2"), ({"label_privacy_stages": 2}, "need --label-privacy"),
    ({"label_privacy": 1.0, "dataset": "xor", "hidden": (3,)}, "several classes"),
    ({"label_privacy": 1.0, "label_privacy_stages": 2, "epochs": 1}, "at least 2 epochs"),
])
def test_bad_label_privacy_settings_are_named(settings, problem):
    assert any(problem in text for text in TrainingConfig(**settings).problems())


RUN = ("--local", "--dtype", "float64", "--train-limit", "3000", "--test-limit", "300", "--epochs", "4",
       "--label-privacy", "1", "--label-privacy-stages", "2", "--quiet")


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (("--label-privacy", "0"), ["label privacy (eps) must be a positive number"]),
    (("--label-privacy", "abc"), ["--label-privacy", "valid number"]),
    (("--preset", "xor", "--label-privacy", "1"), ["label privacy needs several classes"]),
])
def test_bad_label_privacy_options_are_one_line(tmp_path, args, words):
    done = run_cli("coordinator", "train", "--local", "--run-dir", tmp_path / "run", *args)
    assert_one_line_error(done, 2, *words)


@pytest.mark.slow
def test_a_resume_trains_on_the_very_same_labels(tmp_path, train_run):
    """Interrupted in the first stage, before its second draw, and resumed: the same labels, the same weights."""
    _, undisturbed = train_run(*RUN)
    run_dir = tmp_path / "interrupted"
    with start("coordinator", "train", "--run-dir", run_dir, *RUN, "--checkpoint-every", "20",
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        wait_for(lambda: list((run_dir / "checkpoints").glob("*.json")), 120, "a checkpoint")
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130
    first = checkpoint.latest(run_dir / "checkpoints")
    assert first.progress.epoch <= 2  # stopped before the second stage's draw
    done = run_cli("coordinator", "train", "--resume", run_dir, "--local")
    assert done.returncode == 0, done.stderr
    with np.load(run_dir / "labels.npz") as ours, np.load(undisturbed / "labels.npz") as theirs:
        assert all(np.array_equal(ours[name], theirs[name]) for name in ("trained_labels", "label_stage"))
        assert np.count_nonzero(ours["label_stage"] == SECOND) == 1500
    assert max_difference(load_model(run_dir), load_model(undisturbed)) == 0.0
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert all(entry["label_privacy"] == 1.0 for entry in history)


@pytest.mark.slow
def test_a_private_run_without_its_labels_is_not_resumed(tmp_path, train_run):
    """A checkpoint of a label-private run that holds no labels (an older version's) is refused, not redrawn."""
    _, run_dir = train_run(*RUN)
    last = checkpoint.latest(run_dir / "checkpoints")
    last.labels, last.number, last.progress.epoch = None, 1, 2
    stripped = tmp_path / "stripped"
    (stripped / "checkpoints").mkdir(parents=True)
    checkpoint.save(stripped / "checkpoints", last, None)
    done = run_cli("coordinator", "train", "--resume", stripped, "--local")
    assert_one_line_error(done, 1, "holds no trained labels", "never drawn again")
