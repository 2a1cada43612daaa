-- The commands each saga sent, as `<type>/<event id>`: an answer must name
-- one of them (`in_reply_to`). Sagas started before this are not checked.
ALTER TABLE sagas ADD COLUMN sent text[] NOT NULL DEFAULT '{}';
