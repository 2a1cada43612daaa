"""Schemathesis hooks and checks for the fuzz runs of every role's API.

Loaded through SCHEMATHESIS_HOOKS. Every call is bracketed by FUZZ_COUNTS,
a query of the rows (and sums) a write can touch in FUZZ_DATABASE_URL, so a
check can assert that nothing but a successful write changed them. Without
a database (the notifier) there is nothing to count.
"""

import os

import psycopg
import schemathesis

COUNTS = os.environ.get("FUZZ_COUNTS", "")
_url = os.environ.get("FUZZ_DATABASE_URL", "")
_db = psycopg.connect(_url, autocommit=True) if _url and COUNTS else None
_before: dict[int, tuple] = {}
_changed: dict[int, bool] = {}


def _counts() -> tuple:
    return _db.execute(COUNTS).fetchone()


@schemathesis.hook
def before_call(context, case, kwargs):
    if _db is not None:
        _before[id(case)] = _counts()


@schemathesis.hook
def after_call(context, case, response):
    before = _before.pop(id(case), None)
    if before is not None:
        _changed[id(case)] = _counts() != before


@schemathesis.check
def problem_json_errors(ctx, response, case):
    """Every error answer is RFC 9457 problem+json with a matching status."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/problem+json"), (
        f"{response.status_code} answered as {content_type!r}"
    )
    body = response.json()
    assert body.get("status") == response.status_code, f"problem status {body.get('status')}"
    assert str(body.get("type", "")).startswith("urn:orders-center:problem:"), body


@schemathesis.check
def rows_change_only_through_successful_writes(ctx, response, case):
    """A refused request, or any read, leaves every table as it was."""
    changed = _changed.get(id(case))
    if changed is None:
        return
    write = case.method.upper() in ("POST", "PUT", "PATCH", "DELETE")
    if write and 200 <= response.status_code < 300:
        return
    assert not changed, f"{case.method} answered {response.status_code} but changed row counts"
