//! The accounts SMTP AUTH accepts: a users file of `name:hash` lines, where the hash is an
//! argon2 PHC string as `switchyard auth hash` prints it (the format Dovecot and most password
//! tools write too). Passwords are checked on a few threads of their own ([`checker`]), because a
//! good password hash is slow on purpose and must not stall the sessions sharing a worker
//! thread, and its memory must stay bounded however many clients try at once.

pub mod checker;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("cannot read users file `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The accounts of the users file as last loaded: swapped whole by a reload, so a check sees
/// one file's accounts, old or new.
pub type SharedAccounts = Arc<arc_swap::ArcSwap<Accounts>>;

/// Name to PHC hash string, as read from the users file.
#[derive(Debug, Default)]
pub struct Accounts {
    users: HashMap<String, String>,
}

impl Accounts {
    pub fn load(path: &Path) -> Result<Accounts, AccountsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccountsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Accounts::parse(&text, &path.display().to_string())
    }

    /// Parses users-file text; `origin` names it in errors. Blank lines and lines starting
    /// with `#` are ignored.
    pub fn parse(text: &str, origin: &str) -> Result<Accounts, AccountsError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let problem = |message: String| AccountsError::Line {
                path: origin.to_string(),
                line: index + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, hash)) = line.split_once(':') else {
                return Err(problem("expected `name:hash`".to_string()));
            };
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(problem(format!("invalid user name `{name}`")));
            }
            let parsed = PasswordHash::new(hash).map_err(|error| {
                problem(format!("user `{name}`: not a PHC hash string ({error})"))
            })?;
            if !matches!(
                parsed.algorithm.as_str(),
                "argon2id" | "argon2i" | "argon2d"
            ) {
                return Err(problem(format!(
                    "user `{name}`: unsupported hash algorithm `{}` (argon2id expected; \
                     `switchyard auth hash` makes one)",
                    parsed.algorithm
                )));
            }
            let memory = argon2::Params::try_from(&parsed)
                .map_err(|error| {
                    problem(format!("user `{name}`: bad argon2 parameters ({error})"))
                })?
                .m_cost();
            if memory > checker::MAX_MEMORY_KIB {
                return Err(problem(format!(
                    "user `{name}`: argon2 memory cost m={memory} KiB is above the {} KiB a check may use",
                    checker::MAX_MEMORY_KIB
                )));
            }
            if users.insert(name.to_string(), hash.to_string()).is_some() {
                return Err(problem(format!("user `{name}` is listed twice")));
            }
        }
        Ok(Accounts { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `name` exists and `password` is its password. An unknown name costs as much
    /// as a wrong password, so timing does not tell which names exist.
    pub async fn verify(&self, name: &str, password: &str) -> bool {
        let stored = self.users.get(name);
        let hash = stored
            .map(String::as_str)
            .unwrap_or_else(|| unknown_user_hash());
        let matches = checker::check(hash.to_string(), password.to_string()).await;
        matches && stored.is_some()
    }
}

/// A hash no password matches in practice, checked for names that do not exist.
fn unknown_user_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let mut random = [0u8; 32];
        random.iter_mut().for_each(|byte| *byte = fastrand::u8(..));
        hash_password(&String::from_utf8_lossy(&random)).unwrap_or_default()
    })
}

/// An argon2id PHC string for `password`, with a random salt and the crate's default costs
/// (OWASP's recommended minimum: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, AccountsError> {
    let mut salt = [0u8; 16];
    getrandom(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AccountsError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AccountsError::Hash(e.to_string()))
}

/// Salt bytes from the kernel's random source.
fn getrandom(buffer: &mut [u8]) -> Result<(), AccountsError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(buffer))
        .map_err(|e| AccountsError::Hash(format!("no random source: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hashed_password_verifies_and_others_do_not() {
        let hash = hash_password("correct horse").expect("hash");
        let text = format!("# users\n\nalice@example.test:{hash}\n");
        let accounts = Arc::new(Accounts::parse(&text, "users").expect("parse"));
        assert_eq!(accounts.len(), 1);
        assert!(accounts.verify("alice@example.test", "correct horse").await);
        assert!(!accounts.verify("alice@example.test", "wrong").await);
        assert!(!accounts.verify("bob@example.test", "correct horse").await);
    }

    #[test]
    fn bad_lines_are_named() {
        let error = Accounts::parse("alice\n", "users").expect_err("no colon");
        assert_eq!(error.to_string(), "users:1: expected `name:hash`");
        let error = Accounts::parse("\nalice:secret\n", "users").expect_err("plain text");
        assert!(error
            .to_string()
            .starts_with("users:2: user `alice`: not a PHC hash string"));
        let sha = "bob:$6$rounds=5000$salt$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let error = Accounts::parse(sha, "users").expect_err("sha-crypt");
        assert!(error.to_string().contains("users:1:"), "{error}");
        let hash = hash_password("x").expect("hash");
        let twice = format!("carol:{hash}\ncarol:{hash}\n");
        let error = Accounts::parse(&twice, "users").expect_err("duplicate");
        assert_eq!(error.to_string(), "users:2: user `carol` is listed twice");
    }
}
