"""Serving: the MLflow pyfunc, face detection, export/registry, `ferflow predict`."""
