"""Throughput of labelcat against the naive baseline and the machine's limits, in one run.

Measures, on N distinct 1600x1200 JPEGs (quality 90) of real photo content: each a 2x2 mosaic of random
crops of real photos (the product photos of the ``saleor==2.10.1`` wheel, on white, and scikit-image's
photos), turned by a random hue, so that no two are near duplicates and every photo is classified:
- decode only: the tf.data decode/resize stage alone (parallel Pillow, draft mode),
  and the same single-threaded, to show what parallel decoding buys;
- model only: synthetic uint8 batches through the compiled step, on the engine runs use (XNNPACK on a
  CPU) and on TensorFlow's own executor;
- classify stage: decode + model through ``predict`` (the tf.data loop), on both engines;
- full pipeline: ``labelcat run`` end to end (ingest, scan/hash, dedupe,
  classify, junk, Parquet);
- naive baseline: PIL open + resize + ``model.predict`` one image at a time;
- start-up: a fresh process importing TensorFlow, loading the classifier and readying its step, the first
  time (loading the Keras model and converting the step for XNNPACK, which is then cached) and the next
  (the cached flatbuffer; the Keras model is not loaded);
- ``labelcat run FOLDER --quiet`` as cron runs it: a fresh process, wall clock, start-up included (the
  median of three runs).

Usage: ``python bench/bench.py [--n 1000] [--batch-size 32] [--chunk-size 2048] [--naive-n 64] [--ray] [--out bench/out]``
(``--ray`` also times the full pipeline on ``--runner ray``; a ``--chunk-size`` below ``--n`` shows the
pipelining of chunks: the next chunk is scanned while this one is classified).
Writes ``results.json`` and ``results.md`` (the README table) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# the allocator `labelcat` itself sets (``pipeline/cli.py``), for the in-process measurements too
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "sample_catalog"))

from pipeline.models.preprocess import IMAGENET_224  # noqa: E402
from pipeline.models.classifier import load_classifier  # noqa: E402
from pipeline.ops.device import cpu_count, has_gpu  # noqa: E402
from pipeline.ops.fsutil import cache_dir  # noqa: E402
from pipeline.stages.classify import dataset, make_step, predict  # noqa: E402
from pipeline.runners.local import DEFAULT_CHUNK, RunConfig, run  # noqa: E402


def make_photos(folder: Path, n: int, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Distinct photo-content JPEGs from the Saleor product photos and scikit-image's photos (``photos.mosaics``)."""
    from build import flatten
    from decisions import saleor_photos, skimage_photos
    from photos import mosaics

    work = folder.parent / "sources"
    work.mkdir(exist_ok=True)
    sources = [flatten(Image.open(p)) for p, _, _ in saleor_photos(work)]
    sources += [Image.open(p).convert("RGB") for p in skimage_photos(work)]
    return mosaics(folder, n, sources, size)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_decode(paths: list[Path], batch_size: int, parallel: int | None) -> float:
    t = time.perf_counter()
    count = sum(int(idx.shape[0]) for idx, _, _ in dataset(paths, IMAGENET_224, batch_size, parallel=parallel))
    return rate(count, time.perf_counter() - t)


def bench_model(classifier, batch_size: int, batches: int, engine: str = "auto") -> float:
    x = np.random.default_rng(1).integers(0, 255, (batch_size, *classifier.preprocess.shape), dtype=np.uint8)
    return step_rate(make_step(classifier, engine=engine), x, batches)


def step_rate(step, x: np.ndarray, batches: int) -> float:
    """Images a second of a compiled step on the ready batch ``x``, after one call that traces it."""
    np.asarray(step(x)[0])  # trace once
    t = time.perf_counter()
    for _ in range(batches):
        np.asarray(step(x)[0])
    return rate(len(x) * batches, time.perf_counter() - t)


def bench_naive(classifier, paths: list[Path]) -> float:
    model = classifier.model
    x0 = np.asarray(Image.open(paths[0]).convert("RGB").resize((224, 224)), np.float32)[None]
    model.predict(x0, verbose=0)  # warm up
    t = time.perf_counter()
    for p in paths:
        x = np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)[None]
        model.predict(x, verbose=0)
    return rate(len(paths), time.perf_counter() - t)


STARTUP = """
import time
t = time.perf_counter()
from pipeline.models.classifier import load_classifier
from pipeline.stages.classify import make_step
import numpy as np
c = load_classifier({model!r}, precision={precision!r})
loaded = time.perf_counter() - t
make_step(c)(np.zeros((1, *c.preprocess.shape), np.uint8))
print(loaded, time.perf_counter() - t)
"""


def bench_startup(model: str, precision: str, converted: bool = True) -> tuple[float, float]:
    """(seconds to import TensorFlow and load the model, ... and ready its step) in a fresh process;
    ``converted=False`` hides the cached XNNPACK flatbuffers (the model's own cached weights stay)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as fresh:
        if not converted:
            for f in cache_dir().iterdir():
                if f.is_file():
                    (Path(fresh) / f.name).symlink_to(f)
            env["LABELCAT_CACHE"] = fresh
        out = subprocess.run([sys.executable, "-c", STARTUP.format(model=model, precision=precision)], cwd=ROOT,
                             capture_output=True, text=True, check=True, env=env).stdout.split()
    return float(out[-2]), float(out[-1])


def bench_cli(folder: Path, out: Path, model: str, batch_size: int, chunk_size: int) -> tuple[float, dict]:
    """Wall-clock seconds of ``labelcat run FOLDER --quiet`` in a fresh process, and its summary."""
    summary = out.with_suffix(".json")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "run", str(folder), "--out", str(out),
                    "--model", model, "--batch-size", str(batch_size), "--chunk-size", str(chunk_size), "--summary-json", str(summary), "--quiet"],
                   cwd=ROOT, check=True)
    return time.perf_counter() - t, json.loads(summary.read_text())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if has_gpu():
        import tensorflow as tf

        gpu = ", GPU: " + ", ".join(
            tf.config.experimental.get_device_details(d).get("device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")
        )
    return f"{cpu}, {cpu_count()} cores{gpu}"


def environment() -> str:
    """The interpreter's versions, and whether scikit-learn is installed. Why: Keras, which TensorFlow imports
    eagerly, imports scikit-learn when it is there (0.8 s of start-up on the 2-core machine); labelcat does not
    need it, so a venv with only labelcat's own and test requirements starts faster than one shared with
    peers' tools (imagededup needs it). Run the bench from the venv a user has, or read this line."""
    import importlib.metadata as md
    import importlib.util

    versions = ", ".join(f"{name} {md.version(name)}" for name in ("tensorflow", "keras"))
    sklearn = "scikit-learn installed (imported with Keras)" if importlib.util.find_spec("sklearn") else "no scikit-learn"
    return f"Python {platform.python_version()}, {versions}, {sklearn}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="photos for the pipeline measurements")
    ap.add_argument("--naive-n", type=int, default=64, help="photos for the (slow) naive baseline")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="rows per chunk for the pipeline runs")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--ray", action="store_true", help="also time `--runner ray` (needs labelcat[ray])")
    args = ap.parse_args()

    results: dict[str, float | str | int | list] = {"n": args.n, "batch_size": args.batch_size,
                                                    "chunk_size": args.chunk_size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = make_photos(folder, args.n)
        # fresh processes first, while this one has not started TensorFlow's threads
        # the first start converts the step for XNNPACK and caches it; nights after that load the cache
        results["startup_first_s"] = bench_startup(args.model, args.precision, converted=False)[1]
        bench_startup(args.model, args.precision)  # caches the flatbuffer where the runs below find it
        results["startup_load_s"], results["startup_s"] = bench_startup(args.model, args.precision)
        walls = []
        for _ in range(3):  # the median of three: a shared VM's runs vary
            wall, summary = bench_cli(folder, Path(tmp) / "cli.parquet", args.model, args.batch_size, args.chunk_size)
            walls.append(wall)
        wall = sorted(walls)[1]
        results["cli_wall_runs_s"] = walls
        results["cli_wall_s"], results["cli_classified"] = wall, summary["classified"]
        results["cli_wall"] = rate(len(paths), wall)
        classifier = load_classifier(args.model, precision=args.precision)
        results["model"], results["precision"], results["machine"] = classifier.name, classifier.precision, machine()
        results["environment"] = environment()
        bench_decode(paths[: args.batch_size], args.batch_size, None)  # warm the file cache and tf.data
        results["decode_parallel"] = bench_decode(paths, args.batch_size, None)
        results["decode_1_thread"] = bench_decode(paths, args.batch_size, 1)
        batches = max(4, args.n // args.batch_size)
        results["model_only"] = bench_model(classifier, args.batch_size, batches)
        results["engine"] = classifier.info["engine"]  # what ``auto`` chose (read before the next line sets it)
        results["model_only_tf"] = bench_model(classifier, args.batch_size, batches, "tensorflow")
        for key, engine in (("classify_stage", "auto"), ("classify_stage_tf", "tensorflow")):
            t = time.perf_counter()
            predict(classifier, paths, batch_size=args.batch_size, engine=engine)
            results[key] = rate(len(paths), time.perf_counter() - t)
        pipeline_cfg = RunConfig(batch_size=args.batch_size, chunk_size=args.chunk_size, quiet=True)
        t = time.perf_counter()
        run(folder, Path(tmp) / "out.parquet", classifier, pipeline_cfg)
        results["full_pipeline"] = rate(len(paths), time.perf_counter() - t)
        results["naive_baseline"] = bench_naive(classifier, paths[: args.naive_n])
        if args.ray:
            import ray

            from pipeline.runners.ray import run_ray

            t = time.perf_counter()
            run_ray(folder, Path(tmp) / "ray.parquet", args.model, None, args.precision, pipeline_cfg)
            results["ray_pipeline"] = rate(len(paths), time.perf_counter() - t)  # ray.init and actor start included
            ray.shutdown()

    args.out.mkdir(parents=True, exist_ok=True)
    naive = float(results["naive_baseline"])
    bound = 1 / (1 / float(results["decode_parallel"]) + 1 / float(results["model_only"]))
    results["bound"] = bound
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("naive baseline: PIL open + resize + `model.predict` per image", "naive_baseline"),
        (f"`labelcat run FOLDER --quiet`, fresh process, wall clock with start-up (median of "
         f"{', '.join(f'{w:.1f}' for w in results['cli_wall_runs_s'])} s; {results['cli_classified']} classified)",
         "cli_wall"),
        ("labelcat full pipeline in-process, model loaded (scan, hash, dedupe, classify, write)", "full_pipeline"),
        (f"labelcat classify stage (tf.data decode → batch → prefetch → compiled model on {results['engine']})",
         "classify_stage"),
        ("the same on TensorFlow's executor (`engine=\"tensorflow\"`)", "classify_stage_tf"),
        ("limit: decode + resize only, parallel (tf.data, draft mode)", "decode_parallel"),
        ("limit: decode + resize only, 1 thread", "decode_1_thread"),
        (f"limit: model only (synthetic batches, {results['engine']})", "model_only"),
        ("model only on TensorFlow's executor", "model_only_tf"),
    ]
    if "ray_pipeline" in results:
        rows.insert(2, ("labelcat full pipeline, `--runner ray` (local Ray, start-up included)", "ray_pipeline"))
    lines = [f"Machine: {results['machine']}; {args.n} photo-content JPEGs 1600x1200 q90; batch {args.batch_size}; "
             f"chunks of {args.chunk_size}; "
             f"{results['model']} ({results['precision']}); {results['environment']}", "",
             "| measurement | images/s | vs naive | of the bound |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {float(results[key]):.1f} | {float(results[key]) / naive:.1f}x | {float(results[key]) / bound:.2f} |"
              for label, key in rows]
    lines += [f"| bound: decode and model sharing the cores, 1/(1/decode + 1/model) | {bound:.1f} | {bound / naive:.1f}x | 1.00 |",
              "", f"Start-up in a fresh process: {results['startup_load_s']:.1f} s to import TensorFlow and load the classifier, "
              f"{results['startup_s']:.1f} s with its step ready ({results['startup_first_s']:.1f} s the first time, "
              "converting the step)."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
