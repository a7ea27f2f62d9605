//! The schema of each engine as numbered migrations (`host/migrations/ENGINE/NNNN_name.sql`),
//! compiled into the binary and applied by sqlx's migrator: at start, and by `switchyard queue
//! migrate`. The applied versions are kept in the database (`_sqlx_migrations`); a database
//! that has one this binary does not know was migrated by a newer Switchyard and is refused
//! rather than written with assumptions that no longer hold.

use std::borrow::Cow;

use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use std::future::Future;
use std::pin::Pin;

use super::QueueError;

/// One engine's migrations: (version, description, SQL).
type Steps = &'static [(i64, &'static str, &'static str)];

pub(crate) const SQLITE: Steps = &[
    (
        1,
        "queue",
        include_str!("../../migrations/sqlite/0001_queue.sql"),
    ),
    (
        2,
        "kv usage",
        include_str!("../../migrations/sqlite/0002_kv_usage.sql"),
    ),
];

pub(crate) const POSTGRES: Steps = &[
    (
        1,
        "queue",
        include_str!("../../migrations/postgres/0001_queue.sql"),
    ),
    (
        2,
        "content lz4",
        include_str!("../../migrations/postgres/0002_content_lz4.sql"),
    ),
    (
        3,
        "traces",
        include_str!("../../migrations/postgres/0003_traces.sql"),
    ),
    (
        4,
        "kv usage",
        include_str!("../../migrations/postgres/0004_kv_usage.sql"),
    ),
];

/// The newest version a step list knows.
pub(crate) fn newest(steps: Steps) -> i64 {
    steps
        .iter()
        .map(|(version, _, _)| *version)
        .max()
        .unwrap_or(0)
}

/// What [`MigrationSource::resolve`] returns.
type Resolved = Pin<
    Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 'static>,
>;

#[derive(Debug)]
struct Embedded(Steps);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> Resolved {
        let migrations = self
            .0
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

/// The migrator of one engine's steps; engines run it on their own connection type
/// (`Migrator::run`), then map its error with [`error`].
pub(crate) async fn migrator(steps: Steps) -> Result<Migrator, QueueError> {
    Migrator::new(Embedded(steps))
        .await
        .map_err(|error| QueueError::Database(Box::new(error)))
}

/// A migration failure as the queue reports it: a database migrated by a newer binary is
/// named as such.
pub(crate) fn error(error: MigrateError, steps: Steps) -> QueueError {
    match error {
        MigrateError::VersionMissing(version) => QueueError::SchemaTooNew {
            found: version,
            known: newest(steps),
        },
        other => QueueError::Database(Box::new(other)),
    }
}

/// The query that reads the newest applied version (the migrator's own table).
pub(crate) const APPLIED_VERSION: &str =
    "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success";
