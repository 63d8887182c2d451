"""Label differential privacy by randomized response: the labels a run trains on, drawn once, as pure functions.

With randomized response (RR) each training label y of K classes is replaced, once, by itself with probability
e^eps / (e^eps + K - 1) and by each other class with probability 1 / (e^eps + K - 1). Whatever is computed
from the replaced labels afterwards, every error a worker is sent included, is then eps-label-DP: one image's
true label changes the odds of anything that follows by at most e^eps. RR with a prior (Ghazi et al., NeurIPS
2021, "Deep Learning with Label Differential Privacy") spends the same eps better: it answers only among
the k classes a prior finds likeliest, k chosen to make the answer right most often, the prior coming from a
model trained on other images' replaced labels.

What this bounds, exactly: the label trained on is right with probability `keep_probability` (23% at eps 1,
45% at eps 2, 86% at eps 4, for ten classes) for an image whose label was replaced by plain RR. It does not
bound what a model learns from all the other images: a worker that reads the model's own prediction out of
the error it is sent recovers true labels about as often as the model is right, which label privacy allows.
"""

import numpy as np


def keep_probability(eps: float, classes: int) -> float:
    """The probability that randomized response keeps a label: (K - 1 + e^eps)^-1 e^eps."""
    return float(np.exp(eps) / (np.exp(eps) + classes - 1))


def randomized_response(labels: np.ndarray, eps: float, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Each label kept with `keep_probability`, else replaced by one of the other classes, uniformly: (n,) -> (n,)."""
    kept = rng.random(len(labels)) < keep_probability(eps, classes)
    others = (labels + rng.integers(1, classes, len(labels))) % classes  # uniform over the K - 1 other classes
    return np.where(kept, labels, others).astype(labels.dtype)


def top_classes(prior: np.ndarray, eps: float) -> np.ndarray:
    """The k of RR with a prior for each image: the k that maximises (mass of the k likeliest classes) *
    e^eps / (e^eps + k - 1), the probability that the answer is right: (n, K) -> (n,)."""
    mass = np.cumsum(-np.sort(-prior, axis=1), axis=1)  # (n, K): mass of the k likeliest, k = 1..K
    k = np.arange(1, prior.shape[1] + 1)
    return np.argmax(mass * np.exp(eps) / (np.exp(eps) + k - 1), axis=1) + 1


def rr_with_prior(labels: np.ndarray, prior: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """RRWithPrior: among each image's k likeliest classes under `prior` (n, K), its label is answered with
    probability e^eps / (e^eps + k - 1) if it is one of them, else one of them uniformly: (n,) -> (n,)."""
    count, classes = len(labels), prior.shape[1]
    k = top_classes(prior, eps)
    ranked = np.argsort(-prior, axis=1, kind="stable")  # (n, K), likeliest first
    in_top = (ranked == labels[:, None]) & (np.arange(classes) < k[:, None])
    is_in = in_top.any(axis=1)
    keep = is_in & (rng.random(count) < np.exp(eps) / (np.exp(eps) + k - 1))
    # otherwise a uniform pick among the top k, leaving the label out when it is among them
    position = np.where(in_top.any(axis=1), in_top.argmax(axis=1), k)  # the label's rank, or k if outside
    draw = np.floor(rng.random(count) * (k - is_in)).astype(int)  # uniform over k - 1 (label in) or k choices
    draw += is_in & (draw >= position)  # skip the label's own rank
    others = ranked[np.arange(count), draw]
    return np.where(keep, labels, others).astype(labels.dtype)


def prior_from_outputs(outputs: np.ndarray, eps: float) -> np.ndarray:
    """The true classes' probabilities from the outputs of a network trained on randomized labels: (n, K) -> (n, K).

    Such a network learns the replaced label's distribution, p_noisy = r + (q - r) p_true (q the keep probability,
    r = (1 - q) / (K - 1)); the prior undoes that known channel, clipped at 0, and falls back on uniform."""
    classes = outputs.shape[1]
    noisy = np.clip(outputs.astype(np.float64), 0, None)
    noisy /= np.maximum(noisy.sum(axis=1, keepdims=True), 1e-12)
    kept = keep_probability(eps, classes)
    other = (1 - kept) / (classes - 1)
    true = np.clip((noisy - other) / (kept - other), 0, None)  # (n, K)
    total = true.sum(axis=1, keepdims=True)
    return np.where(total > 0, true / np.maximum(total, 1e-12), 1 / classes)

