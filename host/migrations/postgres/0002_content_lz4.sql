-- Message bodies are compressed with lz4 instead of pglz when the server has it (PostgreSQL 14
-- and later, built with lz4 as the major distributions are): pglz costs several times the CPU for
-- each body written, and every body is written once and read at most a few times.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE messages ALTER COLUMN content SET COMPRESSION lz4;
    END IF;
END
$$;
