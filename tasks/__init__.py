"""Prefect tasks (provision, certify, contextualize, verify, deprovision).

Layer rule: a task wraps a domain call from the core package or a pool; retries, backoff and
jitter come from one shared policy.
"""

from tasks import secrets as _secrets  # noqa: F401  (hands pools its Secret reader)
