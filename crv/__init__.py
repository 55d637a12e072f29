"""crv: deploys virtual cluster appliances onto resource pools, as Prefect flows."""

__version__ = "0.1.0"
