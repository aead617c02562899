"""Scan: one read of each photo gives its sha256, upright size, perceptual hashes and quality numbers.

Why one module: the local runner, the Ray runner and training must agree on
what a photo is (the same bytes read, the same decode, the same error codes),
or a photo trained on would be a different photo at night. Every failure,
including a decoder bug on one file, becomes an ``(error code, detail)`` pair
rather than an exception, so one bad photo never stops the night.

Why processes, not threads: Pillow releases the GIL while it decodes and
resizes, but a photo's hashes are many small numpy and Python steps that hold
it, so two threads scanned only 1.45x as fast as one (GCompris's small photos:
230-241 against 160-167 a second on 2 cores), where two processes scan 279-353.
The workers start once per process from a fork server (a clean interpreter:
never a fork of one that has loaded TensorFlow) and serve every chunk after.
A worker that dies on a photo (a decoder crash) breaks only its task: its
photos are scanned again one at a time, and the one that kills a worker
again gets ``decode_failed``.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.models.preprocess import Preprocess

from pipeline.ops.device import cpu_count
from pipeline.stages import decode as dec
from pipeline.stages.dedupe import Candidate, Hashes, compute_hashes
from pipeline.stages.ingest import Record
from pipeline.stages.junk import Quality, quality_stats

SCAN_SIDE = 256  # decode size for hashing and quality checks (JPEG draft mode)

ScanError = tuple[str, str]  # (error code, detail)


@dataclass
class Scan:
    """What one read of the file told us (before the model)."""

    sha256: str
    width: int
    height: int
    hashes: Hashes
    quality: Quality
    pixels: np.ndarray | None = None  # the model's input, cut from the same decode (``model_input``)
    fidelity: int = 100  # the file's encoding quality (``decode.encoding_quality``: which copy of one size is kept)


def shares_scan_decode(model_input: Preprocess | None) -> bool:
    """Whether the model's input can be cut from the scan's decode: the ImageNet convention decodes at the
    same reduced scale (short side 256), so the photo is read and decoded once for hashes and model."""
    return model_input is not None and model_input.name == "center_crop" and model_input.resize_short == SCAN_SIDE


def scan_file(path: Path, max_pixels: int, max_bytes: int, model_input: Preprocess | None = None) -> Scan:
    """Read, hash and measure one photo (and cut its model input when it shares the decode);
    raises ``DecodeError`` with a reason."""
    data = dec.read_bytes(path, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    img = dec.open_image(data, max_pixels)
    width, height = dec.upright_size(img)
    rgb = dec.decode_opened(img, min_side=SCAN_SIDE)
    pixels = dec.center_crop_resize(rgb, model_input.size, model_input.resize_short) \
        if shares_scan_decode(model_input) else None
    grey = rgb.convert("L")  # one greyscale for the hashes and the quality check
    return Scan(digest, width, height, compute_hashes(rgb, grey), quality_stats(rgb, grey), pixels,
                dec.encoding_quality(img))


def scan_one(path: Path, max_pixels: int, max_bytes: int, known_error: ScanError | None = None,
             model_input: Preprocess | None = None) -> Scan | ScanError:
    """``scan_file`` with every failure mapped to ``(code, detail)``; ``known_error`` (from ingest) wins."""
    if known_error is not None:
        return known_error
    try:
        return scan_file(path, max_pixels, max_bytes, model_input)
    except dec.DecodeError as exc:
        return exc.code, exc.detail
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one photo must not stop the night
        return "decode_failed", f"{type(exc).__name__}: {exc}"


def candidate(row: int, scan: Scan) -> Candidate:
    """What dedupe needs of a scanned photo, in one place: the runners, training and the benches must rank
    copies alike (pixels, then the encoding's fidelity: ``find_duplicates``)."""
    return Candidate(row, scan.sha256, scan.width * scan.height, scan.hashes, scan.fidelity)


def _scan_paths(paths: list[Path], max_pixels: int, max_bytes: int,
                model_input: Preprocess | None) -> list[Scan | ScanError]:
    """A worker's task: ``scan_one`` on each path."""
    return [scan_one(path, max_pixels, max_bytes, model_input=model_input) for path in paths]


_pool: ProcessPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _workers(workers: int, broken: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor:
    """The scan's worker processes, started on first use and kept for the process's later scans (a new
    set when ``workers`` changes, or in place of ``broken``, a pool that lost a worker)."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers != workers or _pool is broken:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])  # each worker a fork of a server that imported this
            else:
                context = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(workers, mp_context=context)
            _pool_workers = workers
        return _pool


def stop_workers() -> None:
    """Stop the scan's worker processes (the quick exit in ``cli.main`` skips the exit handlers that would)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None


def _one_at_a_time(paths: list[Path], max_pixels: int, max_bytes: int, model_input: Preprocess | None,
                   workers: int) -> list[Scan | ScanError]:
    """The photos of a task whose worker died, each in a task of its own: the one that kills a worker again
    is ``decode_failed``, the others are scanned as usual."""
    out: list[Scan | ScanError] = []
    for path in paths:
        pool = _workers(workers)
        try:
            out.extend(pool.submit(_scan_paths, [path], max_pixels, max_bytes, model_input).result())
        except BrokenProcessPool:
            out.append(("decode_failed", "the decoder stopped the scanning process"))
            _workers(workers, broken=pool)
    return out


def scan_records(records: list[Record], max_pixels: int, max_bytes: int, workers: int = 0,
                 quiet: bool = True, model_input: Preprocess | None = None) -> dict[int, Scan | ScanError]:
    """Scan every record on the worker processes (``_workers``); keyed by row."""
    todo = [r for r in records if r.error is None]
    out: dict[int, Scan | ScanError] = {r.row: r.error for r in records if r.error is not None}
    if not todo:
        return out
    workers = workers or cpu_count()
    # A few rows per task: a task per row costs as much as scanning a missing file (a million-row
    # manifest of them spent a seventh of its time on futures), and 8 tasks a worker still balance.
    per_task = max(1, min(32, len(todo) // (8 * workers)))
    tasks = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
    pool = _workers(workers)
    futures: list[Future] = [pool.submit(_scan_paths, [r.resolved for r in task], max_pixels, max_bytes, model_input)
                             for task in tasks]
    with tqdm(total=len(todo), desc="scan", unit="img", disable=quiet or None, leave=False) as bar:
        for task, future in zip(tasks, futures):
            try:
                results = future.result()
            except BrokenProcessPool:
                _workers(workers, broken=pool)
                results = _one_at_a_time([r.resolved for r in task], max_pixels, max_bytes, model_input, workers)
            out.update((rec.row, result) for rec, result in zip(task, results))
            bar.update(len(task))
    return out
