"""`stage=synthesize` at scale: peak memory N vs 4N faces, and the stage's throughput vs a plain sampler loop.

Two measurements for "synthesis at scale", each reported as a ratio measured in the same run,
never asserted:

1. peak RSS   — ``run_synthesize_stage`` on a plan of N faces and on one of 4N faces, each in a fresh Python process
   (this script re-invoked with ``--child``) that reports ``getrusage(RUSAGE_SELF).ru_maxrss``. The stage streams
   faces to disk chunk by chunk and computes plan rows on demand, so the peak should not grow with the plan.
   The generator is an untrained one at a larger image size (default 128 px, 1 step, no CFG: faces are cheap but
   big), and N is chosen so that holding the 4N faces as floats would be a visible share of the process.
   Goal: rss(4N) / rss(N) <= 1.15.
2. throughput — on the same generator folder and plan: the stage end to end (wall time around
   ``run_synthesize_stage``: config checks, plan, pipeline loading, Trainer, predict, PNG encoding, shard writing,
   manifest, finalize) vs ``SynFERPipeline`` called in a plain loop over the same plan rows in the same batches,
   with the same sampling settings, saving nothing (pipeline loaded and rows built before the clock starts).
   Runs alternate (loop, stage, stage, loop, ...) after a warm-up of each. Goal: stage / loop >= 0.95.

It also converts the stage's measured images/s into an estimate of the CPU time for 5x AffectNet's train split.

    .venv/bin/python benchmarks/synthesis_bench.py [--generator DIR] [--n 512] [--m 64] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
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

CONFIG_DIR = ROOT / "experiments"
TOY_GENERATOR = ROOT / "outputs" / "toy" / "generator" / "pipeline"
RSS_GOAL = 1.15          # rss(4N) / rss(N): at most
THROUGHPUT_GOAL = 0.95   # stage images/s / plain-loop images/s: at least
CHILD_MARK = "SYNTHESIS_BENCH_CHILD "
AFFECTNET_SCALE = 5

# A lighter UNet for the memory measurement: the tiny generator's UNet has its attention block at 1/4 of the image
# size (32x32 = 1024 tokens at 128 px, ~0.5 s per face on one core); one more down level puts it at 16x16 and
# with narrower levels makes a 128 px face >10x cheaper (~35 ms). The faces (what the stage must not hold) are just
# as big.
LIGHT_UNET = ["generator.model.unet.block_out_channels=[8,8,16,16]",
              "generator.model.unet.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D,CrossAttnDownBlock2D]",
              "generator.model.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D,UpBlock2D,UpBlock2D]"]


def _quiet() -> None:
    """Library chatter (loading / saving bars, Lightning's info lines, deprecation notices) off."""
    import logging
    import warnings

    import datasets
    import diffusers
    import lightning  # noqa: F401  (configures its loggers on import: set the levels after)
    import transformers

    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def compose(overrides: list[str], run_dir: Path):
    """The real config tree (experiments/) with Hydra's compose API, run folder pinned to ``run_dir`` (later
    overrides of the same key win), as tests/conftest.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    merged = {o.split("=", 1)[0]: o for o in [*overrides, f"paths.run_dir={run_dir}"]}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(merged.values()))


def stage_overrides(generator: Path, size: int, batch: int, chunk: int, sample: list[str]) -> list[str]:
    return ["logger=csv", f"synthesis.generator_path={generator}", f"synthesis.plan.size={size}",
            "synthesis.plan.scale=null", f"synthesis.batch_size={batch}", f"synthesis.chunk_size={chunk}",
            "synthesis.progress=false", *sample]


def build_generator(directory: Path, overrides: list[str]) -> dict:
    """An untrained generator (``hydra.utils.instantiate(cfg.generator.model)``) saved as stage=generator leaves it."""
    import hydra

    cfg = compose(["logger=csv", *overrides], directory.parent / "compose_run")
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.generator.model, num_classes=8, _convert_="all")
    model.save_generator(directory)
    params = sum(p.numel() for p in model.unet.parameters())
    return dict(path=str(directory), image_size=int(cfg.generator.model.image_size), unet_params=params)


def _vmrss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------- child: one stage run in a fresh process
def child(spec: dict) -> None:
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    if not spec["verbose"]:
        _quiet()
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    cfg = compose(spec["overrides"], Path(spec["run_dir"]))
    before_kib = _vmrss_kib()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if not spec["verbose"] else contextlib.nullcontext():
        metrics = run_synthesize_stage(cfg)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(CHILD_MARK + json.dumps(dict(ru_maxrss_kib=peak_kib, rss_before_stage_kib=before_kib, seconds=seconds,
                                       images=metrics.get("images"), generated=metrics.get("generated_now"),
                                       torch_threads=torch.get_num_threads())), flush=True)


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if spec["threads"] > 0:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


# ---------------------------------------------------------------------- 1. peak RSS, N vs 4N
def bench_rss(args, workdir: Path) -> dict:
    if args.n < args.chunk:
        print(f"warning: --n {args.n} < --chunk {args.chunk}: the N run writes no full chunk, so its peak misses the "
              "per-chunk shard-writing buffer and rss(4N)/rss(N) is biased upwards", file=sys.stderr)
    gen_over = [f"generator.model.image_size={args.image_size}", *(LIGHT_UNET if args.rss_unet == "light" else [])]
    info = build_generator(workdir / "rss_generator" / "pipeline", gen_over)
    sample = [f"synthesis.sample.steps={args.rss_steps}", "synthesis.sample.text_scale=1.0",
              "synthesis.sample.au_scale=1.0"]
    runs = {}
    for label, n in (("N", args.n), ("4N", 4 * args.n)):
        run_dir = workdir / f"rss_{label}"
        spec = dict(overrides=[*gen_over, *stage_overrides(Path(info["path"]), n, args.batch, args.chunk, sample)],
                    run_dir=str(run_dir), threads=args.threads, verbose=args.verbose)
        runs[label] = run_child(spec)
        if runs[label]["generated"] != n:
            raise RuntimeError(f"child generated {runs[label]['generated']} faces, expected {n}")
        runs[label]["dataset_mib"] = sum(p.stat().st_size for p in (run_dir / "synthesize" / "dataset").rglob("*")
                                         if p.is_file()) / 2 ** 20
        shutil.rmtree(run_dir, ignore_errors=True)
    rss_n, rss_4n = runs["N"]["ru_maxrss_kib"] / 1024, runs["4N"]["ru_maxrss_kib"] / 1024
    face_bytes = 3 * info["image_size"] ** 2 * 4  # one (3,H,W) float32 face, as the sampler returns it
    held_4n = 4 * args.n * face_bytes / 2 ** 20
    held_extra = 3 * args.n * face_bytes / 2 ** 20  # what 4N adds over N if faces were kept
    return dict(n=args.n, four_n=4 * args.n, image_size=info["image_size"], steps=args.rss_steps, unet=args.rss_unet,
                unet_params=info["unet_params"], batch=args.batch, chunk=args.chunk,
                rss_n_mib=rss_n, rss_4n_mib=rss_4n, ratio=rss_4n / rss_n,
                face_float_bytes=face_bytes, faces_4n_float_mib=held_4n,
                faces_4n_share_of_rss_n=held_4n / rss_n, held_ratio_at_least=(rss_n + held_extra) / rss_n,
                runs=runs)


# ---------------------------------------------------------------------- 2. throughput, stage vs plain loop
def bench_throughput(args, workdir: Path) -> dict:
    from omegaconf import OmegaConf

    from datamodules.labels import num_classes as protocol_classes
    from datamodules.labels import parse_au_list
    from datamodules.plans import build_plan
    from datamodules.synthesis import chunk_batches, num_chunks
    from lightning_modules.generator.pipeline import SynFERPipeline
    from lightning_modules.stages.synthesize_stage import plan_captioner, plan_config, run_synthesize_stage

    if args.generator:
        generator, source = Path(args.generator).resolve(), "given"
    elif TOY_GENERATOR.joinpath("model_index.json").is_file():
        generator, source = TOY_GENERATOR, "trained toy generator"
    else:
        generator = Path(build_generator(workdir / "tp_generator" / "pipeline", [])["path"])
        source = "untrained tiny generator (same architecture as the toy one)"
    sample = [f"synthesis.sample.steps={args.steps}"] if args.steps else []
    m = args.m

    def stage_cfg(name: str, size: int, extra=()):
        return compose(stage_overrides(generator, size, args.batch, args.chunk, [*sample, *extra]), workdir / name)

    cfg = stage_cfg("tp_plan", m)
    call_kwargs = dict(OmegaConf.to_container(cfg.synthesis.sample, resolve=True))
    call_kwargs = {"num_inference_steps": int(call_kwargs.pop("steps", 25)), **call_kwargs}  # as SynthesisModule
    plan = build_plan(plan_config(cfg), protocol_classes(int(cfg.data.protocol)), parse_au_list(cfg.data.aus),
                      captioner=plan_captioner(cfg))
    batches = []
    for b in chunk_batches(m, args.chunk, args.batch, list(range(num_chunks(m, args.chunk)))):
        rows = plan.rows(range(b.start, b.stop))
        batches.append(dict(captions=list(rows["caption"]), seeds=list(rows["seed"]),
                            aus=torch.tensor(rows["target_aus"], dtype=torch.float32),
                            au_mask=torch.tensor(rows["au_mask"], dtype=torch.bool)))
    start = time.perf_counter()
    pipe = SynFERPipeline.from_pretrained(str(generator))
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    image_size = int(pipe.config.image_size)
    use_aus = pipe.has_au_adapter

    def loop(which=None, **override) -> float:
        start = time.perf_counter()
        with torch.inference_mode():  # the stage predicts under inference_mode too (no semantic guidance)
            for b in (batches if which is None else which):
                pipe(b["captions"], aus=b["aus"] if use_aus else None, au_mask=b["au_mask"] if use_aus else None,
                     seeds=b["seeds"], batch_size=len(b["seeds"]), progress=False,
                     **{**call_kwargs, **override}).images.cpu()
        return time.perf_counter() - start

    stage_metrics = []

    def stage(size: int = m, extra: tuple = ()) -> float:
        """One fresh run folder per run (a finished one would be skipped); only run_synthesize_stage is timed."""
        name = f"tp_stage_{len(stage_metrics)}"
        run_cfg = stage_cfg(name, size, extra)
        with contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext():
            start = time.perf_counter()
            metrics = run_synthesize_stage(run_cfg)
            wall = time.perf_counter() - start
        if metrics.get("generated_now") != size:
            raise RuntimeError(f"stage generated {metrics.get('generated_now')} faces, expected {size}")
        # setup = everything before trainer.predict (checks, plan, fingerprint, pipeline loading, Trainer, logger)
        stage_metrics.append(dict(metrics, wall_s=wall, setup_s=wall - metrics["seconds"]))
        shutil.rmtree(workdir / name, ignore_errors=True)
        return wall

    threads_before = torch.get_num_threads()
    warm = time.perf_counter()
    # warm-up, 1 sampling step (same shapes and code paths, less time): one sampler batch and a one-batch stage run
    # (first imports, first Trainer, first shard write)
    loop(batches[:1], num_inference_steps=1)
    stage(min(m, args.batch), ("synthesis.sample.steps=1",))
    stage_metrics.clear()
    warmup_s = time.perf_counter() - warm
    times = {"loop": [], "stage": []}
    fns = {"loop": loop, "stage": stage}
    for r in range(args.repeats):      # loop, stage | stage, loop | ...: drift on a shared machine hits both
        for name in (("loop", "stage") if r % 2 == 0 else ("stage", "loop")):
            times[name].append(fns[name]())
    best = {k: m / min(v) for k, v in times.items()}
    median = {k: m / statistics.median(v) for k, v in times.items()}
    steady = [s["images_per_second"] for s in stage_metrics if s.get("images_per_second")]
    return dict(generator=str(generator), generator_source=source, image_size=image_size, m=m, batch=args.batch,
                chunk=args.chunk, sample=call_kwargs, au_adapter=use_aus, repeats=args.repeats,
                loop_images_per_s=best["loop"], stage_images_per_s=best["stage"], ratio=best["stage"] / best["loop"],
                loop_images_per_s_median=median["loop"], stage_images_per_s_median=median["stage"],
                ratio_median=median["stage"] / median["loop"],
                stage_predict_images_per_s=max(steady) if steady else None,
                stage_setup_s=statistics.median(s["setup_s"] for s in stage_metrics),
                pipeline_load_s=load_s, warmup_s=warmup_s, loop_all_s=times["loop"], stage_all_s=times["stage"],
                stage_metrics=[{k: v for k, v in s.items() if k not in ("dataset", "class_counts")}
                               for s in stage_metrics],
                torch_threads_before=threads_before, torch_threads_after=torch.get_num_threads())


def affectnet_estimate(tp: dict, default_config: bool) -> dict:
    from datamodules.toyfaces import AFFECTNET_TRAIN_COUNTS

    train = sum(AFFECTNET_TRAIN_COUNTS)
    faces = AFFECTNET_SCALE * train
    ips = tp["stage_images_per_s"]
    return dict(affectnet_train=train, scale=AFFECTNET_SCALE, faces=faces, stage_images_per_s=ips,
                default_config=default_config,
                hours=faces / ips / 3600, days=faces / ips / 86400,
                hours_at_predict_rate=(faces / tp["stage_predict_images_per_s"] / 3600
                                       if tp.get("stage_predict_images_per_s") else None),
                configuration=(f"{tp['image_size']} px {tp['generator_source']}, {tp['sample'].get('sampler')} "
                               f"{tp['sample']['num_inference_steps']} steps, CFG text {tp['sample'].get('text_scale')}"
                               f" / AU {tp['sample'].get('au_scale')}, batch {tp['batch']}"))


# ---------------------------------------------------------------------- report
def print_table(res: dict) -> None:
    print(f"\nSynFER synthesis benchmark  threads={res['torch_threads']} cpu_count={res['cpu_count']}")
    rs = res.get("rss")
    if rs:
        ok = "ok" if rs["ratio"] <= RSS_GOAL else "OVER GOAL"
        print(f"\n[peak RSS] stage=synthesize in a fresh process per run; untrained generator ({rs['unet']} UNet, "
              f"{rs['unet_params'] / 1e6:.2f} M params), {rs['image_size']} px, {rs['steps']} step(s), no CFG, "
              f"batch {rs['batch']}, chunk {rs['chunk']}")
        print(f"  {'N = %d faces' % rs['n']:<58} {rs['rss_n_mib']:>9.1f} MiB")
        print(f"  {'4N = %d faces' % rs['four_n']:<58} {rs['rss_4n_mib']:>9.1f} MiB")
        print(f"  {'ratio 4N/N (goal <= %.2f)' % RSS_GOAL:<58} {rs['ratio']:>9.3f}  {ok}")
        print(f"  sensitivity: 4N faces as float32 = 4 x {rs['n']} x 3 x {rs['image_size']}^2 x 4 B = "
              f"{rs['faces_4n_float_mib']:.1f} MiB = {100 * rs['faces_4n_share_of_rss_n']:.0f} % of rss(N); "
              f"a stage that kept its faces would show a ratio >= {rs['held_ratio_at_least']:.2f}")
    tp = res.get("throughput")
    if tp:
        ok = "ok" if tp["ratio"] >= THROUGHPUT_GOAL else "UNDER GOAL"
        s = tp["sample"]
        print(f"\n[throughput] {tp['m']} faces, {tp['image_size']} px {tp['generator_source']}, {s.get('sampler')} "
              f"{s['num_inference_steps']} steps, CFG text {s.get('text_scale')} / AU {s.get('au_scale')}, "
              f"batch {tp['batch']}, best of {tp['repeats']} alternating runs (median in brackets)")
        print(f"  {'plain loop: SynFERPipeline(...) per plan batch, no saving':<62} {tp['loop_images_per_s']:>7.3f} "
              f"img/s  ({tp['loop_images_per_s_median']:.3f})")
        print(f"  {'stage=synthesize end to end (run_synthesize_stage wall)':<62} {tp['stage_images_per_s']:>7.3f} "
              f"img/s  ({tp['stage_images_per_s_median']:.3f})")
        print(f"  {'ratio stage/loop (goal >= %.2f)' % THROUGHPUT_GOAL:<62} {tp['ratio']:>7.3f}        "
              f"({tp['ratio_median']:.3f})  {ok}")
        if tp.get("stage_predict_images_per_s"):
            print(f"  {'  (stage, its own predict + finalize rate, informational)':<62} "
                  f"{tp['stage_predict_images_per_s']:>7.3f} img/s")
        print(f"  {'  (stage setup before trainer.predict, incl. pipeline loading)':<62} {tp['stage_setup_s']:>7.3f} s")
    est = res.get("affectnet_5x")
    if est:
        print(f"\n[estimate] {est['scale']}x AffectNet train = {est['scale']} x {est['affectnet_train']:,} = "
              f"{est['faces']:,} faces at {est['stage_images_per_s']:.3f} img/s (stage, end to end)")
        which = "the default CPU configuration" if est["default_config"] else "this configuration"
        print(f"  = {est['hours']:,.1f} h ({est['days']:.1f} days) on {res['torch_threads']} CPU thread(s), one "
              f"process -- {which} ({est['configuration']}), NOT 512 px Stable Diffusion")
    print()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (and OMP_NUM_THREADS of the children); default 1: on a small shared "
                         "machine one intra-op thread is faster and far less noisy; 0 keeps torch's default")
    ap.add_argument("--skip", nargs="*", default=[], choices=["rss", "throughput"])
    ap.add_argument("--n", type=int, default=512, help="RSS: faces of the small run (the large one makes 4N)")
    ap.add_argument("--image-size", type=int, default=128, help="RSS: generator image size (px)")
    ap.add_argument("--rss-steps", type=int, default=1, help="RSS: sampling steps per face")
    ap.add_argument("--rss-unet", default="light", choices=["light", "tiny"],
                    help="RSS: UNet of the untrained generator (light: attention at 1/8 of the image size; tiny: "
                         "the generator/tiny.yaml UNet, >10x slower at 128 px)")
    ap.add_argument("--generator", default=None,
                    help=f"throughput: a saved generator pipeline folder (default {TOY_GENERATOR.relative_to(ROOT)} "
                         "if it exists, else an untrained tiny one)")
    ap.add_argument("--m", type=int, default=64, help="throughput: faces per run")
    ap.add_argument("--steps", type=int, default=None, help="throughput: sampling steps (default: the config's)")
    ap.add_argument("--repeats", type=int, default=2, help="throughput: timed runs of each side")
    ap.add_argument("--batch", type=int, default=16, help="synthesis.batch_size (faces per sampler call)")
    ap.add_argument("--chunk", type=int, default=256, help="synthesis.chunk_size (faces per shard)")
    ap.add_argument("--verbose", action="store_true", help="keep library warnings, loading bars and stage output")
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return {}
    if not args.verbose:
        _quiet()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import datasets
    import diffusers
    import lightning
    import transformers

    res = dict(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), platform=platform.platform(),
               python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, lightning_version=lightning.__version__,
               datasets=datasets.__version__, date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               args={k: v for k, v in vars(args).items() if k != "child"},
               goals=dict(rss_ratio_max=RSS_GOAL, throughput_ratio_min=THROUGHPUT_GOAL))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synfer_synth_bench_") as tmp:
        if "rss" not in args.skip:
            res["rss"] = bench_rss(args, Path(tmp))
        if "throughput" not in args.skip:
            res["throughput"] = bench_throughput(args, Path(tmp))
            res["affectnet_5x"] = affectnet_estimate(res["throughput"], not args.generator and not args.steps
                                                     and args.batch == 16)
    res["wall_s"] = time.perf_counter() - t0
    print_table(res)
    print(f"total {res['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
