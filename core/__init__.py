"""What the API and the workers both need: settings, schemas, variants, errors, logging."""

__version__ = "0.1.0"
