"""Throughput on a lent GPU machine that has JAX but no TensorFlow: the scan on its cores, the model on its GPU.

Why this and not ``bench.py``: the lent machine has no TensorFlow and its wheel is far over what a session
may carry there, so ``labelcat run`` itself cannot run on it. What a night costs is the sum of two halves,
and both are the project's own code here:
- the scan (``scan_records``: one read and one decode per photo for the hashes, the quality check and
  the model's 224 px input) on 1..N worker processes: how many CPU cores feed the GPU;
- decode only: the model input by Pillow threads (``decode.load_pixels``, draft mode), against nvJPEG on
  the GPU (``torchvision.io.decode_jpeg(device="cuda")`` + resize) when torchvision is there;
- the classifier network (EfficientNet-Lite0, ImageNet weights; probabilities and the embedding from one
  compiled call, as ``classify.make_step``) under Keras' JAX backend, float32 and mixed bfloat16, over
  batch sizes, from host uint8 batches to host results;
- both together: the scan of chunk i+1 overlapping the model on chunk i, as the local runner pipelines
  chunks (dedupe, junk rules and the Parquet write are left out: they cost milliseconds a chunk).

Usage (sources: any folder of real photos, e.g. the Saleor and scikit-image photos ``bench.py`` uses)::

    KERAS_BACKEND=jax python bench/gpu_bench.py SOURCES [--n 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from photos import mosaics  # noqa: E402
from pipeline.models.preprocess import IMAGENET_224  # noqa: E402
from pipeline.stages import decode as dec  # noqa: E402
from pipeline.stages.ingest import Record  # noqa: E402
from pipeline.stages.scan import scan_records  # noqa: E402

MAX_PIXELS, MAX_BYTES = dec.DEFAULT_MAX_PIXELS, dec.DEFAULT_MAX_BYTES


def make_photos(folder: Path, n: int, sources: Path, parts: int) -> list[Path]:
    """``photos.mosaics`` in ``parts`` processes (part k: seed k), from the photos in folder ``sources``."""
    from concurrent.futures import ProcessPoolExecutor

    sizes = [n // parts + (k < n % parts) for k in range(parts)]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    with ProcessPoolExecutor(parts) as pool:
        made = pool.map(_mosaic_part, [folder] * parts, sizes, [sources] * parts, range(parts), starts)
        return [p for part in made for p in part]


def _mosaic_part(folder: Path, n: int, sources: Path, seed: int, start: int) -> list[Path]:
    return mosaics(folder, n, [Image.open(p).convert("RGB") for p in sorted(sources.iterdir())], seed=seed, start=start)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def records(paths: list[Path]) -> list[Record]:
    return [Record(i, str(p), p) for i, p in enumerate(paths)]


def bench_scan(paths: list[Path], workers: int) -> float:
    scan_records(records(paths[: 4 * workers]), MAX_PIXELS, MAX_BYTES, workers, model_input=IMAGENET_224)  # start the pool
    t = time.perf_counter()
    scan_records(records(paths), MAX_PIXELS, MAX_BYTES, workers, model_input=IMAGENET_224)
    return rate(len(paths), time.perf_counter() - t)


def bench_pillow_decode(paths: list[Path], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        for _ in pool.map(lambda p: dec.load_pixels(IMAGENET_224, p, MAX_PIXELS), paths):
            pass
        return rate(len(paths), time.perf_counter() - t)


def bench_nvjpeg(paths: list[Path], batch: int) -> float | None:
    """nvJPEG on the GPU: full-size decode of a batch of files, then resize to 224 px, kept on the GPU."""
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    datas = [torchvision.io.read_file(str(p)) for p in paths]  # file reads outside the timing: decode only

    def run(chunk):
        imgs = decode_jpeg(chunk, device="cuda")
        return [torch.nn.functional.interpolate(im[None].float(), size=(224, 224), mode="bilinear", antialias=True) for im in imgs]

    run(datas[:batch])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(datas), batch):
        run(datas[i:i + batch])
    torch.cuda.synchronize()
    return rate(len(datas), time.perf_counter() - t)


def classifier_step(precision: str):
    """The classify stage's compiled call under JAX: uint8 pixels → (softmax, pooled embedding), on host."""
    import jax
    import jax.numpy as jnp
    import keras

    from pipeline.models.backbones import build_efficientnet_lite0, efficientnet_lite0

    weights = efficientnet_lite0().model.get_weights()  # float32 ImageNet weights (ported once, cached)
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "mixed" else "float32")
    net = build_efficientnet_lite0()
    net.set_weights(weights)
    keras.config.set_dtype_policy("float32")
    both = keras.Model(net.inputs, [net.outputs[0], net.get_layer("avg_pool").output])
    trainable = [v.value for v in both.trainable_variables]
    frozen = [v.value for v in both.non_trainable_variables]

    @jax.jit
    def step(tv, ntv, pixels):
        (logits, features), _ = both.stateless_call(tv, ntv, pixels.astype(jnp.float32), training=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), features.astype(jnp.float32)

    def call(pixels: np.ndarray, batch: int | None = None):
        """``batch``: pad to this many rows, so that a chunk's short last batch reuses the compiled step
        (XLA compiles once per shape: a new shape costs seconds, as long as thousands of photos)."""
        n = len(pixels)
        if batch and n < batch:
            pixels = np.concatenate([pixels, np.zeros((batch - n, *pixels.shape[1:]), pixels.dtype)])
        probs, feats = step(trainable, frozen, pixels)
        return np.asarray(probs)[:n], np.asarray(feats)[:n]

    return call


def bench_model(call, batch: int, n: int) -> float:
    x = np.random.default_rng(1).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    call(x)  # compile
    batches = max(4, n // batch)
    t = time.perf_counter()
    for _ in range(batches):
        call(x)
    return rate(batch * batches, time.perf_counter() - t)


def bench_end_to_end(paths: list[Path], call, batch: int, chunk: int, workers: int) -> float:
    """Scan chunk i+1 on the worker processes while the model runs chunk i (the local runner's pipelining)."""
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    scanned: list = [None] * len(chunks)

    def scan(k: int) -> None:
        scanned[k] = scan_records(records(chunks[k]), MAX_PIXELS, MAX_BYTES, workers, model_input=IMAGENET_224)

    call(np.zeros((batch, 224, 224, 3), np.uint8))  # compile outside the timing, as the model-only lines do
    scan_records(records(paths[: 4 * workers]), MAX_PIXELS, MAX_BYTES, workers, model_input=IMAGENET_224)  # start the pool
    done = 0
    t = time.perf_counter()
    scan(0)
    for k in range(len(chunks)):
        ahead = threading.Thread(target=scan, args=(k + 1,)) if k + 1 < len(chunks) else None
        if ahead:
            ahead.start()
        pixels = np.stack([s.pixels for s in scanned[k].values()])
        for i in range(0, len(pixels), batch):
            call(pixels[i:i + batch], batch)
        done += len(pixels)
        if ahead:
            ahead.join()
    return rate(done, time.perf_counter() - t)


def gpu_name() -> str:
    import jax

    return ", ".join(d.device_kind for d in jax.devices())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, help="a folder of real photos to build the mosaics from")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model-n", type=int, default=4096, help="images through the model per batch size")
    ap.add_argument("--batches", default="32,128,512,1024", help="batch sizes for the model-only lines")
    ap.add_argument("--chunk", type=int, default=512, help="photos per chunk for the end-to-end line")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--parts", default="scan,decode,model,end_to_end", help="which measurements to make")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    res: dict = {"n": args.n, "cores": cores}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        t = time.perf_counter()
        paths = make_photos(folder, args.n, args.sources, cores)
        print(f"{len(paths)} photos made in {time.perf_counter() - t:.0f} s", flush=True)
        parts = args.parts.split(",")
        if "scan" in parts:
            workers = sorted({w for w in (1, 2, 4, 8, cores - 1, cores) if w <= cores})
            res["scan"] = {w: bench_scan(paths[: max(200, 100 * w)], w) for w in workers}
            print("scan", res["scan"], flush=True)
        if "decode" in parts:
            res["pillow_decode"] = {w: bench_pillow_decode(paths, w) for w in (1, cores)}
            res["nvjpeg_decode"] = bench_nvjpeg(paths, 128)
            print("decode", res["pillow_decode"], res["nvjpeg_decode"], flush=True)
        if "model" in parts or "end_to_end" in parts:
            res["gpu"] = gpu_name()
        batches = [int(b) for b in args.batches.split(",")]
        if "model" in parts:
            res["model"] = {}
            for precision in ("float32", "mixed"):
                call = classifier_step(precision)
                res["model"][precision] = {b: bench_model(call, b, args.model_n) for b in batches}
                print("model", precision, res["model"][precision], flush=True)
        if "end_to_end" in parts:
            batch = min(max(batches), args.chunk)
            res["end_to_end"] = {"precision": "mixed", "batch": batch, "chunk": args.chunk, "workers": cores,
                                 "rate": bench_end_to_end(paths, classifier_step("mixed"), batch, args.chunk, cores)}
            print("end to end", res["end_to_end"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
