"""Celery workers: the app, the task, and the model runtime (engines, batcher)."""
