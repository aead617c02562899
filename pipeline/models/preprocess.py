"""How a model wants its pixels: a small spec named in model cards, so ``run`` can rebuild the input.

Why a spec and not a function: a card is JSON, and the same spec drives the
classify stage's decode (``pipeline.stages.decode.load_pixels``) and training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels; named in model cards so ``run`` can rebuild it.

    ``center_crop``: RGB, short side to ``resize_short``, central ``size`` square
    (ImageNet convention). ``fashion_mnist``: the product trimmed, squared,
    greyed and inverted at ``size`` px, one channel (the dataset's convention).
    """

    name: str
    size: int
    resize_short: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 1 if self.name == "fashion_mnist" else 3)


    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "resize_short": self.resize_short}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        if d.get("name") not in ("center_crop", "fashion_mnist"):
            raise ValueError(f"unknown preprocessing {d.get('name')!r}")
        return cls(d["name"], int(d["size"]), int(d.get("resize_short", 0)))


IMAGENET_224 = Preprocess("center_crop", 224, 256)
FASHION_MNIST_28 = Preprocess("fashion_mnist", 28)
