"""The HTTP API. Never imports workers/ or torch: it names tasks by string."""
