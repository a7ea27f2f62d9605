//! The DSN extension's parameters (RFC 3461): `RET` and `ENVID` on MAIL, `NOTIFY` and `ORCPT`
//! on RCPT, as parsed from a command, kept in the queue and passed on to the next hop.

use std::fmt;

/// When the sender wants to hear about a recipient (RCPT's NOTIFY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify(u8);

impl Notify {
    const NEVER: u8 = 1;
    const SUCCESS: u8 = 2;
    const FAILURE: u8 = 4;
    const DELAY: u8 = 8;

    /// NOTIFY was not given: failures are reported (RFC 3461 4.1 leaves DELAY to the
    /// implementation; delay reports go only to those who ask).
    pub fn unspecified() -> Notify {
        Notify(0)
    }

    /// `NEVER`, or a comma-separated list of `SUCCESS`, `FAILURE` and `DELAY` (any case).
    pub fn parse(value: &str) -> Result<Notify, &'static str> {
        let mut bits = 0;
        for word in value.split(',') {
            bits |= match word.to_ascii_uppercase().as_str() {
                "NEVER" => Notify::NEVER,
                "SUCCESS" => Notify::SUCCESS,
                "FAILURE" => Notify::FAILURE,
                "DELAY" => Notify::DELAY,
                _ => return Err("NOTIFY takes NEVER or a list of SUCCESS, FAILURE and DELAY"),
            };
        }
        if bits & Notify::NEVER != 0 && bits != Notify::NEVER {
            return Err("NOTIFY=NEVER cannot be combined with other values");
        }
        Ok(Notify(bits))
    }

    pub fn is_specified(self) -> bool {
        self.0 != 0
    }

    /// A failure DSN is sent (NOTIFY absent, or naming FAILURE).
    pub fn on_failure(self) -> bool {
        self.0 == 0 || self.0 & Notify::FAILURE != 0
    }

    pub fn on_success(self) -> bool {
        self.0 & Notify::SUCCESS != 0
    }

    pub fn on_delay(self) -> bool {
        self.0 & Notify::DELAY != 0
    }

    /// As stored in the queue (0: unspecified).
    pub fn bits(self) -> i64 {
        i64::from(self.0)
    }

    pub fn from_bits(bits: i64) -> Notify {
        Notify((bits & 0x0f) as u8)
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 & Notify::NEVER != 0 {
            return f.write_str("NEVER");
        }
        let words: Vec<&str> = [
            (Notify::SUCCESS, "SUCCESS"),
            (Notify::FAILURE, "FAILURE"),
            (Notify::DELAY, "DELAY"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.0 & bit != 0)
        .map(|(_, word)| word)
        .collect();
        f.write_str(&words.join(","))
    }
}

/// How much of the message a failure report returns (MAIL's RET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

impl Ret {
    pub fn parse(value: &str) -> Result<Ret, &'static str> {
        match value.to_ascii_uppercase().as_str() {
            "FULL" => Ok(Ret::Full),
            "HDRS" => Ok(Ret::Headers),
            _ => Err("RET takes FULL or HDRS"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Headers => "HDRS",
        }
    }
}

/// What the sender asked of the whole message: MAIL's RET and ENVID (RFC 3461) and
/// REQUIRETLS (RFC 8689).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageDsn {
    pub ret: Option<Ret>,
    /// As given, in xtext.
    pub envid: Option<String>,
    /// Never to be sent without verified TLS.
    pub requiretls: bool,
}

/// What the sender asked for one recipient: RCPT's NOTIFY and ORCPT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientDsn {
    pub notify: Notify,
    /// `addr-type;address`, the address in xtext, as given.
    pub orcpt: Option<String>,
}

/// Whether `value` is xtext (RFC 3461 4): printable ASCII but `+` and `=`, with `+XX` hex
/// escapes for the rest.
pub fn is_xtext(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => {
                let hex = bytes.get(at + 1..at + 3);
                let upper_hex = |b: &u8| b.is_ascii_digit() || (b'A'..=b'F').contains(b);
                if !hex.is_some_and(|hex| hex.iter().all(upper_hex)) {
                    return false;
                }
                at += 3;
            }
            b'!'..=b'~' if bytes[at] != b'=' => at += 1,
            _ => return false,
        }
    }
    true
}

/// The text an xtext stands for (`+XX` escapes decoded); other bytes are kept. Non-printable
/// results are replaced, since the text goes into a DSN's header-like fields.
pub fn xtext_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'+')
            .then(|| value.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(if (0x21..0x7f).contains(&byte) {
                    byte
                } else {
                    b'?'
                });
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// ENVID: xtext of at most 100 characters (RFC 3461 4.4).
pub fn check_envid(value: &str) -> Result<(), &'static str> {
    if value.is_empty() || value.len() > 100 || !is_xtext(value) {
        return Err("ENVID must be 1 to 100 characters of xtext");
    }
    Ok(())
}

/// ORCPT: `addr-type;xtext` (RFC 3461 4.2), at most 500 characters.
pub fn check_orcpt(value: &str) -> Result<(), &'static str> {
    let Some((kind, address)) = value.split_once(';') else {
        return Err("ORCPT must be addr-type;address");
    };
    let atom = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
    };
    if value.len() > 500 || !atom(kind) || address.is_empty() || !is_xtext(address) {
        return Err("ORCPT must be addr-type;address in xtext, at most 500 characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values() {
        let notify = Notify::parse("success,Delay").expect("parse");
        assert!(notify.on_success() && notify.on_delay() && !notify.on_failure());
        assert_eq!(notify.to_string(), "SUCCESS,DELAY");
        assert!(!Notify::parse("NEVER").expect("never").on_failure());
        assert!(Notify::unspecified().on_failure());
        assert!(Notify::parse("NEVER,FAILURE").is_err());
        assert!(Notify::parse("SOMETIMES").is_err());
        assert!(Notify::parse("").is_err());
        let round = Notify::from_bits(Notify::parse("FAILURE").expect("f").bits());
        assert_eq!(round.to_string(), "FAILURE");
    }

    #[test]
    fn xtext_and_its_parameters() {
        assert!(is_xtext("abc+2Bdef"));
        assert!(!is_xtext("a=b"));
        assert!(!is_xtext("a+2b"));
        assert!(!is_xtext("a b"));
        assert_eq!(xtext_decode("b+40c.test+0D"), "b@c.test?");
        assert!(check_envid("QQ314159").is_ok());
        assert!(check_envid(&"x".repeat(101)).is_err());
        assert!(check_orcpt("rfc822;bob@example.test").is_ok());
        assert!(check_orcpt("rfc822;b+40c").is_ok());
        assert!(check_orcpt("bob@example.test").is_err());
        assert!(check_orcpt("rfc822;").is_err());
        assert_eq!(Ret::parse("hdrs"), Ok(Ret::Headers));
        assert!(Ret::parse("ALL").is_err());
    }
}
