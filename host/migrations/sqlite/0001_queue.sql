-- The SQLite engine's first schema. IF NOT EXISTS: a queue file written before migrations
-- existed already has these tables (brought up to date column by column before this runs).
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    size INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL,
    eight_bit INTEGER NOT NULL,
    content BLOB NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    dsn_ret TEXT,
    dsn_envid TEXT,
    requiretls INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    message_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    last_reply TEXT,
    lease_owner TEXT,
    lease_until INTEGER,
    notify INTEGER NOT NULL DEFAULT 0,
    orcpt TEXT,
    delay_warned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt);
CREATE TABLE IF NOT EXISTS sts_policies (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    fetched_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tls_outcomes (
    domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_text TEXT NOT NULL,
    mx_host TEXT NOT NULL,
    result TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_at INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    PRIMARY KEY (domain, policy_type, policy_text, mx_host, result, receiving_ip, reason)
);
CREATE TABLE IF NOT EXISTS kv (
    tenant TEXT NOT NULL,
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (tenant, plugin, key)
);
