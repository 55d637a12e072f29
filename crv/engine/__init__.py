"""The engine: the stages a node goes through, the executor that runs them along the DAG,
placement on pools, verify checks and teardown. Decisions without Prefect."""
