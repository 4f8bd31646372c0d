"""`stage=relabel`: FERAnno and the timm teachers predict every synthetic face (``trainer.predict``, DDP-able),
the ensemble vote (labeling/voting.py) turns their probabilities, and by default the label each face was synthesized for
(``relabel.condition_voter``), into hard / soft / dropped labels, and the relabelled set is written with a data
card that counts how often each rule fired. The relabelled set holds no faces: a labels table joined by
``sample_id`` to the synthesized set it references (datamodules/label_table.py), with the data card as its
README.md. Nothing is deleted: dropped faces stay with ``kept = false``."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import DataError
from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

HASH_KEYS = ["relabel", "trainer", "seed"]


class VoterEnsemble(L.LightningModule):
    """Frozen voters side by side: ``predict_step`` -> their softmax probabilities (V, B, K) per batch."""

    def __init__(self, voters: dict[str, nn.Module]):
        super().__init__()
        self.names = list(voters)
        self.voters = nn.ModuleList(v.eval().requires_grad_(False) for v in voters.values())

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probs = torch.stack([v(batch["image"])["logits"].float().softmax(-1) for v in self.voters])
        return {"sample_id": list(batch["sample_id"]), "probs": probs.cpu()}


class RankPredictionWriter(BasePredictionWriter):
    """Each rank writes its own predictions file; rank 0 merges them after a barrier."""

    def __init__(self, directory: Path):
        super().__init__(write_interval="epoch")
        self.directory = directory

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        ids = [i for p in predictions for i in p["sample_id"]]
        probs = torch.cat([p["probs"] for p in predictions], dim=1) if predictions else torch.empty(0)
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save({"sample_id": ids, "probs": probs}, self.directory / f"rank{trainer.global_rank}.pt")


def relabel_inputs(cfg: DictConfig) -> list[Path]:
    inputs = [cfg.relabel.input] if isinstance(cfg.relabel.input, str) else list(cfg.relabel.input)
    return ([Path(str(p)) / "manifest.json" for p in inputs]
            + [Path(str(v.checkpoint)) for v in cfg.relabel.voters.values()])


def done_digest(cfg: DictConfig) -> str:
    """Config + the synthetic sets' manifests + the voters' checkpoints: new faces or retrained voters rerun it."""
    return runtime.inputs_hash(cfg, HASH_KEYS, relabel_inputs(cfg))


def check_relabel_config(cfg: DictConfig) -> None:
    from datamodules.synthetic import MANIFEST, read_image_manifest, verify_synthetic

    rl = cfg.relabel
    require(bool(rl.enabled), "relabel.enabled", "relabeling is off in this config (the ablation without relabel)")
    inputs = [rl.input] if isinstance(rl.input, str) else list(rl.input)
    require(len(inputs) > 0, "relabel.input", "no synthetic set given")
    for path in inputs:
        if not (Path(str(path)) / MANIFEST).is_file():
            raise ConfigError("relabel.input", f"no synthetic set at {path} (no {MANIFEST}; run stage=synthesize or "
                                               "the generator evaluation first)")
        read_image_manifest(path)  # a relabelled set (labels only) is not voted on again
        verify_synthetic(path)  # a damaged set is a DataError naming the shard file and the fix
    check_voters(rl, "relabel")
    condition_weight(rl)


def condition_weight(rl: DictConfig) -> Optional[float]:
    """``relabel.condition_voter``, checked: the conditioned label's weight in the vote, None when it does not
    vote."""
    node = rl.get("condition_voter")
    key = "relabel.condition_voter"
    require(node is not None and "enabled" in node and "weight" in node, key,
            "needs {enabled: true|false, weight: w >= 0} (the conditioned label as a voter)")
    require(isinstance(node.enabled, bool), f"{key}.enabled", f"must be true or false, got {node.enabled!r}")
    weight = node.weight
    require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            and weight >= 0, f"{key}.weight", f"must be a number >= 0 (0: the condition abstains), got {weight!r}")
    return float(weight) if node.enabled else None


def check_conditioned_labels(labels: list, num_classes: int, inputs: list) -> None:
    """Every face's ``target_label`` must be a class the voters know (it votes, and the data card counts it)."""
    bad = [(i, v) for i, v in enumerate(labels) if not (isinstance(v, int) and 0 <= v < num_classes)]
    if bad:
        i, v = bad[0]
        raise DataError(f"relabel.input {[str(p) for p in inputs]}: {len(bad)} face(s) have a target_label outside "
                        f"the voters' classes [0, {num_classes}) (e.g. row {i}: {v!r}); the set was made for "
                        "other classes than the voters'")


def check_voters(node: DictConfig, key: str) -> None:
    """``<key>.voters``, ``.threshold`` and ``.batch_size`` of a voting stage (relabel, pseudolabel)."""
    require(node.voters is not None and len(node.voters) > 0, f"{key}.voters", "at least one voter is needed")
    for name, voter in node.voters.items():
        require(Path(str(voter.checkpoint)).is_file(), f"{key}.voters.{name}.checkpoint",
                f"checkpoint not found: {voter.checkpoint}")
        require(float(voter.get("weight", 1.0)) >= 0, f"{key}.voters.{name}.weight", "must be >= 0")
    require(sum(float(v.get("weight", 1.0)) for v in node.voters.values()) > 0, f"{key}.voters",
            "all voter weights are 0")
    require(0.0 <= float(node.threshold) <= 1.0, f"{key}.threshold", f"must be in [0, 1], got {node.threshold}")
    require(int(node.batch_size) >= 1, f"{key}.batch_size", f"must be >= 1, got {node.batch_size}")


def load_voters(cfg: DictConfig, key: str = "relabel") -> dict[str, nn.Module]:
    from lightning_modules.paradigms.teacher import load_fer_classifier

    voters = {name: load_fer_classifier(str(v.checkpoint)) for name, v in cfg[key].voters.items()}
    classes = {name: int(v.hparams.num_classes) for name, v in voters.items()}
    if len(set(classes.values())) != 1:
        raise ConfigError(f"{key}.voters", f"voters disagree on the number of classes: {classes}")
    return voters


def merge_predictions(directory: Path, world_size: int, expected_ids: list[str]) -> torch.Tensor:
    """(V, N, K) probabilities in ``expected_ids`` order from the per-rank files; every id exactly once."""
    ids, probs = [], []
    for rank in range(world_size):
        part = torch.load(directory / f"rank{rank}.pt")
        ids += part["sample_id"]
        if len(part["sample_id"]):
            probs.append(part["probs"])
    if len(ids) != len(set(ids)):
        raise RuntimeError(f"relabel: {len(ids) - len(set(ids))} sample ids were predicted more than once")
    missing = set(expected_ids) - set(ids)
    if missing or len(ids) != len(expected_ids):
        raise RuntimeError(f"relabel: {len(missing)} sample ids were not predicted (e.g. {sorted(missing)[:3]})")
    stacked = torch.cat(probs, dim=1)
    position = {sid: i for i, sid in enumerate(ids)}
    return stacked[:, [position[sid] for sid in expected_ids]]


def log_sample_table(loggers, dataset, class_names: list[str], n: int) -> None:
    """The first ``n`` relabelled faces as a wandb table: image, conditioned and final label, confidence, kept."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers or n <= 0:
        return
    import wandb

    rows = dataset.select(range(min(n, len(dataset))))
    name = (lambda c: class_names[c] if 0 <= c < len(class_names) else str(c))
    data = [[wandb.Image(r["image"]), r["sample_id"], name(int(r["target_label"])), name(int(r["final_label"])),
             float(r["confidence"]), bool(r["is_soft"]), bool(r["kept"])] for r in rows]
    for lg in wandb_loggers:
        lg.log_table("relabel/samples", columns=["image", "sample_id", "conditioned", "final", "confidence", "soft",
                                                 "kept"], data=data)


def card_metrics(card: dict) -> dict[str, float]:
    """The data card's numbers for the loggers: totals, how often each rule fired (counts, shares), per class."""
    out = {f"relabel/{k}": v for k, v in card.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in card["per_class"]:
        for rule in ("hard", "soft", "dropped"):
            out[f"relabel/per_class/{row['class']}/{rule}"] = row[rule]
            if row["before"]:
                out[f"relabel/per_class/{row['class']}/{rule}_share"] = row[rule] / row["before"]
    return out


def label_table(sample_ids: list[str], voter_names: list[str], probs: torch.Tensor, result):
    """The vote as a ``datasets.Dataset`` in the faces' order: what the relabelled set stores (no faces)."""
    from datasets import Dataset, Features, Sequence, Value

    columns = {"sample_id": (sample_ids, Value("string"))}
    for v, name in enumerate(voter_names):
        columns[f"probs/{name}"] = (probs[v].tolist(), Sequence(Value("float32")))
    for column, values, kind in (("final_label", result.final_label, "int64"),
                                 ("soft_label", result.soft_label, None), ("is_soft", result.is_soft, "bool"),
                                 ("confidence", result.confidence, "float32"),
                                 ("voters_agree", result.voters_agree, "bool"), ("kept", result.kept, "bool")):
        columns[column] = (values.tolist(), Value(kind) if kind else Sequence(Value("float32")))
    return Dataset.from_dict({k: v for k, (v, _) in columns.items()},
                             features=Features({k: f for k, (_, f) in columns.items()}))


def source_color_mode(inputs: list) -> dict:
    """The colour mode the faces are stored in, when the sources agree (the mix logs conversions by it)."""
    from datamodules.synthetic import read_manifest

    modes = {read_manifest(p).get("meta", {}).get("color_mode", "rgb") for p in inputs}
    return {"color_mode": modes.pop()} if len(modes) == 1 else {}


def run_relabel_stage(cfg: DictConfig) -> dict:
    from torch.utils.data import DataLoader

    from datamodules.label_table import write_label_set
    from datamodules.synthetic import SyntheticFERDataset, load_synthetic
    from lightning_modules.labeling.voting import data_card, data_card_markdown, ensemble_vote

    check_relabel_config(cfg)
    rl = cfg.relabel
    out_dir = runtime.stage_dir(cfg, "relabel")
    inputs = [rl.input] if isinstance(rl.input, str) else list(rl.input)
    dataset = load_synthetic(inputs)
    columns = dataset.with_format("arrow")  # Arrow -> list: fast at a million faces, a Column is not
    sample_ids = columns["sample_id"].to_pylist()
    if len(sample_ids) != len(set(sample_ids)):
        raise DataError(f"relabel.input {inputs}: sample ids are not unique")
    voters = load_voters(cfg)
    first = next(iter(voters.values()))
    num_classes = int(first.hparams.num_classes)
    class_names = list(getattr(first, "class_names", [str(c) for c in range(num_classes)]))
    conditioned = columns["target_label"].to_pylist()
    check_conditioned_labels(conditioned, num_classes, inputs)
    cond_weight = condition_weight(rl)
    loader = DataLoader(SyntheticFERDataset(dataset, int(rl.image_size), num_classes, use_relabel=False,
                                            kept_only=False, color_mode=str(cfg.data.get("color_mode", "rgb"))),
                        batch_size=int(rl.batch_size), shuffle=False, num_workers=int(rl.num_workers))
    pred_dir = out_dir / "predictions"
    loggers = trainer_setup.build_loggers(cfg, out_dir, "relabel")
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("max_steps", None)
    trainer = trainer_setup.make_trainer(default_root_dir=str(out_dir), logger=loggers or False,
                                   callbacks=[RankPredictionWriter(pred_dir)], **trainer_args)
    # only now, with inputs, voters and Trainer in hand, the earlier run's outputs go (a rank file of an earlier
    # run must never be merged, its relabelled set never read as this run's)
    runtime.clear_stage(out_dir, ["predictions", "dataset", "data_card.json", "data_card.md"])
    runtime.save_resolved_config(cfg, out_dir)
    start = time.time()
    metrics: dict = {}
    try:
        trainer.predict(VoterEnsemble(voters), loader, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            probs = merge_predictions(pred_dir, trainer.world_size, sample_ids)
            weights = [float(v.get("weight", 1.0)) for v in rl.voters.values()]
            conditioned = torch.tensor(conditioned)
            result = ensemble_vote(probs, float(rl.threshold), weights,
                                   condition=None if cond_weight is None else conditioned,
                                   condition_weight=1.0 if cond_weight is None else cond_weight)
            card = data_card(conditioned, result, class_names)
            card["voter_accuracy_vs_condition"] = {
                name: (probs[v].argmax(-1) == conditioned).float().mean().item() for v, name in enumerate(voters)}
            labels = label_table(sample_ids, list(voters), probs, result)
            meta = {"source": [str(p) for p in inputs], "voters": list(voters),
                    "voter_weights": dict(zip(voters, weights)), "condition_voter": card["condition_voter"],
                    "threshold": float(rl.threshold), "class_names": class_names,
                    **source_color_mode(inputs)}
            write_label_set(out_dir / "dataset", inputs, labels, meta, card=data_card_markdown(card))
            relabelled = load_synthetic(out_dir / "dataset")  # the join, checked once as every reader will
            runtime.write_json_atomic(out_dir / "data_card.json", card)
            (out_dir / "data_card.md").write_text(data_card_markdown(card))
            metrics = {"seconds": time.time() - start, "world_size": trainer.world_size,
                       "dataset": str(out_dir / "dataset"), "data_card": card}
            for lg in loggers:
                lg.log_metrics(card_metrics(card))
            log_sample_table(loggers, relabelled, class_names, int(rl.log_samples))
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, done_digest(cfg))
    return metrics
