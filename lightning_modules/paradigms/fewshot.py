"""Few-shot recognition with a frozen backbone: seeded N-way K-shot episodes, prototype and linear-probe
classifiers on the episode's features, and the mean accuracy with its 95 % interval over episodes.

Episodes are a pure function of (labels, N, K, Q, seed, episode index): episode ``e`` of seed ``s`` draws its
classes, then per class one permutation of that class's faces whose first Q are the queries and the next K the
support. The queries therefore come first, so with the same class pool an episode has the same classes and queries
at every K, and its 1-shot support lies inside its 5-shot one: the K's of one table are paired comparisons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("prototype", "linear_probe")
# A checkpoint key naming a LightningModule class with ``forward_features`` (e.g. the ssl stage's SimCLR): few-shot
# episodes load such a backbone by that class instead of as a FER classifier.
FEATURE_MARKER = "feature_module_class"
METRICS = ("cosine", "euclidean")
Z_95 = 1.96


@dataclass(frozen=True)
class Episode:
    """Indices into the split's faces; labels are episode-local (0..N-1, in the order of ``classes``)."""
    classes: tuple[int, ...]
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def class_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def short_classes(labels: np.ndarray, k_shot: int, n_query: int,
                  classes: Optional[Iterable[int]] = None) -> dict[int, int]:
    """class -> its number of faces, for the classes (default: those present) with fewer than K + Q faces."""
    counts = class_counts(labels)
    wanted = counts if classes is None else {int(c): counts.get(int(c), 0) for c in classes}
    return {c: n for c, n in sorted(wanted.items()) if n < k_shot + n_query}


def check_episode_args(n_way: int, k_shot: int, n_query: int) -> None:
    for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def sample_episode(labels: np.ndarray, n_way: int, k_shot: int, n_query: int, rng: np.random.Generator,
                   classes: Optional[Sequence[int]] = None) -> Episode:
    """One N-way K-shot episode with Q queries per class, drawn from ``classes`` (default: every label present)
    that have at least K + Q faces; the others are left out (``short_classes`` names them). ValueError when fewer
    than N classes remain."""
    check_episode_args(n_way, k_shot, n_query)
    labels = np.asarray(labels)
    pool_all = sorted(class_counts(labels)) if classes is None else sorted(int(c) for c in classes)
    short = short_classes(labels, k_shot, n_query, pool_all)
    pool = [c for c in pool_all if c not in short]
    if len(pool) < n_way:
        detail = ", ".join(f"class {c}: {n}" for c, n in short.items())
        raise ValueError(f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes with >= "
                         f"{k_shot + n_query} faces; {len(pool)} of {len(pool_all)} have them"
                         + (f" (too few faces: {detail})" if detail else ""))
    chosen = tuple(sorted(int(c) for c in rng.choice(pool, size=n_way, replace=False)))
    support, query = [], []
    for c in chosen:
        faces = rng.permutation(np.flatnonzero(labels == c))
        query.append(faces[:n_query])
        support.append(faces[n_query:n_query + k_shot])
    local = np.arange(n_way)
    return Episode(classes=chosen, support=np.concatenate(support), support_labels=np.repeat(local, k_shot),
                   query=np.concatenate(query), query_labels=np.repeat(local, n_query))


def episode_rng(seed: int, episode: int) -> np.random.Generator:
    """Episode ``episode`` of ``seed`` has its own stream: it does not depend on how many episodes are drawn."""
    return np.random.default_rng([int(seed), int(episode)])


def episodes(labels: np.ndarray, n_way: int, k_shot: int, n_query: int, num_episodes: int, seed: int,
             classes: Optional[Sequence[int]] = None) -> list[Episode]:
    if not isinstance(num_episodes, int) or isinstance(num_episodes, bool) or num_episodes < 1:
        raise ValueError(f"num_episodes must be an integer >= 1, got {num_episodes!r}")
    return [sample_episode(labels, n_way, k_shot, n_query, episode_rng(seed, e), classes)
            for e in range(num_episodes)]


# ---------------------------------------------------------------------------------------------- classifiers
def prototype_predict(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_classes: int,
                      metric: str = "cosine") -> torch.Tensor:
    """Nearest class mean of the support features: cosine (features and means unit length) or euclidean."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "cosine":
        support, query = F.normalize(support, dim=1), F.normalize(query, dim=1)
    one_hot = F.one_hot(support_labels.long(), n_classes).to(support.dtype)
    prototypes = one_hot.T @ support / one_hot.sum(0).clamp_min(1).unsqueeze(1)
    if metric == "cosine":
        return (query @ F.normalize(prototypes, dim=1).T).argmax(1)
    return torch.cdist(query, prototypes).argmin(1)


def linear_probe_predict(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_classes: int,
                         steps: int = 100, lr: float = 0.1, weight_decay: float = 1e-3,
                         seed: int | Sequence[int] = 0) -> torch.Tensor:
    """Multinomial logistic regression fitted on the support (unit-length features, full batch, Adam, fixed
    steps and learning rate, L2 penalty on the weights, init seeded), predicting the queries.

    One episode: (S, D), (S,), (Q, D) -> (Q,). Many at once: (E, S, D), (E, S), (E, Q, D) with one seed per
    episode -> (E, Q); Adam is elementwise and the summed loss separates, so each episode's probe is the one it
    would get alone (batched only to save the per-step overhead)."""
    single = support.dim() == 2
    if single:
        support, support_labels, query = support[None], support_labels[None], query[None]
    seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if len(seeds) != len(support):
        raise ValueError(f"one seed per episode: {len(support)} episodes, {len(seeds)} seeds")
    x, q = F.normalize(support.float(), dim=-1), F.normalize(query.float(), dim=-1)
    init = [torch.randn(x.shape[-1], n_classes, generator=torch.Generator().manual_seed(s)) * 0.01 for s in seeds]
    weight = torch.stack(init).to(x.device).requires_grad_()
    bias = torch.zeros(len(seeds), 1, n_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    y = support_labels.long().to(x.device)
    with torch.enable_grad():
        for _ in range(int(steps)):
            optimizer.zero_grad(set_to_none=True)
            logits = torch.bmm(x, weight) + bias
            per_episode = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
            loss = (per_episode + weight_decay * weight.pow(2).sum((1, 2))).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        pred = (torch.bmm(q, weight) + bias).argmax(-1)
    return pred[0] if single else pred


def episode_accuracy(features: torch.Tensor, episode: Episode, method: str, *, metric: str = "cosine",
                     probe: Optional[dict] = None, seed: int = 0) -> float:
    """Query accuracy of ``method`` on one episode of ``features`` (the split's frozen features)."""
    return episode_accuracies(features, [episode], method, metric=metric, probe=probe, seeds=[seed])[0]


def episode_accuracies(features: torch.Tensor, eps: Sequence[Episode], method: str, *, metric: str = "cosine",
                       probe: Optional[dict] = None, seeds: Optional[Sequence[int]] = None) -> list[float]:
    """Query accuracy of ``method`` on each episode (all of one N, K, Q); the probes of all of them are fitted
    together (see ``linear_probe_predict``), ``seeds`` one per episode (default: its index)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not eps:
        return []
    index = lambda name: torch.as_tensor(np.stack([getattr(e, name) for e in eps]))  # noqa: E731
    support, query = features[index("support").to(features.device)], features[index("query").to(features.device)]
    y_support, y_query = index("support_labels").to(features.device), index("query_labels")
    n = len(eps[0].classes)
    if method == "prototype":
        pred = torch.stack([prototype_predict(s, y, q, n, metric) for s, y, q in zip(support, y_support, query)])
    else:
        pred = linear_probe_predict(support, y_support, query, n, **(probe or {}),
                                    seed=list(seeds) if seeds is not None else list(range(len(eps))))
    return (pred.cpu() == y_query).float().mean(1).tolist()


def summarize(accuracies: Sequence[float]) -> dict[str, float]:
    """Mean accuracy and the half-width of its 95 % interval, 1.96 * std / sqrt(episodes) (sample std)."""
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"a 95 % interval needs >= 2 episodes, got {len(values)}")
    std = float(values.std(ddof=1))
    return {"acc": float(values.mean()), "ci95": Z_95 * std / math.sqrt(len(values)), "std": std,
            "episodes": len(values)}


# ---------------------------------------------------------------------------------------------- features
def as_features(output) -> torch.Tensor:
    """A backbone's output as (N, D) features: a tensor, or the ``features`` entry of a FER classifier's dict."""
    if isinstance(output, dict):
        if "features" not in output:
            raise ValueError(f"the backbone returned a dict without 'features' (keys: {sorted(output)})")
        output = output["features"]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"the backbone must return (N, D) features, got {shape}")
    return output


@torch.no_grad()
def extract_features(backbone: nn.Module | Callable, batches: Iterable[dict], device: torch.device | str = "cpu",
                     progress: Optional[Callable[[Iterable], Iterable]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of every face the batches hold ({"image", "label"}; faces that failed
    to load are already left out of a batch), in one pass with no gradients. ``backbone`` is any module whose
    output is features (see ``as_features``); an nn.Module is put in eval mode."""
    if isinstance(backbone, nn.Module):
        backbone.eval()
    feats, labels = [], []
    for batch in (progress(batches) if progress else batches):
        if batch["image"].shape[0] == 0:
            continue
        feats.append(as_features(backbone(batch["image"].to(device))).float().cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        raise ValueError("no face could be loaded: no features")
    return torch.cat(feats), torch.cat(labels)
