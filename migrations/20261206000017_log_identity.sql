-- Each log has an identity of its own. Kafka's transactional ids are made
-- from it: the relays of one database share a partition's id, so a
-- take-over fences the previous holder, while the logs of other databases
-- (the saga's services publish to the same destination) and of other
-- installations on the same cluster never fence each other.
ALTER TABLE log_config ADD COLUMN log_id uuid NOT NULL DEFAULT gen_random_uuid();
