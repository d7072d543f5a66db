"""Evaluation: metric functions (pure) and the runner that edits and measures."""
