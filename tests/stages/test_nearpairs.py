"""Batch pair search (the Ray runner's dedupe): exact, shardable, same decisions as the local index."""

import io

import numpy as np
from PIL import Image
import pytest

from conftest import SAMPLE, clustered_candidates, product_photo
from pipeline.stages.decode import decode
from pipeline.stages.dedupe import Candidate, DedupeConfig, DedupeIndex, compute_hashes, find_duplicates, hamming
from pipeline.stages.nearpairs import BatchIndex, HashArrays, NearPairs, PairSearch, one_per_file


@pytest.mark.parametrize("blocks", [3, 4, 6, 11])
def test_pair_search_finds_exactly_the_hashes_within_the_radius(blocks):
    cands = clustered_candidates(400, seed=blocks)
    arrays = HashArrays.from_candidates(cands)
    loose = DedupeConfig(fine_threshold=256, close_fine_threshold=256, color_threshold=1000.0)  # pHash alone decides
    pairs = PairSearch(arrays, loose, blocks=blocks).search(0, len(cands))
    got = set(zip(pairs["photo"].tolist(), pairs["view"].tolist(), pairs["other"].tolist()))
    expected = set()
    for i, c in enumerate(cands):
        for view, (p, _) in enumerate(((c.hashes.phash, c.hashes.fine), *c.hashes.rotated)):
            expected |= {(i, view, j) for j, o in enumerate(cands) if j != i and hamming(p, o.hashes.phash) <= 10}
    assert got == expected
    assert all(d == hamming(([cands[i].hashes.phash] + [p for p, _ in cands[i].hashes.rotated])[v], cands[j].hashes.phash)
               for i, v, d, j in zip(pairs["photo"], pairs["view"], pairs["distance"], pairs["other"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_decisions_as_the_local_index_in_any_shards(seed):
    cands = clustered_candidates(500, seed)
    expected = find_duplicates(cands)
    assert len(expected) > 150  # exact and near duplicates, some rotated
    arrays = HashArrays.from_candidates(cands)
    search = PairSearch(arrays)
    bounds = [0, 7, 130, 131, 400, 500]  # uneven shards, as workers would get them
    parts = [search.search(a, b) for a, b in zip(bounds, bounds[1:])]
    pairs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert find_duplicates(list(reversed(cands)), index=NearPairs(arrays, pairs)) == expected


def test_same_decisions_on_real_photo_copies():
    names = ["hoodies/cl_bogo01_1", "hoodies/cl_bogo02_1", "paints/paints_01", "paints/paints_03",
             "juices/fd_juice_05", "juices/fd_juice_06", "sneakers/sneakers_01_1", "polos/cl_polo01"]
    imgs = [decode((SAMPLE / "images" / f"{n}.jpg").read_bytes()) for n in names]
    imgs.append(product_photo(seed=7))
    copies = []
    for img in imgs:
        w, h = img.size
        for variant in (img.resize((w // 2, h // 2)), img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
                        img.rotate(90, expand=True), img.transpose(Image.FLIP_LEFT_RIGHT)):
            buf = io.BytesIO()
            variant.save(buf, "JPEG", quality=70)
            copies.append(decode(buf.getvalue()))
    photos = imgs + copies
    cands = [Candidate(i, f"sha{i}", p.width * p.height, compute_hashes(p)) for i, p in enumerate(photos)]
    expected = find_duplicates(cands)
    assert len(expected) >= 3 * len(imgs)  # most copies are found...
    assert all(m.kept < len(imgs) for m in expected.values())  # ...and point at their originals
    arrays = HashArrays.from_candidates(cands)
    assert find_duplicates(cands, index=NearPairs(arrays, PairSearch(arrays).search(0, len(cands)))) == expected


def test_blocks_too_wide_for_a_bucket_table_are_refused():
    with pytest.raises(ValueError, match="32 bits wide"):
        PairSearch(HashArrays.from_candidates(clustered_candidates(10, 0)), blocks=2)
    assert PairSearch(HashArrays.from_candidates(clustered_candidates(10, 0))).blocks >= 3


def test_empty_batch():
    arrays = HashArrays.from_candidates([])
    assert find_duplicates([], index=NearPairs(arrays, PairSearch(arrays).search(0, 0))) == {}


@pytest.mark.parametrize("seed", [0, 3])
def test_the_chunked_index_decides_as_the_local_walk_across_chunks_and_nights(seed):
    """Earlier nights under negative keys, then tonight in uneven chunks: every chunk searched in bulk
    against the segments of what was kept so far gives the same matches as asking photo by photo."""
    cands = clustered_candidates(900, seed)
    history = [Candidate(-1 - c.row, c.sha256, c.area, c.hashes) for c in cands[:300]]  # earlier nights
    tonight = [Candidate(c.row - 300, c.sha256, c.area, c.hashes) for c in cands[300:]]
    walk, batch = DedupeIndex(), BatchIndex()
    for h in history:
        walk.add(h.row, h.sha256, h.hashes)
        batch.add(h.row, h.sha256, h.hashes)
    bounds = [0, 50, 51, 260, 600]
    found = 0
    for a, b in zip(bounds, bounds[1:]):
        expected = find_duplicates(tonight[a:b], index=walk)
        assert find_duplicates(tonight[a:b], index=batch) == expected
        found += sum(m.kept < 0 for m in expected.values())
    assert found > 20 and len(batch._segments) <= 3  # matches on earlier nights; segments were merged
    assert find_duplicates([], index=batch) == {}


def test_a_later_copy_of_a_file_finds_what_was_kept_between_it_and_the_first_copy():
    """A file uploaded twice whose first copy is a near duplicate (of A): between the two copies in the walk
    (same size, by row) C is kept, nearer than A. Asking photo by photo, the second copy points at C; the
    chunked search must have kept the first copy's pair with C, though C comes after it in the walk."""
    from pipeline.stages.dedupe import Hashes

    rng = np.random.default_rng(7)

    def bits(*positions):
        return sum(1 << p for p in positions)

    def photo(phash, fine):
        rotated = tuple((int.from_bytes(rng.bytes(8), "big"), int.from_bytes(rng.bytes(32), "big")) for _ in range(3))
        return Hashes(phash, fine, rotated, np.full((4, 4, 3), 0.5, np.float32))

    p0, f0 = int.from_bytes(rng.bytes(8), "big"), int.from_bytes(rng.bytes(32), "big")
    a = photo(p0, f0)
    b = photo(p0 ^ bits(*range(8)), f0 ^ bits(*range(10)))  # 8 bits from A: a near duplicate of it
    c = photo(p0 ^ bits(*range(11)), f0 ^ bits(*range(12)))  # 3 bits from B, 11 from A: kept
    chunk = [Candidate(1, "a", 300, a), Candidate(10, "b", 200, b), Candidate(20, "c", 200, c),
             Candidate(30, "b", 200, b)]
    expected = find_duplicates(chunk)
    assert expected[10].kept == 1 and 20 not in expected and expected[30].kept == 20
    assert find_duplicates(chunk, index=BatchIndex()) == expected


def test_copies_of_one_file_are_searched_once_and_decided_as_the_walk_decides():
    """A chunk of many copies of one file (a shop re-uploading one photo under every SKU) must not search
    all their pairs; each copy repeats the first one, or what the first one repeats."""
    photo = product_photo(seed=3)
    near = compute_hashes(photo.resize((photo.width // 2, photo.height // 2)))
    kept_earlier = Candidate(-1, "an earlier night's resize", 200 * 200, near)
    same_file = compute_hashes(photo)
    chunk = [Candidate(row, "one file", 400 * 400, same_file) for row in range(300)]
    chunk += [Candidate(300 + row, "another file", 400 * 400, compute_hashes(product_photo((30, 160, 60), shape="bag", seed=4))) for row in range(3)]
    walk, batch = DedupeIndex(), BatchIndex()
    for index in (walk, batch):
        index.add(kept_earlier.row, kept_earlier.sha256, kept_earlier.hashes)
    expected = find_duplicates(chunk, index=walk)
    assert find_duplicates(chunk, index=batch) == expected
    assert {m.kept for r, m in expected.items() if r < 300} == {-1}  # every copy repeats the earlier night's photo
    assert 300 not in expected and {(m.kept, m.kind) for r, m in expected.items() if r > 300} == {(300, "exact")}
    assert len(batch._other_row) < 10  # the first copy's pairs, not 300 * 299 / 2
    # A whole-input pair index (`NearPairs` over one `PairSearch`) searches one photo per file the same way.
    everything = [kept_earlier, *chunk]
    searched, borrowing = one_per_file(everything, {})
    assert len(searched) == 3 and len(borrowing) == 299 + 2
    arrays = HashArrays.from_candidates(searched)
    pairs = NearPairs(arrays, PairSearch(arrays).search(0, len(searched)))
    pairs.borrow(borrowing)
    assert find_duplicates(everything, index=pairs) == find_duplicates(everything)


@pytest.mark.parametrize("photo", ["juices/fd_juice_05", "wine/wine-red", "hoodies/cl_bogo04_2", "paints/paints_04"])
def test_a_mirrored_copy_whose_trimmed_box_moved_is_found_by_the_whole_photos_mirror_view(photo, monkeypatch):
    """A copy mirrored and brightened 15%, against a re-encoded copy of the same photo: brightening moves the
    trimmed box, so the trimmed pHashes are 14-28 bits apart in the mirror view, while the whole photos' are
    2-4 apart. The whole photo's pHash is searched mirrored too (by both indexes, the same decision);
    searched upright only, as before, the copy was missed."""
    import pipeline.stages.dedupe as dedupe
    import pipeline.stages.nearpairs as nearpairs
    from PIL import ImageEnhance

    img = decode((SAMPLE / "images" / f"{photo}.jpg").read_bytes())
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=35)
    turned = ImageEnhance.Brightness(img).enhance(1.15).transpose(Image.FLIP_LEFT_RIGHT)
    cands = [Candidate(row, f"sha{row}", img.width * img.height, compute_hashes(p))
             for row, p in enumerate((decode(buf.getvalue()), turned))]
    assert hamming(cands[1].hashes.view(4).phash, cands[0].hashes.phash) > 10  # past the radius, trimmed
    for index in (DedupeIndex, BatchIndex):
        found = find_duplicates(cands, index=index())
        assert found[1].kept == 0 and found[1].kind == "near", index
    for module in (dedupe, nearpairs):
        monkeypatch.setattr(module, "WHOLE_VIEWS", (0,))
    assert find_duplicates(cands) == {} and find_duplicates(cands, index=BatchIndex()) == {}
