//! `switchyard plugins new NAME`: a plugin project that builds and passes its own tests at once,
//! a starting point with the SDK's test harness already in use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the SDK is when the binary runs from its source tree (`cargo run`, CI, a checkout).
fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk")
}

/// Writes the project of plugin `name` (a Rust crate) into `directory` (which must not exist
/// yet, or be empty), depending on the SDK at `sdk`.
pub fn new_plugin(name: &str, directory: &Path, sdk: Option<&Path>) -> anyhow::Result<()> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|first| first.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "plugin name `{name}`: lower-case letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let sdk = match sdk {
        Some(sdk) => sdk.to_path_buf(),
        None => default_sdk(),
    };
    let sdk = std::fs::canonicalize(&sdk).with_context(|| {
        format!(
            "the plugin SDK is not at {} (give its directory with --sdk: plugin-sdk/ of a Switchyard checkout)",
            sdk.display()
        )
    })?;
    if directory.exists()
        && std::fs::read_dir(directory)
            .with_context(|| format!("cannot read {}", directory.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", directory.display());
    }
    std::fs::create_dir_all(directory.join("src"))
        .with_context(|| format!("cannot create {}", directory.display()))?;
    let crate_name = name.replace('-', "_");
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    let sdk_path = sdk.display().to_string().replace('\\', "/");
    let files = [
        ("Cargo.toml", CARGO_TOML),
        ("src/lib.rs", LIB_RS),
        ("README.md", README_MD),
        ("manifest.toml", MANIFEST_TOML),
        (".gitignore", "/target\n"),
    ];
    for (file, template) in files {
        let text = template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{Type}}", &type_name)
            .replace("{{sdk}}", &sdk_path);
        let path = directory.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

const CARGO_TOML: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2021"
description = "A Switchyard plugin"

# A project of its own, even inside another workspace.
[workspace]

[lib]
# cdylib: the WebAssembly component; rlib: the native build that `cargo test` runs.
crate-type = ["cdylib", "rlib"]

[dependencies]
switchyard-plugin-sdk = { path = "{{sdk}}" }
serde = { version = "1", features = ["derive"] }

[profile.release]
opt-level = "s"
lto = true
strip = true
"#;

const LIB_RS: &str = r##"//! `{{name}}`: refuses mail to the recipients its configuration lists, at RCPT TO.
//!
//! ```toml
//! [[plugin]]
//! name = "{{name}}"
//! path = "target/wasm32-wasip2/release/{{crate}}.wasm"
//! [plugin.config]
//! blocked = ["former-employee@example.com"]
//! reply = "550 5.1.1 No such user here"
//! ```

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Recipients refused, compared case-insensitively.
    #[serde(default)]
    pub blocked: Vec<String>,
    /// The refusal, "CODE ENHANCED text" with a 5xx code.
    #[serde(default = "default_reply")]
    pub reply: String,
}

fn default_reply() -> String {
    "550 5.1.1 Recipient refused".to_string()
}

pub struct {{Type}} {
    blocked: Vec<String>,
    reply: Reply,
}

impl Plugin for {{Type}} {
    type Config = Config;
    // Only the hooks listed here are called.
    const HOOKS: &'static [Hook] = &[Hook::RcptTo];

    fn new(config: Config) -> Result<Self, String> {
        Ok({{Type}} {
            blocked: config.blocked.iter().map(|r| r.to_lowercase()).collect(),
            reply: Reply::parse(&config.reply, 500..600)?,
        })
    }

    fn rcpt_to(&self, _: &Session, _: &Envelope, recipient: &str, _: &[Param]) -> AddressDecision {
        if self.blocked.contains(&recipient.to_lowercase()) {
            AddressDecision::reject(self.reply.code, &self.reply.enhanced, self.reply.text.clone())
        } else {
            AddressDecision::next()
        }
    }
}

export_plugin!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_sdk::testing::Harness;

    fn plugin() -> Harness<{{Type}}> {
        Harness::new(r#"{"blocked": ["Gone@Example.com"], "reply": "550 5.1.1 Gone"}"#)
            .expect("the config loads")
    }

    #[test]
    fn a_listed_recipient_is_refused_with_the_configured_reply() {
        let decision = plugin().rcpt_to("gone@example.com");
        assert_eq!(
            decision.verdict,
            Verdict::Reject(Reply { code: 550, enhanced: "5.1.1".into(), text: "Gone".into() })
        );
    }

    #[test]
    fn other_recipients_go_on_to_the_next_plugin() {
        assert_eq!(plugin().rcpt_to("someone@example.com").verdict, Verdict::Continue);
    }

    #[test]
    fn a_reply_that_does_not_refuse_is_a_config_error() {
        let error = Harness::<{{Type}}>::new(r#"{"reply": "250 2.0.0 fine"}"#).err();
        assert!(error.is_some());
    }
}
"##;

const README_MD: &str = r#"# {{name}}

A Switchyard plugin.

```sh
cargo test                                       # natively, with the SDK's mock host
rustup target add wasm32-wasip2                  # once
cargo build --target wasm32-wasip2 --release     # target/wasm32-wasip2/release/{{crate}}.wasm
```

Add `manifest.toml`'s table to the router's configuration (or a tenant file), with `path` pointing
at the built component, and reload (`switchyard plugins reload`). The plugin guide of Switchyard
(`docs/plugin-guide.md`) walks through the hooks, grants, limits and the test harness.
"#;

const MANIFEST_TOML: &str = r#"# The [[plugin]] table for the router's configuration.
[[plugin]]
name = "{{name}}"
path = "target/wasm32-wasip2/release/{{crate}}.wasm"
[plugin.config]
blocked = ["former-employee@example.com"]
reply = "550 5.1.1 No such user here"
"#;
