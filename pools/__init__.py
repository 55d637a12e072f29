"""Resource pool drivers (local, libvirt, libcloud, baremetal).

Layer rule: pools know nothing of Prefect. A driver is the five methods of the pool contract
(validate, list_nodes, get_node, create_node, destroy_node); it translates library errors into
crv errors that say whether a retry can help.
"""
