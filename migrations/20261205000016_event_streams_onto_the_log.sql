-- Event streams leave the outbox for the log (DESIGN.md, part 3): only 1C
-- ('onec', snapshots, latest wins) keeps job rows.
--
-- 1. A task id names an outbox row or a dead log event: log_dead draws its
--    ids from the outbox's sequence, so `tasks retry ID` and the API's
--    replay find either without a second kind of id.
ALTER TABLE log_dead ALTER COLUMN id DROP IDENTITY;
DO $$
BEGIN
    EXECUTE format('ALTER TABLE log_dead ALTER COLUMN id SET DEFAULT nextval(%L)',
                   pg_get_serial_sequence('outbox', 'id'));
END $$;

-- 2. The partition hash of store::log::key_hash (FNV-1a, 64 bit, of the
--    stream, a newline and the key, shifted right by one), for rows moved
--    here; the relays compute the same in Rust, and a test holds the two
--    together.
CREATE FUNCTION log_key_hash(stream text, key text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bytes bytea := convert_to(stream || E'\n' || key, 'UTF8');
    h numeric := 14695981039346656037;
    low integer;
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        low := (h % 256)::integer;
        h := h - low + (low # get_byte(bytes, i));
        h := (h * 1099511628211) % 18446744073709551616;
    END LOOP;
    RETURN div(h, 2)::bigint;
END $$;

-- 3. Pending and running event-stream rows are appended in id order (one
--    key's rows keep their order); a running row's relay may still deliver
--    it once more, which the consumers' inboxes absorb. Dead ones keep their
--    task id in log_dead, replayable as before.
WITH moved AS (
    DELETE FROM outbox
    WHERE destination <> 'onec' AND state IN ('pending', 'running')
    RETURNING *
)
INSERT INTO event_log (position, segment, destination, partition, event_id, aggregatetype,
                       aggregateid, type, version, payload, traceparent, created_at)
SELECT m.p, ((m.p / c.segment_size) % c.segments)::smallint, m.destination,
       (log_key_hash(m.aggregatetype, m.aggregateid) % c.partitions)::smallint, m.event_id,
       m.aggregatetype, m.aggregateid, m.type, m.version, m.payload, m.traceparent, m.created_at
FROM (SELECT nextval('event_log_position') AS p, moved.* FROM moved ORDER BY moved.id) m
CROSS JOIN log_config c;

WITH moved AS (
    DELETE FROM outbox WHERE destination <> 'onec' AND state = 'dead' RETURNING *
)
INSERT INTO log_dead (id, destination, partition, position, event_id, aggregatetype,
                      aggregateid, type, version, payload, traceparent, class, reason, dead_at)
SELECT m.id, m.destination,
       (log_key_hash(m.aggregatetype, m.aggregateid) % c.partitions)::smallint,
       nextval('event_log_position'), m.event_id, m.aggregatetype, m.aggregateid, m.type,
       m.version, m.payload, m.traceparent, 'outbox',
       coalesce(m.last_error, 'dead in the outbox before the log'),
       coalesce(m.finished_at, m.updated_at)
FROM moved m CROSS JOIN log_config c;
