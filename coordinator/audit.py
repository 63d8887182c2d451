"""`coordinator audit`: what a worker learnt from what it was sent, measured by attacking its recording.

A recording (`worker --record`) holds exactly what a curious operator of one spare machine has: its pixels,
and every request and answer. The attacks below use nothing else, in the order a worker gets them; only the
scoring reads the truth, which the run directory holds: the labels (from the run's data), the exposure
plan, and the secret permutation of every round (permutations.jsonl).

Columns a worker is sent are shuffled by a fresh permutation at each re-key (layer 1) or round (later
layers), but a worker can follow them: the weights it is sent next are the ones it holds now, stepped by a
gradient it computed itself, in a new order, so a minimum-cost assignment of columns (scipy's
linear_sum_assignment) puts every column back in one order for the whole run ("hidden-unit tracking").
In that order:
- the output layer's error d2 = (prediction - one-hot label) / B names each row's label column by its one
  negative entry (bce and ce; the label column is the least one for mse too);
- with the label in hand, prediction = B d2 + one-hot is the model's own guess, right even where the label
  trained on is noise (`--label-privacy`);
- the first layer's error d1 rows of one class point the same way: cosine k-means in windows of steps,
  each window's clusters matched to the last's.
Labels come out up to a renaming of the classes; an attacker that knows K labels (`--known-labels`) names
them. With the labels it inferred, a worker classifies test digits by their nearest training images in its own pixels.
Every score has a control: the same guesses scored against the true labels shuffled among the images,
which no attack can know; a control away from chance means the scoring, not the attack, found something.
"""

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from common import model
from common.errors import InputError
from common.protocol import FirstLayer, KeptFirstLayer, LaterBackward, LaterForward, Result, Shard, Welcome
from common.recording import read_recording
from common.label_privacy import keep_probability
from coordinator.config import OUTPUT_UNITS, TrainingConfig
from coordinator.labels import FIRST, PrivateLabels
from coordinator.rundir import KEYS_FILE, LABELS_FILE

AUDIT_FILE = "audit.json"
WINDOW_ROWS = 1600  # d1 rows clustered together: 50 steps of 32, one default kept period
CLUSTER_RESTARTS = 5  # k-means runs per window; the tightest is kept
NEIGHBOURS = 5  # the pixel classifier's vote
NEIGHBOUR_CHUNK = 1000  # test images whose distances to every training image are held at once (240 MB at 60,000)
CONTROL_SEED = 20261207  # the shuffle of the true labels that the controls score against


class AuditError(InputError):
    """A run or recording that cannot be audited; one line says which and why."""


@dataclass
class Key:
    """Columns of one layer sent under one permutation: the weights as sent, and the ones the worker held."""

    round: int
    weights: np.ndarray  # (rows, n) in this key's column order
    held: np.ndarray | None  # (rows, n) the worker's own copy just before, in the previous key's order


@dataclass
class Error:
    """One error the worker was sent: rows of the batch, the error in its key's column order."""

    round: int
    key: int  # index into the layer's keys
    rows: np.ndarray  # (B,) training images
    values: np.ndarray  # (B, n)


@dataclass
class View:
    """Everything one worker (or colluders pooled) saw, in order."""

    worker: str
    slot: int
    pixels: dict  # split -> (n, k) uint8: the worker's own columns of every image
    keys: dict = field(default_factory=dict)  # layer -> [Key]
    errors: dict = field(default_factory=dict)  # layer -> [Error]; layer 1's is d1, the last layer's d2
    learning_rate: float = 0.0
    partial: list = field(default_factory=list)  # why parts of the recording were not used


def view_of(recording, config: TrainingConfig) -> View:
    """The worker's view, read from its recording the way the worker itself could, message by message."""
    reader = ViewReader(recording.worker, config)
    for recorded in recording.messages:
        if not reader.take(recorded.direction, recorded.message):
            break
    view = reader.view
    view.pixels = {split: pixels for split, (pixels, filled) in reader.shards.items() if filled == len(pixels)}
    if "train" not in view.pixels:
        raise AuditError(f"the recording of worker {recording.worker} holds no whole training shard")
    if not recording.complete:
        view.partial.append(f"the recording ended early ({recording.ended})")
    return view


class ViewReader:
    """Builds a View from messages in the order they crossed the worker's socket, keeping what the worker holds:
    its shards, and its own copy of each layer's rows, stepped by the gradients it computes."""

    def __init__(self, worker: str, config: TrainingConfig):
        self.view = View(worker, -1, {})
        self.config = config
        self.output_layer = len(config.hidden) + 1
        self.shards = {}  # split -> (pixels, rows filled)
        self.held = {}  # layer -> the worker's rows of it now, in the latest key's column order
        self.forward_rows = None  # the training rows of the latest first-layer forward: the later layers' batch
        self.batch_of_layer = {}  # later layer -> the rows of its latest forward
        self.layer_of_backward = {}  # a later_backward's request number -> its layer, for its answer's gradient
        self.last_request = 0
        self.handlers = {
            Welcome: self._welcome, Shard: self._shard, FirstLayer: self._first_layer,
            KeptFirstLayer: self._first_layer, LaterForward: self._later_forward, LaterBackward: self._later_backward,
        }

    def take(self, direction: str, message) -> bool:
        """Follow one message; False once the rest belongs to another coordinator session, which is not audited."""
        if direction == "sent":
            self._answer(message)
            return True
        request = getattr(message, "request", None)
        if request is not None:
            if request < self.last_request:  # a new coordinator process numbers its rounds afresh
                self.view.partial.append("audited the first coordinator session only")
                return False
            self.last_request = request
        handler = self.handlers.get(type(message))
        if handler:
            handler(message)
        return True

    def _welcome(self, welcome: Welcome) -> None:
        if self.view.slot < 0:
            self.view.slot = welcome.slot

    def _shard(self, shard: Shard) -> None:
        _take_shard(self.shards, shard)
        if shard.split == "train" and shard.offset == 0 and 1 in self.held:  # other columns: its rows are gone
            self.view.partial.append("the worker's columns changed: hidden units followed within each set of columns")
            self.held.pop(1)

    def _first_layer(self, message) -> None:
        """A (kept) first-layer request: new rows are a new key; an error is d1, and steps the rows held."""
        self.view.learning_rate = message.learning_rate or self.view.learning_rate
        if message.weights is not None:
            self._new_key(1, message.request, message.weights)
        if message.error is not None and 1 in self.held:
            error = message.error.astype(self.config.dtype)
            self.view.errors.setdefault(1, []).append(
                Error(message.request, len(self.view.keys[1]) - 1, message.error_rows, error))
            pixels = self.shards["train"][0][message.error_rows]
            inputs = model.inputs(pixels, self.config.dtype, self.config.input_divisor)
            self.held[1] = self.held[1] - message.learning_rate * model.weight_gradient(inputs, error)
        if message.rows is not None:
            self.forward_rows = message.rows if message.split == "train" else None

    def _later_forward(self, message: LaterForward) -> None:
        self._new_key(message.layer, message.request, message.weights)
        self.batch_of_layer[message.layer] = self.forward_rows

    def _later_backward(self, message: LaterBackward) -> None:
        rows = self.batch_of_layer.get(message.layer)
        self.layer_of_backward[message.request] = message.layer
        if message.layer == self.output_layer and rows is not None:
            keys = self.view.keys[message.layer]
            self.view.errors.setdefault(message.layer, []).append(
                Error(message.request, len(keys) - 1, rows, message.error.astype(self.config.dtype)))

    def _answer(self, message) -> None:
        """The worker's own answer to a later layer's backward: its gradient steps the rows it holds."""
        if isinstance(message, Result) and message.request in self.layer_of_backward:
            layer = self.layer_of_backward.pop(message.request)
            self.held[layer] = self.held[layer] - self.view.learning_rate * message.products["gradient"]

    def _new_key(self, layer: int, request: int, weights: np.ndarray) -> None:
        previous = self.held.get(layer)
        fits = previous is not None and previous.shape == weights.shape
        self.view.keys.setdefault(layer, []).append(Key(request, weights, previous if fits else None))
        self.held[layer] = weights.astype(np.float64)


def _take_shard(shards: dict, shard: Shard) -> None:
    if shard.offset == 0:
        shards[shard.split] = (np.zeros((shard.total, shard.images.shape[1]), np.uint8), 0)
    pixels, filled = shards[shard.split]
    pixels[shard.offset : shard.offset + len(shard.images)] = shard.images
    shards[shard.split] = (pixels, max(filled, shard.offset + len(shard.images)))


def pooled(views: list) -> View:
    """Colluders' views as one: their pixels side by side, their weight rows stacked (a round's permutation is
    the same for every worker, so their columns line up), the errors (the same matrix for all) of the first."""
    first = views[0]
    for other in views[1:]:
        for layer, keys in first.keys.items():
            if [key.round for key in keys] != [key.round for key in other.keys.get(layer, [])]:
                raise AuditError(f"the recordings of {first.worker} and {other.worker} do not share their rounds")
    keys = {layer: [Key(key.round, np.vstack([v.keys[layer][i].weights for v in views]),
                        None if any(v.keys[layer][i].held is None for v in views)
                        else np.vstack([v.keys[layer][i].held for v in views]))
                    for i, key in enumerate(layer_keys)]
            for layer, layer_keys in first.keys.items()}
    pixels = {split: np.hstack([v.pixels[split] for v in views]) for split in first.pixels
              if all(split in v.pixels for v in views)}
    names = "+".join(v.worker for v in views)
    return View(names, first.slot, pixels, keys, first.errors, first.learning_rate,
                sorted({reason for v in views for reason in v.partial}))


# --- following columns across keys -------------------------------------------------------------------------------

def followed(keys: list) -> np.ndarray:
    """For each key, each column's index in the first key's order, as the worker can work it out: (keys, n)."""
    identity = [np.arange(keys[0].weights.shape[1])]
    for key in keys[1:]:
        if key.held is None:  # nothing to match against: the worker starts counting afresh
            identity.append(np.arange(key.weights.shape[1]))
            continue
        _, matched = linear_sum_assignment(cdist(key.weights.T, key.held.T, "sqeuclidean"))
        identity.append(identity[-1][matched])
    return np.array(identity)


def true_units(keys: list, permutations: list) -> np.ndarray:
    """The true unit of each column of each key: (keys, n)."""
    return np.array([_in_force(permutations, key.round) for key in keys])


def _in_force(permutations: list, round_number: int) -> np.ndarray:
    """The permutation of the latest (round, permutation) at or before the round."""
    rounds = [number for number, _ in permutations]
    at = np.searchsorted(rounds, round_number, side="right") - 1
    if at < 0:
        raise AuditError(f"{KEYS_FILE} has no permutation for round {round_number}")
    return permutations[at][1]


def tracking_accuracy(identity: np.ndarray, units: np.ndarray) -> float:
    """The fraction of later keys' columns the worker follows to the right unit of the first key."""
    if len(identity) < 2:
        return float("nan")
    guessed = units[0][identity[1:]]  # the unit the worker thinks each column is
    return float(np.mean(guessed == units[1:]))


# --- labels -------------------------------------------------------------------------------------------------------

def in_first_order(errors: list, identity: np.ndarray) -> list:
    """Each error with its columns put in the first key's order."""
    aligned = []
    for error in errors:
        values = np.empty_like(error.values)
        values[:, identity[error.key]] = error.values
        aligned.append(values)
    return aligned


def label_columns(aligned: list) -> list:
    """Per error, each row's label column: the output error's one negative (least) entry."""
    return [values.argmin(axis=1) for values in aligned]


def predictions(aligned: list, rows: list) -> list:
    """Per error, the model's own guess for each row: the largest of B d2 + one-hot(label column) (bce, ce)."""
    guesses = []
    for values, batch in zip(aligned, rows):
        outputs = values * len(batch)
        outputs[np.arange(len(values)), values.argmin(axis=1)] += 1
        guesses.append(outputs.argmax(axis=1))
    return guesses


def error_clusters(aligned: list, classes: int, rng: np.random.Generator) -> list:
    """Per error, a cluster id for each row: cosine k-means over windows of WINDOW_ROWS rows, the first window's the
    tightest of several starts, each later one's started from the last window's centroids, so that a cluster keeps
    its id as the class directions drift with training (85% of a default run's labels as separate windows matched
    afterwards, 94% seeded)."""
    labels, window, previous = [], [], None

    def flush():
        nonlocal previous
        unit = _unit_rows(np.vstack(window))
        if previous is None:
            previous, ids = _tightest_kmeans(unit, classes, rng)
        else:
            with warnings.catch_warnings():  # a class absent from a window leaves its cluster empty: it keeps its place
                warnings.simplefilter("ignore")
                centroids, ids = kmeans2(unit, previous, minit="matrix")
            previous = _unit_rows(centroids)
        start = 0
        for values in window:
            labels.append(ids[start : start + len(values)])
            start += len(values)
        window.clear()

    for values in aligned:
        window.append(values)
        if sum(map(len, window)) >= WINDOW_ROWS:
            flush()
    if window:
        flush()
    return labels


def _tightest_kmeans(unit: np.ndarray, classes: int, rng: np.random.Generator) -> tuple:
    best = None
    for _ in range(CLUSTER_RESTARTS):
        centroids, ids = kmeans2(unit, classes, minit="++", seed=rng)
        spread = np.sum((unit - centroids[ids]) ** 2)
        if best is None or spread < best[0]:
            best = (spread, centroids, ids)
    return _unit_rows(best[1]), best[2]


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def nearest_known(aligned: list, rows: list, known: np.ndarray, known_labels: np.ndarray, images: int) -> list:
    """Per error, each row's label as that of the known image whose d1 row of the same epoch is nearest in angle
    (the direction attack of Li et al., ICLR 2022, with known labels as anchors)."""
    unit = [_unit_rows(values) for values in aligned]
    epochs = np.cumsum([0] + [len(batch) for batch in rows])[:-1] // images  # each image comes once an epoch
    label_of = dict(zip(known.tolist(), known_labels.tolist()))
    guesses = []
    for epoch in np.unique(epochs):
        members = np.flatnonzero(epochs == epoch)
        anchors = [(unit[i][j], label_of[row]) for i in members for j, row in enumerate(rows[i]) if row in label_of]
        if not anchors:
            guesses += [np.full(len(rows[i]), -1) for i in members]
            continue
        directions, labels = np.array([a for a, _ in anchors]), np.array([label for _, label in anchors])
        guesses += [labels[(unit[i] @ directions.T).argmax(axis=1)] for i in members]
    return guesses


def per_image(rows: list, guesses: list, images: int, classes: int) -> np.ndarray:
    """Each training image's most frequent guess over the epochs it was seen, -1 for images never seen: (n,)."""
    votes = np.zeros((images, classes + 1), np.int64)  # the last column counts no guess (-1)
    np.add.at(votes, (np.concatenate(rows), np.concatenate(guesses)), 1)
    votes = votes[:, :classes]
    guessed = votes.argmax(axis=1)
    guessed[votes.sum(axis=1) == 0] = -1
    return guessed


# --- scoring ------------------------------------------------------------------------------------------------------

def best_renaming(guesses: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """The renaming of guessed ids to classes that makes most guesses right (the auditor's view): (classes,)."""
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (guesses, truth), 1)
    ids, named = linear_sum_assignment(-confusion)
    renaming = np.empty(classes, int)
    renaming[ids] = named
    return renaming


def named_by_known(guesses: np.ndarray, known: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """The renaming an attacker makes from the labels it knows: each id gets the known label seen most with it;
    ids no known image names get the labels left, in order (the attacker cannot tell them apart)."""
    votes = np.zeros((classes, classes), np.int64)
    np.add.at(votes, (guesses[known], truth[known]), 1)
    renaming = np.full(classes, -1)
    for guessed in np.argsort(-votes.max(axis=1), kind="stable"):
        if votes[guessed].max() > 0 and votes[guessed].argmax() not in renaming:
            renaming[guessed] = votes[guessed].argmax()
    left = [label for label in range(classes) if label not in renaming]
    renaming[renaming < 0] = left[: int(np.sum(renaming < 0))]
    return renaming


def known_images(truth: np.ndarray, count: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """`count` training images whose labels the attacker knows: classes in turn, one image of each, then again."""
    by_class = [rng.permutation(np.flatnonzero(truth == label)) for label in range(classes)]
    return np.array([by_class[i % classes][i // classes] for i in range(count) if i // classes < len(by_class[i % classes])],
                    dtype=np.int64)


@dataclass
class Score:
    attack: str
    recovered: float  # fraction right, up to the best renaming of the classes
    with_known: float | None  # fraction right of the images not known, named from the known ones
    control: float  # `recovered`, against the true labels shuffled
    chance: float  # what guessing achieves
    images: int  # how many were scored
    note: str = ""
    bound: float | None = None  # with --label-privacy: the probability that randomized response kept a label
    first_stage: float | None = None  # `recovered`, of the images whose label plain randomized response drew
    above_bound: bool | None = None  # whether `first_stage` passes the bound by over 3 standard errors of its count


def scored(attack: str, guesses: np.ndarray, truth: np.ndarray, shuffled: np.ndarray, known: np.ndarray,
           classes: int, note: str = "", naming: np.ndarray | None = None) -> Score:
    """A per-image guess scored against the truth and the control; images never guessed (-1) are left out.

    With K known labels the attacker names the guessed ids from them, or uses `naming`: the renaming it already
    has for guesses in the same ids (identity for guesses that are labels already)."""
    seen = guesses >= 0
    g, t, s = guesses[seen], truth[seen], shuffled[seen]
    recovered = np.mean(best_renaming(g, t, classes)[g] == t)
    control = np.mean(best_renaming(g, s, classes)[g] == s)
    with_known = None
    known_seen = np.intersect1d(known, np.flatnonzero(seen))
    if len(known):
        renaming = named_by_known(guesses, known_seen, truth, classes) if naming is None else naming
        unknown = seen.copy()
        unknown[known] = False
        with_known = float(np.mean(renaming[guesses[unknown]] == truth[unknown]))
    chance = float(np.max(np.bincount(t, minlength=classes)) / len(t))
    return Score(attack, float(recovered), with_known, float(control), chance, int(seen.sum()), note)


# --- the pixel classifier -----------------------------------------------------------------------------------------

def nearest_neighbours(train_pixels: np.ndarray, labels: np.ndarray, pixels: np.ndarray, classes: int) -> np.ndarray:
    """Each image's digit by a vote of the NEIGHBOURS training images nearest in the worker's pixels: (n,).

    (On 112 random pixels of MNIST: 91% of test digits with every true label, against 78% for a linear
    classifier.) Distances come from matrix products, |a|^2 - 2 a.b + |b|^2, a chunk of images at a time."""
    train = train_pixels.astype(np.float32)
    train_norms = np.einsum("ij,ij->i", train, train)  # (m,)
    guesses = []
    for start in range(0, len(pixels), NEIGHBOUR_CHUNK):
        chunk = pixels[start : start + NEIGHBOUR_CHUNK].astype(np.float32)
        distances = train_norms[None, :] - 2 * chunk @ train.T  # (c, k) @ (k, m) -> (c, m); |a|^2 ranks nothing
        nearest = np.argpartition(distances, NEIGHBOURS - 1, axis=1)[:, :NEIGHBOURS]  # (c, NEIGHBOURS)
        votes = np.zeros((len(chunk), classes), np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(chunk)), NEIGHBOURS), labels[nearest].ravel()), 1)
        guesses.append(votes.argmax(axis=1))
    return np.concatenate(guesses)


# --- the run's truth ----------------------------------------------------------------------------------------------

@dataclass
class Truth:
    config: TrainingConfig
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_images: np.ndarray  # (n, I) uint8, to tell that a recording is of this run
    test_images: np.ndarray
    holders: dict  # worker name -> the input columns of its first exposure record
    permutations: dict  # layer -> [(round, permutation)] of the first session
    private: PrivateLabels | None  # a label-private run's trained labels, from labels.npz

    @property
    def classes(self) -> int:
        return int(self.train_labels.max()) + 1


def truth_of(run_dir: Path) -> Truth:
    """What the coordinator knows of a run, or AuditError naming the file that is missing."""
    run_dir = Path(run_dir)
    for name in ("config.json", "exposure.jsonl", KEYS_FILE):
        if not (run_dir / name).is_file():
            raise AuditError(f"{run_dir} has no {name}: audit a distributed run's directory")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        saved.pop("mode", None)
        config = TrainingConfig(**saved)
        exposure = [json.loads(line) for line in (run_dir / "exposure.jsonl").read_text().splitlines()]
        permutations = _keys_log(run_dir / KEYS_FILE)
    except (ValueError, TypeError, KeyError) as error:
        raise AuditError(f"cannot read the run in {run_dir}: {error}") from None
    holders = {}
    for record in exposure:
        holders.setdefault(record["worker"], np.array(record["columns"]))
    data = config.load_data()
    return Truth(config, data.train_labels, data.test_labels, data.train_images, data.test_images, holders, permutations,
                 _private_labels(run_dir, config))


def _private_labels(run_dir: Path, config: TrainingConfig) -> PrivateLabels | None:
    if config.label_privacy is None:
        return None
    try:
        with np.load(run_dir / LABELS_FILE, allow_pickle=False) as saved:
            return PrivateLabels.from_arrays(saved, config.label_privacy, config.label_privacy_stages,
                                             OUTPUT_UNITS[config.dataset])
    except (OSError, ValueError, KeyError) as error:
        raise AuditError(f"{run_dir} is a label-private run whose {LABELS_FILE} cannot be read: {error}") from None


def _keys_log(path: Path) -> dict:
    """layer -> [(round, permutation)] of the first coordinator session in the keys log."""
    permutations, sessions = {}, 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a kill: the rest of the log is not trusted
            break
        if "session" in entry:
            sessions += 1
            if sessions > 1:
                break
            continue
        permutations.setdefault(entry["layer"], []).append((entry["round"], np.array(entry["permutation"])))
    return permutations


def check_belongs(view: View, truth: Truth, folder: Path) -> None:
    """Refuse a recording that is not of this run: its worker must have held these very pixels of the run's images."""
    columns = truth.holders.get(view.worker.split("+")[0])
    pixels = view.pixels["train"]
    if columns is None:
        raise AuditError(f"the recording in {folder} is of worker {view.worker}, who took no part in this run")
    first = truth.train_images[:, columns[: pixels.shape[1]]]
    if first.shape != pixels.shape or not np.array_equal(first, pixels):
        raise AuditError(f"the recording in {folder} is not of this run: worker {view.worker}'s pixels differ")


# --- the audit ----------------------------------------------------------------------------------------------------

@dataclass
class Audit:
    worker: str
    slot: int
    mode: dict
    known_labels: int
    scores: list
    partial: list



def save_audits(run_dir: Path, audits: list) -> Path:
    """Write RUN_DIR/audit.json: the worker's audit, then its colluders' if any."""
    path = Path(run_dir) / AUDIT_FILE
    path.write_text(json.dumps([asdict(result) for result in audits], indent=1) + "\n")
    return path


def audit_run(run_dir: Path, recording: Path, colluders: list = (), known_labels: int = 10) -> list:
    """The audit of one worker's recording and, with colluders' recordings, of all of them pooled."""
    truth = truth_of(run_dir)
    views = [_checked_view(folder, truth) for folder in [recording, *colluders]]
    audits = [audit(truth, views[:1], known_labels)]
    if colluders:
        audits.append(audit(truth, views, known_labels))
    return audits


def _checked_view(folder: Path, truth: Truth) -> View:
    view = view_of(read_recording(folder), truth.config)
    check_belongs(view, truth, folder)
    return view


class Scoring:
    """Scores guesses of the training labels against the truth and the control, and keeps each attack's guesses;
    in a label-private run, also over the images plain randomized response drew, beside the bound."""

    def __init__(self, truth: Truth, known_labels: int, rng: np.random.Generator):
        self.truth, self.classes = truth.train_labels, truth.classes
        self.private = truth.private
        self.shuffled = np.random.default_rng(CONTROL_SEED).permutation(self.truth)  # what no attack can know
        self.known = known_images(self.truth, known_labels, self.classes, rng)
        self.scores, self.guesses = [], {}

    def labels(self, attack: str, guesses: np.ndarray, note: str = "", naming: np.ndarray | None = None) -> None:
        """Score a per-image guess of the labels (see `scored`)."""
        self.guesses[attack] = guesses
        score = scored(attack, guesses, self.truth, self.shuffled, self.known, self.classes, note, naming)
        if self.private is not None:
            first = (self.private.stage == FIRST) & (guesses >= 0)
            renaming = best_renaming(guesses[guesses >= 0], self.truth[guesses >= 0], self.classes)
            score.bound = bound = keep_probability(self.private.eps, self.classes)
            score.first_stage = float(np.mean(renaming[guesses[first]] == self.truth[first]))
            score.above_bound = bool(score.first_stage > bound + 3 * np.sqrt(bound * (1 - bound) / first.sum()))
        self.scores.append(score)

    def best_labels(self) -> tuple:
        """(name, guesses) of the label attack that recovered most."""
        best = max((score for score in self.scores if score.attack in self.guesses), key=lambda s: s.recovered)
        return best.attack, self.guesses[best.attack]


def audit(truth: Truth, views: list, known_labels: int = 10, seed: int = 0) -> Audit:
    """Attack what one worker, or colluders pooled, saw, scored against the run's truth."""
    config = truth.config
    view = views[0] if len(views) == 1 else pooled(views)
    rng = np.random.default_rng(seed)
    scoring = Scoring(truth, known_labels, rng)
    output_layer = len(config.hidden) + 1
    identities = {layer: followed(keys) for layer, keys in view.keys.items()}
    _score_tracking(scoring, view, truth, identities, output_layer)
    if output_layer in view.errors:
        _attack_output_error(scoring, view.errors[output_layer], identities[output_layer], output_layer, config.loss)
    if 1 in view.errors:
        _attack_first_error(scoring, view.errors[1], identities[1], rng)
    if scoring.guesses:
        scoring.scores += _pixel_attack(view, truth, *scoring.best_labels(), scoring.known, scoring.classes)
    mode = {"later_layers": "workers" if output_layer in view.errors else "coordinator", "rekey": config.rekey,
            "hidden": list(config.hidden), "dropout": config.dropout, "loss": config.loss, "colluders": len(views),
            "label_privacy": config.label_privacy, "label_privacy_stages": config.label_privacy_stages}
    return Audit(view.worker, view.slot, mode, len(scoring.known), scoring.scores, view.partial)


def _score_tracking(scoring: Scoring, view: View, truth: Truth, identities: dict, output_layer: int) -> None:
    """How well the worker followed each layer's columns, against the permutations and against a random truth."""
    for layer, keys in sorted(view.keys.items()):
        if layer not in truth.permutations:
            continue
        units = true_units(keys, truth.permutations[layer])
        random_units = units[:, np.random.default_rng(CONTROL_SEED).permutation(units.shape[1])]
        what = "hidden units" if layer < output_layer else "output classes"
        scoring.scores.append(Score(
            f"tracking: layer {layer}'s {what} across {len(keys)} keys", tracking_accuracy(identities[layer], units),
            None, tracking_accuracy(identities[layer], random_units), 1 / units.shape[1], units.shape[1]))


def _attack_output_error(scoring: Scoring, errors: list, identity: np.ndarray, layer: int, loss: str) -> None:
    """The labels from the output layer's error: per round alone, then linked across rounds; and the model's guess."""
    d, images, classes = f"d{layer}", len(scoring.truth), scoring.classes  # d2 in the default network
    per_round = [_round_score(e.values.argmin(axis=1), scoring.truth[e.rows], classes) for e in errors]
    control = float(np.mean([_round_score(e.values.argmin(axis=1), scoring.shuffled[e.rows], classes) for e in errors]))
    scoring.scores.append(Score(f"label from {d}, each round alone", float(np.mean(per_round)), None, control, control,
                                len(errors), "which rows of a round share a label; chance is the control"))
    rows, aligned = [e.rows for e in errors], in_first_order(errors, identity)
    labels = per_image(rows, label_columns(aligned), images, classes)
    scoring.labels(f"label from {d}, rounds linked", labels)
    if loss in ("bce", "ce"):  # where d2 = prediction - target, so the prediction can be read back
        guessed = per_image(rows, predictions(aligned, rows), images, classes)
        known = scoring.known  # both guesses are in the same columns: the known images name them together
        naming = named_by_known(np.concatenate([labels, guessed]), np.concatenate([known, known + images]),
                                np.concatenate([scoring.truth, scoring.truth]), classes)
        scoring.labels(f"prediction read from {d}", guessed, "the model's guess, not the label trained on", naming)


def _attack_first_error(scoring: Scoring, errors: list, identity: np.ndarray, rng: np.random.Generator) -> None:
    """The labels from d1: clustered, and by the nearest known image (the clusters named by the latter's guesses)."""
    images, classes, known = len(scoring.truth), scoring.classes, scoring.known
    rows, aligned = [e.rows for e in errors], in_first_order(errors, identity)
    clusters = per_image(rows, error_clusters(aligned, classes, rng), images, classes)
    if not len(known):
        scoring.labels("label from d1, clustered", clusters, f"cosine k-means, windows of {WINDOW_ROWS} rows")
        return
    nearest = per_image(rows, nearest_known(aligned, rows, known, scoring.truth[known], images), images, classes)
    both = (clusters >= 0) & (nearest >= 0)
    scoring.labels("label from d1, clustered", clusters, f"cosine k-means, windows of {WINDOW_ROWS} rows; clusters "
                   "named by their rows' nearest known labels", best_renaming(clusters[both], nearest[both], classes))
    scoring.labels("label from d1, nearest known (Li et al.)", nearest,
                   "cosine to the known images' d1 of the same epoch", np.arange(classes))


def _round_score(guesses: np.ndarray, truth: np.ndarray, classes: int) -> float:
    return float(np.mean(best_renaming(guesses, truth, classes)[guesses] == truth))


def _pixel_attack(view: View, truth: Truth, source: str, guesses: np.ndarray, known: np.ndarray, classes: int) -> list:
    """A classifier the worker trains on its own training pixels with the labels it inferred, scored on its test
    pixels (up to the renaming that best fits the training guesses, and named from the known labels); and the same
    classifier trained on every true label, as a reference: what the pixels alone allow."""
    if "test" not in view.pixels or not len(truth.test_labels):
        return []
    seen = guesses >= 0
    test_guesses = nearest_neighbours(view.pixels["train"][seen], guesses[seen], view.pixels["test"], classes)
    test = truth.test_labels
    renaming = best_renaming(guesses[seen], truth.train_labels[seen], classes)
    shuffled = np.random.default_rng(CONTROL_SEED).permutation(test)
    known_renaming = named_by_known(guesses, known[seen[known]], truth.train_labels, classes) if len(known) else None
    ceiling = nearest_neighbours(view.pixels["train"], truth.train_labels, view.pixels["test"], classes)
    chance = float(np.max(np.bincount(test)) / len(test))
    return [
        Score(f"digit from its own pixels ({view.pixels['train'].shape[1]} pixels)",
              float(np.mean(renaming[test_guesses] == test)),
              None if known_renaming is None else float(np.mean(known_renaming[test_guesses] == test)),
              float(np.mean(renaming[test_guesses] == shuffled)), chance, len(test),
              f"trained on the guesses of '{source}'"),
        Score("digit from its own pixels, every true label", float(np.mean(ceiling == test)), None,
              float(np.mean(ceiling == shuffled)), chance, len(test), "a reference: what the pixels alone allow"),
    ]


HEADINGS = ("attack", "recovered", "with known", "control", "chance", "scored", "how")
PRIVATE_HEADINGS = ("first stage", "bound")


def table(result: Audit) -> tuple:
    """(headings, rows) of the audit as a printed table; a label-private run's has the bound and each attack's score
    over the images randomized response drew beside it, marked `above` where it passes by over 3 standard errors."""
    def percent(value):
        return "-" if value is None or value != value else f"{value:.1%}"

    private = result.mode.get("label_privacy") is not None
    rows = []
    for s in result.scores:
        row = [s.attack, percent(s.recovered), percent(s.with_known), percent(s.control), percent(s.chance),
               str(s.images)]
        if private:
            row += [percent(s.first_stage) + (" above" if s.above_bound else ""), percent(s.bound)]
        rows.append((*row, s.note))
    headings = (*HEADINGS[:-1], *PRIVATE_HEADINGS, HEADINGS[-1]) if private else HEADINGS
    return headings, rows
