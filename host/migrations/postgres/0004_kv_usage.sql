-- Rows written by nodes still running while this migration runs must be counted too.
LOCK TABLE kv IN SHARE ROW EXCLUSIVE MODE;
-- What each plugin holds in the kv store, kept by a trigger in the same transaction as the
-- write, so quotas are checked against exact numbers. Bytes count key and value.
CREATE TABLE kv_usage (
    tenant TEXT NOT NULL,
    plugin TEXT NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (tenant, plugin)
);
INSERT INTO kv_usage (tenant, plugin, keys, bytes)
    SELECT tenant, plugin, COUNT(*), SUM(octet_length(key) + octet_length(value))
    FROM kv GROUP BY tenant, plugin;
CREATE FUNCTION kv_usage_count() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO kv_usage (tenant, plugin, keys, bytes)
        VALUES (NEW.tenant, NEW.plugin, 1, octet_length(NEW.key) + octet_length(NEW.value))
        ON CONFLICT (tenant, plugin) DO UPDATE
        SET keys = kv_usage.keys + 1, bytes = kv_usage.bytes + excluded.bytes;
    ELSIF TG_OP = 'UPDATE' THEN
        -- A counter that keeps its length (most increments) leaves the row alone.
        IF octet_length(NEW.value) <> octet_length(OLD.value) THEN
            UPDATE kv_usage
            SET bytes = bytes + octet_length(NEW.value) - octet_length(OLD.value)
            WHERE tenant = NEW.tenant AND plugin = NEW.plugin;
        END IF;
    ELSE
        UPDATE kv_usage
        SET keys = keys - 1, bytes = bytes - octet_length(OLD.key) - octet_length(OLD.value)
        WHERE tenant = OLD.tenant AND plugin = OLD.plugin;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER kv_usage_count AFTER INSERT OR UPDATE OR DELETE ON kv
    FOR EACH ROW EXECUTE FUNCTION kv_usage_count();
-- The purge finds expired rows by their expiry.
CREATE INDEX kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
