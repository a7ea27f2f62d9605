//! 8-bit content made 7-bit (RFC 6152 section 3, RFC 2045): for a next hop that does not offer
//! 8BITMIME, and before DKIM signing (RFC 6376 section 5.3 asks signers to sign what no hop will
//! need to convert). Each MIME leaf part whose body holds 8-bit bytes is re-encoded,
//! quoted-printable for `text/*` and base64 for anything else, and its `Content-Transfer-Encoding`
//! says so; a multipart's `8bit` label becomes `7bit`. Where that cannot be done (8-bit bytes in
//! a header, in a nested `message/rfc822`, or between the parts of a multipart) the caller must
//! refuse the hop: RFC 6152 leaves only a bounce with 5.6.3.

use std::borrow::Cow;

use mail_parser::{MessageParser, PartType};

/// Why a message cannot be made 7-bit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot convert the message to 7 bits: {0}")]
pub struct CannotConvert(pub &'static str);

/// `message` with only 7-bit bytes: itself when it has none to convert.
pub fn seven_bit(message: &[u8]) -> Result<Cow<'_, [u8]>, CannotConvert> {
    if message.is_ascii() {
        return Ok(Cow::Borrowed(message));
    }
    let parsed = MessageParser::default()
        .parse(message)
        .ok_or(CannotConvert("it does not parse as a message"))?;
    // (start, end, replacement), for non-overlapping ranges of `message`.
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for (index, part) in parsed.parts.iter().enumerate() {
        let header = &message[part.offset_header as usize..part.offset_body as usize];
        if !header.is_ascii() {
            return Err(CannotConvert("8-bit bytes in a header"));
        }
        let body = &message[part.offset_body as usize..part.offset_end as usize];
        match &part.body {
            PartType::Multipart(_) | PartType::Message(_) => {
                // Its content is its parts (converted on their own), so its label can only be
                // 7bit once they are; a nested message's 8-bit bytes are left, and refused below.
                if matches!(part.body, PartType::Multipart(_))
                    && transfer_encoding(header).is_some_and(|cte| cte != "7bit")
                {
                    edits.push((
                        part.offset_header as usize,
                        part.offset_body as usize,
                        relabelled(header, "7bit", None),
                    ));
                }
            }
            _ if body.is_ascii() => {}
            _ => {
                let text = matches!(part.body, PartType::Text(_) | PartType::Html(_));
                // Quoted-printable's soft line breaks can start a line with "--" (a boundary
                // to the reader) where the original had it mid-line; base64 never can.
                let quoted = text.then(|| quoted_printable::encode(body));
                let (label, encoded) = match quoted {
                    Some(quoted) if memchr::memmem::find(&quoted, b"\n--").is_none() => {
                        ("quoted-printable", quoted)
                    }
                    _ => ("base64", base64_lines(body)),
                };
                // A message without MIME headers gets them: its body is text, in UTF-8 or in a
                // charset nobody named (RFC 1428's unknown-8bit).
                let charset = (index == 0 && !has_field(header, "content-type")).then(|| {
                    if std::str::from_utf8(body).is_ok() {
                        "utf-8"
                    } else {
                        "unknown-8bit"
                    }
                });
                edits.push((
                    part.offset_header as usize,
                    part.offset_body as usize,
                    relabelled(header, label, charset),
                ));
                edits.push((part.offset_body as usize, part.offset_end as usize, encoded));
            }
        }
    }
    edits.sort_by_key(|(start, _, _)| *start);
    let mut converted = Vec::with_capacity(message.len() + message.len() / 2);
    let mut at = 0;
    for (start, end, replacement) in edits {
        if start < at {
            return Err(CannotConvert("overlapping MIME parts"));
        }
        converted.extend_from_slice(&message[at..start]);
        converted.extend_from_slice(&replacement);
        at = end;
    }
    converted.extend_from_slice(&message[at..]);
    if !converted.is_ascii() {
        return Err(CannotConvert(
            "8-bit bytes inside a nested message or between MIME parts",
        ));
    }
    Ok(Cow::Owned(converted))
}

/// The header block `header` (its fields and the empty line that ends it) with its
/// `Content-Transfer-Encoding` replaced by `label`; with a `charset`, MIME-Version (where
/// missing) and a text/plain Content-Type in that charset added.
fn relabelled(header: &[u8], label: &str, charset: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + 64);
    let mut skipping = false;
    let fields = header
        .strip_suffix(b"\r\n")
        .unwrap_or(header)
        .split_inclusive(|&byte| byte == b'\n');
    for line in fields {
        let continuation = line
            .first()
            .is_some_and(|byte| *byte == b' ' || *byte == b'\t');
        if !continuation {
            skipping = field_name(line).eq_ignore_ascii_case("content-transfer-encoding");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    if let Some(charset) = charset {
        if !has_field(header, "mime-version") {
            out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        }
        out.extend_from_slice(
            format!("Content-Type: text/plain; charset={charset}\r\n").as_bytes(),
        );
    }
    out.extend_from_slice(format!("Content-Transfer-Encoding: {label}\r\n\r\n").as_bytes());
    out
}

/// The name of the field that starts on `line` (empty for a line that is not a field).
fn field_name(line: &[u8]) -> &str {
    line.iter()
        .position(|&byte| byte == b':')
        .and_then(|colon| std::str::from_utf8(&line[..colon]).ok())
        .map(str::trim)
        .unwrap_or("")
}

fn has_field(header: &[u8], name: &str) -> bool {
    header
        .split(|&byte| byte == b'\n')
        .any(|line| field_name(line).eq_ignore_ascii_case(name))
}

/// The `Content-Transfer-Encoding` of a header block, lower case.
fn transfer_encoding(header: &[u8]) -> Option<String> {
    header.split(|&byte| byte == b'\n').find_map(|line| {
        let (name, value) = std::str::from_utf8(line).ok()?.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-transfer-encoding")
            .then(|| value.trim().to_ascii_lowercase())
    })
}

/// Base64 in lines of 76 characters (RFC 2045 6.8), each ending in CRLF.
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_text(message: &[u8], part: usize) -> String {
        let parsed = MessageParser::default().parse(message).expect("parses");
        parsed
            .body_text(part)
            .map(|text| text.into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn seven_bit_messages_are_left_alone() {
        let message = b"Subject: hi\r\n\r\nplain\r\n";
        assert!(matches!(seven_bit(message), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn a_plain_8bit_body_becomes_quoted_printable_with_mime_headers() {
        let message = "From: a@x.test\r\nSubject: hi\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n";
        let converted = seven_bit(message.as_bytes()).expect("converts");
        assert!(converted.is_ascii());
        let text = String::from_utf8(converted.to_vec()).expect("ascii");
        assert!(text.contains("MIME-Version: 1.0\r\n"), "{text}");
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable\r\n\r\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("Content-Transfer-Encoding").count(),
            1,
            "{text}"
        );
        assert!(text.contains("Gr=C3=BC=C3=9Fe aus K=C3=B6ln"), "{text}");
        assert_eq!(body_text(&converted, 0).trim_end(), "Grüße aus Köln");
    }

    #[test]
    fn multipart_leaves_are_converted_each_by_its_kind() {
        let message = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nnaïve café\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n\u{e9}\u{e8}binary\r\n--b\r\nContent-Type: text/plain\r\n\r\nalready ascii\r\n--b--\r\n";
        let converted = seven_bit(message.as_bytes()).expect("converts");
        let text = String::from_utf8(converted.to_vec()).expect("ascii");
        assert!(text.starts_with("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"), "{text}");
        assert!(
            text.contains(
                "Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve caf=C3=A9"
            ),
            "{text}"
        );
        assert!(text.contains("Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"), "{text}");
        assert!(
            text.contains("--b\r\nContent-Type: text/plain\r\n\r\nalready ascii\r\n--b--"),
            "{text}"
        );
        assert_eq!(body_text(&converted, 0).trim_end(), "naïve café");
    }

    #[test]
    fn text_whose_quoted_form_would_start_a_line_with_dashes_goes_in_base64() {
        // Quoted, "é" takes six characters: the soft line break falls just before the dashes,
        // which would then start a line (read as a boundary when one begins so).
        let line = format!("{}\u{e9}--x marks the spot", "x".repeat(69));
        let message = format!("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"sep\"\r\n\r\n--sep\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{line}\r\n--sep--\r\n");
        let quoted = quoted_printable::encode(line.as_bytes());
        assert!(
            memchr::memmem::find(&quoted, b"\n--").is_some(),
            "the case this test is about: {}",
            String::from_utf8_lossy(&quoted)
        );
        let converted = seven_bit(message.as_bytes()).expect("converts");
        let text = String::from_utf8(converted.to_vec()).expect("ascii");
        assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
        assert_eq!(body_text(&converted, 0).trim_end(), line);
    }

    #[test]
    fn what_cannot_be_converted_is_named() {
        assert_eq!(
            seven_bit("Subject: Grüße\r\n\r\nbody\r\n".as_bytes()),
            Err(CannotConvert("8-bit bytes in a header"))
        );
        let nested = "MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ncafé\r\n";
        assert!(seven_bit(nested.as_bytes()).is_err());
    }
}
