//! Checks that involve more than one value of the configuration.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::Config;

/// A problem found after parsing, with the byte offset in the file it refers to.
pub struct Problem {
    pub offset: usize,
    pub message: String,
}

/// Offset of the first line that sets `key` (for errors about values that carry no span).
fn offset_of_key(text: &str, key: &str) -> usize {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let sets_key = trimmed.starts_with(key)
            && (key.starts_with('[') || trimmed[key.len()..].trim_start().starts_with('='));
        if sets_key {
            return offset + (line.len() - trimmed.len());
        }
        offset += line.len();
    }
    0
}

/// Makes a [`Problem`] about the first line that sets a key.
type Locate<'a> = dyn Fn(&str, String) -> Problem + 'a;

pub fn validate(config: &Config, text: &str) -> Result<(), Problem> {
    let problem = |key: &str, message: String| Problem {
        offset: offset_of_key(text, key),
        message,
    };
    listeners(config, &problem)?;
    limits(config, &problem)?;
    files(config, &problem)?;
    submission(config, &problem)?;
    dkim(config, &problem)?;
    queue(config, &problem)?;
    admin(config, &problem)?;
    scanners(config, &problem)?;
    names(config, &problem)
}

/// Scanners: each usable, named once, on listeners that exist.
fn scanners(config: &Config, problem: &Locate) -> Result<(), Problem> {
    let mut names = HashSet::new();
    for scanner in &config.scanners {
        if let Some(message) = scanner.problem() {
            return Err(problem("[[scanner]]", message));
        }
        if !names.insert(scanner.name.as_str()) {
            return Err(problem(
                "[[scanner]]",
                format!("two scanners named `{}`", scanner.name),
            ));
        }
        if let Some(unknown) = scanner
            .listeners
            .iter()
            .find(|name| !config.listeners.iter().any(|l| &&l.name == name))
        {
            return Err(problem(
                "[[scanner]]",
                format!(
                    "scanner `{}`: no listener is named `{unknown}`",
                    scanner.name
                ),
            ));
        }
    }
    Ok(())
}

/// The queue's engine settings: PostgreSQL ones only with that engine, a lease long enough to
/// be renewed in time, names that go into SQL and leases as they are.
fn queue(config: &Config, problem: &Locate) -> Result<(), Problem> {
    use super::QueueEngine;
    let queue = &config.queue;
    if queue.engine == QueueEngine::Sqlite && (queue.url.is_some() || queue.schema.is_some()) {
        return Err(problem(
            "url",
            "queue.url and queue.schema are for engine = \"postgres\"".to_string(),
        ));
    }
    if let Some(schema) = &queue.schema {
        // 47: the NOTIFY channel `switchyard_work_SCHEMA` must fit PostgreSQL's 63 bytes.
        let valid = !schema.is_empty()
            && schema.len() <= 47
            && !schema.starts_with("pg_")
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(problem(
                "schema",
                format!(
                    "queue.schema `{schema}`: use lower-case letters, digits and _ (at most 47, not starting with pg_)"
                ),
            ));
        }
    }
    if queue.max_connections < 5 {
        return Err(problem(
            "max_connections",
            "queue.max_connections must be at least 5 (three writers, reads, wake-ups)".to_string(),
        ));
    }
    if queue.lease < std::time::Duration::from_secs(3) {
        return Err(problem(
            "lease",
            "queue.lease must be at least 3s: it is renewed every third of it".to_string(),
        ));
    }
    let node = config.node_id();
    if node.is_empty() || node.len() > 200 || node.chars().any(|c| c.is_control() || c == ' ') {
        return Err(problem(
            "node_id",
            format!(
                "node_id `{node}`: a name without spaces or control characters, at most 200 bytes"
            ),
        ));
    }
    Ok(())
}

/// Signing keys: each usable on its own, no selector twice.
fn dkim(config: &Config, problem: &Locate) -> Result<(), Problem> {
    for key in &config.dkim {
        if let Some(message) = key.problem() {
            return Err(problem("[[dkim]]", message));
        }
    }
    if config.tls_reports.interval.is_zero() || config.mta_sts.fetch_timeout.is_zero() {
        return Err(problem(
            "[tls_reports]",
            "tls_reports.interval and mta_sts.fetch_timeout must be above 0".to_string(),
        ));
    }
    if let Some(message) = super::dkim::duplicate(&config.dkim) {
        return Err(problem("[[dkim]]", message));
    }
    let routes_seal = config.routes.iter().any(|route| route.arc_seal);
    match config.arc.problem(&config.dkim, routes_seal) {
        Some(message) => Err(problem("[arc]", message)),
        None => Ok(()),
    }
}

/// The hostname and the listeners: valid, and no two on one address.
fn listeners(config: &Config, problem: &Locate) -> Result<(), Problem> {
    if config.hostname.trim().is_empty() || config.hostname.contains(char::is_whitespace) {
        return Err(problem(
            "hostname",
            format!("invalid hostname `{}`", config.hostname),
        ));
    }
    if config.listeners.is_empty() {
        return Err(problem(
            "listener",
            "at least one [[listener]] is needed".to_string(),
        ));
    }
    let mut addresses = HashSet::new();
    for listener in &config.listeners {
        let span = listener.address.span();
        let address: SocketAddr = listener.address.get_ref().parse().map_err(|_| Problem {
            offset: span.start,
            message: format!(
                "listener `{}`: invalid address `{}` (expected ip:port)",
                listener.name,
                listener.address.get_ref()
            ),
        })?;
        if !addresses.insert(address) {
            return Err(Problem {
                offset: span.start,
                message: format!("two listeners on {address}"),
            });
        }
    }
    Ok(())
}

/// Session, retry and delivery limits within what the RFCs and the code need.
fn limits(config: &Config, problem: &Locate) -> Result<(), Problem> {
    if config.kv.purge_batch == 0 || config.kv.purge_interval.is_zero() {
        return Err(problem(
            "[kv]",
            "kv: purge_batch and purge_interval must be above 0".to_string(),
        ));
    }
    let limits = &config.smtp;
    if let Err(message) = limits.memory_limit_bytes(Some(1 << 30)) {
        return Err(problem("memory_limit", message));
    }
    if limits.max_recipients == 0 || limits.max_sessions == 0 || limits.max_sessions_per_ip == 0 {
        return Err(problem(
            "[smtp]",
            "smtp limits must be at least 1".to_string(),
        ));
    }
    if !(1..=32).contains(&limits.client_prefix_v4) {
        return Err(problem(
            "client_prefix_v4",
            format!(
                "client_prefix_v4 must be from 1 to 32, not {}",
                limits.client_prefix_v4
            ),
        ));
    }
    if !(1..=128).contains(&limits.client_prefix_v6) {
        return Err(problem(
            "client_prefix_v6",
            format!(
                "client_prefix_v6 must be from 1 to 128, not {}",
                limits.client_prefix_v6
            ),
        ));
    }
    if limits.max_command_line < 512 {
        return Err(problem(
            "max_command_line",
            "max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)".to_string(),
        ));
    }
    if limits.max_data_line < 998 {
        return Err(problem(
            "max_data_line",
            "max_data_line must be at least 998 (RFC 5321 4.5.3.1.6)".to_string(),
        ));
    }
    if config.retry.intervals.is_empty() || config.retry.intervals.iter().any(|i| i.is_zero()) {
        return Err(problem(
            "intervals",
            "retry.intervals needs at least one non-zero wait".to_string(),
        ));
    }
    let delivery = &config.delivery;
    if delivery.max_connections == 0
        || delivery.max_connections_per_destination == 0
        || delivery.max_messages_per_connection == 0
    {
        return Err(problem(
            "[delivery]",
            "delivery limits must be at least 1".to_string(),
        ));
    }
    Ok(())
}

/// Files the server will open: they exist and are what they should be.
/// `[admin]`: a token file with `listen`, and loopback unless remote use is allowed.
fn admin(config: &Config, problem: &Locate) -> Result<(), Problem> {
    let admin = &config.admin;
    let Some(listen) = admin.listen else {
        return Ok(());
    };
    if !listen.ip().is_loopback() && !admin.allow_remote {
        return Err(problem(
            "listen",
            format!(
                "admin.listen {listen} is not a loopback address: the API speaks plain HTTP;                  set allow_remote = true to serve it there anyway (behind a TLS proxy)"
            ),
        ));
    }
    match &admin.tokens_file {
        None => Err(problem(
            "listen",
            "admin.listen needs admin.tokens_file: every request carries a token".to_string(),
        )),
        Some(path) if !path.is_file() => Err(problem(
            "tokens_file",
            format!(
                "admin.tokens_file {} is not a readable file",
                path.display()
            ),
        )),
        Some(_) => Ok(()),
    }
}

fn files(config: &Config, problem: &Locate) -> Result<(), Problem> {
    if let Some(tls) = &config.tls {
        let sni = tls.sni.iter().flat_map(|extra| {
            [
                ("certificate", &extra.certificate),
                ("private_key", &extra.private_key),
            ]
        });
        for (key, path) in [
            ("certificate", &tls.certificate),
            ("private_key", &tls.private_key),
        ]
        .into_iter()
        .chain(sni)
        {
            if !path.is_file() {
                return Err(problem(
                    key,
                    format!("tls.{key}: no such file `{}`", path.display()),
                ));
            }
        }
    }
    if let Some(ca_file) = &config.delivery.ca_file {
        if !ca_file.is_file() {
            return Err(problem(
                "ca_file",
                format!("delivery.ca_file: no such file `{}`", ca_file.display()),
            ));
        }
    }
    if let Some(root) = &config.mailboxes.root {
        if root.exists() && !root.is_dir() {
            return Err(problem(
                "root",
                format!("mailboxes.root: `{}` is not a directory", root.display()),
            ));
        }
    }
    if let Some(users) = &config.submission.users_file {
        if config.tls.is_none() {
            return Err(problem(
                "users_file",
                "submission.users_file: SMTP AUTH needs [tls] (passwords are only taken over TLS)"
                    .to_string(),
            ));
        }
        crate::accounts::Accounts::load(users)
            .map_err(|error| problem("users_file", format!("submission.users_file: {error}")))?;
    }
    Ok(())
}

/// SMTP AUTH settings, and submission listeners that can use them.
fn submission(config: &Config, problem: &Locate) -> Result<(), Problem> {
    let failures = &config.submission.auth_failures;
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    if failures.limit > 0
        && (failures.window.is_zero()
            || failures.ban.is_zero()
            || failures.window > YEAR
            || failures.ban > YEAR
            || failures.delay > std::time::Duration::from_secs(60))
    {
        return Err(problem(
            "[submission.auth_failures]",
            "submission.auth_failures: window and ban must be above 0 and at most a year, delay \
             at most 1 minute"
                .to_string(),
        ));
    }
    if let Some(listener) = config
        .listeners
        .iter()
        .find(|listener| listener.role.implicit_tls() && config.tls.is_none())
    {
        return Err(Problem {
            offset: listener.address.span().start,
            message: format!(
                "listener `{}` has role `submissions` (implicit TLS), which needs a certificate: \
                 set [tls]",
                listener.name
            ),
        });
    }
    let submission = config
        .listeners
        .iter()
        .find(|listener| listener.role.is_submission());
    if let Some(listener) = submission {
        if config.submission.require_auth && config.submission.users_file.is_none() {
            return Err(Problem {
                offset: listener.address.span().start,
                message: format!(
                    "listener `{}` is a submission listener, which needs AUTH: set [submission] \
                     users_file (or require_auth = false to rely on relay.networks alone)",
                    listener.name
                ),
            });
        }
    }
    Ok(())
}

/// Routes, plugin names and limits, relay domains.
fn names(config: &Config, problem: &Locate) -> Result<(), Problem> {
    let mut shaped = HashSet::new();
    for rule in &config.shaping {
        if let Some(message) = rule.problem() {
            return Err(problem("[[shaping]]", message));
        }
        if !shaped.insert(rule.name().to_ascii_lowercase()) {
            return Err(problem(
                "[[shaping]]",
                format!("two shaping rules for `{}`", rule.name()),
            ));
        }
    }
    for route in &config.routes {
        if route.smarthost.is_some() == route.lmtp.is_some() {
            return Err(problem(
                "domain",
                format!(
                    "route `{}`: give one of smarthost (SMTP) and lmtp",
                    route.domain
                ),
            ));
        }
        let domain = route.domain.trim_start_matches("*.");
        if domain.is_empty() || domain.contains(['@', ' ', '*']) {
            return Err(problem(
                "domain",
                format!("route: invalid domain `{}`", route.domain),
            ));
        }
    }
    if !(0.0..=100.0).contains(&config.record.percent) {
        return Err(problem(
            "percent",
            format!(
                "record: percent must be from 0 to 100, not {}",
                config.record.percent
            ),
        ));
    }
    let mut names = HashSet::new();
    for plugin in &config.plugins {
        if plugin.name.is_empty() || !names.insert(plugin.name.as_str()) {
            return Err(problem(
                "name",
                format!(
                    "plugin names must be unique and not empty: `{}`",
                    plugin.name
                ),
            ));
        }
        if plugin.time_limit.is_zero() || plugin.memory_limit < 1024 * 1024 {
            return Err(problem(
                "time_limit",
                format!(
                    "plugin `{}`: time_limit must be above 0 and memory_limit at least 1 MiB",
                    plugin.name
                ),
            ));
        }
        plugin
            .pinned_digest()
            .map_err(|message| problem("sha256", message))?;
        plugin
            .check_candidates()
            .map_err(|message| problem("canary", message))?;
        if plugin.breaker.failures > 0
            && (plugin.breaker.window.is_zero() || plugin.breaker.cooldown.is_zero())
        {
            return Err(problem(
                "breaker",
                format!(
                    "plugin `{}`: breaker window and cooldown must be above 0",
                    plugin.name
                ),
            ));
        }
    }
    for domain in &config.relay.domains {
        if domain.is_empty() || domain.contains(['@', ' ']) {
            return Err(problem(
                "domains",
                format!("relay.domains: invalid domain `{domain}`"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn scanners_are_named_once_and_on_listeners_that_exist() {
        let scanner = |name: &str, listeners: &str| {
            format!("[[scanner]]\nname = \"{name}\"\nkind = \"clamav\"\naddress = \"127.0.0.1:3310\"\nlisteners = [{listeners}]\n")
        };
        let twice = format!("{}{}", scanner("av", ""), scanner("av", ""));
        let message = Config::parse(&twice, "c.toml")
            .expect_err("twice")
            .to_string();
        assert!(message.contains("two scanners named `av`"), "{message}");
        let message = Config::parse(&scanner("av", "\"mx\""), "c.toml")
            .expect_err("listener")
            .to_string();
        assert!(message.contains("no listener is named `mx`"), "{message}");
        let message = Config::parse(&scanner("a v", ""), "c.toml")
            .expect_err("name")
            .to_string();
        assert!(message.contains("scanner name `a v`"), "{message}");
        Config::parse(&scanner("av", "\"inbound\""), "c.toml").expect("valid");
    }

    #[test]
    fn duplicate_listener_names_the_second() {
        let text = "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:25\"\n\n[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:25\"\n";
        let message = Config::parse(text, "c.toml")
            .expect_err("duplicate")
            .to_string();
        assert!(message.starts_with("c.toml:7:"), "{message}");
        assert!(
            message.contains("two listeners on 127.0.0.1:25"),
            "{message}"
        );
    }

    #[test]
    fn bad_listener_address() {
        let text = "[[listener]]\naddress = \"localhost\"\n";
        let message = Config::parse(text, "c.toml")
            .expect_err("address")
            .to_string();
        assert!(
            message.starts_with("c.toml:2:11: listener `inbound`: invalid address"),
            "{message}"
        );
    }

    #[test]
    fn missing_certificate_file() {
        let text = "[tls]\ncertificate = \"/nonexistent/cert.pem\"\nprivate_key = \"/nonexistent/key.pem\"\n";
        let message = Config::parse(text, "c.toml").expect_err("cert").to_string();
        assert!(
            message.starts_with("c.toml:2:1: tls.certificate: no such file"),
            "{message}"
        );
    }
}
