//! Implements every hook with the SDK's defaults ("continue"), so the host calls all of them: the
//! benchmarks measure the host's cost per call with this plugin.

use serde::Deserialize;
use switchyard_plugin_sdk::*;

#[derive(Deserialize)]
pub struct Config {}

pub struct Noop;

impl Plugin for Noop {
    type Config = Config;

    fn new(_: Config) -> Result<Self, String> {
        Ok(Noop)
    }
}

export_plugin!(Noop);
