//! Helpers of the operator's CLI commands that read the configuration file themselves.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::config::{self, Config};

/// `cdn-steer check` without the host part: what the configuration would build, with every
/// member healthy, as text.
pub fn check_summary(cfg: &Config) -> Result<String> {
    Ok(super::check::render_config(&super::check::summarize(
        Path::new(""),
        cfg,
    )))
}

/// The control socket path of a configuration file, for the CLI's client commands.
///
/// The file may have been edited into something invalid since the daemon read it (that is when
/// one wants `status` most), so only `node.control_socket` has to be readable.
pub fn control_socket_of(config: Option<&Path>) -> Result<PathBuf> {
    let Some(path) = config else {
        return Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET));
    };
    match config::load(path) {
        Ok(cfg) => Ok(cfg.node.control_socket),
        Err(e) => {
            let text = std::fs::read_to_string(path).map_err(|_| anyhow::anyhow!("{e}"))?;
            let value: toml::Table = toml::from_str(&text).map_err(|_| anyhow::anyhow!("{e}"))?;
            match value.get("node").and_then(|n| n.get("control_socket")) {
                Some(toml::Value::String(socket)) => Ok(PathBuf::from(socket)),
                Some(_) => bail!("{e}"),
                None => Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET)),
            }
        }
    }
}
