//! Hot reload: SIGHUP, a change to the configuration file or to a plugin file, and `switchyard
//! plugins reload` (which sends SIGHUP) all load the configured chain beside the running one and
//! swap it in. Also keeps the status file that `switchyard plugins list` prints.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::PluginManager;
use crate::config::Config;

/// Changes arriving within this window make one reload (editors and copies write in bursts).
const SETTLE: Duration = Duration::from_millis(300);

pub fn status_path(config: &Config) -> PathBuf {
    config.data_dir.join("plugins.status")
}

pub fn pid_path(config: &Config) -> PathBuf {
    config.data_dir.join("switchyard.pid")
}

/// The files whose change triggers a reload: the configuration and every plugin in it.
fn watched_files(config_path: &Path, config: &Config) -> HashSet<PathBuf> {
    let mut files: HashSet<PathBuf> = config
        .plugins
        .iter()
        .map(|plugin| absolute(&plugin.path))
        .collect();
    files.insert(absolute(config_path));
    files
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    })
}

/// Runs forever: waits for reload triggers and refreshes the status file every second.
pub async fn run(manager: Arc<PluginManager>, config_path: Option<PathBuf>, config: Arc<Config>) {
    let status_file = status_path(&config);
    let (trigger, mut triggers) = mpsc::unbounded_channel::<String>();
    let hangups = trigger.clone();
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP: reload by signal is off");
            return;
        };
        while hangup.recv().await.is_some() {
            if hangups.send("SIGHUP".to_string()).is_err() {
                return;
            }
        }
    });
    let mut watched = config_path
        .as_ref()
        .map(|path| watched_files(path, &config))
        .unwrap_or_default();
    let mut watcher = config_path
        .as_ref()
        .and_then(|_| start_watcher(&watched, trigger.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(reason) = triggers.recv() => {
                tokio::time::sleep(SETTLE).await;
                while triggers.try_recv().is_ok() {}
                let Some(path) = &config_path else {
                    tracing::warn!(%reason, "reload asked, but serve runs without a configuration file");
                    continue;
                };
                tracing::info!(%reason, "reloading plugins");
                match Config::load(path) {
                    Err(error) => {
                        tracing::error!(%error, "configuration does not load; plugins unchanged");
                        manager.reload_failed(error.to_string());
                    }
                    Ok(next) => {
                        // Only the plugin chain changes live; the rest needs a restart.
                        let _ = manager.reload(&next.plugins).await;
                        let files = watched_files(path, &next);
                        if files != watched {
                            watched = files;
                            watcher = start_watcher(&watched, trigger.clone());
                        }
                    }
                }
                write_status(&status_file, &manager);
            }
            _ = tick.tick() => write_status(&status_file, &manager),
        }
        let _ = &watcher;
    }
}

/// Watches the directories of `files` (so a file replaced by rename is seen) and reports changes
/// to any of them.
fn start_watcher(
    files: &HashSet<PathBuf>,
    trigger: mpsc::UnboundedSender<String>,
) -> Option<notify::RecommendedWatcher> {
    let wanted = files.clone();
    // The watched directories may hold busy files (a log written on every message): only a
    // path with a watched file's name is worth resolving, which takes system calls.
    let names: HashSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|file| file.file_name().map(Into::into))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if let Some(path) = event.paths.iter().find(|path| {
            path.file_name().is_some_and(|name| names.contains(name))
                && wanted.contains(&absolute(path))
        }) {
            let _ = trigger.send(format!("{} changed", path.display()));
        }
    })
    .map_err(|error| tracing::error!(%error, "cannot watch files: reload on change is off"))
    .ok()?;
    let directories: HashSet<PathBuf> = files
        .iter()
        .filter_map(|file| file.parent().map(Path::to_path_buf))
        .collect();
    for directory in directories {
        if let Err(error) = watcher.watch(&directory, RecursiveMode::NonRecursive) {
            tracing::warn!(%error, directory = %directory.display(), "cannot watch directory");
        }
    }
    Some(watcher)
}

/// Replaces the status file atomically.
fn write_status(path: &Path, manager: &PluginManager) {
    let text = format!(
        "{}updated: {}\n",
        manager.describe(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    );
    let temporary = path.with_extension("status.tmp");
    if let Err(error) =
        std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, path))
    {
        tracing::debug!(%error, "cannot write the plugin status file");
    }
}
