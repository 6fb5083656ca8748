"""Data: sources (folder, zip, csv, synthetic), ingest, index, arrays, preprocessing."""
