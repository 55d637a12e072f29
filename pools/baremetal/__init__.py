"""The bare-metal pool: machines powered through their BMCs (IPMI 2.0) and network-booted
(PXE, iPXE) into an OS that runs crv-agent.

- `inventory`: the machines file and the lease ledger (who has which machine, which failed);
- `ipmi`: power and boot device through python-ipmi's native RMCP+ interface;
- `boot`: iPXE scripts and the boot service (TFTP + HTTP) that `crv up` runs per pool;
- `pool`: the pool contract on top of those (`driver: baremetal` in pools.yaml);
- `simbmc`, `simmachine`, `simrack`: a simulated rack (ipmi_sim BMCs, machines that follow
  the real boot chain) for tests and demos.
"""
