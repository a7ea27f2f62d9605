//! The changes the data hooks ask for, as the host applies them to a message: header fields
//! added, removed or replaced, recipients added or removed. The plugin layer turns the WIT's edits
//! into these; nothing here knows about plugins.

use super::header;
use super::text::{is_header_name, is_header_value};

/// A header field as an edit gives it: the name, and the value unfolded, without CRLF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// One change to a message or its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Add a field at the top of the header section.
    AddHeader(Header),
    /// Remove every field of this name (case-insensitive).
    RemoveHeader(String),
    /// Remove every field of this name and add this one.
    ReplaceHeader(Header),
    AddRecipient(String),
    RemoveRecipient(String),
}

/// An edit on one line, as traces and recordings show it (control characters made spaces).
impl std::fmt::Display for Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |text: &str| super::text::one_line(text).into_owned();
        match self {
            Edit::AddHeader(header) => {
                write!(
                    f,
                    "add-header {}: {}",
                    line(&header.name),
                    line(&header.value)
                )
            }
            Edit::RemoveHeader(name) => write!(f, "remove-header {}", line(name)),
            Edit::ReplaceHeader(header) => write!(
                f,
                "replace-header {}: {}",
                line(&header.name),
                line(&header.value)
            ),
            Edit::AddRecipient(address) => write!(f, "add-recipient {}", line(address)),
            Edit::RemoveRecipient(address) => write!(f, "remove-recipient {}", line(address)),
        }
    }
}

/// Applies the data hooks' header edits in chain order: additions go to the top of the header
/// section (in the order made), removals drop every field of that name, replacements do both.
/// Edits with a malformed name or a value holding a control character (CR, LF, NUL...) are
/// ignored: no plugin can start a header field of its own or cut one short.
pub fn apply_to_headers(content: &[u8], edits: &[Edit]) -> Vec<u8> {
    let touches_headers = edits.iter().any(|edit| {
        matches!(
            edit,
            Edit::AddHeader(_) | Edit::RemoveHeader(_) | Edit::ReplaceHeader(_)
        )
    });
    if !touches_headers {
        return content.to_vec();
    }
    let (fields, header_end) = header::fields(content);
    // (lower-case name, raw field, added by an edit)
    let mut fields: Vec<(String, Vec<u8>, bool)> = fields
        .into_iter()
        .map(|(name, raw)| (name, raw, false))
        .collect();
    for edit in edits {
        let (remove, add) = match edit {
            Edit::AddHeader(header) => (None, Some(header)),
            Edit::RemoveHeader(name) => (Some(name.to_ascii_lowercase()), None),
            Edit::ReplaceHeader(header) => (Some(header.name.to_ascii_lowercase()), Some(header)),
            Edit::AddRecipient(_) | Edit::RemoveRecipient(_) => continue,
        };
        if let Some(header) = add {
            if !is_header_name(&header.name) || !is_header_value(&header.value) {
                tracing::warn!(header = %super::text::one_line(&header.name), "plugin header edit ignored: invalid name or value");
                continue;
            }
        }
        if let Some(name) = remove {
            fields.retain(|(field, _, _)| *field != name);
        }
        if let Some(header) = add {
            let raw = format!("{}: {}\r\n", header.name, header.value).into_bytes();
            let top = fields.iter().take_while(|(_, _, added)| *added).count();
            fields.insert(top, (header.name.to_ascii_lowercase(), raw, true));
        }
    }
    let mut edited = Vec::with_capacity(content.len() + 256);
    for (_, raw, _) in fields {
        edited.extend_from_slice(&raw);
    }
    edited.extend_from_slice(&content[header_end..]);
    edited
}

/// Applies the data hooks' recipient edits in chain order.
pub fn apply_to_recipients(recipients: &mut Vec<String>, edits: &[Edit]) {
    for edit in edits {
        match edit {
            Edit::AddRecipient(address) => {
                let valid = super::address::parse_path_argument(&format!("<{address}>"))
                    .map(|parsed| parsed.mailbox.is_some())
                    .unwrap_or(false);
                if valid && !recipients.contains(address) {
                    recipients.push(address.clone());
                } else if !valid {
                    tracing::warn!(recipient = %super::text::one_line(address), "plugin added an invalid recipient; ignored");
                }
            }
            Edit::RemoveRecipient(address) => {
                recipients.retain(|recipient| !recipient.eq_ignore_ascii_case(address))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_edits_in_chain_order() {
        let header = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        let content = b"Received: x\r\nSubject: old\r\nX-Spam: yes\r\n\tcontinued\r\n\r\nbody\r\n";
        let edits = vec![
            Edit::AddHeader(header("X-First", "1")),
            Edit::RemoveHeader("x-spam".into()),
            Edit::ReplaceHeader(header("Subject", "new")),
            Edit::AddHeader(header("Bad", "a\r\nInjected: yes")),
        ];
        let edited = String::from_utf8(apply_to_headers(content, &edits)).expect("utf8");
        assert_eq!(
            edited,
            "X-First: 1\r\nSubject: new\r\nReceived: x\r\n\r\nbody\r\n"
        );
    }

    /// No header edit can start a field of its own or cut one with NUL; no added recipient can
    /// carry a line break.
    #[test]
    fn edits_with_control_characters_are_ignored() {
        let header = |name: &str, value: &str| {
            Edit::AddHeader(Header {
                name: name.into(),
                value: value.into(),
            })
        };
        let content = b"Subject: s\r\n\r\nbody\r\n";
        let edits = vec![
            header("X-Nul", "a\0b"),
            header("X-Lf", "a\nInjected: yes"),
            header("X-Cr", "a\rb"),
            header("X-Esc", "\x1b[2J"),
            header("X\0Name", "v"),
            header("X-Name\r\nInjected", "v"),
            Edit::ReplaceHeader(Header {
                name: "Subject".into(),
                value: "new\r\nBcc: x@y.test".into(),
            }),
            header("X-Tab", "a\tb"),
        ];
        let edited = String::from_utf8(apply_to_headers(content, &edits)).expect("utf8");
        // A bad replacement is ignored whole: the field it would replace stays.
        assert_eq!(edited, "X-Tab: a\tb\r\nSubject: s\r\n\r\nbody\r\n");
        let mut recipients = vec!["a@b.test".to_string()];
        apply_to_recipients(
            &mut recipients,
            &[
                Edit::AddRecipient("c@d.test>\r\nRCPT TO:<e@f.test".into()),
                Edit::AddRecipient("g\0@h.test".into()),
                Edit::AddRecipient("i@j.test".into()),
            ],
        );
        assert_eq!(recipients, ["a@b.test", "i@j.test"]);
    }
}
