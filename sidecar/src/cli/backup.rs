//! `patina backup PATH [--keep-site-id]`: a consistent snapshot of a node's database
//! (`POST /v1/backup`), written to `PATH` only once complete. By default the copy gets a
//! fresh site id (a seed for a new node); `--keep-site-id` keeps the node's own (to bring
//! that node back after losing its disk).

use std::io::Write;

use anyhow::{anyhow, Context};

use super::client::Client;
use super::BackupArgs;

/// Runs `patina backup`.
pub fn run(args: BackupArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let path = if args.keep_site_id {
        "/v1/backup?keep_site_id=true"
    } else {
        "/v1/backup"
    };
    let r = client.send("POST", path, None)?;
    let site = r.header("patina-site-id").map(str::to_owned);
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
    match (site, args.keep_site_id) {
        (Some(site), true) => println!(
            "wrote {n} bytes to {}, keeping the node's site id {site}",
            args.path.display()
        ),
        (Some(site), false) => println!(
            "wrote {n} bytes to {} with fresh site id {site}",
            args.path.display()
        ),
        (None, _) => println!("wrote {n} bytes to {}", args.path.display()),
    }
    Ok(())
}
