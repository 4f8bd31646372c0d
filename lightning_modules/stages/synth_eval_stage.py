"""`stage=synth_eval`: how good is a synthetic set, as the students will get it? A judge (a FER classifier) scores
the set's faces against the conditions they were synthesized for:

- FER-Acc: the judge's argmax equals the conditioned (target) expression, overall and per class;
- AU fidelity (sets made with AU targets): per-AU Pearson r / MAE / AU-Acc of the judge's AU head vs the targets;
- FID / KID against real faces of ``synth_eval.real_split`` in the judge's feature space;
- coverage (``synth_eval.quality``): at equal numbers against half of those real faces, with their other half as
  the yardstick: FID, k-NN precision / recall, within-class feature and AU spread (diversity);
- on a relabelled set, how good the vote's labels are by the judge (``vote_quality``): does the judge agree with
  the label a student would learn, where the vote kept or changed the conditioned label, and how much soft-label
  mass sits on the judge's class.

This scores whatever made the set (generator, semantic guidance, layout initialisation), so the cumulative ablation
compares its rows here; the generator stage's own evaluation scores the generator alone on fixed conditions. The
metrics name their judge and whether it also guided the set (a judge that guided overrates guided faces).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

STAGE = "synth_eval"
HASH_KEYS = ["data", "synth_eval", "seed"]
SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def check_config(se: DictConfig) -> None:
    require(str(se.real_split) in SPLITS, "synth_eval.real_split",
            f"must be one of {', '.join(SPLITS)}, got {se.real_split!r}")
    max_faces = se.max_faces
    require(max_faces is None or (isinstance(max_faces, int) and not isinstance(max_faces, bool) and max_faces >= 2),
            "synth_eval.max_faces", f"must be a number of faces >= 2 or null (all), got {max_faces!r}")
    require(isinstance(se.batch_size, int) and se.batch_size >= 1, "synth_eval.batch_size",
            f"must be >= 1, got {se.batch_size!r}")
    require(float(se.au_active_threshold) >= 0, "synth_eval.au_active_threshold",
            f"must be >= 0, got {se.au_active_threshold}")
    require(isinstance(se.quality, bool), "synth_eval.quality", f"must be true or false, got {se.quality!r}")
    require(isinstance(se.quality_k, int) and not isinstance(se.quality_k, bool) and se.quality_k >= 1,
            "synth_eval.quality_k", f"must be a neighbour count >= 1, got {se.quality_k!r}")


def set_judge(cfg: DictConfig):
    """``synth_eval.judge`` (separate | guide | a checkpoint) resolved against this run, its checkpoint checked."""
    from lightning_modules.generator.evaluation import resolve_judge

    judge = resolve_judge(str(cfg.synth_eval.judge), cfg.paths.run_dir, cfg.synthesis.guidance.classifier)
    if not judge.checkpoint.is_file():
        hint = {"separate": "stage=pipeline trains it (or: stage=teacher teacher.name=judge teacher.seed=1)",
                "guide": "the guiding classifier synthesis.guidance.classifier"}.get(judge.mode, "a teacher checkpoint")
        raise ConfigError("synth_eval.judge", f"{cfg.synth_eval.judge}: no judge checkpoint at {judge.checkpoint} "
                                              f"({hint})")
    return judge


def done_digest(cfg: DictConfig) -> str:
    """Config + the set's manifest (it changes with every shard written or relabelled) + the judge."""
    from datamodules.synthetic import MANIFEST

    return runtime.inputs_hash(cfg, HASH_KEYS, [Path(str(cfg.synth_eval.input)) / MANIFEST,
                                                set_judge(cfg).checkpoint])


def step(cfg: DictConfig):
    """The pipeline step: (output folder, done digest, runner, config)."""
    return Path(cfg.paths.run_dir) / STAGE, done_digest(cfg), lambda: run_synth_eval_stage(cfg), cfg


def pick(n: int, max_faces: Optional[int], seed: int) -> np.ndarray:
    """A seeded subset of ``max_faces`` of ``n`` indices (all when ``max_faces`` is null or >= n), sorted."""
    if max_faces is None or max_faces >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_faces])


def synthetic_conditions(rows: dict, seed: int):
    """(faces (N,3,H,W) in [0,1], their ``EvalConditions``) from a slice of a synthetic set; gray faces (mode L)
    are repeated to three channels, as students get them."""
    import torchvision.transforms.v2.functional as TF

    from lightning_modules.generator.evaluation import EvalConditions

    images = torch.stack([TF.to_dtype(TF.to_image(im.convert("RGB")), torch.float32, scale=True)
                          for im in rows["image"]])
    conds = EvalConditions(labels=torch.tensor(rows["target_label"], dtype=torch.long),
                           aus=torch.tensor(rows["target_aus"], dtype=torch.float32),
                           au_mask=torch.tensor(rows["au_mask"], dtype=torch.bool),
                           captions=list(rows["caption"]), seeds=[seed] * len(rows["caption"]))
    return images, conds


def real_faces(cfg: DictConfig, split: str, n: Optional[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (None: all) seeded real faces of ``split`` in [0,1], one size, and their labels (-1 unknown): the
    FID/KID and coverage reference."""
    from lightning_modules.generator.evaluation import reference_faces
    from lightning_modules.stages.classifier_stage import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit" if split != "test" else "test")
    records = datamodule.records[split]
    if len(records) < 2:
        raise ConfigError("synth_eval.real_split", f"the {split} split has {len(records)} face(s); FID/KID need >= 2")
    images, loaded = reference_faces([records[i] for i in pick(len(records), n, seed)])
    return images, torch.tensor([r.label for r in loaded], dtype=torch.long)


def vote_quality(judge_pred: torch.Tensor, conditioned: torch.Tensor, final: torch.Tensor, kept: torch.Tensor,
                 soft: Optional[torch.Tensor] = None, class_names: Optional[Sequence[str]] = None) -> dict:
    """The vote's labels as a judge sees them, over the faces the vote kept (what students train on).

    ``vote/judge_agrees``: the judge's argmax equals the vote's final label (overall and per conditioned class);
    ``vote/keeps_condition``: final label = conditioned label; ``vote/changed/judge_agrees_vote`` and
    ``.../judge_agrees_condition``: where the vote changed the label, whom the judge sides with;
    ``vote/soft_mass_on_judge``: the mean soft-label probability of the judge's class (1 = a hard label the judge
    agrees with). Fractions of an empty group are None.
    """
    def share(mask: torch.Tensor, among: torch.Tensor):
        return (mask & among).sum().item() / among.sum().item() if among.any() else None

    kept = kept.bool()
    agrees = judge_pred == final
    changed = kept & (final != conditioned)
    out = {"vote/kept": kept.float().mean().item() if len(kept) else None,
           "vote/judge_agrees": share(agrees, kept),
           "vote/keeps_condition": share(final == conditioned, kept),
           "vote/changed/judge_agrees_vote": share(agrees, changed),
           "vote/changed/judge_agrees_condition": share(judge_pred == conditioned, changed)}
    if soft is not None and kept.any():
        out["vote/soft_mass_on_judge"] = soft[kept].gather(1, judge_pred[kept, None]).mean().item()
    for c in conditioned.unique().tolist():
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        out[f"vote/judge_agrees/{name}"] = share(agrees, kept & (conditioned == c))
    return out


def coverage_metrics(judge, judge_image_size: int, synthetic: torch.Tensor, synthetic_labels: torch.Tensor,
                     real: torch.Tensor, real_labels: torch.Tensor, seed: int, k: int = 3, batch_size: int = 256,
                     class_names: Optional[Sequence[str]] = None) -> dict:
    """The synthetic faces against real ones at equal numbers, with real faces as their own yardstick.

    The real faces are split (seeded) into a reference half and a comparison half of m faces each, m = min(synthetic,
    real // 2); the synthetic faces (m, seeded) and the comparison half are each scored against the reference half:
    ``quality/<synthetic|real>/fid`` (FID at equal m: real-vs-real is the floor that m faces allow), ``.../precision``
    and ``.../recall`` (k-NN manifolds), ``.../spread`` (mean within-class pairwise feature distance, synthetic faces
    by conditioned class, real by label: diversity), ``.../au_spread`` (mean AU standard deviation within a class, by
    the judge's AU head); ``quality/spread_ratio`` = synthetic / real spread, also per class."""
    from lightning_modules.generator import feature_metrics as fm
    from lightning_modules.generator.evaluation import TeacherFeatures, teacher_scores

    m = min(len(synthetic), len(real) // 2)
    if m <= k:
        reason = (f"coverage needs more than synth_eval.quality_k={k} faces per set; {len(synthetic)} synthetic "
                  f"and {len(real)} real faces give {m}")
        log.warning("synth_eval: %s: skipped", reason)
        return {"quality/skipped": reason}
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(real)))
    ref, other = order[:m], order[m:2 * m]
    chosen = torch.from_numpy(pick(len(synthetic), m, seed))
    features = TeacherFeatures(judge, judge_image_size)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([features(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])

    reference = embed(real[ref])
    sets = {"synthetic": (synthetic[chosen], synthetic_labels[chosen]), "real": (real[other], real_labels[other])}
    num_classes = int(max(synthetic_labels.max(), real_labels.max())) + 1
    out: dict = {"quality/faces_per_set": m, "quality/k": k}
    spreads, au_spreads = {}, {}
    for name, (images, labels) in sets.items():
        feats = embed(images)
        out.update({f"quality/{name}/{key}": value
                    for key, value in fm.knn_precision_recall(reference, feats, k).items()})
        out[f"quality/{name}/fid"] = fm.fid_of_features(reference, feats)
        spreads[name] = fm.class_spread(feats, labels, num_classes)
        aus = teacher_scores(judge, images, judge_image_size, batch_size, need_aus=False)[1]
        if aus is not None:
            au_spreads[name] = fm.au_spread(aus, labels, num_classes)
    for metric, per_set in (("spread", spreads), ("au_spread", au_spreads)):
        if len(per_set) < 2:
            continue
        out[f"quality/synthetic/{metric}"], out[f"quality/real/{metric}"] = fm.mean_of_shared(per_set["synthetic"],
                                                                                             per_set["real"])
        for c in range(num_classes):
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            syn, rl = per_set["synthetic"].get(c), per_set["real"].get(c)
            out[f"quality/synthetic/{metric}/{name}"], out[f"quality/real/{metric}/{name}"] = syn, rl
    syn_spread, real_spread = out.get("quality/synthetic/spread"), out.get("quality/real/spread")
    out["quality/spread_ratio"] = syn_spread / real_spread if syn_spread is not None and real_spread else None
    return out


def evaluate_set(dataset, judge, judge_image_size: int, au_names: Sequence[int], real: Optional[torch.Tensor],
                 max_faces: Optional[int], seed: int, batch_size: int = 256, au_active_threshold: float = 1.0,
                 real_labels: Optional[torch.Tensor] = None, quality_k: Optional[int] = None) -> dict:
    """The judge's scores of (a seeded subset of) ``dataset`` against its conditions + FID/KID against ``real``
    (None: no FID) + with ``quality_k`` the coverage metrics against ``real`` / ``real_labels``."""
    from datamodules.labels import EXPRESSIONS
    from lightning_modules.generator.evaluation import (TeacherFeatures, distribution_metrics, fidelity_metrics,
                                                        teacher_scores)

    indices = pick(len(dataset), max_faces, seed)
    images, conds = synthetic_conditions(dataset.select(indices)[:], seed)
    probs, aus = teacher_scores(judge, images, judge_image_size, batch_size, need_aus=conds.has_aus)
    metrics = fidelity_metrics(probs, aus, conds, au_names, au_active_threshold)
    metrics["num_samples"] = len(conds)
    if "final_label" in dataset.column_names:  # a relabelled set: are the labels students learn right?
        votes = dataset.select(indices).select_columns(["final_label", "kept", "soft_label"])[:]
        metrics.update(vote_quality(probs.argmax(-1), conds.labels, torch.tensor(votes["final_label"]),
                                    torch.tensor(votes["kept"]), torch.tensor(votes["soft_label"]), EXPRESSIONS))
    if real is not None:
        size = images.shape[-1]
        real = torch.nn.functional.interpolate(real, size=(size, size), mode="bilinear", antialias=True)
        metrics.update(distribution_metrics(TeacherFeatures(judge, judge_image_size), images, real, batch_size))
        if quality_k is not None:
            labels = real_labels if real_labels is not None else torch.full((len(real),), -1, dtype=torch.long)
            metrics.update(coverage_metrics(judge, judge_image_size, images, conds.labels, real, labels, seed,
                                            quality_k, batch_size, EXPRESSIONS))
    return metrics


def run_synth_eval_stage(cfg: DictConfig) -> dict:
    from datamodules.labels import parse_au_list
    from datamodules.synthetic import load_synthetic
    from lightning_modules.generator.evaluation import judge_record
    from lightning_modules.paradigms.teacher import load_teacher
    from lightning_modules.stages.synthesize_stage import synthesis_guidance

    se = cfg.synth_eval
    check_config(se)
    chosen = set_judge(cfg)
    path = chosen.checkpoint
    dataset = load_synthetic(str(se.input))
    out_dir = runtime.stage_dir(cfg, STAGE)
    digest = done_digest(cfg)
    if runtime.finished_earlier(cfg, STAGE, out_dir, digest):
        return {"skipped": True}
    if not runtime.is_rank_zero():  # one process scores the set; under DDP the pipeline's barrier waits for it
        return {"scored_on_rank_zero": True}
    judge = load_teacher(path)
    vocab = parse_au_list(cfg.data.aus)
    if int(judge.hparams.num_aus) != len(vocab):
        raise ConfigError("synth_eval.judge", f"{path} predicts {judge.hparams.num_aus} AUs, data.aus has "
                                              f"{len(vocab)}")
    n = len(pick(len(dataset), se.max_faces, int(se.seed)))
    real, real_labels = real_faces(cfg, str(se.real_split), n, int(se.seed)) if se.fid else (None, None)
    with torch.no_grad():
        metrics = evaluate_set(dataset, judge, int(cfg.data.image_size), list(vocab.aus), real, se.max_faces,
                               int(se.seed), int(se.batch_size), float(se.au_active_threshold), real_labels,
                               int(se.quality_k) if se.quality else None)
    metrics.update(judge_record(chosen, synthesis_guidance(cfg).enabled), input=str(se.input), set_size=len(dataset),
                   real_split=str(se.real_split) if se.fid else None)
    if metrics["judge_also_guided"]:
        log.warning("synth_eval: the judge %s also guided this set's synthesis: its FER-Acc overrates the guided "
                    "faces (name a judge that did not guide: synth_eval.judge)", path)
    log.info("synth_eval: %d faces of %s: FER-Acc %.3f%s (judge %s)", metrics["num_samples"], se.input,
             metrics["fer_acc"], f", FID {metrics['fid']:.1f}" if "fid" in metrics else "", path)
    loggers = trainer_setup.build_loggers(cfg, out_dir, STAGE)
    try:
        runtime.log_scalars(loggers, metrics, prefix="synth_eval")
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.save_resolved_config(cfg, out_dir)
    runtime.write_metrics(out_dir, metrics)
    runtime.mark_done(out_dir, digest)
    return metrics
