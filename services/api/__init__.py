"""The HTTP API (FastAPI): routers per resource, dependencies, schemas."""
