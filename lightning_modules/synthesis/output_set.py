"""The synthetic set a synthesis run writes, over its life: prepared (another config's set refused, a kill's
damage cleaned, a lost manifest rebuilt from intact shards), checked for damage, and finalized (every plan row exactly
once, shards ordered, marked complete, its dataset card written)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from lightning_modules.run.runtime import ConfigError

log = logging.getLogger(__name__)


def prepare_output(dataset_dir: Path, fingerprint: str, overwrite: bool, plan_size: int, chunk_size: int,
                   ours: bool = False) -> tuple[int, list[str]]:
    """Rank 0, once the run is ready to start: refuse a different config's set (unless ``overwrite``), clean up
    after a kill or damage. ``ours``: this stage finished this config in ``dataset_dir`` (its done marker), so a set
    whose manifest was deleted is recovered from its shards. Returns (finished samples, shards dropped as
    damaged)."""
    from datamodules.synthetic import FORMAT, MANIFEST, _write_manifest, check_shards, read_manifest

    if (dataset_dir / MANIFEST).is_file():
        old = read_manifest(dataset_dir).get("meta", {}).get("fingerprint")
        if old != fingerprint:
            if not overwrite:
                raise ConfigError("synthesis.overwrite", f"{dataset_dir} holds a synthetic set made with another "
                                  f"config (fingerprint {old} != {fingerprint}); set synthesis.overwrite=true to "
                                  "replace it, or use another experiment_name")
            shutil.rmtree(dataset_dir)
    elif dataset_dir.exists() and any(dataset_dir.iterdir()):
        if ours:
            kept = rebuild_manifest(dataset_dir, fingerprint, plan_size, chunk_size)
            log.warning("synthesize: %s lost its %s after the run finished; rebuilt it from the %d intact shards, "
                        "the rest is made again", dataset_dir, MANIFEST, len(kept))
        elif not overwrite:
            raise ConfigError("synthesis.overwrite", f"{dataset_dir} exists but is not a synthetic set; set "
                              "synthesis.overwrite=true to replace it")
        else:
            shutil.rmtree(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    if not (dataset_dir / MANIFEST).is_file():
        _write_manifest(dataset_dir, {"format": FORMAT, "shards": [], "meta": {
            "fingerprint": fingerprint, "plan_size": plan_size, "complete": False}})
    good, dropped = check_shards(dataset_dir)
    if dropped:
        update_complete(dataset_dir, False)
    return read_manifest(dataset_dir)["count"], dropped



def update_complete(dataset_dir: Path, complete: bool) -> None:
    from datamodules.synthetic import update_manifest

    update_manifest(dataset_dir, complete=complete)



def rebuild_manifest(dataset_dir: Path, fingerprint: str, plan_size: int, chunk_size: int) -> list[str]:
    """The manifest of a set this config finished, from its chunk shards that read back with their chunk's row
    count (``finalize`` checks the ids against the plan afterwards); the other shard folders are removed by
    ``check_shards`` and made again."""
    from datamodules.errors import DataError
    from datamodules.synthesis import chunk_name, num_chunks
    from datamodules.synthetic import FORMAT, _write_manifest, open_shard

    shards = []
    for chunk in range(num_chunks(plan_size, chunk_size)):
        entry = {"name": chunk_name(chunk), "count": min(chunk_size, plan_size - chunk * chunk_size)}
        try:
            open_shard(dataset_dir, entry)
        except DataError:
            continue
        shards.append(entry)
    _write_manifest(dataset_dir, {"format": FORMAT, "shards": shards, "meta": {
        "fingerprint": fingerprint, "plan_size": plan_size, "complete": False}})
    return [s["name"] for s in shards]



def set_damage(dataset_dir: Path) -> Optional[str]:
    """None when the set is intact (manifest, every shard there, readable, with its row count), else why not."""
    from datamodules.errors import DataError
    from datamodules.synthetic import verify_synthetic

    try:
        verify_synthetic(dataset_dir)
    except DataError as err:
        return str(err)
    return None



def finalize(dataset_dir: Path, out_dir: Path, plan, size: int, seconds: float, world_size: int,
             card: Optional[dict] = None) -> dict:
    """Check that every plan row is in the set exactly once, order the shards, mark the set complete, write its
    dataset card (README.md; ``card``: card_settings); the summary (images, time, images/s per device) is logged
    and returned."""
    from datamodules.face_storage import synthetic_card
    from datamodules.synthetic import check_shards, load_synthetic, update_manifest

    good, dropped = check_shards(dataset_dir)
    if dropped:
        raise RuntimeError(f"synthesize: shards {dropped} were damaged while writing; rerun to redo them")
    update_manifest(dataset_dir, sort_shards=True)
    ids = load_synthetic(dataset_dir, allow_incomplete=True)["sample_id"]
    expected = plan.rows(range(size))["sample_id"] if size <= 10_000 else None
    if len(ids) != size or len(set(ids)) != size or (expected is not None and list(ids) != list(expected)):
        raise RuntimeError(f"synthesize: the set has {len(ids)} rows ({len(set(ids))} distinct ids), the plan "
                           f"{size}; rerun the command to redo missing chunks")
    stats = [json.loads(p.read_text()) for p in sorted((out_dir / "stats").glob("rank*.json"))]
    made = sum(s["images"] for s in stats)
    per_device = {f"rank{s['rank']}": s["images"] / s["seconds"] if s["seconds"] > 0 else None for s in stats}
    counts = np.bincount(np.asarray(plan.labels[:size]), minlength=int(plan.labels.max()) + 1).tolist()
    layout = {"layout_init": plan.layout.summary()} if plan.layout is not None else {}
    manifest = update_manifest(dataset_dir, complete=True, count=size, class_counts=counts, **layout)
    card = card or {}
    (dataset_dir / "README.md").write_text(synthetic_card(manifest, card.get("class_names", []), card))
    summary = {**layout, "images": size, "generated_now": made, "seconds": seconds, "world_size": world_size,
               "images_per_second": made / seconds if seconds > 0 else None,
               "images_per_second_per_device": per_device, "dataset": str(dataset_dir),
               "class_counts": counts}
    log.info("synthesize: %d faces in %s (%d generated now in %.1f s, %.2f img/s on %d process(es))", size,
             dataset_dir, made, seconds, summary["images_per_second"] or 0, world_size)
    return summary
