"""`stage=pseudolabel`: the self-training baseline of the low-data protocol.

The train faces outside the labelled ``data.train_limit`` subset that the generator learns from
(``generator.data.train_limit``; the very same faces) are labelled by the ``pseudolabel.voters`` (default: the
teacher alone) with the relabel stage's predictor and vote, and written as a set in the synthetic-store format
(``<run>/pseudolabel/dataset``), so a student reads it like synthetic faces (``mix.synthetic=``). The labelled
subset, val and test faces are never in it. The data card scores the pseudo-labels against the dataset's own
labels of those faces, which no model is trained on.

Unlike relabel's labels table, the faces are stored in the set: it holds at most the real train set's unlabelled
part (not 5x of it) at the data's own size, and a student then reads it without going back through the real
data's format-specific loader.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import require
from lightning_modules.stages import relabel_stage

HASH_KEYS = ["data", "generator.data", "pseudolabel", "trainer", "seed"]
log = logging.getLogger(__name__)


def check_pseudolabel_config(cfg: DictConfig) -> None:
    from lightning_modules.stages.generator_stage import unlabelled_count

    require(OmegaConf.select(cfg, "pseudolabel") is not None, "pseudolabel", "no pseudolabel settings in the config")
    relabel_stage.check_voters(cfg.pseudolabel, "pseudolabel")
    require(int(cfg.pseudolabel.chunk_size) >= 1, "pseudolabel.chunk_size",
            f"must be >= 1, got {cfg.pseudolabel.chunk_size}")
    require(unlabelled_count(cfg) != 0, "generator.data.train_limit",
            "the generator learns from no face outside the labelled data.train_limit subset, so there is nothing to "
            "pseudo-label: set generator.data.train_limit=null (or larger than data.train_limit)")


def done_digest(cfg: DictConfig) -> str:
    """Config (data, the unlabelled faces, voting settings) + the voters' checkpoints."""
    voters = [Path(str(v.checkpoint)) for v in cfg.pseudolabel.voters.values()]
    return runtime.inputs_hash(cfg, HASH_KEYS, voters)


def step(cfg: DictConfig):
    """The pipeline step: (output folder, done digest, runner, config)."""
    return (Path(cfg.paths.run_dir) / "pseudolabel", done_digest(cfg), lambda: run_pseudolabel_stage(cfg), cfg)


def unlabelled_real_faces(cfg: DictConfig):
    """(the real datamodule after setup, the unlabelled faces the generator learns from)."""
    from datamodules.unlabelled import unlabelled_faces
    from lightning_modules.stages.classifier_stage import build_datamodule
    from lightning_modules.stages.generator_stage import unlabelled_count

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return datamodule, unlabelled_faces(datamodule, unlabelled_count(cfg))


def predicted_ids(directory: Path, world_size: int) -> set[str]:
    return {i for rank in range(world_size) for i in torch.load(directory / f"rank{rank}.pt")["sample_id"]}


def run_pseudolabel_stage(cfg: DictConfig) -> dict:
    from torch.utils.data import DataLoader

    from datamodules.batch import RecordDataset, collate_fer
    from datamodules.transforms import eval_transform
    from lightning_modules.labeling.voting import ensemble_vote

    check_pseudolabel_config(cfg)
    pl = cfg.pseudolabel
    out_dir = runtime.stage_dir(cfg, "pseudolabel")
    datamodule, faces = unlabelled_real_faces(cfg)
    voters = relabel_stage.load_voters(cfg, "pseudolabel")
    first = next(iter(voters.values()))
    require(int(first.hparams.num_classes) == datamodule.num_classes, "pseudolabel.voters",
            f"the voters predict {int(first.hparams.num_classes)} classes, the data has {datamodule.num_classes}")
    dataset = RecordDataset(faces, eval_transform(int(pl.image_size), datamodule.color_mode), len(datamodule.vocab),
                            datamodule.num_classes, name=f"{datamodule.format} unlabelled train")
    loader = DataLoader(dataset, batch_size=int(pl.batch_size), shuffle=False, num_workers=int(pl.num_workers),
                        collate_fn=collate_fer)
    pred_dir = out_dir / "predictions"
    loggers = trainer_setup.build_loggers(cfg, out_dir, "pseudolabel")
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("max_steps", None)
    trainer = trainer_setup.make_trainer(default_root_dir=str(out_dir), logger=loggers or False,
                                   callbacks=[relabel_stage.RankPredictionWriter(pred_dir)], **trainer_args)
    runtime.clear_stage(out_dir, ["predictions", "dataset", "data_card.json"])
    runtime.save_resolved_config(cfg, out_dir)
    log.info("pseudolabel: %d train faces outside the %d labelled ones, labelled by %s", len(faces),
             len(datamodule.records["train"]), ", ".join(voters))
    start = time.time()
    metrics: dict = {}
    try:
        trainer.predict(relabel_stage.VoterEnsemble(voters), loader, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            seen = predicted_ids(pred_dir, trainer.world_size)
            readable = [f for f in faces if f.sample_id in seen]  # collate_fer drops unreadable images
            probs = relabel_stage.merge_predictions(pred_dir, trainer.world_size, [f.sample_id for f in readable])
            weights = [float(v.get("weight", 1.0)) for v in pl.voters.values()]
            result = ensemble_vote(probs, float(pl.threshold), weights)
            hidden = {r.sample_id: r.label for r in datamodule.outside_subset}
            written, unreadable = write_set(out_dir / "dataset", readable, probs, list(voters), result, cfg,
                                            datamodule.color_mode, len(datamodule.vocab))
            unreadable += len(faces) - len(readable)
            if unreadable:
                warnings.warn(f"pseudolabel: {unreadable} unreadable face(s) left out of {out_dir / 'dataset'}")
            card = pseudolabel_card(readable, result, hidden, datamodule.class_names, written, unreadable)
            runtime.write_json_atomic(out_dir / "data_card.json", card)
            metrics = {"seconds": time.time() - start, "world_size": trainer.world_size,
                       "labelled_faces": len(datamodule.records["train"]), "unlabelled_faces": len(faces),
                       "dataset": str(out_dir / "dataset"), "data_card": card}
            for lg in loggers:
                lg.log_metrics({f"pseudolabel/{k}": v for k, v in card.items() if isinstance(v, (int, float))})
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, done_digest(cfg))
    return metrics


def write_set(directory: Path, faces, probs: torch.Tensor, voter_names: list[str], result, cfg: DictConfig,
              color_mode: str, num_aus: int) -> tuple[int, int]:
    """The voted faces as a synthetic-store set, a shard per ``pseudolabel.chunk_size`` faces (images as stored,
    in the data's colour mode; ``target_label`` = the vote's label, as there is no conditioned one). Returns
    (rows written, faces whose image could not be read any more)."""
    from datamodules.batch import LOAD_ERRORS, load_record_image
    from datamodules.synthetic import update_manifest, write_shard
    from datamodules.transforms import to_color_mode

    chunk = int(cfg.pseudolabel.chunk_size)
    meta = {"source": "pseudolabel", "voters": voter_names, "threshold": float(cfg.pseudolabel.threshold),
            "color_mode": color_mode, "complete": False}
    written = unreadable = 0
    for number, lo in enumerate(range(0, len(faces), chunk)):
        rows: dict[str, list] = {}
        for i in range(lo, min(lo + chunk, len(faces))):
            face = faces[i]
            try:
                image = to_color_mode(load_record_image(face), color_mode)
            except LOAD_ERRORS:
                unreadable += 1
                continue
            label = int(result.final_label[i])
            values = {"image": image.convert("L") if color_mode == "gray" else image, "sample_id": face.sample_id,
                      "seed": 0, "target_label": label,
                      "target_aus": (face.aus.tolist() if face.aus is not None else [0.0] * num_aus),
                      "au_mask": (face.au_mask.tolist() if face.au_mask is not None
                                  else [face.aus is not None] * num_aus),
                      "caption": face.caption, "guidance": json.dumps({"source": "pseudolabel"}),
                      **{f"probs/{name}": probs[v, i].tolist() for v, name in enumerate(voter_names)},
                      "final_label": label, "soft_label": result.soft_label[i].tolist(),
                      "is_soft": bool(result.is_soft[i]), "confidence": float(result.confidence[i]),
                      "voters_agree": bool(result.voters_agree[i]), "kept": bool(result.kept[i])}
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
        if rows:
            write_shard(directory, f"shard-{number:05d}", rows, meta=meta)
            written += len(rows["sample_id"])
    if not written:
        raise runtime.ConfigError("generator.data.train_limit", "no readable face outside the labelled subset")
    update_manifest(directory, complete=True)
    return written, unreadable


def pseudolabel_card(faces, result, hidden: dict[str, int], class_names: list[str], written: int,
                     unreadable: int) -> dict:
    """Counts, confidence and the pseudo-labels' accuracy against the dataset's own labels (all and kept)."""
    kept = result.kept
    final = result.final_label
    truth = torch.tensor([hidden.get(f.sample_id, -1) for f in faces])
    known = truth >= 0
    acc = lambda sel: float((final[sel] == truth[sel]).float().mean()) if int(sel.sum()) else None  # noqa: E731
    counts = torch.bincount(final[kept], minlength=len(class_names)).tolist()
    return {"faces": len(faces), "written": written, "unreadable": unreadable, "kept": int(kept.sum()),
            "dropped": int((~kept).sum()), "soft": int(result.is_soft.sum()),
            "mean_confidence": float(result.confidence.float().mean()) if len(faces) else None,
            "accuracy_vs_dataset_labels": acc(known), "accuracy_vs_dataset_labels_kept": acc(known & kept),
            "kept_class_counts": dict(zip(class_names, counts))}
