"""Repositories: session-taking functions that never commit; the caller owns the transaction."""
