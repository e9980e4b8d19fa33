"""A worker is two processes: a shell (Celery, PostgreSQL, Redis) and its engine (the models).

- `server`: the engine process — the device, the warm variant cache, the batchers.
- `client`: the shell's handle on it — starts it, feeds it, restarts it when it dies.
- `messages`: what crosses the socket pair between the two.
"""
