//! `switchyard plugins new NAME`: a plugin project that builds and passes its own tests at once,
//! a starting point with the SDK's test harness already in use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the SDK is when the binary runs from its source tree (`cargo run`, CI, a checkout).
fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk")
}

/// The languages a project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate on the SDK, tested with its mock host (`cargo test`).
    Rust,
    /// An app for componentize-py, tested with unittest.
    Python,
    /// A module for componentize-js, tested with Node's test runner.
    Js,
}

/// The WIT package, copied into Python and JavaScript projects (their toolchains read it).
const WIT: &str = include_str!("../../../wit/switchyard-plugin.wit");

/// Writes the project of plugin `name` in `lang` into `directory` (which must not exist yet, or
/// be empty); a Rust project depends on the SDK at `sdk`.
pub fn new_plugin(
    name: &str,
    lang: Lang,
    directory: &Path,
    sdk: Option<&Path>,
) -> anyhow::Result<()> {
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
    // Crate names Cargo or Rust refuse (a keyword, or a crate of the standard library).
    const RESERVED: &[&str] = &[
        "alloc",
        "as",
        "async",
        "await",
        "break",
        "const",
        "continue",
        "core",
        "crate",
        "dyn",
        "else",
        "enum",
        "extern",
        "false",
        "fn",
        "for",
        "if",
        "impl",
        "in",
        "let",
        "loop",
        "match",
        "mod",
        "move",
        "mut",
        "proc_macro",
        "pub",
        "ref",
        "return",
        "self",
        "static",
        "std",
        "struct",
        "super",
        "test",
        "trait",
        "true",
        "type",
        "unsafe",
        "use",
        "where",
        "while",
    ];
    if RESERVED.contains(&name.replace('-', "_").as_str()) {
        bail!("plugin name `{name}` is reserved in Rust; choose another");
    }
    if directory.exists()
        && std::fs::read_dir(directory)
            .with_context(|| format!("cannot read {}", directory.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", directory.display());
    }
    let files: &[(&str, &str)] = match lang {
        Lang::Rust => &[
            ("Cargo.toml", CARGO_TOML),
            ("src/lib.rs", LIB_RS),
            ("README.md", README_MD),
            ("manifest.toml", MANIFEST_TOML),
            (".gitignore", "/target\n"),
        ],
        Lang::Python => &[
            ("app.py", APP_PY),
            ("test_app.py", TEST_APP_PY),
            ("test.sh", PYTHON_TEST_SH),
            ("build.sh", PYTHON_BUILD_SH),
            ("wit/switchyard-plugin.wit", WIT),
            ("README.md", PYTHON_README_MD),
            ("manifest.toml", MANIFEST_TOML),
            (".gitignore", "/.bindings\n/*.wasm\n__pycache__/\n"),
        ],
        Lang::Js => &[
            ("plugin.js", PLUGIN_JS),
            ("plugin.test.mjs", PLUGIN_TEST_MJS),
            ("build.mjs", BUILD_MJS),
            ("package.json", PACKAGE_JSON),
            ("wit/switchyard-plugin.wit", WIT),
            ("README.md", JS_README_MD),
            ("manifest.toml", MANIFEST_TOML),
            (".gitignore", "/node_modules\n/*.wasm\n"),
        ],
    };
    // Only a Rust project needs the SDK.
    let sdk = if lang == Lang::Rust {
        let sdk = sdk.map(Path::to_path_buf).unwrap_or_else(default_sdk);
        std::fs::canonicalize(&sdk).with_context(|| {
            format!(
                "the plugin SDK is not at {} (give its directory with --sdk: plugin-sdk/ of a Switchyard checkout)",
                sdk.display()
            )
        })?
    } else {
        PathBuf::new()
    };
    let crate_name = name.replace('-', "_");
    // `Plugin` at the end: no name can make it one of the SDK's types (`Session`, `Reply`...).
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .chain(std::iter::once("Plugin".to_string()))
        .collect();
    let sdk_path = sdk.display().to_string().replace('\\', "/");
    let component = match lang {
        Lang::Rust => format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        Lang::Python | Lang::Js => format!("{crate_name}.wasm"),
    };
    for (file, template) in files {
        let text = template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{Type}}", &type_name)
            .replace("{{sdk}}", &sdk_path)
            .replace("{{component}}", &component);
        let path = directory.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if file.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
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
path = "{{component}}"
[plugin.config]
blocked = ["former-employee@example.com"]
reply = "550 5.1.1 No such user here"
"#;

const APP_PY: &str = r##""""{{name}}: refuses mail to the recipients its configuration lists, at RCPT TO.

Built with componentize-py for the `plugin-core` world of wit/switchyard-plugin.wit (./build.sh).

Config (JSON from the host's [plugin.config] table):
    blocked: recipient addresses refused, case-insensitively
    reply: the refusal, "CODE ENHANCED text" with a 5xx code
"""

import json

from wit_world import exports
from wit_world.imports import types
from componentize_py_types import Err

CONTINUE = types.AddressDecision(verdict=types.Verdict_Continue(), rewrite=None)


class Hooks(exports.Hooks):
    blocked = []
    reply = types.Reply(code=550, enhanced="5.1.1", text="Recipient refused")

    def init(self, config: str) -> types.PluginInfo:
        try:
            parsed = json.loads(config)
        except ValueError as error:
            raise Err(f"config is not JSON: {error}")
        Hooks.blocked = [address.lower() for address in parsed.get("blocked", [])]
        code, enhanced, text = parsed.get("reply", "550 5.1.1 Recipient refused").split(" ", 2)
        if not code.startswith("5"):
            raise Err("reply must refuse: a 5xx code")
        Hooks.reply = types.Reply(code=int(code), enhanced=enhanced, text=text)
        # The host calls only these.
        return types.PluginInfo(hooks=["rcpt-to"])

    def rcpt_to(self, session, envelope, recipient, params):
        if recipient.lower() in Hooks.blocked:
            return types.AddressDecision(verdict=types.Verdict_Reject(Hooks.reply), rewrite=None)
        return CONTINUE

    # The world's other hooks: never called (not listed by init), but a component exports them.
    def connect(self, session):
        return types.Verdict_Continue()

    def helo(self, session, name):
        return types.Verdict_Continue()

    def auth(self, session, mechanism, identity):
        return types.Verdict_Continue()

    def mail_from(self, session, sender, params):
        return CONTINUE

    def data(self, session, envelope, auth, body):
        return types.DataDecision(verdict=types.DataVerdict_Continue(), edits=[])

    def route(self, message, recipient):
        return types.NextHop_Continue()

    def delivery_result(self, report):
        return None

    def bounce(self, report):
        return None
"##;

const TEST_APP_PY: &str = r##""""The plugin's own tests, natively (./test.sh): the hooks are methods, called with a session and
an envelope made here, on the bindings componentize-py generates from the WIT."""

import json
import unittest

import app
from componentize_py_types import Err
from wit_world.imports import types

ENVELOPE = types.Envelope(sender="s@sender.example", recipients=[])


class HooksTest(unittest.TestCase):
    def setUp(self):
        self.hooks = app.Hooks()
        info = self.hooks.init(json.dumps({"blocked": ["Gone@Example.com"], "reply": "550 5.1.1 Gone"}))
        self.assertEqual(info.hooks, ["rcpt-to"])

    def test_a_listed_recipient_is_refused_with_the_configured_reply(self):
        decision = self.hooks.rcpt_to(None, ENVELOPE, "gone@example.com", [])
        self.assertEqual(decision.verdict, types.Verdict_Reject(types.Reply(code=550, enhanced="5.1.1", text="Gone")))

    def test_other_recipients_go_on_to_the_next_plugin(self):
        decision = self.hooks.rcpt_to(None, ENVELOPE, "someone@example.com", [])
        self.assertEqual(decision.verdict, types.Verdict_Continue())

    def test_a_reply_that_does_not_refuse_is_a_config_error(self):
        with self.assertRaises(Err):
            self.hooks.init(json.dumps({"reply": "250 2.0.0 fine"}))


if __name__ == "__main__":
    unittest.main()
"##;

const PYTHON_TEST_SH: &str = r##"#!/usr/bin/env bash
# Runs the plugin's tests natively, on bindings generated from the WIT into .bindings/.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf .bindings
componentize-py -d wit -w plugin-core bindings .bindings >/dev/null
PYTHONPATH=.bindings python3 -m unittest -v test_app
"##;

const PYTHON_BUILD_SH: &str = r##"#!/usr/bin/env bash
# Builds the component: {{component}}.
set -euo pipefail
cd "$(dirname "$0")"
componentize-py -d wit -w plugin-core componentize app -o {{component}} >/dev/null
echo "built {{component}}"
"##;

const PYTHON_README_MD: &str = r##"# {{name}}

A Switchyard plugin in Python, built with componentize-py (`python3 -m pip install componentize-py==0.25.1`).

```sh
./test.sh      # its tests, natively (unittest, on bindings generated from wit/)
./build.sh     # {{component}}
```

Add `manifest.toml`'s table to the router's configuration, with `path` pointing at the built
component, and reload (`switchyard plugins reload`). The component embeds CPython (about 18 MB):
each transaction's instance runs `init` itself, so keep `init` cheap. Switchyard's plugin guide
(`docs/plugin-guide.md`) walks through the hooks and their answers.
"##;

const PLUGIN_JS: &str = r##"// {{name}}: refuses mail to the recipients its configuration lists, at RCPT TO.
//
// Built with componentize-js for the `plugin-core` world of wit/switchyard-plugin.wit
// (npm run build). WIT names become camelCase (rcpt-to: rcptTo); a variant is { tag, val }; an
// option is the value or undefined; a `result` error is thrown.
//
// Config (JSON from the host's [plugin.config] table):
//   blocked: recipient addresses refused, case-insensitively
//   reply: the refusal, "CODE ENHANCED text" with a 5xx code

const carryOn = { tag: "continue" };
let blocked = [];
let reply = { code: 550, enhanced: "5.1.1", text: "Recipient refused" };

export const hooks = {
  init(text) {
    let config;
    try {
      config = JSON.parse(text);
    } catch (error) {
      throw `config is not JSON: ${error}`;
    }
    const [code, enhanced, ...words] = (config.reply || "550 5.1.1 Recipient refused").split(" ");
    if (!code.startsWith("5")) {
      throw "reply must refuse: a 5xx code";
    }
    blocked = (config.blocked || []).map((address) => address.toLowerCase());
    reply = { code: Number(code), enhanced, text: words.join(" ") };
    // The host calls only these.
    return { hooks: ["rcpt-to"] };
  },

  rcptTo(session, envelope, recipient, params) {
    if (blocked.includes(recipient.toLowerCase())) {
      return { verdict: { tag: "reject", val: reply } };
    }
    return { verdict: carryOn };
  },

  // The world's other hooks: never called (not listed by init), but a component exports them.
  connect: (session) => carryOn,
  helo: (session, name) => carryOn,
  auth: (session, mechanism, identity) => carryOn,
  mailFrom: (session, sender, params) => ({ verdict: carryOn }),
  data: (session, envelope, auth, body) => ({ verdict: carryOn, edits: [] }),
  route: (message, recipient) => carryOn,
  deliveryResult: (report) => {},
  bounce: (report) => undefined,
};
"##;

const PLUGIN_TEST_MJS: &str = r##"// The plugin's own tests, natively with Node's test runner (npm test): the hooks are plain
// functions, called with a session and an envelope made here.
import { test } from "node:test";
import assert from "node:assert/strict";
import { hooks } from "./plugin.js";

const envelope = { sender: "s@sender.example", recipients: [] };

test("a listed recipient is refused with the configured reply", () => {
  assert.deepEqual(hooks.init(JSON.stringify({ blocked: ["Gone@Example.com"], reply: "550 5.1.1 Gone" })), {
    hooks: ["rcpt-to"],
  });
  assert.deepEqual(hooks.rcptTo({}, envelope, "gone@example.com", []).verdict, {
    tag: "reject",
    val: { code: 550, enhanced: "5.1.1", text: "Gone" },
  });
});

test("other recipients go on to the next plugin", () => {
  hooks.init(JSON.stringify({ blocked: ["gone@example.com"] }));
  assert.equal(hooks.rcptTo({}, envelope, "someone@example.com", []).verdict.tag, "continue");
});

test("a reply that does not refuse is a config error", () => {
  assert.throws(() => hooks.init(JSON.stringify({ reply: "250 2.0.0 fine" })), /5xx/);
});
"##;

const BUILD_MJS: &str = r##"// Builds plugin.js into a component for the `plugin-core` world: {{component}}.
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const here = (file) => fileURLToPath(new URL(file, import.meta.url));
const { component } = await componentize({
  sourcePath: here("plugin.js"),
  witPath: here("wit"),
  worldName: "plugin-core",
  // No clocks, random numbers, stdio or HTTP: the plugin decides from its inputs alone.
  disableFeatures: ["random", "stdio", "clocks", "http", "fetch-event"],
});
await writeFile(process.argv[2] || here("{{component}}"), component);
console.log("built", process.argv[2] || "{{component}}");
"##;

const PACKAGE_JSON: &str = r##"{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {
    "build": "node build.mjs",
    "test": "node --test"
  },
  "devDependencies": {
    "@bytecodealliance/componentize-js": "0.23.0",
    "@bytecodealliance/preview2-shim": "0.25.0"
  }
}
"##;

const JS_README_MD: &str = r##"# {{name}}

A Switchyard plugin in JavaScript, built with componentize-js (StarlingMonkey, from npm).

```sh
npm install
npm test          # its tests, natively (node --test)
npm run build     # {{component}}
```

`@bytecodealliance/preview2-shim` is listed beside componentize-js because componentize-js 0.23.0
imports it at build time without declaring it.

Add `manifest.toml`'s table to the router's configuration, with `path` pointing at the built
component, and reload (`switchyard plugins reload`). The component embeds a JavaScript engine
(about 12 MB): each transaction's instance runs `init` itself, so keep `init` cheap. Switchyard's
plugin guide (`docs/plugin-guide.md`) walks through the hooks and their answers.
"##;
