//! `patina backup PATH`: a consistent snapshot of a node's database without its identity
//! (`POST /v1/backup`), written to `PATH` only once complete.

use std::io::Write;

use anyhow::{anyhow, Context};

use super::client::Client;
use super::BackupArgs;

/// Runs `patina backup`.
pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let r = client.send("POST", "/v1/backup", None)?;
    let expected: Option<u64> = r.header("Content-Length").and_then(|v| v.parse().ok());
    let tmp = args.path.with_extension("partial");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let copied = std::io::copy(&mut r.into_reader(), &mut file);
    let done = copied
        .with_context(|| format!("the backup stream from {} broke off", client.api))
        .and_then(|n| {
            file.flush()?;
            file.sync_all()
                .with_context(|| format!("cannot sync {}", tmp.display()))?;
            match expected {
                Some(e) if e != n => Err(anyhow!(
                    "the backup from {} is truncated: {n} of {e} bytes",
                    client.api
                )),
                _ => Ok(n),
            }
        });
    let n = match done {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &args.path)
        .with_context(|| format!("cannot move the backup into {}", args.path.display()))?;
    println!("wrote {n} bytes to {}", args.path.display());
    Ok(())
}
