"""Prefect deployments: schedules, typed run forms and entry points for the flows; no logic."""
