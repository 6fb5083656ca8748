"""Video: `ferflow watch` (every face in every frame, tracked and smoothed), per-video summary."""
