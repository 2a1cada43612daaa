-- After an attempt whose outcome is unknown (a timeout, a connection cut
-- mid-answer), 1C may still be processing that version. Until this time no
-- newer version of the order is sent, so the late one cannot land after it.
ALTER TABLE onec_tasks ADD COLUMN in_doubt_until timestamptz;
