//! Text that came from outside (a plugin, a remote server) on its way into a reply, a header, a
//! log line or a DSN: one rule for what it may hold, so no such text can end a line early and
//! add lines of its own.

use std::borrow::Cow;

/// `text` on one line: every control character (CR, LF, NUL, ESC...) becomes a space.
pub fn one_line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

/// Whether `value` may be the value of a header field as given (unfolded): no control
/// characters but HTAB, so no CR or LF can start a field of its own and no NUL can cut one.
pub fn is_header_value(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

/// Whether `name` may be a header field name (RFC 5322 2.2: printable ASCII but colon).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_spaces() {
        assert_eq!(one_line("plain text"), "plain text");
        assert_eq!(
            one_line("no\r\n250 2.1.5 forged\0\x1b"),
            "no  250 2.1.5 forged  "
        );
    }

    #[test]
    fn header_rules() {
        assert!(is_header_value("a\tb ü"));
        for bad in ["a\r\nInjected: yes", "a\nb", "a\rb", "a\0b", "\x7f"] {
            assert!(!is_header_value(bad), "{bad:?}");
        }
        assert!(is_header_name("X-Spam-Score"));
        for bad in ["", "X Spam", "X:Spam", "X\0", "X\r\nY", "Ü"] {
            assert!(!is_header_name(bad), "{bad:?}");
        }
    }
}
