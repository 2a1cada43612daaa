"""The chart against a real kube-apiserver (etcd and the API server on
loopback, RBAC on, no nodes). Run under the throwaway server:

    target/debug/infra kube-api -- .venv-tools/bin/python tests/deploy/test_apiserver.py

- every manifest of the chart, with the default and the production values,
  passes `kubectl apply --server-side --dry-run=server` (admission, defaulting
  and validation by the real server); kinds whose CRDs belong to other
  projects (ServiceMonitor, PrometheusRule) stay under test_deploy.py;
- the relay's ServiceAccount, bound by the chart's Role, may do exactly what
  the relay's code calls on its Lease (get, create, update) and nothing more.
"""

import os
import subprocess

import yaml

from test_deploy import CUSTOM_KINDS, NAMESPACE, PRODUCTION, one, render, run_checks

KUBECTL = os.environ["KUBECTL"]


def kubectl(*args, stdin=None, check=True, user=None):
    command = [KUBECTL, *args] + ([f"--as={user}"] if user else [])
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result


def manifests(docs):
    return yaml.safe_dump_all([d for d in docs if d["kind"] not in CUSTOM_KINDS])


def test_server_side_dry_run(docs, namespace):
    kubectl("create", "namespace", namespace)
    result = kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-", stdin=manifests(docs))
    applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
    expected = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert len(applied) == len(expected), f"{len(applied)} of {len(expected)} applied:\n{result.stdout}"
    # Nothing was written: a dry run leaves the namespace empty.
    left = kubectl("get", "deployments,services,configmaps,roles", "-n", namespace, "-o", "name").stdout.split()
    assert not [n for n in left if "orders-center" in n], left


def test_relay_rbac(docs):
    role = one(docs, "Role", "relay")
    binding = one(docs, "RoleBinding", "relay")
    account = one(docs, "ServiceAccount", "relay")["metadata"]["name"]
    lease = role["rules"][1]["resourceNames"][0]
    kubectl("create", "namespace", NAMESPACE)
    objects = [one(docs, "ServiceAccount", "relay"), role, binding]
    kubectl("apply", "--server-side", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(objects))
    relay = f"system:serviceaccount:{NAMESPACE}:{account}"

    def can(verb, resource):
        answer = kubectl("auth", "can-i", verb, resource, "-n", NAMESPACE, check=False, user=relay).stdout.strip()
        return answer == "yes"

    # What crates/relay/src/leader/kube.rs calls: GET, POST, PUT on its Lease.
    allowed = [("get", f"leases.coordination.k8s.io/{lease}"), ("create", "leases.coordination.k8s.io"),
               ("update", f"leases.coordination.k8s.io/{lease}")]
    refused = [("patch", f"leases.coordination.k8s.io/{lease}"), ("delete", f"leases.coordination.k8s.io/{lease}"),
               ("list", "leases.coordination.k8s.io"), ("watch", "leases.coordination.k8s.io"),
               ("get", "leases.coordination.k8s.io/another-lease"), ("update", "leases.coordination.k8s.io/another-lease"),
               ("get", "secrets"), ("list", "secrets"), ("get", "configmaps"), ("create", "pods"), ("list", "pods")]
    wrong = [f"{v} {r} should be allowed" for v, r in allowed if not can(v, r)]
    wrong += [f"{v} {r} should be refused" for v, r in refused if can(v, r)]
    assert not wrong, wrong
    # And for real, as the relay: create, read and replace the Lease; not delete it.
    body = yaml.safe_dump({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                           "metadata": {"name": lease, "namespace": NAMESPACE},
                           "spec": {"holderIdentity": "relay-0", "leaseDurationSeconds": 15}})
    kubectl("create", "-f", "-", stdin=body, user=relay)
    current = yaml.safe_load(kubectl("get", "lease", lease, "-n", NAMESPACE, "-o", "yaml", user=relay).stdout)
    current["spec"]["holderIdentity"] = "relay-1"
    kubectl("replace", "-f", "-", stdin=yaml.safe_dump(current), user=relay)
    denied = kubectl("delete", "lease", lease, "-n", NAMESPACE, check=False, user=relay)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    denied = kubectl("get", "secrets", "-n", NAMESPACE, check=False, user=relay)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr


def main():
    defaults = {}
    checks = [
        ("server-side dry run: default values", lambda: test_server_side_dry_run(render(defaults), "dry-run-defaults")),
        ("server-side dry run: production values", lambda: test_server_side_dry_run(render(PRODUCTION), "dry-run-production")),
        ("relay RBAC: exactly get, create and update on its Lease", lambda: test_relay_rbac(render(defaults))),
    ]
    run_checks(checks)


if __name__ == "__main__":
    import helm_python as helm

    helm.disable_logging()
    main()
