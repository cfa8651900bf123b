//! `kiln config show`: the settings as every source resolved them (as `nix config show`).

use std::process::ExitCode;

use clap::Subcommand;

use super::StoreArgs;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print every setting with its effective value, `name = value` per line.
    Show {
        /// One JSON object, setting name → value.
        #[arg(long)]
        json: bool,
        /// Only this setting's value.
        name: Option<String>,
    },
}

pub fn run(args: &StoreArgs, cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    let (_, settings) = args.resolve()?;
    match cmd {
        ConfigCmd::Show { json, name } => {
            if let Some(n) = name {
                if !settings.iter().any(|(k, _)| k == n) {
                    anyhow::bail!("unknown setting '{n}'");
                }
                println!("{}", settings.get(&n));
            } else if json {
                let map: serde_json::Map<String, serde_json::Value> = settings
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (k, v) in settings.iter() {
                    println!("{k} = {v}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
