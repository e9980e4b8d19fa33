"""Celery workers. A worker is two processes, and the folders say which runs a file:

- the shell (Celery, PostgreSQL, Redis; never torch): this folder's modules (`app`, `tasks`,
  `reconciler`, `webhooks`, `grouped`) and `workers.shell` (its variant pool, leases and cancels,
  media decoding, the handle on its engine process);
- the engine (the device and the models; torch): `workers.engine` (`python -m workers.engine`);
- `workers.shared`: what both import — the request and result types, the channel's messages.
"""
