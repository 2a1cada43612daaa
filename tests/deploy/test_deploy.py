"""Offline checks of everything that ships to Kubernetes: the chart, its
values schema, skaffold.yaml and the Dockerfile. No cluster or Docker engine
is needed. Run: .venv-tools/bin/python tests/deploy/test_deploy.py"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "orders-center"
PRODUCTION = yaml.safe_load((ROOT / "k8s" / "values-production.yaml").read_text())
RELEASE, NAMESPACE = "orders-center", "orders"
KUBE_VERSIONS = ["1.29.0", "1.32.0"]
# Kinds whose CRDs kubernetes-validate does not know: the monitoring ones
# belong to other projects; OutboxRelay's CRD ships in crds/ and is
# validated on its own.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "OutboxRelay"}
CRD = CHART / "crds" / "outboxrelays.yaml"

# What the relay's code calls on the API server, as (API group, resource,
# verb, resource names): crates/worker/src/leader/kube.rs on its Lease, and
# crates/relay-resource on the OutboxRelay resources (kube's watcher lists
# and watches; the leader's server-side apply patches the status; kube's
# event recorder creates Events and patches their series).
def relay_calls(lease):
    return {("coordination.k8s.io", "leases", "create", ()),
            ("coordination.k8s.io", "leases", "get", (lease,)),
            ("coordination.k8s.io", "leases", "update", (lease,)),
            ("orders-center.io", "outboxrelays", "list", ()),
            ("orders-center.io", "outboxrelays", "watch", ()),
            ("orders-center.io", "outboxrelays/status", "patch", ()),
            ("events.k8s.io", "events", "create", ()),
            ("events.k8s.io", "events", "patch", ())}


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for name, text in files.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, component=None):
    found = [d for d in by_kind(docs, kind) if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]


def env(container, name):
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) == 1, f"{container['name']}: no env {name}"
    return found[0]


def test_lint(values, label):
    result = helm.lint(str(CHART), values, strict=True)
    assert not result["errors"], f"{label}: {result['errors']}"
    bad = [m for m in result["messages"] if m["severity"] > 1]
    assert not bad, f"{label}: {bad}"


def test_kubernetes_validate(docs, label):
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(builtin, f)
        f.flush()
        for version in KUBE_VERSIONS:
            out = subprocess.run(
                [str(Path(sys.executable).parent / "kubernetes-validate"), "-k", version, "--strict", f.name],
                capture_output=True, text=True,
            )
            assert out.returncode == 0, f"{label} on {version}:\n{out.stdout}{out.stderr}"


def test_outbox_relay_crd():
    crd = yaml.safe_load(CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "outboxrelays.orders-center.io"
    for version in KUBE_VERSIONS:
        out = subprocess.run(
            [str(Path(sys.executable).parent / "kubernetes-validate"), "-k", version, "--strict", str(CRD)],
            capture_output=True, text=True,
        )
        assert out.returncode == 0, f"the CRD on {version}:\n{out.stdout}{out.stderr}"


def test_outbox_relay_values():
    rabbit = render({"broker": {"url": "amqp://u:p@rabbitmq:5672/"}, "relay": {"outboxRelays": {"spec": {"onec": {"rateLimit": 50}}}}})
    relays = {d["spec"]["destination"]: d["spec"] for d in by_kind(rabbit, "OutboxRelay")}
    assert relays == {"onec": {"destination": "onec", "rateLimit": 50}, "rabbitmq": {"destination": "rabbitmq"}}, relays
    off = render({"relay": {"outboxRelays": {"enabled": False}, "leaderElection": {"backend": "postgres"}}})
    assert not by_kind(off, "OutboxRelay") and not by_kind(off, "Role")
    relay = one(off, "Deployment", "relay")["spec"]["template"]["spec"]
    assert relay["automountServiceAccountToken"] is False
    assert not [e for e in relay["containers"][0]["env"] if e["name"].startswith("OUTBOX_RELAY")]
    with helm.Chart.load(str(CHART)) as chart:
        notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["orders-center/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} get obr" in notes, notes
    assert f"patch obr {RELEASE}-onec --type merge -p '{{\"spec\":{{\"paused\":true}}}}'" in notes, notes


def test_custom_resources(docs):
    rules = one(docs, "PrometheusRule")
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    tested = yaml.safe_load((ROOT / "observability" / "alerts.yml").read_text())
    assert rules["spec"]["groups"] == tested["groups"], "the PrometheusRule differs from the promtool-tested rules"
    assert rules["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    monitors = by_kind(docs, "ServiceMonitor")
    saga = {"saga-orchestrator", "saga-inventory", "saga-payments", "saga-notifier"}
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {"api", "relay", "consumer-journal", "consumer-ingest"} | saga, "the mock is off in production"
    services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in by_kind(docs, "Service")}
    for m in monitors:
        component = m["metadata"]["labels"]["app.kubernetes.io/component"]
        port_names = {p["name"] for p in services[component]["spec"]["ports"]}
        assert m["spec"]["endpoints"][0]["port"] in port_names, f"{component}: ServiceMonitor port not on the Service"
        assert m["spec"]["selector"]["matchLabels"].items() <= services[component]["metadata"]["labels"].items()
    dashboard = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboard) == 1
    shipped = json.loads(dashboard[0]["data"]["orders-center.json"])
    assert shipped == json.loads((ROOT / "observability" / "dashboard.json").read_text())


def test_rendered_contract(docs):
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Deployment")}
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    relay_pod = deployments["relay"]["spec"]["template"]["spec"]
    relay = relay_pod["containers"][0]
    job = one(docs, "Job", "migrate")

    # One image for every role.
    images = {api["image"], relay["image"], job["spec"]["template"]["spec"]["containers"][0]["image"]}
    if "onec-mock" in deployments:
        images.add(deployments["onec-mock"]["spec"]["template"]["spec"]["containers"][0]["image"])
    assert len(images) == 1, images
    assert api["args"] == ["api"] and relay["args"] == ["relay"]

    # The relay's ServiceAccount may do exactly what its code calls.
    account = relay_pod["serviceAccountName"]
    binding = one(docs, "RoleBinding", "relay")
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    role = one(docs, "Role", "relay")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    lease_name = env(relay, "LEASE_NAME")["value"]
    granted = {(group, resource, verb, tuple(rule.get("resourceNames", [])))
               for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == relay_calls(lease_name), granted ^ relay_calls(lease_name)
    assert relay_pod["automountServiceAccountToken"] is True
    assert env(relay, "OUTBOX_RELAY_RESOURCES")["value"] == "true"
    assert env(relay, "OUTBOX_RELAY_SELECTOR")["value"] == f"app.kubernetes.io/instance={RELEASE}"
    # One OutboxRelay per destination of the relays, selected by that label.
    relays = {d["spec"]["destination"]: d for d in by_kind(docs, "OutboxRelay")}
    broker = {"kafka"} if any(e["name"] == "BROKER" for e in relay["env"]) else set()
    assert set(relays) == {"onec"} | broker, relays.keys()
    for destination, resource in relays.items():
        assert resource["apiVersion"] == "orders-center.io/v1alpha1"
        assert resource["metadata"]["name"] == f"{RELEASE}-{destination}"
        assert resource["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert env(relay, "LEADER_ELECTION")["value"] == "kube"

    # API tokens come from a Secret, and the helm test sends one.
    tokens = env(api, "API_TOKENS")["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    assert tokens["name"] in secrets and tokens["key"] in secrets[tokens["name"]]["stringData"], tokens
    assert secrets[tokens["name"]]["stringData"][tokens["key"]], "empty API token"
    test_pod = one(docs, "Pod", "test")["spec"]["containers"][0]
    assert env(test_pod, "API_TOKENS")["valueFrom"]["secretKeyRef"] == tokens
    assert "Authorization: Bearer" in test_pod["args"][0]

    # Identity from the Downward API.
    assert env(relay, "POD_NAME")["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    # The migration hook runs `orders-center migrate` (the image's entrypoint) before install and upgrade.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    # The release's Secrets are ordinary objects (helm uninstall removes
    # them); the hook reads its own hook Secret, which Helm deletes after it.
    hooks = [n for n, d in secrets.items() if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert all(n.endswith("-migrate") for n in hooks), hooks
    for name in hooks:
        assert "hook-succeeded" in secrets[name]["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    read = {e["valueFrom"]["secretKeyRef"]["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert read & secrets.keys() <= set(hooks), f"the hook reads a Secret made after it: {read}"
    assert 'ENTRYPOINT ["/usr/local/bin/orders-center"]' in (ROOT / "Dockerfile").read_text()

    # Probes hit endpoints the binaries serve.
    served = {
        "api": routes(ROOT / "crates/api/src/routes/mod.rs"),
        "relay": routes(ROOT / "crates/relay/src/runtime.rs"),
        "onec-mock": routes(ROOT / "crates/onec-mock/src/lib.rs"),
        "consumer-journal": routes(ROOT / "crates/orders-center/src/main.rs"),
        "consumer-ingest": routes(ROOT / "crates/orders-center/src/main.rs"),
        "saga-orchestrator": routes(ROOT / "crates/orders-center/src/main.rs"),
        # The services serve the relay's status routes beside their API.
        "saga-inventory": routes(ROOT / "crates/relay/src/runtime.rs"),
        "saga-payments": routes(ROOT / "crates/relay/src/runtime.rs"),
        "saga-notifier": routes(ROOT / "crates/orders-center/src/main.rs"),
    }
    for component, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in served[component], f"{component} {probe} {get['path']} is not served"
            assert get["port"] in ports, f"{component} {probe} port {get['port']}"

    # The API's order cache is sized by the values.
    assert re.fullmatch(r"[0-9]+(B|KiB|MiB|GiB|KB|MB|GB)?", env(api, "CACHE_BUDGET")["value"])
    assert env(api, "CACHE_WARMUP_LIMIT")["value"]

    # Ingestion runs `ingest` on its source, with the broker of every role,
    # and may reach the broker and the database.
    if "consumer-ingest" in deployments:
        ingest = deployments["consumer-ingest"]["spec"]["template"]["spec"]["containers"][0]
        assert ingest["args"] == ["ingest"]
        assert env(ingest, "INGEST_SOURCE")["value"] == "orders.in"
        assert int(env(ingest, "CONSUMER_MEMBERS")["value"]) >= 1
        assert env(ingest, "BROKER")["valueFrom"]["secretKeyRef"] == env(api, "BROKER")["valueFrom"]["secretKeyRef"]
        policy = next(p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("consumer-ingest-egress"))
        ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
        assert {53, 5432, 9092, 5672}.issubset(ports), f"consumer-ingest egress: {ports}"

    # With a broker, every role gets its URL from the Secret; the journal
    # consumer runs `consume journal`, and restricted egress lets the relay
    # and the consumer reach the broker.
    if "consumer-journal" in deployments:
        consumer = deployments["consumer-journal"]["spec"]["template"]["spec"]["containers"][0]
        assert consumer["args"] == ["consume", "journal"]
        for container in (api, relay, consumer):
            ref = env(container, "BROKER")["valueFrom"]["secretKeyRef"]
            assert ref == env(consumer, "BROKER")["valueFrom"]["secretKeyRef"], ref
        egress = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-egress")}
        for component in ("relay", "consumer-journal"):
            policy = egress[f"{RELEASE}-{component}-egress"] if f"{RELEASE}-{component}-egress" in egress else next(
                p for n, p in egress.items() if n.endswith(f"{component}-egress"))
            ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
            assert {53, 5432, 9092, 5672}.issubset(ports), f"{component} egress: {ports}"

    # With the saga, its four roles run with the broker; inventory and
    # payments each read their own database URL from their own Secret and
    # elect leaders in it; the API and the relays start sagas.
    if "saga-orchestrator" in deployments:
        saga = {role: deployments[f"saga-{role}"]["spec"]["template"]["spec"]["containers"][0]
                for role in ("orchestrator", "inventory", "payments", "notifier")}
        assert saga["orchestrator"]["args"] == ["consume", "saga"]
        for role in ("inventory", "payments", "notifier"):
            assert saga[role]["args"] == [role], saga[role]["args"]
            # Every role's API takes the orders API's bearer tokens.
            assert env(saga[role], "API_TOKENS") == env(api, "API_TOKENS"), role
            assert env(saga[role], "PROTECT_READS") == env(api, "PROTECT_READS"), role
        for container in (api, relay, *saga.values()):
            assert env(container, "SAGAS")["value"] == "true", container["name"]
            assert "secretKeyRef" in env(container, "BROKER")["valueFrom"]
        secrets = {d["metadata"]["name"] for d in by_kind(docs, "Secret")}
        # Each role holds the signing keys of its own saga streams only.
        # A stream with two readers has a key per reader; its writer holds both.
        own = {"orchestrator": ["reserve@saga", "payment"],
               "inventory": ["reserve.commands", "saga@inventory", "reserve@saga", "reserve@payments"],
               "payments": ["payment.commands", "reserve@payments", "payment"], "notifier": ["saga@notifier"]}
        for role, container in [*saga.items(), ("relay", relay)]:
            streams = own.get(role, ["reserve.commands", "payment.commands", "saga@notifier", "saga@inventory"])
            keys = env(container, "SAGA_KEYS")["value"]
            assert keys == ",".join(f"{s}=$(SAGA_KEY_{i})" for i, s in enumerate(streams)), (role, keys)
            for i, stream in enumerate(streams):
                ref = env(container, f"SAGA_KEY_{i}")["valueFrom"]["secretKeyRef"]
                assert ref["key"] == stream.replace("@", "_for_"), (role, ref)
                assert ref["name"].endswith("-saga-keys"), (role, ref)
                assert ref["name"] in secrets, ref
        refs = set()
        for role in ("inventory", "payments"):
            ref = env(saga[role], f"{role.upper()}_DATABASE_URL")["valueFrom"]["secretKeyRef"]
            refs.add(ref["name"])
            assert ref["name"] != env(api, "DATABASE_URL")["valueFrom"]["secretKeyRef"]["name"]
            assert env(saga[role], "LEADER_ELECTION")["value"] == "postgres"
            assert ref["name"] in secrets or ref["name"].startswith("orders-center-"), ref
        assert len(refs) == 2, refs
        services = {d["metadata"]["name"] for d in by_kind(docs, "Service")}
        for role in saga:
            assert f"{RELEASE}-saga-{role}" in services, role
        egress = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-egress")}
        for role in saga:
            policy = egress.get(f"{RELEASE}-saga-{role}-egress")
            if policy is None:
                continue
            ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
            need = {53, 443} if role == "notifier" else {53, 5432}
            assert need.issubset(ports) and {9092, 5672}.issubset(ports), f"saga-{role} egress: {ports}"

    # Everything runs as non-root with a read-only root filesystem.
    for name, spec in pod_specs(docs):
        pod_ctx = spec.get("securityContext", {})
        for c in spec["containers"]:
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, f"{name}/{c['name']} may run as root"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']} has a writable root filesystem"
            assert ctx.get("allowPrivilegeEscalation") is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name


def routes(source):
    return set(re.findall(r'route\(\s*"([^"]+)"', source.read_text()))


def test_schema_refuses(bad_values):
    for label, values in bad_values:
        try:
            render(values)
        except helm.HelmError as e:
            assert "schema" in str(e) or "values" in str(e), f"{label}: {e}"
            continue
        raise AssertionError(f"values accepted although {label}")


def test_skaffold():
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4beta"), config["apiVersion"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    images = [a["image"] for a in config["build"]["artifacts"]]
    assert images == [values["image"]["repository"]], images
    assert config["build"]["local"]["push"] is False
    assert config["build"]["artifacts"][0]["docker"]["dockerfile"] == "Dockerfile"
    release = config["deploy"]["helm"]["releases"][0]
    assert (ROOT / release["chartPath"] / "Chart.yaml").is_file()
    for f in release["valuesFiles"]:
        assert (ROOT / f).is_file(), f
    assert set(release["setValueTemplates"]) == {"image.repository", "image.tag"}
    dev = yaml.safe_load((ROOT / release["valuesFiles"][0]).read_text())
    services = {s["metadata"]["name"] for s in by_kind(render(dev), "Service")}
    for forward in config["portForward"]:
        assert forward["resourceName"] in services, f"port-forward to unknown service {forward['resourceName']}"


def test_dockerfile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    documented = re.search(r"^# build: (.+)$", dockerfile, re.M).group(1).strip()
    run = " ".join(re.search(r"^RUN (?:--mount\S+ \\\n\s*)*(cargo build[^\\\n]*)", dockerfile, re.M).group(1).split())
    assert run == documented, f"Dockerfile runs {run!r} but documents {documented!r}"
    assert documented in (ROOT / ".ci/run").read_text(), ".ci/run does not check the Dockerfile's build command"
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)
    runtime = stages[-1]
    user = re.search(r"^USER (\S+)", runtime, re.M).group(1)
    assert user.split(":")[0] not in ("0", "root"), user
    # The Dockerfile and `infra image` read one list of what the image holds.
    contents = {}
    for line in (ROOT / "image/contents").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, rest = line.split(None, 1)
            contents.setdefault(kind, []).append(rest.split())
    assert "scripts/image-files /out" in dockerfile and "COPY --from=build /out/ /" in runtime
    for src, dest in contents["binary"]:
        assert f"--bin {Path(src).name}" in documented, f"{src} is in the image but not built"
        assert dest.startswith("/usr/local/bin/"), dest
    assert f"USER {contents['user'][0][0]}" in runtime
    assert f'ENTRYPOINT {json.dumps(contents["entrypoint"][0])}' in runtime
    assert f'CMD {json.dumps(contents["cmd"][0])}' in runtime
    assert f"EXPOSE {' '.join(contents['expose'][0])}" in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in ignored and ".git/" in ignored


def test_broker_users(production):
    """A role given its own broker user reads that Secret; the others keep the shared one."""
    values = {**production, "broker": {**production["broker"], "users": {
        "inventory": {"existingSecret": "inventory-broker", "existingSecretKey": "url"}}}}
    docs = render(values)
    brokers = {}
    for d in by_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            b = env(c, "BROKER")
            if b:
                brokers[d["metadata"]["name"]] = b["valueFrom"]["secretKeyRef"]
    inventory = [name for name in brokers if name.endswith("saga-inventory")]
    assert inventory and brokers[inventory[0]] == {"name": "inventory-broker", "key": "url"}, brokers
    shared = {(r["name"], r["key"]) for name, r in brokers.items() if name not in inventory}
    assert len(shared) == 1 and ("inventory-broker", "url") not in shared, shared


def test_numbers_render_as_written(values, label):
    """Every number that reaches an env var renders as the integer written.

    Helm reads YAML numbers as float64, and `quote` printed 1048576 as
    1.048576e+06, which the binary refused (`--body-limit-bytes`): the API
    pods crash-looped on the default values, while lint and dry runs passed.
    """
    exponent = re.compile(r"^-?\d+(\.\d+)?[eE][+-]?\d+$")
    docs = render(values)
    seen = {}
    for name, spec in pod_specs(docs):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                if "value" in e:
                    assert not exponent.match(str(e["value"])), f"{label}: {name}/{e['name']}={e['value']}"
                    seen[e["name"]] = e["value"]
    want = {
        "BODY_LIMIT_BYTES": values.get("api", {}).get("bodyLimitBytes", 1048576),
        "DATABASE_MAX_CONNECTIONS": values.get("database", {}).get("maxConnections", 16),
    }
    for env_name, number in want.items():
        assert seen.get(env_name) == str(number), f"{label}: {env_name}={seen.get(env_name)}, wrote {number}"


def main():
    defaults, production = {}, PRODUCTION
    large = {**production,
             "api": {**production.get("api", {}), "bodyLimitBytes": 10485760},
             "database": {**production.get("database", {}), "maxConnections": 1000000},
             "relay": {**production.get("relay", {}), "batchSize": 2000000, "maxAttempts": 1000000},
             "broker": {**production.get("broker", {}), "maxInFlight": 5000000}}
    checks = [
        ("lint: default values", lambda: test_lint(defaults, "defaults")),
        ("lint: production values", lambda: test_lint(production, "production")),
        ("kubernetes-validate --strict: default values", lambda: test_kubernetes_validate(render(defaults), "defaults")),
        ("kubernetes-validate --strict: production values", lambda: test_kubernetes_validate(render(production), "production")),
        ("custom resources: PrometheusRule, ServiceMonitors, dashboard", lambda: test_custom_resources(render(production))),
        ("rendered contract: default values", lambda: test_rendered_contract(render(defaults))),
        ("rendered contract: production values", lambda: test_rendered_contract(render(production))),
        ("broker users per role", lambda: test_broker_users(production)),
        ("OutboxRelay CRD: kubernetes-validate --strict", test_outbox_relay_crd),
        ("OutboxRelay resources and RBAC follow the values", test_outbox_relay_values),
        ("numbers render as written: default values", lambda: test_numbers_render_as_written(defaults, "defaults")),
        ("numbers render as written: production values", lambda: test_numbers_render_as_written(production, "production")),
        ("numbers render as written: millions", lambda: test_numbers_render_as_written(large, "millions")),
        ("values.schema.json refuses bad values", lambda: test_schema_refuses([
            ("an unknown top-level key", {"replicas": 3}),
            ("an unknown nested key", {"api": {"replicas": 3}}),
            ("a port is a string", {"api": {"port": "eighty"}}),
            ("an unknown leader election backend", {"relay": {"leaderElection": {"backend": "zookeeper"}}}),
            ("an error rate above 1", {"onecMock": {"errorRate": 1.5}}),
            ("a malformed duration", {"onec": {"timeout": "ten seconds"}}),
            ("a boolean where an object belongs", {"metrics": {"serviceMonitor": True}}),
            ("a broker URL of an unknown scheme", {"broker": {"url": "redis://cache:6379"}}),
            ("a saga step timeout that is no duration", {"saga": {"stepTimeout": "soon"}}),
            ("an unknown saga role", {"saga": {"shipping": {"replicaCount": 1}}}),
            ("a cache budget that is no size", {"api": {"cache": {"budget": "lots"}}}),
            ("an ingest source with a space", {"consumers": {"ingest": {"source": "orders in"}}}),
            ("a broker user for an unknown role", {"broker": {"users": {"shipping": {"existingSecret": "s"}}}}),
        ])),
        ("skaffold.yaml", test_skaffold),
        ("Dockerfile", test_dockerfile),
    ]
    run_checks(checks)


def run_checks(checks):
    """Runs every check, reports each, and exits non-zero if any failed."""
    failed = 0
    for name, check in checks:
        try:
            check()
            print(f"ok    {name}")
        except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAIL  {name}: {e}")
    print(f"{len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    helm.disable_logging()
    main()
