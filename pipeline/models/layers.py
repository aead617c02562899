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
