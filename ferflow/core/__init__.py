"""Small core: params, files, class names, presets, stage plumbing."""
