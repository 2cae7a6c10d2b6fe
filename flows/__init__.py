"""Prefect flows and tasks around the `ucad` library; deployments are in prefect.yaml."""
