"""SynFER generator vs diffusers baselines: training-step time and sampling throughput, as ratios.

Two measurements in one run, each against a plain diffusers baseline on the same architecture and batch:

1. train step  — ``FERGenerator.diffusion_loss`` + backward + AdamW step (text encoder + AU encoder + UNet with the
   decoupled AU attention) vs the textbook diffusers loop (tokenize, CLIPTextModel, DDPMScheduler.add_noise,
   UNet2DConditionModel with plain attention, MSE, backward, AdamW) on a UNet / text encoder built from the same
   configs. Optionally also ``lightning.Trainer.fit`` vs a bare loop over the same DataLoader (Lightning overhead).
2. sampling    — ``SynFERPipeline`` vs ``StableDiffusionPipeline`` loading the same saved tiny latent-diffusion
   folder, same prompts, per-sample seeds, DDIM steps and classifier-free guidance; plus SynFER with an AU adapter
   (two passes: text_scale == au_scale) and with separate scales (three passes: expected slower, informational).

Ours and the baseline are timed interleaved (step by step / call by call) and the median is reported, so a busy
machine slows both alike. Only ratios are meaningful; nothing here asserts on absolute times.

    .venv/bin/python benchmarks/generator_bench.py [--device cpu|cuda] [--size tiny|sd] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TRAIN_GOAL = 1.10      # ours / baseline seconds per step: at most
SAMPLE_GOAL = 0.95     # ours / diffusers images per second: at least

# SD-1.5 shapes (random weights, built from config: nothing is downloaded).
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_TEXT = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_length=77)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TINY_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)

# train: pixel-space FERGenerator (backbone=tiny) at `train_image` px; for `sd` the UNet sees 64x64 inputs, the
# same spatial cost as SD-1.5's 64x64 latents. sample: latent diffusion, `latent` x `latent` latents.
SIZES = {
    "tiny": dict(unet=None, text=None, vae=TINY_VAE, train_batch=16, train_image=32, train_warmup=3,
                 train_steps=10, lightning_steps=4, lightning_rounds=4,
                 sample_batch=16, latent=16, sample_steps=10, sample_warmup=1, sample_repeats=5),
    "sd": dict(unet=SD15_UNET, text=SD15_TEXT, vae=SD15_VAE, train_batch=8, train_image=64, train_warmup=3,
               train_steps=10, lightning_steps=5, lightning_rounds=4,
               sample_batch=8, latent=64, sample_steps=25, sample_warmup=1, sample_repeats=3),
}

CAPTIONS = ["a photo of a happy face, smiling", "a photo of an angry face", "a surprised face with raised brows",
            "a sad face looking down", "a neutral face", "a disgusted face, wrinkled nose",
            "a fearful face, wide eyes", "a face with a contemptuous smirk"]


def _quiet() -> None:
    """Library chatter (loading bars, Lightning's info lines, deprecation notices) off: the table is the output."""
    import logging
    import warnings

    import diffusers
    import lightning  # noqa: F401  (configures its loggers on import: set the levels after)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _captions(n: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def make_batch(n: int, image_size: int, num_aus: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(image=torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1,
                 aus=torch.rand(n, num_aus, generator=g) * 5,
                 au_mask=torch.rand(n, num_aus, generator=g) < 0.8,
                 caption=_captions(n),
                 label=torch.randint(0, 8, (n,), generator=g))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------- 1. training step
def build_generator(cfg: dict, device: torch.device):
    from lightning_modules.generator.module import FERGenerator

    torch.manual_seed(0)
    module = FERGenerator(backbone="tiny", image_size=cfg["train_image"], ema_decay=None, unet=cfg["unet"],
                          text_encoder=cfg["text"])
    return module.to(device).train()


class BaselineTrainer:
    """The textbook diffusers text-to-image training step on the same UNet / text-encoder architecture."""

    def __init__(self, module, device: torch.device, precision: str):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.device, self.precision = device, precision
        self.unet = UNet2DConditionModel.from_config(module.unet.config)  # default (plain) attention processors
        self.unet.load_state_dict(module.unet.state_dict(), strict=False)  # same start; AU weights are ignored
        self.text_encoder = CLIPTextModel(module.text_encoder.config)
        self.text_encoder.load_state_dict(module.text_encoder.state_dict())
        self.unet.to(device).train()
        self.text_encoder.to(device).train()
        self.tokenizer = module.tokenizer
        self.scheduler = DDPMScheduler.from_config(module.noise_scheduler.config)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=module.hparams.lr, weight_decay=module.hparams.weight_decay)

    def step(self, batch: dict) -> None:
        latents = batch["image"]
        ids = self.tokenizer(batch["caption"], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with _autocast(self.device, self.precision):
            text = self.text_encoder(ids)[0]
            pred = self.unet(noisy, t, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()


def bench_train_step(module, cfg: dict, device: torch.device, precision: str, batch: dict) -> dict:
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=module.hparams.lr,
                            weight_decay=module.hparams.weight_decay)

    def ours() -> None:
        with _autocast(device, precision):
            loss = module.diffusion_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    base = BaselineTrainer(module, device, precision)
    for _ in range(cfg["train_warmup"]):
        ours()
        base.step(batch)
    times = {"ours": [], "baseline": []}
    for i in range(cfg["train_steps"]):  # interleaved, alternating who goes first
        order = (("ours", ours), ("baseline", lambda: base.step(batch)))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            times[name].append(_timed(fn, device))
    n_ours = sum(p.numel() for p in module.trainable_parameters())
    n_base = sum(p.numel() for p in base.opt.param_groups[0]["params"])
    del base, opt
    ours_s, base_s = statistics.median(times["ours"]), statistics.median(times["baseline"])
    return dict(ours_s_per_step=ours_s, baseline_s_per_step=base_s, ratio=ours_s / base_s, goal_max=TRAIN_GOAL,
                ours_trainable_params=n_ours, baseline_trainable_params=n_base, timed_steps=cfg["train_steps"],
                warmup_steps=cfg["train_warmup"], ours_all_s=times["ours"], baseline_all_s=times["baseline"])


# ---------------------------------------------------------------------- 1b. Lightning Trainer.fit vs bare loop
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, image_size: int, num_aus: int):
        self.batch = make_batch(n, image_size, num_aus, torch.device("cpu"), seed=1)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


def _intervals(stamps: list[float], skip: int) -> list[float]:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[skip:] if len(gaps) > skip else gaps


def bench_lightning(module, cfg: dict, device: torch.device, precision: str) -> dict:
    """Per-step wall time between consecutive batch starts (fetch + forward/backward + optimizer + LR scheduler
    + logging): ``Trainer.fit`` vs a hand-written loop over the same DataLoader with the same optimizer/scheduler."""
    import lightning as L
    from diffusers.optimization import get_scheduler

    steps, warm, rounds = cfg["lightning_steps"] + 1, 1, cfg["lightning_rounds"]
    data = _ListDataset(steps * cfg["train_batch"], cfg["train_image"], len(module.vocab))

    def loader():
        return torch.utils.data.DataLoader(data, batch_size=cfg["train_batch"], shuffle=False, num_workers=0)

    def bare() -> list[float]:
        module.to(device)  # Trainer.fit's teardown moves a GPU module back to the CPU
        hp = module.hparams
        opt = torch.optim.AdamW(module.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = get_scheduler(hp.lr_schedule, opt, num_warmup_steps=min(hp.warmup_steps, steps - 1),
                              num_training_steps=steps)
        module.train()
        stamps = []
        for batch in loader():
            _sync(device)
            stamps.append(time.perf_counter())
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with _autocast(device, precision):
                loss = module.diffusion_loss(batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        _sync(device)
        stamps.append(time.perf_counter())
        return _intervals(stamps, warm)

    class Stamp(L.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == steps - 1:
                _sync(device)
                self.stamps.append(time.perf_counter())

    def fit() -> list[float]:
        stamp = Stamp()
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
                            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            precision="bf16-mixed" if precision == "bf16" else "32-true", callbacks=[stamp])
        trainer.fit(module, train_dataloaders=loader())
        module._trainer = None
        return _intervals(stamp.stamps, warm)

    times = {"bare": [], "lightning": []}
    for r in range(rounds):  # short alternating runs: drift on a shared machine hits both
        for name, fn in ((("bare", bare), ("lightning", fit)) if r % 2 == 0 else (("lightning", fit), ("bare", bare))):
            times[name] += fn()
    module.to(device)
    bare_s, fit_s = statistics.median(times["bare"]), statistics.median(times["lightning"])
    return dict(lightning_s_per_step=fit_s, bare_loop_s_per_step=bare_s, ratio=fit_s / bare_s,
                timed_steps_per_run=cfg["lightning_steps"], runs=rounds, lightning_all_s=times["lightning"],
                bare_all_s=times["bare"])


# ---------------------------------------------------------------------- 2. sampling
def save_ldm(directory: Path, cfg: dict) -> int:
    """A random latent-diffusion folder of the chosen size (UNet 4 ch + AutoencoderKL + CLIPTextModel + offline CLIP
    tokenizer + DDIM), saved by diffusers' StableDiffusionPipeline. Returns the pixel size."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from lightning_modules.generator.components import TINY_TEXT, TINY_UNET
    from lightning_modules.generator.conditioning import tiny_text_encoder

    torch.manual_seed(0)
    text_cfg = {**TINY_TEXT, **(cfg["text"] or {})}
    text, tokenizer = tiny_text_encoder(**text_cfg)
    unet = UNet2DConditionModel(sample_size=cfg["latent"], in_channels=4, out_channels=4,
                                cross_attention_dim=text_cfg["hidden_size"], **(cfg["unet"] or TINY_UNET))
    vae = AutoencoderKL(in_channels=3, out_channels=3, **cfg["vae"])
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                              beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return cfg["latent"] * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def bench_sampling(cfg: dict, device: torch.device, precision: str, workdir: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from datamodules.labels import DISFA_AUS
    from lightning_modules.generator.conditioning import AUEncoder, install_au_attention
    from lightning_modules.generator.pipeline import SynFERPipeline

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pixels = save_ldm(workdir, cfg)
    sd = StableDiffusionPipeline.from_pretrained(str(workdir), safety_checker=None, requires_safety_checker=False,
                                                 torch_dtype=dtype).to(device)
    ours = SynFERPipeline.from_pretrained(str(workdir), torch_dtype=dtype).to(device)
    ours_au = SynFERPipeline.from_pretrained(str(workdir), torch_dtype=dtype).to(device)
    torch.manual_seed(0)
    cross = int(ours_au.unet.config.cross_attention_dim)
    encoder = AUEncoder(len(DISFA_AUS), cross, num_tokens=4, hidden_dim=256).to(device=device, dtype=dtype)
    procs = install_au_attention(ours_au.unet, num_tokens=4)
    ours_au.set_au_adapter(encoder, procs, DISFA_AUS)
    for p in (sd, ours, ours_au):
        p.set_progress_bar_config(disable=True)

    n, steps = cfg["sample_batch"], cfg["sample_steps"]
    prompts, seeds = _captions(n), list(range(100, 100 + n))
    g = torch.Generator().manual_seed(0)
    aus, au_mask = torch.rand(n, len(DISFA_AUS), generator=g) * 5, torch.rand(n, len(DISFA_AUS), generator=g) < 0.8

    variants = {
        "diffusers_cfg": lambda: sd(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                    num_inference_steps=steps, guidance_scale=3.0, height=pixels, width=pixels,
                                    output_type="pt").images,
        "ours_cfg": lambda: ours(prompts, seeds=seeds, num_inference_steps=steps, text_scale=3.0,
                                 output_type="pt").images,
        "ours_au_2pass": lambda: ours_au(prompts, aus=aus, au_mask=au_mask, seeds=seeds, num_inference_steps=steps,
                                         text_scale=3.0, au_scale=3.0, output_type="pt").images,
        "ours_au_3pass": lambda: ours_au(prompts, aus=aus, au_mask=au_mask, seeds=seeds, num_inference_steps=steps,
                                         text_scale=3.0, au_scale=2.0, output_type="pt").images,
    }
    with torch.no_grad():
        ref, mine = variants["diffusers_cfg"](), variants["ours_cfg"]()  # also the warm-up
        max_diff = float((ref.float() - mine.float()).abs().max())
        for _ in range(cfg["sample_warmup"] - 1):
            for fn in variants.values():
                fn()
        for name in ("ours_au_2pass", "ours_au_3pass"):
            variants[name]()
        times = {k: [] for k in variants}
        names = list(variants)
        for r in range(cfg["sample_repeats"]):  # interleaved, rotating the order
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(_timed(variants[name], device))
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    base = ips["diffusers_cfg"]
    rows = {
        "diffusers_cfg": dict(label="diffusers StableDiffusionPipeline, CFG 3.0 (batched 2N)", passes=2),
        "ours_cfg": dict(label="SynFERPipeline, no AU adapter, text_scale 3.0", passes=2, goal_min=SAMPLE_GOAL),
        "ours_au_2pass": dict(label="SynFERPipeline + AU adapter, text_scale = au_scale = 3.0", passes=2,
                              goal_min=SAMPLE_GOAL),
        "ours_au_3pass": dict(label="SynFERPipeline + AU adapter, text_scale 3.0, au_scale 2.0 (informational)",
                              passes=3, expected_slower=True),
    }
    for k, row in rows.items():
        row.update(images_per_s=ips[k], ratio_vs_diffusers=ips[k] / base, all_s=times[k])
    return dict(batch=n, steps=steps, pixels=pixels, latent=cfg["latent"], repeats=cfg["sample_repeats"],
                ours_vs_diffusers_max_abs_diff=max_diff, rows=rows)


# ---------------------------------------------------------------------- report
def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


def print_table(res: dict) -> None:
    print(f"\nSynFER generator benchmark  size={res['size']} device={res['device']} precision={res['precision']} "
          f"threads={res['torch_threads']}")
    tr = res.get("train_step")
    if tr:
        ok = "ok" if tr["ratio"] <= TRAIN_GOAL else "OVER GOAL"
        print(f"\n[train step] batch {res['config']['train_batch']}, {res['config']['train_image']}px, "
              f"median of {tr['timed_steps']} interleaved steps")
        print(f"  {'ours (FERGenerator.diffusion_loss + AdamW)':<58} {_fmt_s(tr['ours_s_per_step']):>10}/step")
        print(f"  {'diffusers textbook loop (same UNet/text arch)':<58} {_fmt_s(tr['baseline_s_per_step']):>10}/step")
        print(f"  {'ratio ours/baseline (goal <= %.2f)' % TRAIN_GOAL:<58} {tr['ratio']:>10.3f}  {ok}")
    lt = res.get("lightning_overhead")
    if lt:
        print(f"\n[Lightning overhead] Trainer.fit vs bare loop over the same DataLoader "
              f"({lt['runs']}x{lt['timed_steps_per_run']} steps)")
        print(f"  {'Trainer.fit':<58} {_fmt_s(lt['lightning_s_per_step']):>10}/step")
        bare = "bare loop (same module, optimizer, LR scheduler)"
        print(f"  {bare:<58} {_fmt_s(lt['bare_loop_s_per_step']):>10}/step")
        print(f"  {'ratio fit/bare (informational)':<58} {lt['ratio']:>10.3f}")
    sm = res.get("sampling")
    if sm:
        print(f"\n[sampling] batch {sm['batch']}, {sm['pixels']}px ({sm['latent']}x{sm['latent']} latents), "
              f"{sm['steps']} DDIM steps, median of {sm['repeats']} interleaved calls "
              f"(max |ours - diffusers| = {sm['ours_vs_diffusers_max_abs_diff']:.2e})")
        for row in sm["rows"].values():
            note = ""
            if "goal_min" in row:
                note = "ok" if row["ratio_vs_diffusers"] >= row["goal_min"] else "UNDER GOAL"
            elif row.get("expected_slower"):
                note = "expected slower"
            print(f"  {row['label']:<74} {row['images_per_s']:>8.2f} img/s  x{row['ratio_vs_diffusers']:.3f}  "
                  f"{note}")
    print()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast for training, bf16 weights for sampling (both sides alike)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads on CPU (default 1: on a small shared machine one intra-op thread is "
                         "faster and far less noisy than several; 0 keeps torch's default)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "lightning", "sampling"])
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--sample-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed sampling calls per variant")
    ap.add_argument("--batch", type=int, default=None, help="override both batch sizes")
    ap.add_argument("--verbose", action="store_true", help="keep library warnings and loading bars")
    args = ap.parse_args(argv)
    if not args.verbose:
        _quiet()

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = dict(SIZES[args.size])
    for key, val in (("train_steps", args.train_steps), ("sample_steps", args.sample_steps),
                     ("sample_repeats", args.repeats), ("train_batch", args.batch), ("sample_batch", args.batch)):
        if val is not None:
            cfg[key] = val
    device = torch.device(args.device)
    import diffusers
    import lightning
    import transformers

    res = dict(size=args.size, device=args.device, precision=args.precision, torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
               torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
               lightning_version=lightning.__version__,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               config={k: v for k, v in cfg.items() if k not in ("unet", "text", "vae")},
               goals=dict(train_ratio_max=TRAIN_GOAL, sample_ratio_min=SAMPLE_GOAL))
    t0 = time.perf_counter()
    if "train" not in args.skip or "lightning" not in args.skip:
        module = build_generator(cfg, device)
        if "train" not in args.skip:
            batch = make_batch(cfg["train_batch"], cfg["train_image"], len(module.vocab), device)
            res["train_step"] = bench_train_step(module, cfg, device, args.precision, batch)
        if "lightning" not in args.skip:
            res["lightning_overhead"] = bench_lightning(module, cfg, device, args.precision)
        del module
    if "sampling" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="synfer_bench_") as tmp:
            res["sampling"] = bench_sampling(cfg, device, args.precision, Path(tmp))
    res["wall_s"] = time.perf_counter() - t0
    print_table(res)
    print(f"total {res['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
