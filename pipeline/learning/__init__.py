"""Learning: architectures, recipes, training, calibration, evaluation (Fashion-MNIST and shop models)."""
