use clap::Parser;
use switchyard::{
    cli::{Cli, Command},
    config::AgentConfig,
    run,
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Agent { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run::agent(&config)),
        Command::CheckConfig { config } => {
            let c = AgentConfig::load(&config)?;
            println!(
                "{}: ok, {} services",
                config.display(),
                c.catalog.services.len()
            );
            Ok(())
        }
    }
}
