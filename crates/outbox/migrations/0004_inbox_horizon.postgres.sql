-- How far back the inbox may have forgotten: records of messages processed
-- before `forgotten_before` (unix microseconds) may have been deleted past
-- their retention, records of any processed at or after it are all kept.
-- `skein audit` does not take a message published before it, and not found
-- in the inbox, for lost or missed: the inbox may have applied and forgotten
-- it.
CREATE TABLE IF NOT EXISTS skein_inbox_horizon (
    name             TEXT   PRIMARY KEY,
    forgotten_before BIGINT NOT NULL   -- unix microseconds
);
