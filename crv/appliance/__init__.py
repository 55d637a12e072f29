"""The appliance format: the spec, reading an appliance directory, parameters, the plan (DAG)
and the bundle of recipes the agents fetch. Knows nothing of pools, the service or Prefect."""
