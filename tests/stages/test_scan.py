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
