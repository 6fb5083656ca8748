"""`ferflow demo`: a local web page for photos, the webcam and short videos (see docs/serving.md)."""
