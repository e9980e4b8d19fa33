"""SQLAlchemy 2.0 models, engines and repositories shared by the API and the workers."""
