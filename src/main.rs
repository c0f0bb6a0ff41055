//! The `slotgate` binary: one CLI for every role.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// slotgate: sell API plans by concurrency slots and rate limits, enforced in front of any upstream.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (`slotgate crds | kubectl apply -f -`).
    Crds,
    /// Compile a folder of ApiPlan, ApiKey and Secret manifests into a gateway configuration file.
    Compile {
        /// Folder of YAML manifests.
        #[arg(default_value = "examples")]
        dir: PathBuf,
        /// Where to write the configuration (JSON); `-` for standard output.
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => print!("{}", slotgate::api::crds_yaml()),
        Command::Compile { dir, output } => {
            let folder = slotgate::standalone::load_dir(&dir)?;
            for skipped in &folder.skipped {
                eprintln!("warning: skipped {skipped}: not an ApiPlan, ApiKey or Secret");
            }
            let compiled = folder.compile(None);
            for (id, report) in &compiled.keys {
                if let Some(c) = report.conditions.iter().find(|c| !c.status) {
                    eprintln!(
                        "warning: ApiKey {id}: {}=False {}: {}",
                        c.type_, c.reason, c.message
                    );
                }
            }
            let json = compiled.config.to_json();
            if output.as_os_str() == "-" {
                println!("{}", String::from_utf8_lossy(&json));
            } else {
                std::fs::write(&output, json).with_context(|| format!("writing {}", output.display()))?;
            }
        }
    }
    Ok(())
}
