use super::*;

fn view(id: &str, version: i64, state: Option<TaskState>) -> OrderView {
    let mut v = testkit::sample_order(id);
    v["version"] = version.into();
    v["sync"] = match state {
        None => serde_json::Value::Null,
        Some(s) => serde_json::json!({
            "task_id": 7, "version": version, "state": s, "attempts": 0,
            "last_error": null, "updated_at": "2026-12-02T10:00:00Z"
        }),
    };
    serde_json::from_value(v).expect("a valid view")
}

fn cache(budget_bytes: u64) -> OrderCache {
    let c = OrderCache::new(
        CacheConfig {
            budget_bytes,
            warmup_limit: Duration::from_secs(1),
        },
        CacheMetrics::unregistered(),
    );
    c.listening();
    c
}

#[test]
fn a_cached_body_is_the_view_as_serde_renders_it() {
    for state in [None, Some(TaskState::Pending), Some(TaskState::Done)] {
        let v = view("A-1", 3, state);
        let e = Entry::of(&v);
        assert_eq!(&e.body()[..], &serde_json::to_vec(&v).unwrap()[..]);
        let mut done = v.clone();
        done.sync = view("A-1", 3, Some(TaskState::Done)).sync;
        assert_eq!(
            &e.with_sync(done.sync.clone()).body()[..],
            &serde_json::to_vec(&done).unwrap()[..]
        );
        assert_eq!(e.sync_in_flight(), state == Some(TaskState::Pending));
    }
}

#[test]
fn hits_need_the_version_asked_for_and_a_live_listener() {
    let c = cache(1 << 20);
    assert!(c.fill(c.snapshot(), &view("A-1", 2, None)));
    assert_eq!(c.get("A-1", 2).map(|e| e.version()), Some(2));
    assert!(c.get("A-1", 3).is_none(), "older than the client saw");
    // The same version or an older one never replaces what is there.
    assert!(!c.fill(c.snapshot(), &view("A-1", 1, None)));
    assert!(!c.fill(c.snapshot(), &view("A-1", 2, None)));
    c.lost();
    assert!(c.get("A-1", 0).is_none());
    assert!(
        !c.fill(c.snapshot(), &view("A-1", 3, None)),
        "not listening"
    );
    assert_eq!(c.usage().0, 0, "a lost listener drops everything");
    assert_eq!(c.0.metrics.resets(), 1);
    c.listening();
    assert!(c.fill(c.snapshot(), &view("A-1", 3, None)));
}

#[test]
fn a_notification_drops_older_entries_and_a_slow_read_cannot_bring_them_back() {
    let c = cache(1 << 20);
    assert!(c.fill(c.snapshot(), &view("A-1", 1, None)));
    c.notified("A-1", 1, Duration::ZERO);
    assert!(c.get("A-1", 0).is_some(), "its own version changes nothing");
    // A read begins, a newer version is announced, the read returns v1.
    let before = c.snapshot();
    c.notified("A-1", 2, Duration::from_millis(3));
    assert!(c.get("A-1", 0).is_none());
    assert!(!c.fill(before, &view("A-1", 1, None)), "stale read kept");
    // Another order's notification does not refuse the fill.
    let before = c.snapshot();
    c.notified("B-1", 9, Duration::ZERO);
    assert!(c.fill(before, &view("A-1", 2, None)));
    // A read that began before the ledger's memory is not kept.
    let before = c.snapshot();
    for i in 0..=RECENT {
        c.notified(&format!("X-{i}"), 1, Duration::ZERO);
    }
    assert!(!c.fill(before, &view("C-1", 1, None)));
    assert_eq!(c.0.metrics.lag().0, (RECENT + 4) as u64);
}

#[test]
fn the_budget_bounds_the_weight() {
    let one = u64::from(Entry::of(&view("A-00000", 1, None)).weight("A-00000"));
    let c = cache(one * 50);
    for i in 0..2_000 {
        let id = format!("A-{i:05}");
        c.fill(c.snapshot(), &view(&id, 1, None));
    }
    let (entries, bytes) = c.usage();
    assert!(bytes <= one * 50, "{bytes} > {}", one * 50);
    assert!((1..=50).contains(&entries), "{entries}");
    assert!(c.0.metrics.evictions() > 0, "nothing counted as evicted");
}
