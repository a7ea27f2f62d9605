//! `bounce-branding`: the subject and human-readable text of delivery status notifications, in
//! your words. The host keeps the RFC 3464 structure (delivery-status part, returned headers).
//!
//! ```toml
//! [[plugin]]
//! name = "bounce-branding"
//! path = "target/wasm32-wasip2/plugin/bounce_branding.wasm"
//! [plugin.config]
//! subject = "Undeliverable: {subject}"
//! text = """
//! Hello,
//!
//! {company} could not deliver your message to:
//! {failures}
//!
//! Reply to support@example.com if you need help."""
//! company = "Example Corp"
//! ```
//!
//! Placeholders: `{subject}` (of the returned message), `{sender}`, `{failures}` (one line per
//! recipient: address and reason), `{company}`.

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub subject: String,
    pub text: String,
    #[serde(default)]
    pub company: String,
}

pub struct BounceBranding(Config);

pub fn fill(template: &str, report: &BounceReport, company: &str) -> String {
    let subject = report
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("subject"))
        .map(|header| header.value.as_str())
        .unwrap_or("(no subject)");
    let failures = report
        .failed
        .iter()
        .map(|failed| format!("  {}: {}", failed.address, failed.diagnostic))
        .collect::<Vec<_>>()
        .join("\n");
    template
        .replace("{subject}", subject)
        .replace("{sender}", &report.message.sender)
        .replace("{failures}", &failures)
        .replace("{company}", company)
}

impl Plugin for BounceBranding {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::Bounce];

    fn new(config: Config) -> Result<Self, String> {
        if config.subject.trim().is_empty() {
            return Err("subject must not be empty".to_string());
        }
        Ok(BounceBranding(config))
    }

    fn bounce(&self, report: &BounceReport) -> Option<BounceText> {
        Some(BounceText {
            subject: fill(&self.0.subject, report, &self.0.company),
            text: fill(&self.0.text, report, &self.0.company),
        })
    }
}

export_plugin!(BounceBranding);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let report = BounceReport {
            message: MessageFacts {
                id: "Q".into(),
                sender: "a@x.test".into(),
                size: 1,
                tenant: String::new(),
            },
            failed: vec![FailedRecipient {
                address: "b@y.test".into(),
                status: "5.1.1".into(),
                diagnostic: "550 5.1.1 no such user".into(),
            }],
            headers: vec![Header {
                name: "Subject".into(),
                value: "Hi".into(),
            }],
        };
        assert_eq!(
            fill("Undeliverable: {subject}", &report, "ACME"),
            "Undeliverable: Hi"
        );
        assert_eq!(
            fill("{company}\n{failures}", &report, "ACME"),
            "ACME\n  b@y.test: 550 5.1.1 no such user"
        );
    }
}
