#!/bin/sh
# Never run: the sim pool simulates this recipe (benchmarks/bench_deploy.py).
crv-agent set url "http://$CRV_ADDRESS:8080/"
