//! The header section of a message as received (CRLF line endings): where it ends, its fields
//! and their names.

/// The header section: everything before the first empty line.
pub fn section(content: &[u8]) -> &[u8] {
    if content.starts_with(b"\r\n") {
        return &[];
    }
    match memchr::memmem::find(content, b"\r\n\r\n") {
        Some(end) => &content[..end + 2],
        None => content,
    }
}

/// Names of the header fields, in order (continuation lines skipped).
fn names(content: &[u8]) -> impl Iterator<Item = &[u8]> {
    section(content)
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty() && !line.starts_with(b" ") && !line.starts_with(b"\t"))
        .filter_map(|line| {
            line.iter()
                .position(|&b| b == b':')
                .map(|colon| line[..colon].trim_ascii())
        })
}

/// The domains of every address in the message's From: fields, in order, as
/// [`super::address::domain_key`] compares them. Addresses without a domain are left out; a
/// message with no From: field, or none that parses, has none.
pub fn from_domains(content: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(content) else {
        return Vec::new();
    };
    parsed
        .header_values(mail_parser::HeaderName::From)
        .filter_map(|value| value.as_address())
        .flat_map(|address| address.iter())
        .filter_map(|addr| addr.address()?.rsplit_once('@'))
        .map(|(_, domain)| super::address::domain_key(domain))
        .filter(|domain| !domain.is_empty())
        .collect()
}

pub fn count(content: &[u8], name: &str) -> usize {
    names(content)
        .filter(|found| found.eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

/// The header fields of a message, each as (lower-case name, raw field with its continuation
/// lines and CRLFs), and where the header section ends.
pub fn fields(content: &[u8]) -> (Vec<(String, Vec<u8>)>, usize) {
    let header_end = if content.starts_with(b"\r\n") {
        0
    } else {
        memchr::memmem::find(content, b"\r\n\r\n")
            .map(|end| end + 2)
            .unwrap_or(content.len())
    };
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for line in content[..header_end].split_inclusive(|&b| b == b'\n') {
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        match fields.last_mut() {
            Some((_, raw)) if continuation => raw.extend_from_slice(line),
            _ => {
                let name = line.split(|&b| b == b':').next().unwrap_or_default();
                fields.push((
                    String::from_utf8_lossy(name).trim().to_ascii_lowercase(),
                    line.to_vec(),
                ));
            }
        }
    }
    (fields, header_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_counting() {
        let content =
            b"Received: a\r\n\tb\r\nreceived: c\r\nSubject: x\r\n\r\nReceived: not a header\r\n";
        assert_eq!(count(content, "Received"), 2);
        assert_eq!(count(content, "Message-ID"), 0);
    }
}
