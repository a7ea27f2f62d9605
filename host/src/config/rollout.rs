//! `plugins promote` and `plugins rollback` as edits of the file that declares the plugin (the
//! configuration file, or a tenant's file): promoting makes the candidate (its `canary` or
//! `shadow`) the plugin's `path` and drops the candidate; rolling back drops the candidate. The
//! file stays the one source of what runs, so the next reload or restart runs what the
//! operator chose; comments and layout are kept.

use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{file}: not valid TOML: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: no [[plugin]] named `{name}`")]
    NoPlugin { file: String, name: String },
    #[error("plugin `{name}` has neither a canary nor a shadow to {action}")]
    NoCandidate { name: String, action: &'static str },
    #[error("plugin `{name}`: its {candidate} has no path")]
    NoPath {
        name: String,
        candidate: &'static str,
    },
}

/// Which candidate an edit was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateKind {
    Canary,
    Shadow,
}

impl CandidateKind {
    pub fn key(self) -> &'static str {
        match self {
            CandidateKind::Canary => "canary",
            CandidateKind::Shadow => "shadow",
        }
    }
}

/// A plugin's candidate as its file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub kind: CandidateKind,
    /// As written: relative paths are relative to the file.
    pub path: String,
    /// The canary's own pin, if it has one.
    pub sha256: Option<String>,
}

/// The candidate of plugin `name` in `text` (a configuration or tenant file), for `action` (what
/// an error says was to be done).
pub fn candidate(
    text: &str,
    file: &str,
    name: &str,
    action: &'static str,
) -> Result<Candidate, RolloutError> {
    let mut document = parse(text, file)?;
    let entry = plugin_entry(&mut document, file, name)?;
    candidate_of(entry, name, action)
}

/// `text` with plugin `name`'s candidate promoted: its path becomes the plugin's `path`. A
/// plugin that was pinned stays pinned: to the canary's own `sha256` when it has one, else to
/// `candidate_digest` (the candidate file's digest, which the caller checked against the
/// running candidate's).
pub fn promote(
    text: &str,
    file: &str,
    name: &str,
    candidate_digest: &str,
) -> Result<String, RolloutError> {
    let mut document = parse(text, file)?;
    let entry = plugin_entry(&mut document, file, name)?;
    let candidate = candidate_of(entry, name, "promote")?;
    entry.remove(candidate.kind.key());
    entry.insert("path", Item::Value(Value::from(candidate.path.as_str())));
    let pin = match candidate.sha256 {
        Some(pin) => Some(pin),
        None => entry
            .contains_key("sha256")
            .then(|| candidate_digest.to_string()),
    };
    if let Some(pin) = pin {
        entry.insert("sha256", Item::Value(Value::from(pin)));
    }
    Ok(document.to_string())
}

/// `text` with plugin `name`'s candidate removed: the live version alone runs again.
pub fn rollback(text: &str, file: &str, name: &str) -> Result<String, RolloutError> {
    let mut document = parse(text, file)?;
    let entry = plugin_entry(&mut document, file, name)?;
    let candidate = candidate_of(entry, name, "roll back")?;
    entry.remove(candidate.kind.key());
    Ok(document.to_string())
}

fn parse(text: &str, file: &str) -> Result<DocumentMut, RolloutError> {
    text.parse::<DocumentMut>()
        .map_err(|error| RolloutError::Parse {
            file: file.to_string(),
            message: error.message().to_string(),
        })
}

/// The `[[plugin]]` table named `name`.
fn plugin_entry<'a>(
    document: &'a mut DocumentMut,
    file: &str,
    name: &str,
) -> Result<&'a mut Table, RolloutError> {
    document
        .get_mut("plugin")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|plugins| {
            plugins
                .iter_mut()
                .find(|entry| entry.get("name").and_then(Item::as_str) == Some(name))
        })
        .ok_or_else(|| RolloutError::NoPlugin {
            file: file.to_string(),
            name: name.to_string(),
        })
}

fn candidate_of(
    entry: &Table,
    name: &str,
    action: &'static str,
) -> Result<Candidate, RolloutError> {
    let no_path = |kind: CandidateKind| RolloutError::NoPath {
        name: name.to_string(),
        candidate: kind.key(),
    };
    if let Some(canary) = entry.get("canary") {
        let table: &dyn TableLike = canary
            .as_table_like()
            .ok_or_else(|| no_path(CandidateKind::Canary))?;
        let path = table
            .get("path")
            .and_then(Item::as_str)
            .ok_or_else(|| no_path(CandidateKind::Canary))?;
        return Ok(Candidate {
            kind: CandidateKind::Canary,
            path: path.to_string(),
            sha256: table
                .get("sha256")
                .and_then(Item::as_str)
                .map(str::to_string),
        });
    }
    if let Some(shadow) = entry.get("shadow") {
        // `shadow = "PATH"`, or a table with its path and pin.
        let (path, sha256) = match shadow.as_table_like() {
            Some(table) => (
                table.get("path").and_then(Item::as_str),
                table.get("sha256").and_then(Item::as_str),
            ),
            None => (shadow.as_str(), None),
        };
        return Ok(Candidate {
            kind: CandidateKind::Shadow,
            path: path
                .ok_or_else(|| no_path(CandidateKind::Shadow))?
                .to_string(),
            sha256: sha256.map(str::to_string),
        });
    }
    Err(RolloutError::NoCandidate {
        name: name.to_string(),
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed digest: 64 times `digit`.
    fn pin(digit: char) -> String {
        digit.to_string().repeat(64)
    }

    const FILE: &str = r#"# the router
hostname = "mx.example.com"

[[plugin]]
name = "gate"   # decides at RCPT
path = "plugins/gate-v1.wasm"
sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
canary = { path = "plugins/gate-v2.wasm", percent = 10, sha256 = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc" }

[[plugin]]
name = "tagger"
path = "plugins/tagger.wasm"
shadow = "plugins/tagger-v2.wasm"

[plugin.config]
header = "X-Tag"

[[plugin]]
name = "plain"
path = "plugins/plain.wasm"
"#;

    #[test]
    fn promoting_a_canary_makes_it_the_path_pinned_to_the_canarys_pin() {
        let text = promote(FILE, "f.toml", "gate", &pin('b')).expect("promote");
        assert!(text.contains("# the router\n"), "{text}");
        assert!(
            text.contains("name = \"gate\"   # decides at RCPT\n"),
            "{text}"
        );
        assert!(text.contains("path = \"plugins/gate-v2.wasm\""), "{text}");
        assert!(
            text.contains(&format!("sha256 = \"{}\"", pin('c'))),
            "{text}"
        );
        assert!(!text.contains("canary"), "{text}");
        assert!(!text.contains("gate-v1"), "{text}");
        // The other entries are untouched.
        assert!(
            text.contains("shadow = \"plugins/tagger-v2.wasm\""),
            "{text}"
        );
        let config = crate::config::Config::parse(&text, "f.toml").expect("still a config");
        assert_eq!(config.plugins[0].sha256.as_deref(), Some(pin('c').as_str()));
        assert!(config.plugins[0].canary.is_none());
    }

    #[test]
    fn a_pinned_plugin_without_a_candidate_pin_is_pinned_to_the_candidates_digest() {
        // Not a configuration that loads (a pinned plugin's candidates must be pinned), but
        // the text edit still never leaves a pinned plugin unpinned.
        let unpinned = FILE.replace(&format!(", sha256 = \"{}\" }}", pin('c')), " }");
        let text = promote(&unpinned, "f.toml", "gate", &pin('b')).expect("promote");
        assert!(
            text.contains(&format!("sha256 = \"{}\"", pin('b'))),
            "{text}"
        );
    }

    #[test]
    fn an_unpinned_plugin_stays_unpinned() {
        let text = promote(FILE, "f.toml", "tagger", &pin('d')).expect("promote shadow");
        assert!(text.contains("path = \"plugins/tagger-v2.wasm\""), "{text}");
        assert!(!text.contains("shadow"), "{text}");
        assert!(!text.contains(&pin('d')), "{text}");
        // The sub-table that follows the entry still belongs to it.
        let config = crate::config::Config::parse(&text, "f.toml").expect("still a config");
        assert_eq!(
            config.plugins[1]
                .config
                .get("header")
                .and_then(|v| v.as_str()),
            Some("X-Tag")
        );
    }

    #[test]
    fn a_pinned_shadow_is_promoted_with_its_own_pin() {
        let pinned = FILE.replace(
            "shadow = \"plugins/tagger-v2.wasm\"",
            &format!(
                "sha256 = \"{}\"\nshadow = {{ path = \"plugins/tagger-v2.wasm\", sha256 = \"{}\" }}",
                pin('a'),
                pin('e')
            ),
        );
        let candidate = candidate(&pinned, "f.toml", "tagger", "promote").expect("candidate");
        assert_eq!(candidate.sha256, Some(pin('e')));
        let text = promote(&pinned, "f.toml", "tagger", &pin('d')).expect("promote shadow");
        let config = crate::config::Config::parse(&text, "f.toml").expect("still a config");
        assert_eq!(config.plugins[1].sha256.as_deref(), Some(pin('e').as_str()));
        assert!(config.plugins[1].path.ends_with("plugins/tagger-v2.wasm"));
        assert!(config.plugins[1].shadow.is_none());
    }

    #[test]
    fn rolling_back_drops_the_candidate_only() {
        let text = rollback(FILE, "f.toml", "gate").expect("rollback");
        assert!(text.contains("path = \"plugins/gate-v1.wasm\""), "{text}");
        assert!(
            text.contains(&format!("sha256 = \"{}\"", pin('a'))),
            "{text}"
        );
        assert!(!text.contains("canary"), "{text}");
        let text = rollback(&text, "f.toml", "tagger").expect("rollback shadow");
        assert!(!text.contains("shadow"), "{text}");
    }

    #[test]
    fn errors_name_what_is_missing() {
        let error = promote(FILE, "f.toml", "plain", &pin('b')).expect_err("no candidate");
        assert_eq!(
            error.to_string(),
            "plugin `plain` has neither a canary nor a shadow to promote"
        );
        let error = rollback(FILE, "f.toml", "nobody").expect_err("no plugin");
        assert_eq!(error.to_string(), "f.toml: no [[plugin]] named `nobody`");
        let error = rollback("[[plugin", "f.toml", "gate").expect_err("bad toml");
        assert!(
            error.to_string().starts_with("f.toml: not valid TOML"),
            "{error}"
        );
    }
}
