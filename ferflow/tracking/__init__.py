"""Tracking: the MLflow store, training runs, interrupt handling, the leaderboard."""
