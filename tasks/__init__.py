"""Prefect tasks (provision, certify, contextualize, verify, deprovision).

Layer rule: a task wraps a domain call from the core package or a pool; retries, backoff and
jitter come from one shared policy.
"""
