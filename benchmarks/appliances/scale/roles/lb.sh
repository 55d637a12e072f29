#!/bin/sh
# Never run: the sim pool simulates this recipe (benchmarks/bench_deploy.py).
crv-agent list web url >/dev/null
crv-agent set url "http://$CRV_ADDRESS:80/"
