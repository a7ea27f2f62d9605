-- The PostgreSQL engine's first schema. Integers are BIGINT throughout (the same Rust types as
-- the SQLite engine reads); times are milliseconds since the Unix epoch, as the nodes count them.
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    size BIGINT NOT NULL,
    smtputf8 BIGINT NOT NULL,
    eight_bit BIGINT NOT NULL,
    content BYTEA NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    dsn_ret TEXT,
    dsn_envid TEXT,
    requiretls BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE recipients (
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    address TEXT NOT NULL,
    state BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt BIGINT NOT NULL,
    last_reply TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    notify BIGINT NOT NULL DEFAULT 0,
    orcpt TEXT,
    delay_warned BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, idx)
);
-- The claim's scan: only recipients still to deliver, by due time.
CREATE INDEX recipients_due ON recipients (next_attempt) WHERE state = 0;
-- Lease renewal and a restarted node's recovery: by owner.
CREATE INDEX recipients_lease ON recipients (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE sts_policies (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    fetched_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE tls_outcomes (
    domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_text TEXT NOT NULL,
    mx_host TEXT NOT NULL,
    result TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count BIGINT NOT NULL,
    first_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    PRIMARY KEY (domain, policy_type, policy_text, mx_host, result, receiving_ip, reason)
);
CREATE TABLE kv (
    tenant TEXT NOT NULL,
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BYTEA NOT NULL,
    expires_at BIGINT,
    PRIMARY KEY (tenant, plugin, key)
);
