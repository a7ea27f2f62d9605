//! Passwords for next hops that want SMTP AUTH (a provider's smarthost), from
//! `[delivery] credentials_file`, in the manner of Postfix's `smtp_sasl_password_maps`: keyed by
//! the host a route or a plugin names, so a plugin can choose a relay but never learns its
//! password.
//!
//! One line per host: `HOST[:PORT] USERNAME:PASSWORD`; `#` starts a comment. A line with a port
//! applies to that port only, one without to every port of the host.

use std::collections::HashMap;
use std::path::Path;

/// What AUTH PLAIN sends.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

/// The credentials file as last loaded, swapped whole by a reload.
pub type SharedCredentials = std::sync::Arc<arc_swap::ArcSwap<CredentialsFile>>;

/// Every host's credentials.
#[derive(Debug, Default)]
pub struct CredentialsFile {
    /// `host` or `host:port`, host in lower case.
    by_host: HashMap<String, Credentials>,
}

impl CredentialsFile {
    pub fn load(path: &Path) -> Result<CredentialsFile, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        CredentialsFile::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<CredentialsFile, CredentialsError> {
        let mut by_host = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let invalid = |message: &str| CredentialsError::Invalid {
                path: origin.to_string(),
                line: number + 1,
                message: message.to_string(),
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (host, secret) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| invalid("expected `HOST[:PORT] USERNAME:PASSWORD`"))?;
            let (username, password) = secret
                .trim()
                .split_once(':')
                .ok_or_else(|| invalid("expected `USERNAME:PASSWORD` after the host"))?;
            if username.is_empty() || password.is_empty() {
                return Err(invalid("empty username or password"));
            }
            let host: crate::config::HostPort = host
                .parse()
                .map_err(|_| invalid(&format!("`{host}` is not a host or host:port")))?;
            let key = key(&host.host, host.port);
            let credentials = Credentials {
                username: username.to_string(),
                password: password.to_string(),
            };
            if by_host.insert(key.clone(), credentials).is_some() {
                return Err(invalid(&format!("{key} is listed twice")));
            }
        }
        Ok(CredentialsFile { by_host })
    }

    /// The credentials for `host` on `port`: the line for that port, else the host's line.
    pub fn get(&self, host: &str, port: u16) -> Option<&Credentials> {
        self.by_host
            .get(&key(host, Some(port)))
            .or_else(|| self.by_host.get(&key(host, None)))
    }

    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

fn key(host: &str, port: Option<u16>) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_by_host_and_port() {
        let file = CredentialsFile::parse(
            "# relays\nsmtp.provider.test:587 user@x.test:pa:ss\nrelay.test  bob:pw\n",
            "creds",
        )
        .expect("parse");
        let exact = file.get("SMTP.provider.test.", 587).expect("port line");
        assert_eq!(
            (exact.username.as_str(), exact.password.as_str()),
            ("user@x.test", "pa:ss")
        );
        assert!(file.get("smtp.provider.test", 25).is_none());
        assert_eq!(
            file.get("relay.test", 2525).map(|c| c.username.as_str()),
            Some("bob")
        );
        assert_eq!(
            format!("{:?}", file.get("relay.test", 25)),
            "Some(Credentials(bob, ****))"
        );
    }

    #[test]
    fn bad_lines_are_named() {
        let error = |text: &str| {
            CredentialsFile::parse(text, "creds")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            error("relay.test\n"),
            "creds:1: expected `HOST[:PORT] USERNAME:PASSWORD`"
        );
        assert_eq!(
            error("\nrelay.test bob\n"),
            "creds:2: expected `USERNAME:PASSWORD` after the host"
        );
        assert_eq!(
            error("relay.test :pw\n"),
            "creds:1: empty username or password"
        );
        assert_eq!(
            error("a.test u:p\na.test v:q\n"),
            "creds:2: a.test is listed twice"
        );
    }
}
