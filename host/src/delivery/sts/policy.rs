//! MTA-STS (RFC 8461) texts: the `_mta-sts` TXT record and the policy file, and which MX hosts a
//! policy allows.

use std::fmt;

/// What a policy asks of senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual; report what enforcing would have refused.
    Testing,
    /// No policy (a domain withdrawing one).
    None,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        })
    }
}

/// A domain's policy file, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns: `mail.example.com`, or `*.example.com` for one label in front.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached (at most a year, RFC 8461 3.2).
    pub max_age: u64,
    /// The file as fetched, for TLS reports' `policy-string`.
    pub text: String,
}

/// The longest `max_age` RFC 8461 allows: 31,557,600 seconds (about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;

impl Policy {
    /// Parses a policy file (RFC 8461 3.2): `key: value` lines, CRLF or LF; unknown keys are
    /// ignored; `version`, `mode` and `max_age` are required, and `mx` unless the mode is none.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut version = None;
        let mut mode = None;
        let mut mx = Vec::new();
        let mut max_age = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("not a `key: value` line: `{line}`"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode `{other}`")),
                    })
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                "max_age" => {
                    let age: u64 = value
                        .parse()
                        .map_err(|_| format!("max_age `{value}` is not a number"))?;
                    max_age = Some(age.min(MAX_AGE_LIMIT));
                }
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".to_string());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mx.is_empty() && mode != Mode::None {
            return Err("no mx".to_string());
        }
        Ok(Policy {
            mode,
            mx,
            max_age,
            text: text.to_string(),
        })
    }

    /// Whether the policy allows MX host `host` (RFC 8461 4.1): an exact name, or a wildcard
    /// standing for exactly one label.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// The policy id of a `_mta-sts` TXT record set (RFC 8461 3.1): the `id` of the one record that
/// starts with `v=STSv1`. `None` when there is no such record, or more than one (then there is
/// no policy either).
pub fn record_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|record| record.trim_start().starts_with("v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    record.split(';').find_map(|field| {
        let (key, value) = field.split_once('=')?;
        let value = value.trim();
        let valid = !value.is_empty()
            && value.len() <= 32
            && value.bytes().all(|b| b.is_ascii_alphanumeric());
        (key.trim() == "id" && valid).then(|| value.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files() {
        let policy = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.net\r\nmax_age: 86400\r\n",
        )
        .expect("policy");
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 86400);
        assert!(policy.allows("MAIL.example.com."));
        assert!(policy.allows("mx1.example.net"));
        assert!(!policy.allows("a.b.example.net"));
        assert!(!policy.allows("example.net"));
        assert!(!policy.allows("evil.example.com"));
        assert!(Policy::parse("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n").is_err());
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1\n").is_err());
        assert!(Policy::parse("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n").is_err());
        let long = Policy::parse("version: STSv1\nmode: none\nmax_age: 99999999999\n").expect("ok");
        assert_eq!(long.max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn txt_records() {
        let id = |records: &[&str]| {
            record_id(&records.iter().map(|r| r.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            id(&["v=STSv1; id=20160831085700Z;"]),
            Some("20160831085700Z".into())
        );
        assert_eq!(id(&["v=spf1 -all", "v=STSv1; id=abc"]), Some("abc".into()));
        assert_eq!(id(&["v=STSv1; id=a", "v=STSv1; id=b"]), None);
        assert_eq!(id(&["v=STSv1; id=bad-id"]), None);
        assert_eq!(id(&[]), None);
    }
}
