"""The operator API: REST (FastAPI), API keys and roles, audit log, metrics, job worker."""
