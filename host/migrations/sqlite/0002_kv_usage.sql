-- What each plugin holds in the kv store, kept by triggers in the same transaction as the write,
-- so quotas are checked against exact numbers. Bytes count key and value.
CREATE TABLE IF NOT EXISTS kv_usage (
    tenant TEXT NOT NULL,
    plugin TEXT NOT NULL,
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (tenant, plugin)
);
INSERT OR REPLACE INTO kv_usage (tenant, plugin, keys, bytes)
    SELECT tenant, plugin, COUNT(*),
           SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(CAST(value AS BLOB)))
    FROM kv GROUP BY tenant, plugin;
CREATE TRIGGER IF NOT EXISTS kv_usage_insert AFTER INSERT ON kv BEGIN
    INSERT INTO kv_usage (tenant, plugin, keys, bytes)
    VALUES (NEW.tenant, NEW.plugin, 1,
            LENGTH(CAST(NEW.key AS BLOB)) + LENGTH(CAST(NEW.value AS BLOB)))
    ON CONFLICT (tenant, plugin) DO UPDATE
    SET keys = keys + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS kv_usage_update AFTER UPDATE OF value ON kv
WHEN LENGTH(CAST(NEW.value AS BLOB)) != LENGTH(CAST(OLD.value AS BLOB)) BEGIN
    UPDATE kv_usage
    SET bytes = bytes + LENGTH(CAST(NEW.value AS BLOB)) - LENGTH(CAST(OLD.value AS BLOB))
    WHERE tenant = NEW.tenant AND plugin = NEW.plugin;
END;
CREATE TRIGGER IF NOT EXISTS kv_usage_delete AFTER DELETE ON kv BEGIN
    UPDATE kv_usage
    SET keys = keys - 1,
        bytes = bytes - LENGTH(CAST(OLD.key AS BLOB)) - LENGTH(CAST(OLD.value AS BLOB))
    WHERE tenant = OLD.tenant AND plugin = OLD.plugin;
END;
-- The purge finds expired rows by their expiry.
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
