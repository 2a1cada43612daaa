"""The chart on a real one-node cluster, as a user meets it.

Run by tests/cluster/run, which starts the node (scripts/cluster up),
imports the images, and serves PostgreSQL and RabbitMQ on this machine
(`infra host-services`, which sets PG_PORT and AMQP_PORT). Pods reach them
through selector-less Services named `postgres` and `rabbitmq`, so the
values below are the ones a user would write.

Each step prints what it measured: pods and restarts, delivery of 1,000
orders, the leader hand-over between real relay pods, a rolling upgrade
under writes, the PodDisruptionBudgets under a drain, the uninstall, and the
README's saga tour.
"""

import base64
import concurrent.futures
import json
import os
from datetime import datetime
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/orders-center"
KUBECTL = os.environ.get("KUBECTL", str(ROOT / "target/infra/kube-node-v1.33.13/kubectl"))
HELM = os.environ.get("HELM", str(ROOT / "target/infra/helm-v3.21.4/helm"))
PG_PORT = os.environ["PG_PORT"]
AMQP_PORT = os.environ["AMQP_PORT"]
TEST_IMAGE = "localhost/orders-center-test:dev"
os.environ.setdefault("KUBECONFIG", str(ROOT / "target/cluster/kubeconfig"))
NODE = "orders-center-node"
GENERAL_ID = "0190a6f6-2a9b-7c1e-9f6a-3c1f2d4e5b6a"
# The chart's defaults: leaseDuration 15s + renewDeadline 10s.
HANDOVER_BOUND = 25.0


def run(*args, check=True, stdin=None):
    out = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out


def kubectl(*args, check=True, stdin=None):
    return run(KUBECTL, *args, check=check, stdin=stdin).stdout


def helm(*args):
    started = time.monotonic()
    out = run(HELM, *args).stdout
    return out, time.monotonic() - started


def psql(sql, db="postgres"):
    return run("psql", "-h", "127.0.0.1", "-p", PG_PORT, "-U", "postgres", "-d", db, "-qAtc", sql).stdout.strip()


def expose(namespace):
    for name, port, target in [("postgres", 5432, PG_PORT), ("rabbitmq", 5672, AMQP_PORT)]:
        run("bash", str(ROOT / "scripts/cluster"), "expose", name, str(port), namespace, target)


def secret(namespace, name, key):
    raw = kubectl("get", "secret", name, "-n", namespace, "-o", f"jsonpath={{.data.{key}}}")
    return base64.b64decode(raw).decode()


def service_url(namespace, name):
    svc = json.loads(kubectl("get", "service", name, "-n", namespace, "-o", "json"))
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


class Client:
    """HTTP to a Service's ClusterIP from this machine (kube-proxy's rules)."""

    def __init__(self, base, headers):
        self.base, self.headers = base, headers

    def call(self, method, path, body=None, retry_for=60.0):
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + retry_for
        while True:
            request = urllib.request.Request(self.base + path, data=data, method=method, headers=dict(self.headers))
            if data is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    text = response.read()
                    return response.status, json.loads(text) if text else None
            except urllib.error.HTTPError as e:
                if e.code < 500 or time.monotonic() > deadline:
                    return e.code, json.loads(e.read() or b"null")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                # A pod going away mid-rollout: the caller retries, as a client would.
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def wait_until(what, limit, check, every=0.5):
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit} s")
        time.sleep(every)


def pods(namespace, selector=""):
    args = ["get", "pods", "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return json.loads(kubectl(*args))["items"]


def ready(pod):
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def node_schedulable():
    node = json.loads(kubectl("get", "node", NODE, "-o", "json"))
    conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
    return conditions.get("Ready") == "True" and not node["spec"].get("taints")


def all_ready(namespace):
    """Every pod Ready and none restarted (a crash loop shows as restarts)."""
    items = [p for p in pods(namespace) if p["status"].get("phase") != "Succeeded"]
    restarts = {
        p["metadata"]["name"]: c["restartCount"]
        for p in items
        for c in p["status"].get("containerStatuses", [])
        if c["restartCount"]
    }
    assert not restarts, f"containers restarted: {restarts}"
    return items and all(ready(p) for p in items) and items


class Release:
    def __init__(self, name, namespace, values):
        self.name, self.namespace, self.values = name, namespace, values
        self.fullname = name if name.startswith("orders-center") else f"{name}-orders-center"

    def set_args(self, extra=()):
        args = []
        for key, value in list(self.values.items()) + list(extra):
            args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={value}"]
        return args

    def install(self):
        # A node that cannot take pods fails here with its reason, not after helm's 5 minutes.
        wait_until("the node Ready and untainted", 60, node_schedulable)
        kubectl("create", "namespace", self.namespace)
        expose(self.namespace)
        _, took = helm("install", self.name, str(CHART), "-n", self.namespace, "--wait", "--timeout", "5m",
                       *self.set_args())
        return took

    def api(self):
        return self.service("api")

    def service(self, component):
        token = secret(self.namespace, f"{self.fullname}-api", "tokens").split(",")[0]
        return Client(service_url(self.namespace, f"{self.fullname}-{component}"), {"Authorization": f"Bearer {token}"})

    def mock(self):
        user = secret(self.namespace, f"{self.fullname}-onec", "username")
        password = secret(self.namespace, f"{self.fullname}-onec", "password")
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        return Client(service_url(self.namespace, f"{self.fullname}-onec-mock"), {"Authorization": f"Basic {auth}"})

    def lease(self):
        return json.loads(kubectl("get", "lease", f"{self.fullname}-relay", "-n", self.namespace, "-o", "json",
                                  check=False) or "{}").get("spec", {})

    def leader(self):
        return self.lease().get("holderIdentity")

    def renewed_after(self, wall):
        """The holder, once the Lease is renewed after `wall` (a Unix time)."""
        spec = self.lease()
        renewed = spec.get("renewTime")
        return renewed and datetime.fromisoformat(renewed).timestamp() > wall and spec.get("holderIdentity")


def order(price=1):
    return {"order": {"status": "new", "price": price, "general_id": GENERAL_ID}}


class Writer(threading.Thread):
    """Saves orders through the API Service until stopped, and remembers
    the latest version acknowledged for each: what 1C must end up holding."""

    def __init__(self, api, prefix, update_every=0):
        super().__init__(daemon=True)
        self.api, self.prefix, self.update_every = api, prefix, update_every
        self.stop = threading.Event()
        self.acked = {}
        self.refused = 0

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            # Every update_every-th write changes an order saved before: a new version of it.
            if self.update_every and n % self.update_every == 0 and self.acked:
                oid = random.choice(sorted(self.acked))
            else:
                oid = f"{self.prefix}-{n}"
            status, body = self.api.call("PUT", f"/api/v1/orders/{oid}", order(price=n))
            if status in (200, 201):
                self.acked[oid] = body["version"]
            else:
                self.refused += 1
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.join()
        return self.acked


def held_by_1c(release):
    status, held = release.mock().call("GET", "/admin/orders")
    assert status == 200, (status, held)
    return held


def wait_delivered(release, acked, limit=180):
    """Every acknowledged save reaches 1C at its latest version (via the
    order's 1C sync state, which survives a restart of the mock)."""
    api = release.api()

    def synced(oid):
        status, body = api.call("GET", f"/api/v1/orders/{oid}")
        assert status == 200, (oid, status, body)
        sync = body.get("sync") or {}
        return sync.get("state") == "done" and sync.get("version") == acked[oid]

    pending = set(acked)
    started = time.monotonic()
    while pending:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            done = {oid for oid, ok in zip(sorted(pending), pool.map(synced, sorted(pending))) if ok}
        pending -= done
        if pending and time.monotonic() - started > limit:
            raise AssertionError(f"{len(pending)} of {len(acked)} saves not in 1C after {limit} s: {sorted(pending)[:5]}")
        if pending:
            time.sleep(1)
    return time.monotonic() - started


def step(title):
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def main():
    started = time.monotonic()
    psql('CREATE ROLE "orders-center" LOGIN PASSWORD \'orders-center\'')
    for db in ["orders-center", "saga-orders", "inventory", "payments"]:
        psql(f'CREATE DATABASE "{db}" OWNER "orders-center"')

    if os.environ.get("CLUSTER_ONLY") != "saga":
        default_values()
    saga_tour()
    print(f"\ncluster end-to-end passed in {time.monotonic() - started:.0f} s")


def default_values():
    # 1. The default values, as a new user installs them (the test Pod's image
    # is the only value set: curlimages/curl cannot be pulled here).
    step("helm install with the default values")
    rel = Release("orders-center", "orders", {"tests.image": TEST_IMAGE})
    took = rel.install()
    items = wait_until("every pod Ready", 120, lambda: all_ready("orders"))
    print(f"installed in {took:.1f} s; Ready, no restarts: {sorted(p['metadata']['name'] for p in items)}")
    migrations = psql("SELECT count(*) FILTER (WHERE success) || '/' || count(*) FROM _sqlx_migrations", "orders-center")
    applied, total = migrations.split("/")
    assert int(total) > 0 and applied == total, f"migration hook: {migrations} applied"
    print(f"migration hook: {migrations} migrations applied")
    # The test Pod is deleted once it succeeds (hook-succeeded); a failed one stays, with its logs.
    started = time.monotonic()
    result = run(HELM, "test", rel.name, "-n", rel.namespace, "--timeout", "2m", check=False)
    if result.returncode != 0:
        logs = kubectl("logs", f"{rel.fullname}-test", "-n", rel.namespace, check=False)
        raise AssertionError(f"helm test failed: {result.stderr.strip()}\n{logs}")
    out, took = result.stdout, time.monotonic() - started
    assert "Phase:          Succeeded" in out, out
    print(f"helm test passed in {took:.1f} s")

    # 2. 1,000 orders through the API Service reach the 1C mock.
    t = step("1,000 orders through the API Service")
    api = rel.api()
    before = len(held_by_1c(rel))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: api.call("PUT", f"/api/v1/orders/E2E-{i}", order())[0], range(1000)))
    assert answers.count(201) == 1000, f"answers: { {s: answers.count(s) for s in set(answers)} }"
    saved = time.monotonic() - t

    def all_held():
        held = held_by_1c(rel)
        return all(held.get(f"E2E-{i}") == 1 for i in range(1000)) and held

    held = wait_until("1,000 orders in 1C", 120, all_held)
    print(f"1C held {before} orders before, {len(held)} after; saved in {saved:.1f} s, all in 1C at +{time.monotonic() - t:.1f} s")

    # The chart's OutboxRelay (its CRD from crds/), reported by the Lease's
    # holder through the relay pods' own ServiceAccount.
    step("kubectl get obr")

    def reported():
        status = json.loads(kubectl("get", "obr", f"{rel.fullname}-onec", "-n", "orders", "-o", "json")).get("status", {})
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready" and c["status"] == "True"]
        return status.get("leader") == rel.leader() and status.get("backlog") == 0 and ready and status

    wait_until("the leader's OutboxRelay status", 60, reported)
    print(kubectl("get", "obr", "-n", "orders"))

    # 3. The Lease between real relay pods: the leader force-deleted (it
    # releases the Lease on SIGTERM), then its process SIGKILLed on the node
    # (nothing releases it; the others wait for it to expire).
    step("leader hand-over between relay pods")

    def force_delete(leader):
        kubectl("delete", "pod", leader, "-n", "orders", "--grace-period=0", "--force")

    def sigkill(leader):
        pod = json.loads(kubectl("get", "pod", leader, "-n", "orders", "-o", "json"))
        container = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
        run("ctr", "--address", str(ROOT / "target/cluster/containerd/containerd.sock"), "-n", "k8s.io",
            "tasks", "kill", "-s", "SIGKILL", container)

    hand_over(rel, api, "LEADER", "force-deleted", force_delete, another=True)
    # The killed container restarts under its pod's name and may lead again,
    # but only through a renewal made after it died (the kill lands at once).
    hand_over(rel, api, "CRASH", "SIGKILLed", sigkill, another=False, dead_after=1.0)

    # 4. A rolling upgrade of every Deployment while orders are saved and updated.
    step("helm upgrade under writes")
    old = {p["metadata"]["name"] for p in pods("orders")}
    writer = Writer(api, "UPGRADE", update_every=3)
    writer.start()
    _, took = helm("upgrade", rel.name, str(CHART), "-n", rel.namespace, "--reuse-values", "--wait",
                   "--timeout", "5m", "--set", "logFormat=text")
    time.sleep(2)
    acked = writer.finish()
    items = wait_until("every pod Ready after the upgrade", 120, lambda: all_ready("orders"))
    kept = old & {p["metadata"]["name"] for p in items}
    assert not kept, f"pods not rolled: {kept}"
    for deployment in json.loads(kubectl("get", "deployments", "-n", "orders", "-o", "json"))["items"]:
        env = deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
        assert deployment["status"].get("updatedReplicas") == deployment["spec"]["replicas"], deployment["metadata"]["name"]
        assert {"name": "LOG_FORMAT", "value": "text"} in env or deployment["metadata"]["name"].endswith("onec-mock"), (
            deployment["metadata"]["name"], env)
    delivered = wait_delivered(rel, acked)
    held = held_by_1c(rel)
    stale = {oid: (held[oid], v) for oid, v in acked.items() if oid in held and held[oid] != v}
    assert not stale, f"1C holds stale versions: {stale}"
    versions = sum(acked.values())
    print(f"upgraded in {took:.1f} s, {len(old)} pods replaced; {len(acked)} orders ({versions} versions) saved, "
          f"{writer.refused} refused, none lost, none stale; all in 1C {delivered:.1f} s after")

    # 5. The PodDisruptionBudgets under a drain: one API and one relay pod stay.
    t = step("kubectl drain against the PodDisruptionBudgets")
    writer = Writer(api, "DRAIN")
    writer.start()
    out = run(KUBECTL, "drain", NODE, "--pod-selector", f"app.kubernetes.io/instance={rel.name}",
              "--delete-emptydir-data", "--timeout", "20s", check=False)
    drained = time.monotonic() - t
    assert out.returncode != 0 and "disruption budget" in out.stderr, out.stderr[-1500:]
    for component in ["api", "relay"]:
        up = [p for p in pods("orders", f"app.kubernetes.io/component={component}") if ready(p)]
        assert len(up) == 1, f"{component}: {len(up)} Ready during the drain"
    kubectl("uncordon", NODE)
    wait_until("every pod Ready after the drain", 180, lambda: all_ready_after_drain("orders"))
    acked = writer.finish()
    delivered = wait_delivered(rel, acked)
    print(f"drain refused after {drained:.1f} s with one api and one relay pod Ready; "
          f"{len(acked)} orders saved meanwhile, all in 1C {delivered:.1f} s after uncordon")

    # 6. Uninstall leaves nothing of the release but what the README says is kept.
    step("helm uninstall")
    helm("uninstall", rel.name, "-n", rel.namespace, "--wait", "--timeout", "2m")
    wait_until("the release's pods gone", 60, lambda: not pods("orders"))
    left = leftovers("orders", rel)
    assert left == [f"leases.coordination.k8s.io/{rel.fullname}-relay"], left
    print(f"uninstalled; left behind: {left} (the relays' Lease, which the README says is kept)")



def saga_tour():
    # 7. The saga with a broker: the README's tour ends completed and cancelled.
    t = step("helm install with the saga and RabbitMQ")
    saga = Release("saga", "saga", {
        "tests.image": TEST_IMAGE,
        "database.url": "postgres://orders-center:orders-center@postgres:5432/saga-orders",
        "broker.url": "amqp://guest:guest@rabbitmq:5672/%2f",
        "saga.enabled": True,
        # RabbitMQ returns an event no queue is bound for, and the relay keeps
        # one order's messages in order: without a consumer of order events,
        # each order's saga commands wait behind its undeliverable events.
        "consumers.journal.enabled": True,
        "saga.inventory.database.url": "postgres://orders-center:orders-center@postgres:5432/inventory",
        "saga.payments.database.url": "postgres://orders-center:orders-center@postgres:5432/payments",
    })
    took = saga.install()
    items = wait_until("every saga pod Ready", 180, lambda: all_ready("saga"))
    print(f"installed in {took:.1f} s; {len(items)} pods Ready, no restarts")
    api, inventory, payments = saga.api(), saga.service("saga-inventory"), saga.service("saga-payments")
    for client, method, path, body in [
        (inventory, "PUT", "/api/v1/stock/SKU-1", {"available": 10}),
        (payments, "POST", "/api/v1/accounts", {"account_id": "acc-1"}),
        (payments, "POST", "/api/v1/accounts/acc-1/top-ups", {"amount": 2000}),
        (payments, "POST", "/api/v1/accounts", {"account_id": "acc-2"}),
        (api, "PUT", "/api/v1/orders/ORD-2001", json.loads((ROOT / "examples/checkout-order.json").read_text())),
        (api, "PUT", "/api/v1/orders/ORD-2002", json.loads((ROOT / "examples/checkout-order-no-funds.json").read_text())),
    ]:
        status, answer = client.call(method, path, body)
        assert status in (200, 201), (path, status, answer)

    def outcome(oid):
        return api.call("GET", f"/api/v1/orders/{oid}")[1]["order"]["status"]

    wait_until("both sagas end", 120, lambda: outcome("ORD-2001") == "completed" and outcome("ORD-2002") == "cancelled")
    # OrderCompleted sells the stock and tells the notifier, after the saga ends.
    wait_until("the sale and both notifications", 60, lambda: (
        inventory.call("GET", "/api/v1/stock/SKU-1")[1].get("sold") == 2
        and len(saga.service("saga-notifier").call("GET", "/api/v1/notifications")[1]) == 2))
    stock = inventory.call("GET", "/api/v1/stock/SKU-1")[1]
    account = payments.call("GET", "/api/v1/accounts/acc-1")[1]
    notes = saga.service("saga-notifier").call("GET", "/api/v1/notifications")[1]
    states = [s["step"] for s in api.call("GET", "/api/v1/orders/ORD-2001/states")[1]]
    print(f"ORD-2001 completed ({' > '.join(states)}), ORD-2002 cancelled at +{time.monotonic() - t:.1f} s; "
          f"stock {stock}; acc-1 {account}; {len(notes)} notifications")
    assert stock["available"] == 8, stock
    assert float(account["balance"]) == 749.5, account
    assert len(notes) == 2, notes
    helm("uninstall", saga.name, "-n", saga.namespace, "--wait", "--timeout", "2m")


def hand_over(rel, api, prefix, how, kill, another, dead_after=0.0):
    """Kills the leading relay while orders are saved; the Lease must be
    renewed (by `another` relay, if so) within the bound, and every save
    reach 1C."""
    leader = wait_until("a relay leads", 60, rel.leader)
    relays = sorted(p["metadata"]["name"] for p in pods(rel.namespace, "app.kubernetes.io/component=relay"))
    assert leader in relays, (leader, relays)
    writer = Writer(api, prefix)
    writer.start()
    time.sleep(2)
    killed, wall = time.monotonic(), time.time()
    kill(leader)
    def renewed():
        holder = rel.renewed_after(wall + dead_after)
        return holder if holder and not (another and holder == leader) else None

    successor = wait_until(f"a leader after one was {how}", 60, renewed, every=0.1)
    handover = time.monotonic() - killed
    time.sleep(3)
    acked = writer.finish()
    print(f"leader {leader} {how}; {successor} leads after {handover:.1f} s (bound {HANDOVER_BOUND:.0f} s)")
    assert handover <= HANDOVER_BOUND, f"hand-over took {handover:.1f} s"
    took = wait_delivered(rel, acked)
    held = held_by_1c(rel)
    assert all(held.get(oid) == v for oid, v in acked.items())
    print(f"{len(acked)} orders saved around it, {writer.refused} refused; all in 1C {took:.1f} s later; "
          f"1C holds {len(held)}")


def all_ready_after_drain(namespace):
    items = [p for p in pods(namespace) if p["status"].get("phase") != "Succeeded"]
    return items and all(ready(p) for p in items)


def leftovers(namespace, release):
    """Every object in the namespace that names the release."""
    kinds = kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").split()
    found = []
    for kind in kinds:
        if kind in ("events", "events.events.k8s.io"):
            continue
        items = json.loads(kubectl("get", kind, "-n", namespace, "-o", "json", check=False) or '{"items": []}')
        for item in items.get("items", []):
            meta = item["metadata"]
            if meta["name"].startswith(release.fullname) or meta.get("labels", {}).get(
                    "app.kubernetes.io/instance") == release.name:
                found.append(f"{kind}/{meta['name']}")
    return sorted(found)


def diagnose():
    """What a failed step needs to be understood from CI's output alone: the
    pods and why any is unscheduled, the node's conditions and taints, recent
    events, the cluster's processes, the log tails of the scheduler and of
    any process that stopped, and the disk the kubelet measures."""
    def show(title, text):
        print(f"\n-- {title}\n{text.rstrip()}", file=sys.stderr)

    for namespace in ["orders", "saga"]:
        show(f"pods in {namespace}", kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False))
        for pod in json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json", check=False) or '{"items": []}')[
                "items"]:
            if pod["status"].get("phase") == "Pending":
                conditions = pod["status"].get("conditions") or "none (never seen by the scheduler)"
                show(f"{pod['metadata']['name']} is Pending; its conditions", json.dumps(conditions))
        show(f"events in {namespace}", "\n".join(
            kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).splitlines()[-25:]))
    node = json.loads(kubectl("get", "node", NODE, "-o", "json", check=False) or "{}")
    show("node conditions", "\n".join(
        f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
        for c in node.get("status", {}).get("conditions", [])))
    show("node taints", json.dumps(node.get("spec", {}).get("taints", [])))
    show("node allocatable", json.dumps(node.get("status", {}).get("allocatable", {})))
    status = run("bash", str(ROOT / "scripts/cluster"), "status", check=False)
    show("cluster processes", status.stdout.split("\nNAME")[0])
    stopped = [line.split(":")[0] for line in status.stdout.splitlines() if line.endswith(": stopped")]
    # The scheduler's log is quiet while all is well: its tail is shown either way.
    for name in dict.fromkeys(stopped + ["kube-scheduler"]):
        log = ROOT / "target/cluster/logs" / f"{name}.log"
        if log.exists():
            show(f"the last lines of {name}'s log", "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    show("disk", run("df", "-h", str(ROOT / "target"), check=False).stdout)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        diagnose()
        sys.exit(1)
