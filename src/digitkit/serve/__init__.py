"""Serving: the REST API and drawing page (app.py), their schemas, the audit log, metrics and drift monitoring."""
