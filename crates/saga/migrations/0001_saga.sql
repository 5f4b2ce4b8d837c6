-- Saga instances: one per saga and key. `version` is bumped by every
-- change; a change made from a stale version is refused (optimistic
-- concurrency between coordinator copies).
CREATE TABLE saga_instances (
    id             TEXT   PRIMARY KEY,
    saga           TEXT   NOT NULL,
    saga_key       TEXT   NOT NULL,
    status         TEXT   NOT NULL,  -- running | compensating | completed | compensated | failed
    step           BIGINT NOT NULL,  -- index of the step running or being compensated
    attempt        BIGINT NOT NULL,  -- sends of that step or compensation so far
    compensations  TEXT   NOT NULL,  -- JSON array: steps still to compensate, next first
    finish         TEXT   NOT NULL,  -- failure | cancel: which final command ends a compensation
    data           TEXT   NOT NULL,  -- JSON saga data
    reason         TEXT,
    correlation_id TEXT   NOT NULL,
    deadline_at    BIGINT,           -- microseconds; NULL once over
    version        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    UNIQUE (saga, saga_key)
);
CREATE INDEX saga_instances_deadline ON saga_instances (deadline_at);
CREATE INDEX saga_instances_status ON saga_instances (status, id);
CREATE INDEX saga_instances_key ON saga_instances (saga_key);

-- Every command a saga sent, by its message id: a reply names it in
-- ce-causationid, which finds the instance, the step and the phase.
CREATE TABLE saga_sent (
    message_id  TEXT   PRIMARY KEY,
    instance_id TEXT   NOT NULL,
    step        BIGINT NOT NULL,
    phase       TEXT   NOT NULL,  -- forward | compensation | final
    kind        TEXT   NOT NULL,  -- ce-type
    sent_at     BIGINT NOT NULL
);
CREATE INDEX saga_sent_instance ON saga_sent (instance_id);

-- Every transition, for `skein saga show` and traces.
CREATE TABLE saga_transitions (
    instance_id TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    from_status TEXT,
    to_status   TEXT   NOT NULL,
    step        TEXT,
    cause_id    TEXT,
    cause       TEXT   NOT NULL,  -- ce-type of the cause, or "deadline"
    sent        TEXT   NOT NULL,  -- JSON array of {id, type}
    note        TEXT   NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
