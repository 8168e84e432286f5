//! The blocking HTTP client the client subcommands share: `--api`, `--token`, and error
//! text that says which node answered what.

use std::io::Read;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::Value;

use super::ClientArgs;

/// A node's API.
pub struct Client {
    /// `--api` as given, for messages.
    pub api: String,
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `--api ADDR` (`host:port` or a full `http://` URL).
    pub fn new(args: &ClientArgs) -> Client {
        let base = if args.api.starts_with("http://") || args.api.starts_with("https://") {
            args.api.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", args.api)
        };
        Client {
            api: args.api.clone(),
            base,
            token: args.token.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .build(),
        }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self
            .agent
            .request(method, &format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the node's message.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<ureq::Response> {
        let req = self.request(method, path);
        let res = match body {
            Some((ctype, bytes)) => req.set("Content-Type", ctype).send_bytes(bytes),
            None => req.call(),
        };
        res.map_err(|e| self.describe(method, path, e))
    }

    /// GET or POST answering JSON.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> anyhow::Result<Value> {
        let r = self.send(method, path, body)?;
        let mut text = String::new();
        r.into_reader()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the answer of {} {path}", self.api))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "the node at {} answered {path} with non-JSON: {text}",
                self.api
            )
        })
    }

    fn describe(&self, method: &str, path: &str, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::Status(code, r) => {
                let mut text = String::new();
                let _ = r.into_reader().take(64 * 1024).read_to_string(&mut text);
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| error_text(&v))
                    .unwrap_or(text);
                anyhow!("{method} {path} on {}: HTTP {code}: {msg}", self.api)
            }
            ureq::Error::Transport(t) => anyhow!("cannot reach the node at {}: {t}", self.api),
        }
    }
}

/// The error message in any of the API's error shapes.
pub fn error_text(v: &Value) -> Option<String> {
    v.get("error")
        .and_then(Value::as_str)
        .or_else(|| v.pointer("/results/0/error").and_then(Value::as_str))
        .map(String::from)
}

/// A JSON value as a table cell: text bare, NULL as `NULL`, blobs as `x'..'`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|x| x.as_u64().is_some_and(|b| b < 256)) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|b| b as u8)
                .collect();
            format!("x'{}'", hex::encode(bytes))
        }
        other => other.to_string(),
    }
}

/// JSON rows (arrays of values) as table cells.
pub fn cells(rows: &[Value]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            r.as_array()
                .map(|r| r.iter().map(cell).collect())
                .unwrap_or_default()
        })
        .collect()
}

/// An aligned text table.
pub fn table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let fmt_row = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = widths.get(i).copied().unwrap_or(0);
                format!("{c}{}", " ".repeat(w.saturating_sub(c.chars().count())))
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = fmt_row(columns);
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&rule.join("  "));
    out.push('\n');
    for r in rows {
        out.push_str(&fmt_row(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["id".into(), "name".into()],
            &[
                vec!["1".into(), "alpha".into()],
                vec!["22".into(), "b".into()],
            ],
        );
        assert_eq!(t, "id  name\n--  -----\n1   alpha\n22  b\n");
        assert_eq!(cell(&serde_json::json!([0, 255])), "x'00ff'");
        assert_eq!(cell(&Value::Null), "NULL");
    }
}
