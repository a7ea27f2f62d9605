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
//!   # On the host's scanners (`[[scanner]]`; the plugin needs the "scanners" grant):
//!   { virus = true, action = "reject", reply = "554 5.7.1 Virus found: {virus}" },
//!   { scanner_error = ["timeout", "refused", "protocol"], action = "tempfail", reply = "451 4.7.1 Cannot scan the message now ({scanner_error})" },
//!   { scanner_error = ["too-large"], action = "add-header", name = "X-Scanned", value = "no, too large" },
//!   { rspamd_action = "reject", action = "reject", reply = "550 5.7.1 Spam: {rspamd_message}" },
//!   { rspamd_action = "add header", action = "add-header", name = "X-Spam", value = "Yes, score={rspamd_score}" },
//!   { always = true, action = "add-rspamd-headers" },
//! ]
//! ```
//!
//! A rule matches when all its conditions hold (`header` + `contains`, case-insensitive substring;
//! `attachment`, a file extension of any attachment; `spf`/`dkim`/`dmarc`, the host's result;
//! `always`; and on the scanners' results: `virus` (ClamAV found one), `scanner_error` (a
//! scanner gave no verdict: `true` for any error, or a list of the kinds that count:
//! `timeout`, `refused`, `too-large`, `protocol`), `rspamd_score` (rspamd's score is at least
//! this), `rspamd_action` (rspamd recommends this action), `rspamd_symbol` (this symbol
//! matched); `scanner` narrows them to one scanner by name, and without it the `rspamd_*`
//! conditions read the first rspamd scanner's report). Edits (`add-header`, `remove-header`,
//! `add-rspamd-headers`, which puts in the header fields rspamd asked to add, replacing any of
//! the same names the message arrived with, and `add-recipient`/`remove-recipient`, which change
//! the envelope like Postfix's `recipient_bcc_maps`) apply and evaluation goes on; any other
//! action decides and stops.
//!
//! A reply, quarantine reason or header value may name what the scanners said: `{virus}` (the
//! signature), `{rspamd_score}`, `{rspamd_action}`, `{rspamd_message}` (rspamd's reply text, or
//! its action when it gives none), `{scanner_error}` (the scanner and its error).

use serde::Deserialize;
use switchyard_plugin_sdk::host::scanners::{
    ClamavReport, RspamdReport, ScanError, ScanOutcome, ScanResult,
};
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
    /// ClamAV found a virus.
    #[serde(default)]
    pub virus: bool,
    /// A scanner gave no verdict (of these kinds).
    #[serde(default)]
    pub scanner_error: ErrorKinds,
    /// rspamd's score is at least this.
    pub rspamd_score: Option<f64>,
    /// rspamd recommends this action ("reject", "add header"...).
    pub rspamd_action: Option<String>,
    /// This rspamd symbol matched.
    pub rspamd_symbol: Option<String>,
    /// The scanner conditions look at this scanner only (by its configured name).
    pub scanner: Option<String>,
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

/// `scanner_error = true` (any error) or a list of kinds.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(untagged)]
pub enum ErrorKinds {
    Any(bool),
    Kinds(Vec<String>),
    #[default]
    #[serde(skip)]
    Unset,
}

const ERROR_KINDS: &[&str] = &["timeout", "refused", "too-large", "protocol"];

/// rspamd's actions (its `action` in a report).
const RSPAMD_ACTIONS: &[&str] = &[
    "no action",
    "greylist",
    "add header",
    "rewrite subject",
    "soft reject",
    "reject",
];

impl ErrorKinds {
    fn wanted(&self) -> bool {
        matches!(self, ErrorKinds::Any(true) | ErrorKinds::Kinds(_))
    }

    fn counts(&self, error: &ScanError) -> bool {
        match self {
            ErrorKinds::Any(any) => *any,
            ErrorKinds::Kinds(kinds) => kinds.iter().any(|kind| kind == error_kind(error)),
            ErrorKinds::Unset => false,
        }
    }
}

fn error_kind(error: &ScanError) -> &'static str {
    match error {
        ScanError::Timeout(_) => "timeout",
        ScanError::Refused(_) => "refused",
        ScanError::TooLarge(_) => "too-large",
        ScanError::Protocol(_) => "protocol",
    }
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
    "add-rspamd-headers",
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

/// What the scanners said about the message, read from the host once per message.
struct Scans(Vec<ScanResult>);

impl Scans {
    /// The first of the results a rule looks at (every scanner's, or the one it names) that
    /// `pick` finds something in.
    fn find<'a, T>(
        &'a self,
        scanner: Option<&str>,
        pick: impl Fn(&'a ScanResult) -> Option<T>,
    ) -> Option<T> {
        self.0
            .iter()
            .filter(|result| scanner.is_none_or(|name| result.scanner == name))
            .find_map(pick)
    }

    fn virus(&self, scanner: Option<&str>) -> Option<&str> {
        self.find(scanner, |result| match &result.outcome {
            ScanOutcome::Clamav(ClamavReport::Infected(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    fn rspamd(&self, scanner: Option<&str>) -> Option<&RspamdReport> {
        self.find(scanner, |result| match &result.outcome {
            ScanOutcome::Rspamd(report) => Some(report),
            _ => None,
        })
    }

    /// The first scanner that gave no verdict of the kinds counted, and why, in words.
    fn error(&self, scanner: Option<&str>, kinds: &ErrorKinds) -> Option<String> {
        self.find(scanner, |result| match &result.outcome {
            ScanOutcome::Error(error) if kinds.counts(error) => {
                Some(format!("{}: {}", result.scanner, error_text(error)))
            }
            _ => None,
        })
    }
}

fn error_text(error: &ScanError) -> String {
    match error {
        ScanError::Timeout(millis) => format!("no answer within {millis} ms"),
        ScanError::Refused(text) => format!("cannot connect: {text}"),
        ScanError::TooLarge(limit) => format!("message larger than {limit} bytes"),
        ScanError::Protocol(text) => text.clone(),
    }
}

/// `text` with `{virus}`, `{rspamd_score}`, `{rspamd_action}`, `{rspamd_message}` and
/// `{scanner_error}` replaced by what the scanners said (empty when they said nothing of it).
/// Control characters become spaces: the result goes into a reply or a header field.
fn fill(text: &str, scans: Option<&Scans>, scanner: Option<&str>) -> String {
    let Some(scans) = scans.filter(|_| text.contains('{')) else {
        return text.to_string();
    };
    let rspamd = scans.rspamd(scanner);
    let filled = text
        .replace("{virus}", scans.virus(scanner).unwrap_or_default())
        .replace(
            "{rspamd_score}",
            &rspamd
                .map(|report| format!("{:.2}", report.score))
                .unwrap_or_default(),
        )
        .replace(
            "{rspamd_action}",
            rspamd
                .map(|report| report.action.as_str())
                .unwrap_or_default(),
        )
        .replace(
            "{rspamd_message}",
            rspamd
                .map(|report| report.message.as_deref().unwrap_or(&report.action))
                .unwrap_or_default(),
        )
        .replace(
            "{scanner_error}",
            &scans
                .error(scanner, &ErrorKinds::Any(true))
                .unwrap_or_default(),
        );
    filled
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The names `fill` replaces.
const PLACEHOLDERS: &[&str] = &[
    "{virus}",
    "{rspamd_score}",
    "{rspamd_action}",
    "{rspamd_message}",
    "{scanner_error}",
];

impl Rule {
    /// Whether the rule's reply, reason or header value names what the scanners said.
    fn names_scans(&self) -> bool {
        [&self.reply, &self.reason, &self.value]
            .into_iter()
            .flatten()
            .any(|text| PLACEHOLDERS.iter().any(|name| text.contains(name)))
    }

    /// Whether the rule looks at the scanners' results.
    fn reads_scanners(&self) -> bool {
        self.virus
            || self.scanner_error.wanted()
            || self.rspamd_score.is_some()
            || self.rspamd_action.is_some()
            || self.rspamd_symbol.is_some()
            || self.action == "add-rspamd-headers"
    }

    /// Whether the scanner conditions hold (true when there are none); counts them.
    fn scans_match(&self, scans: &Scans, conditions: &mut u32) -> bool {
        let scanner = self.scanner.as_deref();
        let rspamd = scans.rspamd(scanner);
        let checks = [
            (self.virus, scans.virus(scanner).is_some()),
            (
                self.scanner_error.wanted(),
                scans.error(scanner, &self.scanner_error).is_some(),
            ),
            (
                self.rspamd_score.is_some(),
                rspamd
                    .zip(self.rspamd_score)
                    .is_some_and(|(r, at)| r.score >= at),
            ),
            (
                self.rspamd_action.is_some(),
                rspamd
                    .zip(self.rspamd_action.as_deref())
                    .is_some_and(|(r, action)| r.action.eq_ignore_ascii_case(action)),
            ),
            (
                self.rspamd_symbol.is_some(),
                rspamd
                    .zip(self.rspamd_symbol.as_deref())
                    .is_some_and(|(r, symbol)| {
                        r.symbols
                            .iter()
                            .any(|s| s.name.eq_ignore_ascii_case(symbol))
                    }),
            ),
        ];
        for (wanted, holds) in checks {
            if wanted {
                *conditions += 1;
                if !holds {
                    return false;
                }
            }
        }
        true
    }
}

/// What a message's rules are checked against, each part read when a rule first needs it.
struct Message<'a> {
    headers: Vec<Header>,
    auth: &'a AuthResults,
    body: &'a Body<'a>,
    attachments: Option<Vec<String>>,
    scans: Option<Scans>,
}

impl Message<'_> {
    fn scans(&mut self) -> &Scans {
        let body = self.body;
        self.scans
            .get_or_insert_with(|| Scans(host::scanners::results(body)))
    }
}

impl ContentFilter {
    fn matches(&self, rule: &Rule, message: &mut Message<'_>) -> bool {
        let mut conditions = 0;
        if let Some(name) = &rule.header {
            conditions += 1;
            let needle = rule.contains.as_deref().unwrap_or_default().to_lowercase();
            let found = message.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case(name) && h.value.to_lowercase().contains(&needle)
            });
            if !found {
                return false;
            }
        }
        for (wanted, actual) in [
            (&rule.spf, &message.auth.spf),
            (&rule.dkim, &message.auth.dkim),
            (&rule.dmarc, &message.auth.dmarc),
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
            let body = message.body;
            let found = message
                .attachments
                .get_or_insert_with(|| attachment_extensions(&read_body(body)));
            if !rule.attachment.iter().any(|ext| {
                found
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(ext.trim_start_matches('.')))
            }) {
                return false;
            }
        }
        if rule.reads_scanners() && !rule.scans_match(message.scans(), &mut conditions) {
            return false;
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
            if let Some(action) = rule
                .rspamd_action
                .as_deref()
                .filter(|action| !RSPAMD_ACTIONS.contains(&action.to_ascii_lowercase().as_str()))
            {
                return Err(format!(
                    "rule {}: rspamd has no action `{action}` (expected one of {})",
                    index + 1,
                    RSPAMD_ACTIONS.join(", ")
                ));
            }
            if let ErrorKinds::Kinds(kinds) = &rule.scanner_error {
                if let Some(kind) = kinds
                    .iter()
                    .find(|kind| !ERROR_KINDS.contains(&kind.as_str()))
                {
                    return Err(format!(
                        "rule {}: no scanner error is `{kind}` (expected {})",
                        index + 1,
                        ERROR_KINDS.join(", ")
                    ));
                }
            }
            if rule.scanner.is_some() && !rule.reads_scanners() {
                return Err(format!(
                    "rule {}: `scanner` narrows scanner conditions; the rule has none",
                    index + 1
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
        let mut message = Message {
            headers: body.headers(),
            auth,
            body,
            attachments: None,
            scans: None,
        };
        let mut edits = DataDecision::next();
        for rule in &self.rules {
            if !self.matches(rule, &mut message) {
                continue;
            }
            if rule.names_scans() {
                message.scans();
            }
            let scanner = rule.scanner.as_deref();
            let fill = |text: &str| fill(text, message.scans.as_ref(), scanner);
            let name = rule.name.clone().unwrap_or_default();
            let mut decided = match rule.action.as_str() {
                "add-header" => {
                    edits =
                        edits.add_header(&name, fill(rule.value.as_deref().unwrap_or_default()));
                    continue;
                }
                "remove-header" => {
                    edits = edits.remove_header(&name);
                    continue;
                }
                "add-rspamd-headers" => {
                    let fields = message
                        .scans
                        .as_ref()
                        .and_then(|scans| scans.rspamd(scanner))
                        .map(|report| report.headers.clone())
                        .unwrap_or_default();
                    // rspamd's fields replace any of the same names the message arrived with (a
                    // sender's forged X-Spam-Status), as rspamd's milter does.
                    let mut removed: Vec<String> = Vec::new();
                    for field in &fields {
                        if !removed
                            .iter()
                            .any(|name| name.eq_ignore_ascii_case(&field.name))
                        {
                            edits = edits.remove_header(&field.name);
                            removed.push(field.name.clone());
                        }
                    }
                    for field in fields {
                        edits = edits.add_header(&field.name, field.value);
                    }
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
                "quarantine" => DataDecision::quarantine(fill(
                    rule.reason.as_deref().unwrap_or("content filter"),
                )),
                "tempfail" => {
                    let reply = rule_reply(
                        &fill(rule.reply.as_deref().unwrap_or("451 4.7.1 Try again later")),
                        400..500,
                        451,
                    );
                    DataDecision::tempfail(reply.code, &reply.enhanced, reply.text)
                }
                _ => {
                    let reply = rule_reply(
                        &fill(
                            rule.reply
                                .as_deref()
                                .unwrap_or("550 5.7.1 Message refused by content filter"),
                        ),
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

    mod scanners {
        use super::super::*;
        use switchyard_plugin_sdk::host::scanners::Symbol;
        use switchyard_plugin_sdk::testing::{mock, Harness};

        const POLICY: &str = r#"{"rules":[
            {"virus":true,"action":"reject","reply":"554 5.7.1 Virus found: {virus}"},
            {"scanner_error":["timeout","refused","protocol"],"action":"tempfail","reply":"451 4.7.1 Cannot scan now ({scanner_error})"},
            {"scanner_error":["too-large"],"action":"add-header","name":"X-Scanned","value":"no ({scanner_error})"},
            {"rspamd_action":"reject","action":"reject","reply":"550 5.7.1 Spam: {rspamd_message}"},
            {"rspamd_symbol":"BAYES_SPAM","scanner":"rspamd","action":"quarantine","reason":"bayes {rspamd_score}"},
            {"rspamd_score":6.0,"action":"add-header","name":"X-Spam","value":"Yes, score={rspamd_score}"},
            {"always":true,"action":"add-rspamd-headers"}
        ]}"#;

        fn rspamd(score: f64, action: &str, symbols: &[&str]) -> ScanResult {
            ScanResult {
                scanner: "rspamd".to_string(),
                outcome: ScanOutcome::Rspamd(RspamdReport {
                    score,
                    required_score: 15.0,
                    action: action.to_string(),
                    symbols: symbols
                        .iter()
                        .map(|name| Symbol {
                            name: name.to_string(),
                            score: 1.0,
                        })
                        .collect(),
                    message: (action == "reject").then(|| "Gtube pattern".to_string()),
                    headers: vec![Header {
                        name: "X-Spamd-Result".to_string(),
                        value: format!("default: [{score}]"),
                    }],
                }),
            }
        }

        fn clamav(outcome: ScanOutcome) -> ScanResult {
            ScanResult {
                scanner: "clamav".to_string(),
                outcome,
            }
        }

        fn decide(scans: Vec<ScanResult>) -> DataDecision {
            let harness = Harness::<ContentFilter>::new(POLICY).expect("policy");
            mock(|host| host.scans = scans);
            let envelope = Envelope {
                sender: "a@example.com".to_string(),
                recipients: vec!["b@example.org".to_string()],
            };
            harness.data(&envelope, "Subject: hi\r\n\r\nbody\r\n")
        }

        fn reply_of(decision: &DataDecision) -> String {
            match &decision.verdict {
                DataVerdict::Reject(reply) | DataVerdict::Tempfail(reply) => {
                    format!("{} {} {}", reply.code, reply.enhanced, reply.text)
                }
                DataVerdict::Quarantine(reason) => format!("quarantine {reason}"),
                other => format!("{other:?}"),
            }
        }

        #[test]
        fn a_virus_is_refused_with_its_name() {
            let decision = decide(vec![
                rspamd(1.0, "no action", &[]),
                clamav(ScanOutcome::Clamav(ClamavReport::Infected(
                    "Eicar-Test".into(),
                ))),
            ]);
            assert_eq!(reply_of(&decision), "554 5.7.1 Virus found: Eicar-Test");
        }

        #[test]
        fn a_scanner_without_a_verdict_defers_the_message_and_says_which() {
            let decision = decide(vec![
                rspamd(1.0, "no action", &[]),
                clamav(ScanOutcome::Error(ScanError::Timeout(2000))),
            ]);
            assert_eq!(
                reply_of(&decision),
                "451 4.7.1 Cannot scan now (clamav: no answer within 2000 ms)"
            );
        }

        #[test]
        fn rspamd_verdicts_reject_quarantine_and_mark() {
            let decision = decide(vec![rspamd(1001.0, "reject", &["GTUBE"])]);
            assert_eq!(reply_of(&decision), "550 5.7.1 Spam: Gtube pattern");
            let decision = decide(vec![rspamd(3.0, "no action", &["BAYES_SPAM"])]);
            assert_eq!(reply_of(&decision), "quarantine bayes 3.00");
            let decision = decide(vec![rspamd(7.5, "add header", &["X"])]);
            assert_eq!(decision.verdict, DataVerdict::Continue);
            let added: Vec<(String, String)> = decision
                .edits
                .iter()
                .filter_map(|edit| match edit {
                    Edit::AddHeader(h) => Some((h.name.clone(), h.value.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(
                added,
                [
                    ("X-Spam".to_string(), "Yes, score=7.50".to_string()),
                    ("X-Spamd-Result".to_string(), "default: [7.5]".to_string())
                ]
            );
            assert!(
                decision
                    .edits
                    .contains(&Edit::RemoveHeader("X-Spamd-Result".to_string())),
                "rspamd's fields replace the arriving ones: {:?}",
                decision.edits
            );
        }

        #[test]
        fn a_message_too_large_to_scan_is_marked_not_deferred() {
            let decision = decide(vec![clamav(ScanOutcome::Error(ScanError::TooLarge(100)))]);
            assert_eq!(decision.verdict, DataVerdict::Continue);
            assert_eq!(
                decision.edits,
                [Edit::AddHeader(Header {
                    name: "X-Scanned".to_string(),
                    value: "no (clamav: message larger than 100 bytes)".to_string()
                })]
            );
        }

        #[test]
        fn placeholders_are_filled_whatever_rule_matched_first() {
            let harness = Harness::<ContentFilter>::new(
                r#"{"rules":[{"header":"Subject","contains":"hi","action":"reject","reply":"550 5.7.1 score {rspamd_score}"}]}"#,
            )
            .expect("policy");
            mock(|host| host.scans = vec![rspamd(3.5, "no action", &[])]);
            let envelope = Envelope {
                sender: "a@example.com".to_string(),
                recipients: vec!["b@example.org".to_string()],
            };
            let decision = harness.data(&envelope, "Subject: hi\r\n\r\nbody\r\n");
            assert_eq!(reply_of(&decision), "550 5.7.1 score 3.50");
        }

        #[test]
        fn unknown_actions_and_error_kinds_are_refused() {
            for rules in [
                r#"[{"rspamd_action":"add_header","action":"reject"}]"#,
                r#"[{"scanner_error":["slow"],"action":"reject"}]"#,
            ] {
                let config: Config =
                    serde_json::from_str(&format!(r#"{{"rules":{rules}}}"#)).expect("json");
                assert!(ContentFilter::new(config).is_err(), "{rules}");
            }
        }

        #[test]
        fn no_results_match_no_scanner_rule() {
            let decision = decide(Vec::new());
            assert_eq!(decision.verdict, DataVerdict::Continue);
            assert!(decision.edits.is_empty());
        }
    }
}
