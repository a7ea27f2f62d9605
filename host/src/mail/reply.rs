//! SMTP replies: a three-digit code, an RFC 3463 enhanced status code and text.

use std::fmt;

/// One reply, possibly multi-line (one entry of `lines` per line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as "5.7.1"; empty when not applicable (greeting, EHLO).
    pub enhanced: String,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.to_string(),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code.
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply::new(code, "", text)
    }

    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            enhanced: String::new(),
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The reply as it goes on the wire, CRLF terminated. Control characters in the text (a
    /// CR or LF from a plugin or a remote server's reply) become spaces, so no text can end the
    /// reply early or add reply lines of its own.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (index, line) in self.lines.iter().enumerate() {
            let separator = if index == last { ' ' } else { '-' };
            out.push_str(&self.code.to_string());
            out.push(separator);
            if !self.enhanced.is_empty() {
                push_text(&mut out, &self.enhanced);
                out.push(' ');
            }
            push_text(&mut out, line);
            out.push_str("\r\n");
        }
        if self.lines.is_empty() {
            out.push_str(&format!("{}\r\n", self.code));
        }
        out
    }

    /// Parses the lines of a reply received from a server. `enhanced` is taken from the first
    /// line when `with_enhanced` (the server advertised ENHANCEDSTATUSCODES or the text looks
    /// like one). Control characters in the text (a bare CR, NUL, ESC) become spaces: the text
    /// goes into logs, the queue and DSN fields.
    pub fn parse_lines(code: u16, lines: Vec<String>) -> Reply {
        let lines: Vec<String> = lines
            .into_iter()
            .map(|line| super::text::one_line(&line).into_owned())
            .collect();
        let enhanced = lines
            .first()
            .and_then(|line| line.split_whitespace().next())
            .filter(|word| is_enhanced_code(word))
            .map(str::to_string)
            .unwrap_or_default();
        let lines = lines
            .into_iter()
            .map(|line| {
                if !enhanced.is_empty() {
                    line.strip_prefix(enhanced.as_str())
                        .map(|rest| rest.trim_start().to_string())
                        .unwrap_or(line)
                } else {
                    line
                }
            })
            .collect();
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// The text on one line, for logs and the queue's `last_reply`.
    pub fn one_line(&self) -> String {
        let text = self.lines.join(" ");
        if self.enhanced.is_empty() {
            format!("{} {}", self.code, text)
        } else {
            format!("{} {} {}", self.code, self.enhanced, text)
        }
    }
}

/// RFC 5321's reply text is printable US-ASCII (4.2, `textstring`): control characters become
/// spaces ([`super::text::one_line`]) and anything beyond ASCII (a client's own bytes echoed in
/// an error, a plugin's text) a `?`.
fn push_text(out: &mut String, text: &str) {
    out.extend(
        super::text::one_line(text)
            .chars()
            .map(|c| if c.is_ascii() { c } else { '?' }),
    );
}

/// An RFC 3463 enhanced status code: class.subject.detail.
pub fn is_enhanced_code(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..].iter().all(|part| {
            !part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit())
        })
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_on_the_wire_is_ascii() {
        let reply = Reply::new(501, "5.5.4", "Bad parameter syntax: Föö=1 \u{1F600}");
        assert_eq!(
            reply.to_wire(),
            "501 5.5.4 Bad parameter syntax: F??=1 ?\r\n"
        );
    }

    #[test]
    fn text_cannot_inject_reply_lines() {
        let reply = Reply::new(550, "5.7.1", "no\r\n250 2.0.0 Ok: queued as X");
        assert_eq!(
            reply.to_wire(),
            "550 5.7.1 no  250 2.0.0 Ok: queued as X\r\n"
        );
    }

    #[test]
    fn wire_format() {
        assert_eq!(Reply::new(250, "2.1.0", "Ok").to_wire(), "250 2.1.0 Ok\r\n");
        let ehlo = Reply::multiline(250, vec!["mx".into(), "PIPELINING".into()]);
        assert_eq!(ehlo.to_wire(), "250-mx\r\n250 PIPELINING\r\n");
    }

    #[test]
    fn parse_enhanced() {
        let reply = Reply::parse_lines(550, vec!["5.1.1 no such user".into()]);
        assert_eq!(reply.enhanced, "5.1.1");
        assert_eq!(reply.one_line(), "550 5.1.1 no such user");
        let plain = Reply::parse_lines(220, vec!["mx ESMTP".into()]);
        assert_eq!(plain.enhanced, "");
        // A remote server's bare CR or NUL never reaches a log line, the queue or a DSN field.
        let hostile = Reply::parse_lines(550, vec!["5.1.1 no\rBcc: x\0".into()]);
        assert_eq!(hostile.one_line(), "550 5.1.1 no Bcc: x ");
    }
}
