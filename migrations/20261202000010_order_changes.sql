-- Every committed write of an order row tells the API replicas' caches:
-- channel `order_changed`, payload `<version> <commit time, µs since the
-- epoch> <order id>`. A deferred constraint trigger fires just before the
-- commit, so every writer (the API, the saga, ingestion, a hand-written
-- UPDATE) is covered, and the time is as close to the commit as SQL gets:
-- the listener's lag metric is delivery time minus it. Order ids hold no
-- spaces, so the id may come last unquoted.
CREATE FUNCTION notify_order_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_changed',
        NEW.version::text || ' '
        || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text || ' '
        || NEW.id);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER order_changed
    AFTER INSERT OR UPDATE ON orders
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION notify_order_changed();
