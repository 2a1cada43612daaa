"""The chart against a real kube-apiserver (etcd and the API server on
loopback, RBAC on, no nodes). Run under the throwaway server:

    target/debug/infra kube-api -- .venv-tools/bin/python tests/deploy/test_apiserver.py

- every manifest of the chart, with the default and the production values,
  passes `kubectl apply --server-side --dry-run=server` (admission, defaulting
  and validation by the real server); kinds whose CRDs belong to other
  projects (ServiceMonitor, PrometheusRule) stay under test_deploy.py;
- the relay's ServiceAccount, bound by the chart's Role, may do exactly what
  the relay's code calls (its Lease; the OutboxRelay resources, their
  status and Events) and nothing more;
- the OutboxRelay CRD from crds/ installs, and the server refuses a
  negative rate limit.

The relays themselves against this server, steered and reported through
the resources, are tested by crates/relay-resource (tests/it/apiserver.rs).
"""

import os
import subprocess

import yaml

from test_deploy import CRD, NAMESPACE, PRODUCTION, one, relay_calls, render, run_checks

KUBECTL = os.environ["KUBECTL"]


def kubectl(*args, stdin=None, check=True, user=None):
    command = [KUBECTL, *args] + ([f"--as={user}"] if user else [])
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result


# Kinds whose CRDs belong to other projects.
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def manifests(docs):
    return yaml.safe_dump_all([d for d in docs if d["kind"] not in MONITORING_KINDS])


def install_crd():
    kubectl("apply", "--server-side", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/outboxrelays.orders-center.io", "--timeout=30s")


def test_crd_refuses_a_negative_rate_limit():
    install_crd()
    kubectl("create", "namespace", "crd-check")
    bad = yaml.safe_dump({"apiVersion": "orders-center.io/v1alpha1", "kind": "OutboxRelay",
                          "metadata": {"name": "onec", "namespace": "crd-check"},
                          "spec": {"destination": "onec", "rateLimit": -1}})
    refused = kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert refused.returncode != 0 and "spec.rateLimit" in refused.stderr, refused.stderr
    good = bad.replace("rateLimit: -1", "rateLimit: 0")
    kubectl("apply", "-f", "-", stdin=good)
    columns = kubectl("get", "obr", "-n", "crd-check").stdout.split("\n")[0].split()
    assert columns == ["NAME", "DESTINATION", "PAUSED", "BACKLOG", "OLDEST", "DEAD", "LEADER", "BREAKER", "AGE"], columns


def test_server_side_dry_run(docs, namespace):
    install_crd()
    kubectl("create", "namespace", namespace)
    result = kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-", stdin=manifests(docs))
    applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
    expected = [d for d in docs if d["kind"] not in MONITORING_KINDS]
    assert len(applied) == len(expected), f"{len(applied)} of {len(expected)} applied:\n{result.stdout}"
    # Nothing was written: a dry run leaves the namespace empty.
    left = kubectl("get", "deployments,services,configmaps,roles", "-n", namespace, "-o", "name").stdout.split()
    assert not [n for n in left if "orders-center" in n], left


def test_relay_rbac(docs):
    role = one(docs, "Role", "relay")
    binding = one(docs, "RoleBinding", "relay")
    account = one(docs, "ServiceAccount", "relay")["metadata"]["name"]
    lease = role["rules"][1]["resourceNames"][0]
    install_crd()
    kubectl("create", "namespace", NAMESPACE)
    objects = [one(docs, "ServiceAccount", "relay"), role, binding]
    kubectl("apply", "--server-side", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(objects))
    relay = f"system:serviceaccount:{NAMESPACE}:{account}"

    def resource(group, plural, names):
        kind = plural if group == "" else f"{plural.split('/')[0]}.{group}"
        if "/" in plural:
            return f"{kind}/{names[0] if names else 'any'}", ["--subresource", plural.split("/")[1]]
        return f"{kind}/{names[0]}" if names else kind, []

    def can_call(verb, group, plural, names):
        target, extra = resource(group, plural, names)
        answer = kubectl("auth", "can-i", verb, target, *extra, "-n", NAMESPACE, check=False, user=relay).stdout.strip()
        return answer == "yes"

    # What the relay's code calls (test_deploy.relay_calls), and neighbours it does not.
    allowed = relay_calls(lease)
    refused = {("patch", "coordination.k8s.io", "leases", (lease,)), ("delete", "coordination.k8s.io", "leases", (lease,)),
               ("list", "coordination.k8s.io", "leases", ()), ("watch", "coordination.k8s.io", "leases", ()),
               ("get", "coordination.k8s.io", "leases", ("another-lease",)),
               ("update", "coordination.k8s.io", "leases", ("another-lease",)),
               ("get", "orders-center.io", "outboxrelays", ("orders-center-onec",)),
               ("create", "orders-center.io", "outboxrelays", ()), ("update", "orders-center.io", "outboxrelays", ("x",)),
               ("patch", "orders-center.io", "outboxrelays", ("x",)), ("delete", "orders-center.io", "outboxrelays", ("x",)),
               ("update", "orders-center.io", "outboxrelays/status", ()),
               ("list", "events.k8s.io", "events", ()), ("delete", "events.k8s.io", "events", ()),
               ("get", "", "secrets", ()), ("list", "", "secrets", ()), ("get", "", "configmaps", ()),
               ("create", "", "pods", ()), ("list", "", "pods", ())}
    wrong = [f"{v} {g}/{r} {n} should be allowed" for g, r, v, n in allowed if not can_call(v, g, r, n)]
    wrong += [f"{v} {g}/{r} {n} should be refused" for v, g, r, n in refused if can_call(v, g, r, n)]
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
        ("relay RBAC: exactly what the relay calls", lambda: test_relay_rbac(render(defaults))),
        ("OutboxRelay CRD: installs, columns, a negative rate limit refused", test_crd_refuses_a_negative_rate_limit),
    ]
    run_checks(checks)


if __name__ == "__main__":
    import helm_python as helm

    helm.disable_logging()
    main()
