"""Bytes a LoRA generator's pipeline folder takes: the reference save (LoRA + AU adapter + base_model.json) vs a full
copy of UNet, VAE and text encoder.

1. tiny: a tiny random SD folder (tests/tiny_sd.py) and a LoRA FERGenerator over it, saved both ways (measured).
2. sd15: Stable Diffusion 1.5 shapes built on the meta device (no weights, nothing downloaded): parameter counts
   of UNet, VAE, text encoder, the LoRA of each rank and the AU adapter, as stored bytes (an estimate: safetensors
   headers and configs add a few kB).

    .venv/bin/python benchmarks/lora_storage_bench.py [--ranks 4 8 16 32 64] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generator_bench import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402
from lightning_modules.generator.module import LORA_TARGETS  # noqa: E402

MB = 1e6


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes per top-level entry of ``folder`` and in total."""
    sizes = {}
    for entry in sorted(folder.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    sizes["total"] = sum(sizes.values())
    return sizes


def tiny(rank: int) -> dict:
    from lightning_modules.generator import pipeline as generator_pipeline
    from lightning_modules.generator.module import FERGenerator
    from tests.tiny_sd import save_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_sd(Path(tmp) / "sd")
        gen = FERGenerator(backbone="pretrained", pretrained_path=str(base), image_size=32, finetune="lora",
                           lora_rank=rank, au_hidden_dim=32, ema_decay=None, frozen_dtype=None)
        gen.save_generator(Path(tmp) / "reference")
        found = generator_pipeline.frozen_base
        generator_pipeline.frozen_base = lambda pipe: None  # the save before LoRA references: everything copied
        try:
            gen.save_generator(Path(tmp) / "full")
        finally:
            generator_pipeline.frozen_base = found
        return {"base": folder_bytes(base)["total"], "reference": folder_bytes(Path(tmp) / "reference"),
                "full": folder_bytes(Path(tmp) / "full")}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd15(ranks: list[int], au_tokens: int = 4, au_hidden: int = 1024, num_aus: int = 12) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.generator.conditioning import AUEncoder, cross_attention_layers

    text_cfg = dict(SD15_TEXT)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                    **SD15_UNET)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=text_cfg["hidden_size"],
                                            num_hidden_layers=text_cfg["num_layers"],
                                            num_attention_heads=text_cfg["num_heads"],
                                            intermediate_size=text_cfg["intermediate_size"],
                                            max_position_embeddings=text_cfg["max_length"]))
        au_encoder = AUEncoder(num_aus, 768, au_tokens, au_hidden)
    targets = [m for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS)]
    lora = {r: sum(r * (m.in_features + m.out_features) for m in targets) for r in ranks}
    # K/V_au of every cross-attention layer (bias-free, text-dim -> hidden) + the AU encoder
    au = _params(au_encoder) + sum(2 * a.to_k.in_features * a.to_k.out_features
                                   for a in cross_attention_layers(unet).values())
    return {"params": {"unet": _params(unet), "vae": _params(vae), "text_encoder": _params(text), "au_adapter": au,
                       "lora": lora, "lora_layers": len(targets)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--tiny-rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"tiny": tiny(args.tiny_rank), "sd15": sd15(args.ranks)}
    t = result["tiny"]
    print(f"tiny SD parts, LoRA rank {args.tiny_rank}: reference {t['reference']['total'] / MB:.3f} MB vs full "
          f"{t['full']['total'] / MB:.3f} MB (base folder {t['base'] / MB:.3f} MB)")
    print("  reference:", {k: v for k, v in t["reference"].items()})
    print("  full:     ", {k: v for k, v in t["full"].items()})
    p = result["sd15"]["params"]
    print(f"SD 1.5 params: UNet {p['unet'] / 1e6:.1f} M, VAE {p['vae'] / 1e6:.1f} M, text encoder "
          f"{p['text_encoder'] / 1e6:.1f} M, AU adapter {p['au_adapter'] / 1e6:.2f} M, {p['lora_layers']} LoRA layers")
    full32 = 4 * (p["unet"] + p["vae"] + p["text_encoder"])
    full_sd_cfg = 4 * p["unet"] + 2 * (p["vae"] + p["text_encoder"])  # generator=sd: frozen_dtype fp16
    print(f"  full copy: {full32 / 1e9:.2f} GB all fp32, {full_sd_cfg / 1e9:.2f} GB as generator=sd saves it "
          f"(fp32 UNet, fp16 VAE + text encoder)")
    for r, n in p["lora"].items():
        ref = 4 * (n + p["au_adapter"])
        print(f"  rank {r:>3}: LoRA {4 * n / MB:7.1f} MB + AU adapter {4 * p['au_adapter'] / MB:.1f} MB = "
              f"{ref / MB:7.1f} MB ({100 * ref / full_sd_cfg:.1f} % of the generator=sd full copy)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
