"""Fuzzes every role's HTTP API from its own /openapi.json with schemathesis,
bounded in examples and time, against `orders-center dev` on a fresh
database: the orders API, then inventory's, payments' and the notifier's.

Checks: no 5xx, every response conforms to the schema, every error is
problem+json, and a refused request never changes a table.

Usage: python tests/fuzz/run_fuzz.py [path/to/orders-center]
The database is a new one on DATABASE_URL's server when that is set;
otherwise `dev` starts a throwaway cluster.
"""

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fuzz-" + secrets.token_hex(8)


def fresh_database(server_url: str) -> tuple[str, str]:
    name = "oc_fuzz_" + secrets.token_hex(4)
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    return name, urlunsplit(parts._replace(path="/" + name))


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


ORDERS_COUNTS = """
SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_items),
       (SELECT count(*) FROM order_payments), (SELECT count(*) FROM order_history),
       (SELECT count(*) FROM outbox), (SELECT count(*) FROM event_log),
       (SELECT count(*) FROM idempotency_keys)
"""
INVENTORY_COUNTS = """
SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM reservations),
       (SELECT count(*) FROM reservation_lines), (SELECT count(*) FROM outbox),
       (SELECT count(*) FROM event_log),
       (SELECT sum(available) FROM products)
"""
PAYMENTS_COUNTS = """
SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM top_ups),
       (SELECT count(*) FROM payments), (SELECT count(*) FROM outbox),
       (SELECT count(*) FROM event_log),
       (SELECT sum(balance) FROM accounts)
"""


def beside(db_url: str, suffix: str) -> str:
    """The URL of dev's database for a service, next to the orders one."""
    parts = urlsplit(db_url)
    return urlunsplit(parts._replace(path=parts.path + "_" + suffix))


def start_dev(binary: str, env: dict) -> tuple[subprocess.Popen, str, str, dict]:
    dev = subprocess.Popen(
        [binary, "dev", "--listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0",
         "--inventory-listen", "127.0.0.1:0", "--payments-listen", "127.0.0.1:0",
         "--notifier-listen", "127.0.0.1:0",
         "--onec-mock-listen", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    api = db = None
    services = {}
    for line in dev.stdout:
        if m := re.match(r"\s+API\s+(http://\S+)/api/v1/orders", line):
            api = m.group(1)
        if m := re.match(r"\s+(inventory|payments|notifier)\s+(http://\S+)", line):
            services[m.group(1)] = m.group(2)
        if m := re.match(r"\s+PostgreSQL\s+(postgres://\S+)", line):
            db = m.group(1)
        if "Press Ctrl-C" in line:
            break
    if api is None:
        dev.kill()
        sys.exit("orders-center dev did not start")
    return dev, api, db, services


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/orders-center")
    (ROOT / "target").mkdir(exist_ok=True)
    env = dict(os.environ, API_TOKENS=TOKEN, RUST_LOG="warn")
    server = os.environ.get("DATABASE_URL")
    fresh = None
    if server:
        fresh, env["DATABASE_URL"] = fresh_database(server)
    dev, api, db, services = start_dev(binary, env)
    db = db or env["DATABASE_URL"]
    # (name, base URL, its database, the row counts a refused call must keep, seconds)
    service_time = os.environ.get("FUZZ_SERVICE_MAX_TIME", "60")
    targets = [
        ("orders", api, db, ORDERS_COUNTS, os.environ.get("FUZZ_MAX_TIME", "120")),
        ("inventory", services["inventory"], beside(db, "inventory"), INVENTORY_COUNTS, service_time),
        ("payments", services["payments"], beside(db, "payments"), PAYMENTS_COUNTS, service_time),
        # No database: its API only reads.
        ("notifier", services["notifier"], "", "", service_time),
    ]
    failed = []
    try:
        st = Path(sys.executable).with_name("st")
        for name, base, database, counts, max_time in targets:
            print(f"--- schemathesis: {name} ({base}/openapi.json)", flush=True)
            run = subprocess.run(
                [str(st), "run", f"{base}/openapi.json",
                 "--header", f"Authorization: Bearer {TOKEN}",
                 "--checks", "all",
                 # Valid by the schema is not valid by every rule (the body id must
                 # match the path), so schema-valid requests may be refused.
                 "--exclude-checks", "positive_data_acceptance",
                 "--max-examples", os.environ.get("FUZZ_MAX_EXAMPLES", "40"),
                 "--max-time", max_time,
                 "--workers", "1",
                 "--request-timeout", "10",
                 "--seed", os.environ.get("FUZZ_SEED", "20261121"),
                 "--phases", "examples,coverage,fuzzing",
                 "--no-color"],
                env=dict(env, SCHEMATHESIS_HOOKS="hooks", FUZZ_DATABASE_URL=database,
                         FUZZ_COUNTS=counts, PYTHONPATH=str(Path(__file__).parent)),
                # Schemathesis keeps its example cache in the working directory.
                cwd=ROOT / "target",
                timeout=420,
            )
            if run.returncode != 0:
                failed.append(name)
        if failed:
            print(f"schemathesis failed for: {', '.join(failed)}")
        return 1 if failed else 0
    finally:
        dev.terminate()
        dev.wait(timeout=30)
        if fresh:
            drop_database(server, fresh)


if __name__ == "__main__":
    sys.exit(main())
