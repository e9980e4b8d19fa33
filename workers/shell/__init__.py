"""The worker's shell process: Celery, PostgreSQL, Redis, and never torch (a test checks).

- `pool`: the variants it serves, job leases, cancels, the heartbeat;
- `engine_client`: starts its engine process, feeds it, restarts it when it dies;
- `media_decoding`: a job's images and audio decoded before they cross to the engine.
"""
