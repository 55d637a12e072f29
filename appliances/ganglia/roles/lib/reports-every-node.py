"""gmetad's verify (ganglia/gmetad, `on_node`): every compute node's gmond reports in gmetad's
XML (port 8651, local clients only), with a report younger than 2 minutes. The hosts to expect
are in ./gmond-hosts, which the gmetad recipe writes from the blackboard. Waits up to 50 s:
gmetad polls its collector every 15 s."""

import socket
import sys
import time
import xml.etree.ElementTree as ET

with open("gmond-hosts") as listed:
    want = {line.strip() for line in listed if line.strip()}
deadline = time.monotonic() + 50
while True:
    with socket.create_connection(("127.0.0.1", 8651), timeout=10) as s:
        data = b"".join(iter(lambda: s.recv(65536), b""))
    hosts = {h.get("IP"): int(h.get("TN", "999")) for h in ET.fromstring(data).iter("HOST")}
    missing = sorted(ip for ip in want if hosts.get(ip, 999) > 120)
    if not missing:
        print(f"gmetad reports {len(want)} compute nodes: {' '.join(sorted(want))}")
        sys.exit(0)
    if time.monotonic() > deadline:
        sys.exit(f"gmetad does not report {' '.join(missing)} (it has {' '.join(sorted(hosts))})")
    time.sleep(5)
