"""Capture sources: how the changes of the source tables reach the queue."""
