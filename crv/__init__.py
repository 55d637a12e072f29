"""crv: deploys virtual cluster appliances onto resource pools.

The core, bottom to top: `base` (errors, CRV_HOME, locks), `appliance` (the format and the plan),
`service` (the HTTPS service, its store and CA, and its client) and `engine` (stages, executor,
placement). The CLI (`crv_cli`), the Prefect deployments, flows and tasks sit above; `pools`
sits between the appliance format and the service. See docs/architecture.md."""

__version__ = "0.1.0"
