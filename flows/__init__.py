"""Prefect flows (deploy_appliance, scale_role, autoscale, destroy_cluster).

Layer rule: flows orchestrate tasks along the plan's DAG; they hold no pool or domain logic.
"""
