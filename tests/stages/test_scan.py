"""One read and one decode per photo: the scan's decode also gives the model its input."""

import numpy as np
from PIL import Image

from conftest import SAMPLE, product_photo
from pipeline.models.preprocess import FASHION_MNIST_28, IMAGENET_224
from pipeline.stages.decode import load_pixels
from pipeline.stages.scan import scan_file, shares_scan_decode


def test_the_scan_cuts_exactly_the_pixels_the_model_would_decode(tmp_path):
    photo = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees
    product_photo(size=(1200, 900), seed=3).save(photo, quality=90, exif=exif)
    paths = [photo, SAMPLE / "images" / "juices" / "fd_juice_01.jpg", SAMPLE / "images" / "hoodies" / "cl_bogo01_1.jpg"]
    for path in paths:
        scan = scan_file(path, 64_000_000, 100 * 1024 * 1024, model_input=IMAGENET_224)
        assert scan.pixels is not None and scan.pixels.shape == (224, 224, 3)
        np.testing.assert_array_equal(scan.pixels, load_pixels(IMAGENET_224, path))


def test_other_model_inputs_are_decoded_by_the_classifier():
    assert shares_scan_decode(IMAGENET_224) and not shares_scan_decode(FASHION_MNIST_28)
    scan = scan_file(SAMPLE / "images" / "polos" / "cl_polo01.jpg", 64_000_000, 1 << 27, model_input=FASHION_MNIST_28)
    assert scan.pixels is None


def dies_on_poison(paths, *args):
    """A worker's task that kills its worker process when it meets a file named poison (as a decoder crash
    would), else the real one; module-level, so the worker processes import it by name."""
    import os

    from pipeline.stages import scan

    if any(p.name.startswith("poison") for p in paths):
        os._exit(1)
    return scan._scan_paths(paths, *args)


def test_a_worker_that_dies_on_a_photo_costs_only_that_photo(tmp_path, monkeypatch):
    """The scan runs on worker processes (a photo's many small hashing steps hold the GIL, so threads barely
    scaled). A photo that kills its worker must not stop the night: the photos of its task are scanned
    again one at a time, the killer comes out ``decode_failed``, every other photo is scanned, and the
    next scan has live workers again."""
    from pipeline.stages import scan
    from pipeline.stages.ingest import Record

    names = [f"p{i}.jpg" for i in range(6)] + ["poison.jpg"] + [f"q{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        product_photo(((i * 40) % 255, 90, 60), seed=i).save(tmp_path / name)
    records = [Record(row, name, tmp_path / name) for row, name in enumerate(names)]
    monkeypatch.setattr(scan, "_scan_paths", dies_on_poison)
    out = scan.scan_records(records, 64_000_000, 1 << 27, workers=2)
    assert out[6] == ("decode_failed", "the decoder stopped the scanning process")
    assert all(isinstance(out[row], scan.Scan) for row in range(len(names)) if row != 6)
    monkeypatch.undo()
    again = scan.scan_records(records[:3], 64_000_000, 1 << 27, workers=2)
    assert all(isinstance(s, scan.Scan) for s in again.values())
