//! The NATS habits an operator brings: a `nats` CLI context (`--context NAME` or
//! `NATS_CONTEXT`) and the `NATS_*` environment variables, read as the layer just above the
//! built-in defaults — so a settings file, `DELTASYNC_*` variables and flags override them.
//!
//! Talks to the file system (the context file) through [`read_context`]; the mapping from
//! context fields and variables to settings is pure ([`layer`]).
//!
//! ```text
//! context field       NATS_* variable   setting
//! url                 NATS_URL          nats.url
//! user / password     NATS_USER / NATS_PASSWORD   nats.user / nats.password
//! token               NATS_TOKEN        nats.token
//! creds               NATS_CREDS        nats.creds_file
//! nkey                NATS_NKEY         nats.nkey_file (a file holding the seed)
//! ca / cert / key     NATS_CA / NATS_CERT / NATS_KEY  nats.tls.ca_file / cert_file / key_file
//! jetstream_domain    -                 nats.jetstream_domain
//! inbox_prefix        -                 nats.inbox_prefix
//! ```
//!
//! A context is `$XDG_CONFIG_HOME/nats/context/NAME.json` (`~/.config/...` when unset), or a
//! path when NAME holds a `/` or ends in `.json`. The context the `nats` CLI has *selected*
//! is not read unless named: a deltasync process connects where its own settings say.
//! Context fields deltasync cannot honour (a socks proxy, `nsc` lookups, an API prefix, ...)
//! are refused when set rather than ignored, since connecting without them would reach the
//! wrong place or fail obscurely; descriptive fields are ignored.

use super::SettingsError;
use std::collections::HashMap;
use std::path::PathBuf;

/// The variable naming the context, like the `nats` CLI's.
pub const CONTEXT_ENV: &str = "NATS_CONTEXT";

/// (`NATS_*` variable, setting) pairs, in the table's order.
const ENV_KEYS: [(&str, &str); 9] = [
    ("NATS_URL", "nats.url"),
    ("NATS_USER", "nats.user"),
    ("NATS_PASSWORD", "nats.password"),
    ("NATS_TOKEN", "nats.token"),
    ("NATS_CREDS", "nats.creds_file"),
    ("NATS_NKEY", "nats.nkey_file"),
    ("NATS_CA", "nats.tls.ca_file"),
    ("NATS_CERT", "nats.tls.cert_file"),
    ("NATS_KEY", "nats.tls.key_file"),
];

/// (context field, setting) pairs.
const CONTEXT_KEYS: [(&str, &str); 11] = [
    ("url", "nats.url"),
    ("user", "nats.user"),
    ("password", "nats.password"),
    ("token", "nats.token"),
    ("creds", "nats.creds_file"),
    ("nkey", "nats.nkey_file"),
    ("ca", "nats.tls.ca_file"),
    ("cert", "nats.tls.cert_file"),
    ("key", "nats.tls.key_file"),
    ("jetstream_domain", "nats.jetstream_domain"),
    ("inbox_prefix", "nats.inbox_prefix"),
];

/// Context fields that only describe the context.
const CONTEXT_IGNORED: [&str; 3] = ["description", "color_scheme", "name"];

/// One setting from this layer: its key, value, and where it came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: &'static str,
    pub value: String,
    pub origin: String,
}

/// A context file, read: its name (as given), path and JSON.
#[derive(Debug, Clone)]
pub struct Context {
    pub name: String,
    pub path: PathBuf,
    pub json: serde_json::Value,
}

/// Where the context `name` lives, given the environment (`XDG_CONFIG_HOME`, `HOME`).
pub fn context_path(name: &str, vars: &HashMap<String, String>) -> Result<PathBuf, SettingsError> {
    if name.contains('/') || name.ends_with(".json") {
        return Ok(PathBuf::from(name));
    }
    let base = match (vars.get("XDG_CONFIG_HOME"), vars.get("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".config"),
        _ => {
            return Err(SettingsError::invalid(
                "nats context",
                format!(
                    "cannot find context {name:?}: neither XDG_CONFIG_HOME nor HOME is set; \
                     give the context file's path instead"
                ),
            ))
        }
    };
    Ok(base
        .join("nats")
        .join("context")
        .join(format!("{name}.json")))
}

/// Reads the context named by `flag` (`--context`), else by `NATS_CONTEXT`; `None` when
/// neither names one.
pub fn read_context(
    flag: Option<&str>,
    vars: &HashMap<String, String>,
) -> Result<Option<Context>, SettingsError> {
    let (name, how) = match (flag, vars.get(CONTEXT_ENV)) {
        (Some(n), _) => (n.to_owned(), "--context"),
        (None, Some(n)) if !n.is_empty() => (n.clone(), CONTEXT_ENV),
        _ => return Ok(None),
    };
    let path = context_path(&name, vars)?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        SettingsError::invalid(
            "nats context",
            format!(
                "{how} names context {name:?}, but {} cannot be read: {e}",
                path.display()
            ),
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        SettingsError::invalid(
            "nats context",
            format!("context {name:?} ({}) is not JSON: {e}", path.display()),
        )
    })?;
    Ok(Some(Context { name, path, json }))
}

/// The settings this layer sets: the context's fields, then the `NATS_*` variables over them.
pub fn layer(
    context: Option<&Context>,
    vars: &HashMap<String, String>,
) -> Result<Vec<Entry>, SettingsError> {
    let mut out: Vec<Entry> = Vec::new();
    let mut set = |key: &'static str, value: String, origin: String| {
        out.retain(|e| e.key != key);
        out.push(Entry { key, value, origin });
    };
    if let Some(ctx) = context {
        let origin = format!("the NATS context {:?} ({})", ctx.name, ctx.path.display());
        let fields = ctx.json.as_object().ok_or_else(|| {
            SettingsError::invalid("nats context", format!("{origin} is not a JSON object"))
        })?;
        for (field, value) in fields {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(false) | serde_json::Value::Null => String::new(),
                serde_json::Value::Array(a) if a.is_empty() => String::new(),
                other => other.to_string(),
            };
            if text.is_empty() || CONTEXT_IGNORED.contains(&field.as_str()) {
                continue; // the nats CLI writes every field, unset ones empty
            }
            match CONTEXT_KEYS.iter().find(|(f, _)| f == field) {
                Some((_, key)) => set(key, text, origin.clone()),
                None => {
                    return Err(SettingsError::invalid(
                        "nats context",
                        format!(
                            "{origin} sets {field:?}, which deltasync does not support; \
                             remove it or use a context without it (supported: {})",
                            CONTEXT_KEYS.map(|(f, _)| f).join(", ")
                        ),
                    ))
                }
            }
        }
    }
    for (var, key) in ENV_KEYS {
        if let Some(v) = vars.get(var).filter(|v| !v.is_empty()) {
            set(key, v.clone(), format!("the environment variable {var}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ctx(json: serde_json::Value) -> Context {
        Context {
            name: "orders".into(),
            path: PathBuf::from("/home/op/.config/nats/context/orders.json"),
            json,
        }
    }

    #[test]
    fn a_context_name_is_found_under_the_xdg_config_home_or_home() {
        let v = vars(&[("HOME", "/home/op")]);
        assert_eq!(
            context_path("orders", &v).unwrap(),
            PathBuf::from("/home/op/.config/nats/context/orders.json")
        );
        let v = vars(&[("HOME", "/home/op"), ("XDG_CONFIG_HOME", "/etc/xdg")]);
        assert_eq!(
            context_path("orders", &v).unwrap(),
            PathBuf::from("/etc/xdg/nats/context/orders.json")
        );
        assert_eq!(
            context_path("./ctx/orders.json", &v).unwrap(),
            PathBuf::from("./ctx/orders.json")
        );
        assert!(context_path("orders", &vars(&[])).is_err());
    }

    #[test]
    fn variables_override_the_context_and_empty_fields_are_unset() {
        let c = ctx(serde_json::json!({
            "description": "prod", "url": "nats://ctx:4222", "user": "alice",
            "password": "pw", "token": "", "creds": "", "nkey": "", "cert": "",
            "key": "", "ca": "/ca.pem", "nsc": "", "jetstream_domain": "hub",
            "jetstream_api_prefix": "", "socks_proxy": "", "tls_first": false,
        }));
        let v = vars(&[("NATS_URL", "nats://env:4222"), ("NATS_CA", "")]);
        let got = layer(Some(&c), &v).unwrap();
        let find = |k: &str| got.iter().find(|e| e.key == k).cloned();
        let url = find("nats.url").unwrap();
        assert_eq!(url.value, "nats://env:4222");
        assert_eq!(url.origin, "the environment variable NATS_URL");
        let user = find("nats.user").unwrap();
        assert_eq!(user.value, "alice");
        assert!(
            user.origin.contains("NATS context \"orders\""),
            "{}",
            user.origin
        );
        assert_eq!(find("nats.tls.ca_file").unwrap().value, "/ca.pem");
        assert_eq!(find("nats.jetstream_domain").unwrap().value, "hub");
        assert_eq!(find("nats.token"), None);
        assert_eq!(got.len(), 5, "{got:?}");
    }

    #[test]
    fn a_context_field_deltasync_cannot_honour_is_refused() {
        for (field, value) in [
            ("socks_proxy", serde_json::json!("socks5://p:1080")),
            ("tls_first", serde_json::json!(true)),
            ("jetstream_api_prefix", serde_json::json!("$JS.x.API")),
        ] {
            let c = ctx(serde_json::json!({ "url": "nats://a:4222", field: value }));
            let err = layer(Some(&c), &vars(&[])).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("does not support"),
                "{err}"
            );
        }
    }

    #[test]
    fn without_a_context_only_the_variables_count() {
        let got = layer(
            None,
            &vars(&[("NATS_CREDS", "/x.creds"), ("NATS_OTHER", "1")]),
        )
        .unwrap();
        assert_eq!(
            got,
            vec![Entry {
                key: "nats.creds_file",
                value: "/x.creds".into(),
                origin: "the environment variable NATS_CREDS".into()
            }]
        );
    }
}
