"""Prints the relay's objects of the chart (default values, release
orders-center in namespace orders) whose kinds are given, as YAML: what the
relays' end-to-end test applies to a real API server.

    .venv-tools/bin/python tests/deploy/render.py ServiceAccount Role RoleBinding OutboxRelay
"""

import sys

import helm_python as helm
import yaml

from test_deploy import render

if __name__ == "__main__":
    helm.disable_logging()
    kinds = set(sys.argv[1:])
    docs = [d for d in render({}) if d["kind"] in kinds
            and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "relay"]
    assert {d["kind"] for d in docs} == kinds, f"the chart renders {[d['kind'] for d in docs]}"
    print(yaml.safe_dump_all(docs))
