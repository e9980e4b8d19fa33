"""Reference implementations the overhead bench measures gemmaq against (never imported by gemmaq)."""
