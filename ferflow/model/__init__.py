"""Model: architectures, augmentation layers, training, evaluation (TTA)."""
