"""Layers labelcat's saved models use beyond Keras' built-in ones, registered for ``safe_mode`` loading.

Why registered classes and not ``Lambda`` layers: a model card is loaded with
``safe_mode=True`` and Lambda layers (arbitrary code) are refused; a
registered layer is plain configuration (its class ships with labelcat).
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="labelcat")
class PowerTransform(keras.layers.Layer):
    """``max(x, 0) ** power``, element-wise: the few-shot head's power transform of the pooled features.

    Why: the backbone's pooled features are non-negative and skewed (a few
    channels fire strongly, most weakly); the square root evens them before
    centring and unit length, so class means and distances lean less on a
    few channels (the transform of Hu et al., "Leveraging the feature
    distribution in transfer-based few-shot learning", 2021, at its usual
    power 0.5; measured in the README's few-shot table).
    """

    def __init__(self, power: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.power = float(power)

    def call(self, x):
        return ops.power(ops.maximum(x, 0.0) + 1e-12, self.power)

    def get_config(self) -> dict:
        return {**super().get_config(), "power": self.power}


#: Added to a category's share before its logarithm: a share ImageNet leaves at zero costs a class
#: log(1e-4) ≈ -9.2 times the weight, a strong vote against it but not an infinite one.
PRIOR_EPS = 1e-4


@keras.saving.register_keras_serializable(package="labelcat")
class CategoryPrior(keras.layers.Layer):
    """``weight · log P(class's category | ImageNet, the photo shows one of the classes' categories)``.

    A shop model's classes are often categories the packaged taxonomy knows (a
    "photo gear" folder is ``cameras``, "plants" ``garden_plants``), and the
    frozen backbone's ImageNet head already says how much of a photo is each
    of them: the default model's zero-shot answer among the shop's categories
    (``stages.junk.sold_posterior``). That is evidence the few photos a class
    cannot give, so it is added to the few-shot logits with a weight that
    cross-validation on the training photos picks (``fewshot.fit``; 0 turns
    it off, and the model is then built without this layer). Input: the
    ImageNet logits; ``membership`` (ImageNet class x category, 0/1, a
    non-trainable weight saved with the model) folds them into the classes'
    categories, ``classes[c]`` is class c's category among them.
    """

    def __init__(self, categories: int, classes: list[int], weight: float, imagenet: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = int(categories)
        self.classes = [int(c) for c in classes]
        self.weight = float(weight)
        self.imagenet = int(imagenet)

    def build(self, input_shape) -> None:
        self.membership = self.add_weight(name="membership", shape=(self.imagenet, self.categories),
                                          initializer="zeros", trainable=False)

    def call(self, imagenet_logits):
        mass = ops.matmul(ops.softmax(ops.cast(imagenet_logits, "float32"), axis=-1), self.membership)
        share = mass / ops.maximum(ops.sum(mass, axis=-1, keepdims=True), 1e-12)
        return self.weight * ops.log(ops.take(share, self.classes, axis=1) + PRIOR_EPS)

    def get_config(self) -> dict:
        return {**super().get_config(), "categories": self.categories, "classes": self.classes,
                "weight": self.weight, "imagenet": self.imagenet}
