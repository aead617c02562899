"""Models: the classifier registry, ImageNet backbones and their weight readers, the taxonomy, model cards."""
