//! `content-filter`: rules evaluated at the end of DATA, in order.
//!
//! ```toml
//! [[plugin]]
//! name = "content-filter"
//! path = "target/wasm32-wasip2/plugin/content_filter.wasm"
//! [plugin.config]
//! rules = [
//!   { header = "Subject", contains = "[spam]", action = "reject", reply = "550 5.7.1 Looks like spam" },
//!   { header = "Subject", contains = "[review]", action = "quarantine", reason = "held for review" },
//!   { attachment = ["exe", "js", "scr"], action = "reject", reply = "552 5.7.0 Executable attachments are not accepted" },
//!   { dmarc = "fail", action = "quarantine", reason = "DMARC failed" },
//!   { header = "X-Mailer", contains = "bulkmailer", action = "add-header", name = "X-Bulk", value = "yes" },
//!   { always = true, action = "remove-header", name = "X-Internal" },
//!   { header = "Subject", contains = "invoice", action = "add-recipient", address = "archive@example.com" },
//!   { header = "To", contains = "old-list@", action = "remove-recipient", address = "old-list@example.com" },
//! ]
//! ```
//!
//! A rule matches when all its conditions hold (`header` + `contains`, case-insensitive substring;
//! `attachment`, a file extension of any attachment; `spf`/`dkim`/`dmarc`, the host's result;
//! `always`). Edits (`add-header`, `remove-header`, and `add-recipient`/`remove-recipient`, which
//! change the envelope like Postfix's `recipient_bcc_maps`) apply and evaluation goes on; any
//! other action decides and stops.

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub header: Option<String>,
    pub contains: Option<String>,
    #[serde(default)]
    pub attachment: Vec<String>,
    pub spf: Option<String>,
    pub dkim: Option<String>,
    pub dmarc: Option<String>,
    #[serde(default)]
    pub always: bool,
    pub action: String,
    /// For reject/tempfail: "550 5.7.1 text".
    pub reply: Option<String>,
    /// For quarantine.
    pub reason: Option<String>,
    /// For add-header/remove-header.
    pub name: Option<String>,
    pub value: Option<String>,
    /// For add-recipient/remove-recipient.
    pub address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub rules: Vec<Rule>,
}

pub struct ContentFilter {
    rules: Vec<Rule>,
}

const ACTIONS: &[&str] = &[
    "accept",
    "reject",
    "tempfail",
    "quarantine",
    "discard",
    "add-header",
    "remove-header",
    "add-recipient",
    "remove-recipient",
];

/// A rule's reply: "550 5.7.1 text" with a code in `codes`; text without such a code is sent
/// whole with `default_code`.
fn rule_reply(text: &str, codes: std::ops::Range<u16>, default_code: u16) -> Reply {
    Reply::parse(text, codes).unwrap_or_else(|_| Reply::new(default_code, "", text))
}

/// File extensions of attachments, from `filename=` and `name=` parameters, lower case.
pub fn attachment_extensions(content: &str) -> Vec<String> {
    let lower = content.to_ascii_lowercase();
    let mut extensions = Vec::new();
    for key in ["filename=", "name="] {
        let mut rest = lower.as_str();
        while let Some(at) = rest.find(key) {
            rest = &rest[at + key.len()..];
            let value = rest.trim_start_matches('"');
            let end = value.find(['"', ';', '\r', '\n']).unwrap_or(value.len());
            if let Some((_, extension)) = value[..end].trim().rsplit_once('.') {
                extensions.push(extension.to_string());
            }
        }
    }
    extensions
}

/// Reads the whole body through the host handle, 64 KiB at a time.
fn read_body(body: &Body) -> String {
    let size = body.size();
    let mut content = Vec::with_capacity(size.min(16 << 20) as usize);
    let mut offset = 0;
    while offset < size {
        let chunk = body.read(offset, 64 * 1024);
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        content.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&content).into_owned()
}

impl ContentFilter {
    fn matches(
        &self,
        rule: &Rule,
        headers: &[Header],
        auth: &AuthResults,
        attachments: &mut Option<Vec<String>>,
        body: &Body,
    ) -> bool {
        let mut conditions = 0;
        if let Some(name) = &rule.header {
            conditions += 1;
            let needle = rule.contains.as_deref().unwrap_or_default().to_lowercase();
            let found = headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case(name) && h.value.to_lowercase().contains(&needle)
            });
            if !found {
                return false;
            }
        }
        for (wanted, actual) in [
            (&rule.spf, &auth.spf),
            (&rule.dkim, &auth.dkim),
            (&rule.dmarc, &auth.dmarc),
        ] {
            if let Some(wanted) = wanted {
                conditions += 1;
                if !wanted.eq_ignore_ascii_case(actual) {
                    return false;
                }
            }
        }
        if !rule.attachment.is_empty() {
            conditions += 1;
            let found = attachments.get_or_insert_with(|| attachment_extensions(&read_body(body)));
            if !rule.attachment.iter().any(|ext| {
                found
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(ext.trim_start_matches('.')))
            }) {
                return false;
            }
        }
        conditions > 0 || rule.always
    }
}

impl Plugin for ContentFilter {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::Data];

    fn new(config: Config) -> Result<Self, String> {
        for (index, rule) in config.rules.iter().enumerate() {
            if !ACTIONS.contains(&rule.action.as_str()) {
                return Err(format!(
                    "rule {}: unknown action `{}` (expected one of {})",
                    index + 1,
                    rule.action,
                    ACTIONS.join(", ")
                ));
            }
            if rule.action.ends_with("-header") && rule.name.is_none() {
                return Err(format!(
                    "rule {}: `{}` needs `name`",
                    index + 1,
                    rule.action
                ));
            }
            if rule.action.ends_with("-recipient")
                && !rule.address.as_deref().is_some_and(|a| a.contains('@'))
            {
                return Err(format!(
                    "rule {}: `{}` needs `address` (local@domain)",
                    index + 1,
                    rule.action
                ));
            }
            if rule.header.is_some() != rule.contains.is_some() {
                return Err(format!(
                    "rule {}: `header` and `contains` go together",
                    index + 1
                ));
            }
        }
        Ok(ContentFilter {
            rules: config.rules,
        })
    }

    fn data(&self, _: &Session, _: &Envelope, auth: &AuthResults, body: &Body) -> DataDecision {
        let headers = &body.headers();
        let mut attachments = None;
        let mut edits = DataDecision::next();
        for rule in &self.rules {
            if !self.matches(rule, headers, auth, &mut attachments, body) {
                continue;
            }
            let name = rule.name.clone().unwrap_or_default();
            let mut decided = match rule.action.as_str() {
                "add-header" => {
                    edits = edits.add_header(&name, rule.value.clone().unwrap_or_default());
                    continue;
                }
                "remove-header" => {
                    edits = edits.remove_header(&name);
                    continue;
                }
                "add-recipient" => {
                    edits = edits.add_recipient(rule.address.clone().unwrap_or_default());
                    continue;
                }
                "remove-recipient" => {
                    edits = edits.remove_recipient(rule.address.clone().unwrap_or_default());
                    continue;
                }
                "accept" => DataDecision::accept(),
                "discard" => DataDecision::discard(),
                "quarantine" => DataDecision::quarantine(
                    rule.reason
                        .clone()
                        .unwrap_or_else(|| "content filter".to_string()),
                ),
                "tempfail" => {
                    let reply = rule_reply(
                        rule.reply.as_deref().unwrap_or("451 4.7.1 Try again later"),
                        400..500,
                        451,
                    );
                    DataDecision::tempfail(reply.code, &reply.enhanced, reply.text)
                }
                _ => {
                    let reply = rule_reply(
                        rule.reply
                            .as_deref()
                            .unwrap_or("550 5.7.1 Message refused by content filter"),
                        500..600,
                        550,
                    );
                    DataDecision::reject(reply.code, &reply.enhanced, reply.text)
                }
            };
            decided.edits = edits.edits;
            return decided;
        }
        edits
    }
}

export_plugin!(ContentFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_attachment_extensions() {
        let mime = "Content-Type: application/octet-stream; name=\"setup.EXE\"\r\nContent-Disposition: attachment; filename=report.pdf\r\n";
        let found = attachment_extensions(mime);
        assert!(
            found.contains(&"exe".to_string()) && found.contains(&"pdf".to_string()),
            "{found:?}"
        );
    }

    #[test]
    fn rules_are_checked() {
        let config: Config =
            serde_json::from_str(r#"{"rules":[{"always":true,"action":"explode"}]}"#)
                .expect("json");
        assert!(ContentFilter::new(config).is_err());
        let config: Config =
            serde_json::from_str(r#"{"rules":[{"header":"Subject","action":"reject"}]}"#)
                .expect("json");
        assert!(ContentFilter::new(config).is_err());
        let config: Config =
            serde_json::from_str(r#"{"rules":[{"always":true,"action":"add-recipient"}]}"#)
                .expect("json");
        assert!(ContentFilter::new(config).is_err());
    }
}
