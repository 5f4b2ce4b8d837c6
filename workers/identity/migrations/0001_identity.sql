-- Users. The email is stored lower-cased, so UNIQUE makes it unique
-- whatever case it was registered in.
CREATE TABLE users (
    id            TEXT   PRIMARY KEY,
    email         TEXT   NOT NULL UNIQUE,
    name          TEXT   NOT NULL,
    role          TEXT   NOT NULL CHECK (role IN ('customer', 'admin')),
    password_hash TEXT   NOT NULL,   -- argon2id PHC string
    created_at    BIGINT NOT NULL
);

-- Refresh tokens, only as their SHA-256 (hex). Each works once: refreshing
-- marks it used and issues the next token of the same family (one login).
-- Presenting a used token again revokes the whole family. Rows are deleted
-- once expired.
CREATE TABLE refresh_tokens (
    hash       TEXT   PRIMARY KEY,
    family     TEXT   NOT NULL,
    user_id    TEXT   NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id, expires_at);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);
