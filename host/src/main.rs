use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use switchyard::cli::{
    auth_command, dkim_command, load_config, plugins_command, queue_command, tls_reports_command,
    Cli, Command,
};
use switchyard::config::Config;
use switchyard::dkim::KeySet;
use switchyard::net::tls::CertificateResolver;

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            if let Some(ca_file) = &config.delivery.ca_file {
                switchyard::net::verify::ClientTls::new(Some(ca_file))?;
            }
            if let Some(credentials) = &config.delivery.credentials_file {
                switchyard::delivery::credentials::CredentialsFile::load(credentials)?;
            }
            // Plugins are compiled and initialised too: a bad component or plugin config is a
            // configuration error; so are key files that do not load.
            let runtime = tokio::runtime::Runtime::new()?;
            let tenants = config.load_tenants()?;
            KeySet::load(&config.dkim)?.with_sealer(&config.arc)?;
            for tenant in &tenants {
                KeySet::load(&tenant.dkim)?.with_sealer(&tenant.arc)?;
            }
            if let Some(files) = &config.tls {
                switchyard::net::tls::Certificates::load(files)?;
                for tenant in &tenants {
                    CertificateResolver::load_tenant(&tenant.certificates, &tenant.domains)?;
                }
            }
            runtime.block_on(switchyard::plugins::check(
                &config.plugins,
                &tenants,
                &config.data_dir.join("plugin-cache"),
            ))?;
            if config.queue.engine == switchyard::config::QueueEngine::Postgres {
                let location = switchyard::queue::location(&config.queue, &config.data_dir);
                let version = runtime
                    .block_on(switchyard::queue::postgres::check(&config.queue))
                    .with_context(|| format!("connecting to the queue {location}"))?;
                eprintln!("queue {location} reachable, schema version {version}");
            }
            if !tenants.is_empty() {
                eprintln!("{} tenant file(s) valid", tenants.len());
            }
            for warning in switchyard::scan::warnings(&config, &tenants) {
                eprintln!("warning: {warning}");
            }
            print!("{}", config.to_toml());
            eprintln!("{}: configuration is valid", file.display());
            Ok(())
        }
        Command::Serve {
            config: config_path,
        } => {
            let config = load_config(config_path.as_ref())?;
            init_logging(&config.log.level);
            let runtime = tokio::runtime::Runtime::new()?;
            let served = runtime.block_on(switchyard::serve::serve(config, config_path));
            // Work a stop cut short (a delivery past the drain time) must not hold up the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            served
        }
        Command::Plugins {
            config: config_path,
            action,
        } => {
            let config = load_config(config_path.as_ref())?;
            init_logging("warn");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(plugins_command(config_path.as_deref(), &config, action))
        }
        Command::Auth { action } => auth_command(action),
        Command::Dkim { action } => dkim_command(action),
        Command::TlsReports { config, action } => {
            let config = load_config(config.as_ref())?;
            init_logging("warn");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(tls_reports_command(&config, action))
        }
        Command::Queue { config, action } => {
            let config = load_config(config.as_ref())?;
            init_logging("warn");
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(queue_command(&config, action))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the one before
/// already ends with (drivers often wrap an error in one that repeats it: "error returned from
/// database: role x does not exist", caused by "role x does not exist").
fn describe(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|last| last.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}
