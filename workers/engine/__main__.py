"""`python -m workers.engine`: the engine process a worker's shell starts (workers.engine.server)."""

from workers.engine.server import main

main()
