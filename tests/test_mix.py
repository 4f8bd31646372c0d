"""MixedFERDataModule: real + synthetic train sets by mode/scale/ratio, class balance, soft labels, DDP split."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.mix import MixedFERDataModule
from datamodules.samplers import MixedBatchSampler, ShardedSampler
from datamodules.real import RealFERDataModule
from datamodules.synthetic import to_pil, write_shard
from datamodules.transforms import eval_transform

N_REAL = 48
K = 8
DETERMINISTIC = {"crop_scale": [1.0, 1.0], "hflip": False, "rotation_deg": 0.0, "color_jitter": 0.0}


def make_real(**kw) -> RealFERDataModule:
    return RealFERDataModule(format="toy", toy={"n_train": N_REAL, "n_val": 16, "n_test": 16, "image_size": 32},
                             image_size=32, batch_size=8, **kw)


def write_set(directory: Path, labels: list[int], relabel: dict | None = None, shards: int = 2) -> list[str]:
    """Toy faces (40 rendered, reused cyclically) stored as a synthetic set with the given target labels, in
    ``shards`` shards; ``relabel``: the vote's columns (lists of len(labels)), written as stage=relabel writes
    them: a labels table at ``directory`` joined to the faces in ``<directory>-faces``. Returns the sample ids."""
    from datamodules.real import toy_records
    from datamodules.toyfaces import ToyFacesConfig

    faces = toy_records(ToyFacesConfig(image_size=32, seed=5), "test", 40, progress=False)
    n, per = len(labels), math.ceil(len(labels) / shards)
    ids = [f"syn-{i:04d}" for i in range(n)]
    for s in range(shards):
        part = range(s * per, min(n, (s + 1) * per))
        recs = [faces[i % len(faces)] for i in part]
        images = torch.stack([torch.from_numpy(np.asarray(r.image)).permute(2, 0, 1) for r in recs]).float() / 255
        rows = {"image": to_pil(images), "sample_id": [ids[i] for i in part], "seed": list(part),
                "target_label": [labels[i] for i in part], "target_aus": [r.aus.tolist() for r in recs],
                "au_mask": [r.au_mask.tolist() for r in recs], "caption": [r.caption for r in recs],
                "guidance": ["{}"] * len(recs)}
        write_shard(directory.with_name(directory.name + "-faces") if relabel else directory, f"shard-{s:05d}", rows)
    if relabel:
        from datasets import Dataset

        from datamodules.label_table import write_label_set

        write_label_set(directory, [directory.with_name(directory.name + "-faces")],
                        Dataset.from_dict({"sample_id": ids, **relabel}), {"voters": ["teacher"]})
    return ids


def one_hot(k: int) -> list[float]:
    return [float(c == k) for c in range(K)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    out["plain"] = (root / "plain", write_set(root / "plain", [i % K for i in range(120)]))
    skewed = [0, 2, 3, 4, 5, 6, 7] + [1] * 30 + [2, 3, 4]  # class 1 dominates
    out["skewed"] = (root / "skewed", write_set(root / "skewed", skewed))
    # Relabelled: rows 3k are soft (mass on the target and the next class), rows 5k dropped by the vote.
    n = 60
    targets = [i % K for i in range(n)]
    final = [(t + 1) % K if i % 7 == 0 else t for i, t in enumerate(targets)]  # relabel moves some classes
    soft = [[0.6 * (c == f) + 0.4 * (c == (f + 1) % K) for c in range(K)] if i % 3 == 0 else one_hot(f)
            for i, f in enumerate(final)]
    relabel = {"final_label": final, "soft_label": soft, "is_soft": [i % 3 == 0 for i in range(n)],
               "confidence": [0.9] * n, "kept": [i % 5 != 0 for i in range(n)]}
    out["relabelled"] = (root / "relabelled", write_set(root / "relabelled", targets, relabel), relabel)
    hard = {**relabel, "soft_label": [one_hot(f) for f in final], "is_soft": [False] * n}
    out["hard"] = (root / "hard", write_set(root / "hard", targets, hard), hard)
    return out


def mixed(synthetic=None, **kw) -> MixedFERDataModule:
    dm = MixedFERDataModule(make_real(), synthetic=None if synthetic is None else str(synthetic), **kw)
    dm.setup("fit")
    return dm


def epoch_batches(dm: MixedFERDataModule, epoch: int = 0) -> list[dict]:
    loader = dm.train_dataloader()
    (loader.batch_sampler if loader.batch_sampler.__class__ is MixedBatchSampler else loader.sampler).set_epoch(epoch)
    return list(loader)


def ids_of(batches) -> list[str]:
    return [s for b in batches for s in b["sample_id"]]


# ---------------------------------------------------------------------------------------------- ratio, scale
def test_ratio_mode_exact_synthetic_count_per_batch(sets):
    dm = mixed(sets["plain"][0], mode="ratio", ratio=0.25, scale=1.0)
    batches = epoch_batches(dm)
    assert len(batches) == math.ceil(N_REAL / 6)  # 2 synthetic + 6 real per batch; epoch = one pass over real
    assert [sum(s.startswith("syn-") for s in b["sample_id"]) for b in batches] == [2] * len(batches)
    assert all(len(b["sample_id"]) == 8 for b in batches)
    assert {s for s in ids_of(batches) if not s.startswith("syn-")} == {r.sample_id for r in dm.real.records["train"]}
    sampler = dm.train_sampler()
    for epoch in range(20):  # over many batches the synthetic share is exactly the ratio
        sampler.set_epoch(epoch)
        batches = list(sampler)
        syn = [sum(dm.is_synthetic(i) for i in b) for b in batches]
        assert syn == [2] * len(batches)
        assert all(i < len(dm.train_dataset) for b in batches for i in b)


def test_ratio_rounding_and_bad_ratio(sets):
    assert MixedBatchSampler(48, 40, 8, 0.5).n_syn == 4
    with pytest.raises(ValueError, match=r"^mix\.ratio"):
        MixedBatchSampler(48, 40, 8, 0.05)  # rounds to 0 synthetic per batch
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"^mix\.ratio must be in \(0, 1\)") as err:
            MixedFERDataModule(make_real(), str(sets["plain"][0]), mode="ratio", ratio=ratio)
        assert "synthetic_only" in str(err.value) and "real_only" in str(err.value)


@pytest.mark.parametrize("scale,size", [(0.5, 24), (1.0, 48), (2.0, 96)])
def test_scale_takes_exact_prefix(sets, scale, size):
    directory, ids = sets["plain"]
    dm = mixed(directory, mode="concat", scale=scale)
    assert dm.num_synthetic == size and len(dm.train_dataset) == N_REAL + size
    assert list(dm.train_dataset.datasets[1].dataset["sample_id"]) == ids[:size]  # the first rows, across shards
    assert dm.summary()["mix"]["synthetic_size"] == size
    assert sum(dm.summary()["mix"]["synthetic_class_counts"]) == size


def test_not_enough_synthetic_rows(sets):
    with pytest.raises(ValueError, match=r"^mix\.scale=3.0 needs 144 synthetic rows.*only 120"):
        mixed(sets["plain"][0], mode="concat", scale=3.0)
    with pytest.raises(ValueError, match=r"^mix\.scale=1.1 needs 53 .*only 48 kept rows"):  # 60 rows, 48 kept
        mixed(sets["relabelled"][0], mode="concat", scale=1.1)
    assert mixed(sets["relabelled"][0], mode="concat", scale=1.1, kept_only=False).num_synthetic == 53


def test_real_only_equals_concat_scale_zero(sets):
    real_only = mixed(mode="real_only", seed=3)
    concat0 = mixed(sets["plain"][0], mode="concat", scale=0.0, seed=3)
    assert concat0.num_synthetic == 0 and len(concat0.train_dataset) == N_REAL
    for epoch in (0, 1):
        a, b = ids_of(epoch_batches(real_only, epoch)), ids_of(epoch_batches(concat0, epoch))
        assert a == b and sorted(a) == sorted(r.sample_id for r in real_only.real.records["train"])
    assert ids_of(epoch_batches(real_only, 0)) != ids_of(epoch_batches(real_only, 1))
    assert ids_of(epoch_batches(mixed(mode="real_only", seed=4), 0)) != ids_of(epoch_batches(real_only, 0))


def test_synthetic_only_uses_only_synthetic(sets):
    directory, ids = sets["plain"]
    dm = mixed(directory, mode="synthetic_only", scale=0.5)
    seen = ids_of(epoch_batches(dm))
    assert sorted(seen) == ids[:24] and dm.num_real == 0
    assert all(dm.is_synthetic(i) for i in range(len(dm.train_dataset)))


def test_concat_holds_both(sets):
    dm = mixed(sets["plain"][0], mode="concat", scale=0.5)
    seen = ids_of(epoch_batches(dm))
    assert len(seen) == N_REAL + 24 and len(set(seen)) == len(seen)
    assert sum(s.startswith("syn-") for s in seen) == 24


# ---------------------------------------------------------------------------------------------- balance
def _class_frequencies(dm: MixedFERDataModule, epochs: int = 40) -> np.ndarray:
    sampler, counts = dm.train_sampler(), np.zeros(K)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        flat = [i for b in sampler for i in b] if isinstance(sampler, MixedBatchSampler) else list(sampler)
        counts += np.bincount(dm.train_labels[flat], minlength=K)
    present = np.bincount(dm.train_labels, minlength=K) > 0
    return counts[present] / counts.sum()


@pytest.mark.parametrize("mode", ["concat", "synthetic_only", "ratio"])
def test_class_balance_flattens_a_skewed_mix(sets, mode):
    directory, _ = sets["skewed"]
    plain = _class_frequencies(mixed(directory, mode=mode, scale=0.75))
    balanced_dm = mixed(directory, mode=mode, scale=0.75, class_balance=True)
    balanced = _class_frequencies(balanced_dm)
    uniform = 1 / len(balanced)
    assert plain.max() > 1.8 * uniform  # the mix really is skewed...
    assert np.abs(balanced - uniform).max() < 0.3 * uniform  # ...and balancing makes it near uniform
    syn = balanced_dm.train_labels[balanced_dm.num_real:]
    assert list(syn) == ([0, 2, 3, 4, 5, 6, 7] + [1] * 29)[:len(syn)]  # labels the weights use = stored ones


# ---------------------------------------------------------------------------------------------- relabel
def test_soft_labels_reach_the_batch_and_the_loss(sets):
    from lightning_modules.paradigms.classifier import FERClassifier

    directory, ids, relabel = sets["relabelled"]
    dm = mixed(directory, mode="concat", scale=0.5)  # 24 of the 48 kept rows, 8 of them soft
    stored = {sid: (relabel["soft_label"][i], relabel["final_label"][i]) for i, sid in enumerate(ids)}
    real_labels = {r.sample_id: r.label for r in dm.real.records["train"]}
    batches = epoch_batches(dm)
    used = [i for i in range(60) if relabel["kept"][i]][:24]
    assert dm.num_soft == sum(relabel["is_soft"][i] for i in used)
    assert dm.num_soft > 0 and dm.summary()["mix"]["soft_labels"] == dm.num_soft
    model = FERClassifier(backbone="resnet18", num_classes=K, label_smoothing=0.0)
    n_syn = 0
    for batch in batches:
        assert batch["soft_label"].shape == (len(batch["sample_id"]), K)
        assert torch.allclose(model._targets(batch), batch["soft_label"])  # the loss trains on these rows
        for row, label, sid in zip(batch["soft_label"], batch["label"], batch["sample_id"]):
            if sid in stored:
                n_syn += 1
                assert torch.allclose(row, torch.tensor(stored[sid][0]))
                assert int(label) == int(np.argmax(stored[sid][0]))
            else:
                assert row.tolist() == one_hot(real_labels[sid])
    assert n_syn == 24


def test_no_soft_key_without_soft_rows(sets):
    directory, ids, relabel = sets["hard"]
    for kw in ({"use_relabel": True}, {"use_relabel": False}):
        dm = mixed(directory, mode="concat", scale=0.5, **kw)
        batch = next(iter(dm.train_dataloader()))
        assert "soft_label" not in batch and dm.num_soft == 0
    # use_relabel=False: conditioned labels; True: the vote's final labels (which differ for rows 7k).
    rows = [i for i in range(60) if relabel["kept"][i]][:24]
    targets = [i % K for i in rows]
    assert list(mixed(directory, mode="concat", scale=0.5, use_relabel=False).synthetic_labels) == targets
    finals = [relabel["final_label"][i] for i in rows]
    assert list(mixed(directory, mode="concat", scale=0.5).synthetic_labels) == finals != targets


def test_soft_labels_even_with_use_relabel_off_are_dropped(sets):
    dm = mixed(sets["relabelled"][0], mode="concat", scale=0.5, use_relabel=False)
    assert dm.num_soft == 0 and "soft_label" not in next(iter(dm.train_dataloader()))


def test_kept_only_filters_dropped_faces(sets):
    directory, ids, relabel = sets["relabelled"]
    kept_ids = [s for i, s in enumerate(ids) if relabel["kept"][i]]
    dm = mixed(directory, mode="synthetic_only", scale=0.5)
    assert list(dm.train_dataset.datasets[0].dataset["sample_id"]) == kept_ids[:24]
    dm_all = mixed(directory, mode="synthetic_only", scale=0.5, kept_only=False)
    assert list(dm_all.train_dataset.datasets[0].dataset["sample_id"]) == ids[:24]


# ---------------------------------------------------------------------------------------------- transforms
def test_synthetic_augmentation_is_its_own(sets):
    from datasets import load_from_disk

    directory, ids = sets["plain"]
    dm = mixed(directory, mode="concat", scale=0.5, synthetic_augment=DETERMINISTIC)
    torch.manual_seed(0)
    syn = dm.train_dataset[N_REAL + 3]
    stored = load_from_disk(str(directory / "shards" / "shard-00000"))[3]["image"]
    assert syn["sample_id"] == ids[3]
    assert torch.equal(syn["image"], dm.train_dataset[N_REAL + 3]["image"])  # no random augmentation
    assert torch.allclose(syn["image"], eval_transform(32)(stored.convert("RGB")))
    real = [dm.train_dataset[0]["image"] for _ in range(3)]  # the real set keeps its random augmentation
    assert not (torch.equal(real[0], real[1]) and torch.equal(real[1], real[2]))
    dm_default = mixed(directory, mode="concat", scale=0.5)  # None = the real set's augment
    assert dm_default.synthetic_augment == dm_default.real.augment
    with pytest.raises(ValueError, match=r"^mix\.synthetic_augment"):
        MixedFERDataModule(make_real(), str(directory), mode="concat", synthetic_augment={"bogus": 1})


# ---------------------------------------------------------------------------------------------- DDP split
@pytest.mark.parametrize("n", [48, 47])
def test_sharded_sampler_split(n):
    ranks = [ShardedSampler(n, seed=1, rank=r, world_size=2) for r in range(2)]
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == math.ceil(n / 2)
    assert set(parts[0]) | set(parts[1]) == set(range(n))
    assert len(set(parts[0]) & set(parts[1])) == (0 if n % 2 == 0 else 1)  # one wrapped-around pad sample
    before = [list(s) for s in ranks]
    for s in ranks:
        s.set_epoch(1)
    after = [list(s) for s in ranks]
    assert after != before and after == [list(s) for s in ranks]  # new order, deterministic
    assert set(after[0]) | set(after[1]) == set(range(n))
    single = ShardedSampler(n, seed=1)
    single.set_epoch(1)
    order = list(single)
    assert after[0] == (order + order)[0:2 * len(after[0]):2]  # rank 0 = every other of the one-rank order


def test_mixed_batch_sampler_split():
    ranks = [MixedBatchSampler(45, 30, 8, 0.5, seed=2, rank=r, world_size=2) for r in range(2)]
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 6  # ceil(45/4)=12 global batches, 6 per rank
    for batches in parts:
        assert all(sum(i >= 45 for i in b) == 4 and len(b) == 8 for b in batches)
    real = [[i for b in p for i in b if i < 45] for p in parts]
    assert set(real[0]) | set(real[1]) == set(range(45))
    assert len(set(real[0]) & set(real[1])) <= 3  # only the wrap past one real pass repeats
    for s in ranks:
        s.set_epoch(5)
    assert [list(s) for s in ranks] != parts and [list(s) for s in ranks] == [list(s) for s in ranks]


def test_datamodule_reads_rank_from_trainer_and_shards_eval(sets):
    dm = mixed(sets["plain"][0], mode="concat", scale=0.5)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    sampler = dm.train_sampler()
    assert (sampler.rank, sampler.world_size) == (1, 2) and len(sampler) == (N_REAL + 24) // 2
    val = dm.val_dataloader()
    assert val.sampler.num_replicas == 2 and val.sampler.rank == 1 and not val.sampler.shuffle
    dm_ratio = mixed(sets["plain"][0], mode="ratio", scale=0.5)
    dm_ratio.trainer = SimpleNamespace(global_rank=0, world_size=2)
    assert dm_ratio.train_dataloader().batch_sampler.world_size == 2


def test_rank_falls_back_to_torch_distributed(sets, monkeypatch):
    dm = mixed(sets["plain"][0], mode="concat", scale=0.5)
    assert (dm.train_sampler().rank, dm.train_sampler().world_size) == (0, 1)  # no trainer, no process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert (dm.train_sampler().rank, dm.train_sampler().world_size) == (1, 3)


def test_val_test_are_real_only(sets):
    dm = mixed(sets["plain"][0], mode="synthetic_only", scale=1.0)
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        assert loader.dataset is dm.real.datasets[split]
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)  # one process: no sharding
        ids = ids_of(loader)
        assert len(ids) == 16 and all(s.startswith(f"toy_{split}_") for s in ids)


def test_lightning_calls_set_epoch_on_the_batch_sampler(sets):
    """Under a real Trainer (use_distributed_sampler=False) every epoch gets the sampler's own new order."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[str]] = {}

        def training_step(self, batch, _):
            self.seen.setdefault(self.current_epoch, []).extend(batch["sample_id"])
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MixedFERDataModule(make_real(), str(sets["plain"][0]), mode="ratio", scale=0.5, ratio=0.5)
    model = Recorder()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
              accelerator="cpu", devices=1).fit(model, datamodule=dm)
    expected = []
    for epoch in (0, 1):
        sampler = dm.train_sampler()
        sampler.set_epoch(epoch)
        expected.append([dm.train_dataset[i]["sample_id"] for b in sampler for i in b])
    assert [model.seen[0], model.seen[1]] == expected and expected[0] != expected[1]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "mixed"}, r"^mix\.mode must be one of"),
    ({"mode": "concat"}, r"^mix\.synthetic must name"),
    ({"mode": "concat", "scale": -1}, r"^mix\.scale must be a number >= 0"),
    ({"mode": "synthetic_only", "scale": 0}, r"^mix\.scale must be > 0 for mix\.mode=synthetic_only"),
    # values the mode ignores are still checked: a typo must not pass silently
    ({"mode": "real_only", "ratio": 1.5}, r"^mix\.ratio must be in \(0, 1\)"),
    ({"mode": "real_only", "ratio": 0}, r"^mix\.ratio must be in \(0, 1\)"),
    ({"mode": "real_only", "scale": -0.5}, r"^mix\.scale must be a number >= 0"),
    ({"mode": "real_only", "scale": "big"}, r"^mix\.scale must be a number"),
    ({"mode": "real_only", "class_balance": "yes"}, r"^mix\.class_balance must be true or false"),
    ({"mode": "real_only", "synthetic_augment": {"rotation_deg": 500}}, r"^mix\.synthetic_augment: .*rotation_deg"),
    ({"mode": "real_only", "synthetic_augment": {"sharpen": 1}}, r"^mix\.synthetic_augment: .*sharpen"),
    ({"mode": "real_only", "seed": 1.5}, r"^mix\.seed must be an integer"),
])
def test_bad_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixedFERDataModule(make_real(), **kwargs)


def test_unknown_mix_key_and_unreadable_sets(tmp_path):
    from datamodules.errors import DataError
    from datamodules.mix import check_mix

    with pytest.raises(ValueError, match=r"^mix\.sclae is not a mix setting"):
        check_mix(mode="real_only", sclae=2)
    with pytest.raises(ValueError, match=r"^mix\.synthetic: cannot read"):
        mixed(tmp_path / "nowhere", mode="concat")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"^mix\.synthetic: cannot read .*corrupt"):
        mixed(tmp_path / "bad", mode="ratio")
    dm = MixedFERDataModule(make_real(), mode="real_only")  # real_only needs no synthetic set
    dm.setup("fit")
    assert dm.summary()["mix"]["synthetic_size"] == 0 and dm.summary()["train_size"] == N_REAL


def test_truncated_shard_is_a_data_error_naming_the_file(tmp_path):
    from datamodules.errors import DataError

    write_set(tmp_path / "syn", [i % K for i in range(48)])
    arrow = next((tmp_path / "syn" / "shards" / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{arrow}.*cannot be read"):
        mixed(tmp_path / "syn", mode="concat", scale=0.5)


def test_synthetic_labels_outside_protocol(sets):
    with pytest.raises(ValueError, match=r"^mix\.synthetic: row .* 7-class protocol"):
        dm = MixedFERDataModule(make_real(protocol=7), str(sets["plain"][0]), mode="concat", scale=1.0)
        dm.setup("fit")


def test_scale_null_takes_every_kept_face(tmp_path):
    """mix.scale=None (the pipeline's mixed student): all kept faces, whatever the vote dropped."""
    from datamodules.real import RealFERDataModule
    from datamodules.synthetic import load_synthetic, write_dataset
    from synthetic_fixtures import write_toy_synthetic_set

    raw = tmp_path / "raw"
    write_toy_synthetic_set(raw, n=20, shards=1)
    data = load_synthetic(raw)
    voted = data.add_column("kept", [i % 4 != 0 for i in range(20)])           # 15 kept
    write_dataset(tmp_path / "voted", voted)
    real = RealFERDataModule(format="toy", toy={"n_train": 48, "n_val": 16, "n_test": 16, "image_size": 32},
                             image_size=32, batch_size=8)
    dm = MixedFERDataModule(real, synthetic=str(tmp_path / "voted"), mode="concat", scale=None)
    dm.setup("fit")
    assert dm.num_synthetic == 15 and len(dm.train_dataset) == 48 + 15
    assert dm.summary()["mix"]["scale"] == round(15 / 48, 4)
    write_dataset(tmp_path / "none_kept", data.add_column("kept", [False] * 20))
    with pytest.raises(ValueError, match=r"mix\.synthetic.*no kept faces"):
        MixedFERDataModule(real, synthetic=str(tmp_path / "none_kept"), mode="concat", scale=None).setup("fit")


def test_unreadable_real_faces_are_counted_in_the_mixed_summary(sets, tmp_path):
    """Soft labels make the mix rebuild the real train dataset; its load failures must still reach the summary."""
    import warnings

    from bad_data_helpers import copy, toy_export
    from datamodules.real import RealFERDataModule

    root = copy(toy_export(tmp_path / "export"), "imagefolder", tmp_path)
    for path in sorted((root / "train").rglob("*.png"))[:2]:
        path.write_bytes(b"not a png")
    real = RealFERDataModule(format="imagefolder", root=str(root), image_size=32, batch_size=8, augment={})
    dm = MixedFERDataModule(real, synthetic=str(sets["relabelled"][0]), mode="concat", scale=1.0)
    dm.setup("fit")
    assert dm.num_soft > 0  # the rebuilt-dataset path
    n_real = len(real.records["train"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = ids_of(list(dm.train_dataloader()))
    assert sum("2 unreadable image(s)" in str(w.message) for w in caught) == 1
    real_served = [s for s in served if not s.startswith("syn-")]
    assert len(real_served) == len(set(real_served)) == n_real - 2
    assert dm.summary()["skipped"] == {"train/corrupt_image": 2}


def test_sets_that_differ_only_in_provenance_join_others_are_refused(tmp_path):
    from datamodules.errors import DataError
    from datamodules.synthetic import load_synthetic, write_dataset
    from synthetic_fixtures import write_toy_synthetic_set

    write_toy_synthetic_set(tmp_path / "plain", n=8)
    plain = load_synthetic(tmp_path / "plain")
    write_dataset(tmp_path / "layout", plain.add_column("layout_source", ["real-1"] * len(plain)))
    joined = load_synthetic([tmp_path / "plain", tmp_path / "layout"])
    assert len(joined) == 16 and "layout_source" not in joined.column_names
    write_dataset(tmp_path / "relabelled", plain.add_column("final_label", [0] * len(plain)))
    with pytest.raises(DataError, match="final_label"):
        load_synthetic([tmp_path / "plain", tmp_path / "relabelled"])
