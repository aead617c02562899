"""The local runner's chunk loop: the next chunk is scanned while this one is classified, and that changes no row."""

import threading
from dataclasses import replace

import pyarrow.parquet as pq

from conftest import product_photo
from pipeline.runners.local import RunConfig, local_engine, run, scanned_ahead

VOLATILE = {"processed_at", "run_id"}


def _photos(folder, n=6):
    folder.mkdir()
    for i in range(n):
        product_photo(((i * 40) % 255, 90, 160), seed=i, shape="shirt" if i % 2 else "bag").save(folder / f"p{i}.jpg")


def _rows(path):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in pq.read_table(path).to_pylist()]


def test_the_next_chunk_is_scanned_while_this_one_is_classified(tmp_path, tiny_classifier):
    _photos(tmp_path / "in")
    engine = local_engine()
    scan, classify = engine.scan, engine.classify
    second_scan_started = threading.Event()
    seen_during_first_classify: list[bool] = []

    def watched_scan(records, cfg, preprocess):
        if records[0].row == 2:  # chunk 1 of chunks of two
            second_scan_started.set()
        return scan(records, cfg, preprocess)

    def watched_classify(paths, ready, clf, cfg, progress):
        if not seen_during_first_classify:  # chunk 0: chunk 1's scan must start before this one is done
            seen_during_first_classify.append(second_scan_started.wait(timeout=30))
        return classify(paths, ready, clf, cfg, progress)

    cfg = RunConfig(chunk_size=2, quiet=True)
    run(tmp_path / "in", tmp_path / "ahead.parquet", tiny_classifier, cfg,
        engine=replace(engine, scan=watched_scan, classify=watched_classify))
    assert seen_during_first_classify == [True]

    run(tmp_path / "in", tmp_path / "in_turn.parquet", tiny_classifier, cfg, engine=replace(engine, scan_ahead=False))
    ahead, in_turn = _rows(tmp_path / "ahead.parquet"), _rows(tmp_path / "in_turn.parquet")
    assert len(ahead) == 6 and ahead == in_turn


def test_scanned_ahead_skips_committed_chunks_and_uses_a_scan_taken_already():
    scanned: list[int] = []

    def scan(records):
        scanned.append(records[0])
        return {"scan of": records[0]}

    chunks = [[0, 1], [2, 3], [4, 5], [6]]
    out = list(scanned_ahead(chunks, scan, wanted=lambda n: n != 2, first={"early": True}))
    assert [(n, recs) for n, recs, _ in out] == list(enumerate(chunks))
    assert [s for _, _, s in out] == [{"early": True}, {"scan of": 2}, None, {"scan of": 6}]
    assert scanned == [2, 6]  # chunk 0 was scanned while the model loaded, chunk 2 was committed before a kill


def test_a_kept_record_meets_later_copies_under_its_top_two_labels(tiny_classifier):
    """An earlier night's kept photo is listed for the copy check under the first two labels of its row's
    top-k (``Context.keep_for_copies``), as tonight's photos are (``copies.categories_of``): a badge copy
    whose top label is the original's second still meets it. Another model's record is never listed."""
    import numpy as np

    from pipeline.ops.store import History
    from pipeline.runners.local import Context
    from pipeline.stages.dedupe import DedupeIndex

    ctx = Context(tiny_classifier, RunConfig(), "r1", DedupeIndex(), History(), {})
    thumb = np.zeros((32, 32, 3), np.uint8).tobytes()
    rec = {"in_dedupe": True, "embedding_q8": np.ones(8, np.int8), "thumb": thumb,
           "model_version": tiny_classifier.version, "topk_labels": ["tops", "dresses", "shoes"], "label": "tops"}
    ctx.keep_for_copies(-1, rec)
    ctx.keep_for_copies(-2, {**rec, "model_version": "another"})
    assert len(ctx.copies) == 1
    assert [len(ctx.copies.segments(c)) for c in ("tops", "dresses", "shoes")] == [1, 1, 0]
    assert ctx.copies.segments("dresses")[0].keys.tolist() == [-1]
