//! Query parameters of the HTTP endpoint: each route names the ones it takes, and a bad or
//! unknown one is an error message naming it (the handlers answer 400 with it).
//!
//! Talks to nothing.
//!
//! ```text
//! durations  "30s", "500ms", "2m" (humantime) or whole seconds ("30"); capped at a maximum
//! limits     whole numbers >= 1; capped at a maximum
//! lineage    32 hex digits
//! ```

use deltasync_core::Lineage;
use std::time::Duration;

/// The query of one request.
#[derive(Debug)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// The pairs of a query, refusing any parameter not in `allowed` and any given twice.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Params, String> {
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&k.as_str()) {
                return Err(format!(
                    "unknown query parameter {k:?}; this route takes {}",
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                ));
            }
            if pairs[..i].iter().any(|(earlier, _)| earlier == k) {
                return Err(format!("query parameter {k:?} is given twice"));
            }
        }
        Ok(Params { pairs })
    }

    /// The raw value of `name`.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name` as a whole number.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, String> {
        self.str(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("query parameter {name}={v:?} is not a whole number >= 0"))
            })
            .transpose()
    }

    /// `name` as a count of at least 1, `default` when absent, at most `max`.
    pub fn limit(&self, name: &str, default: usize, max: usize) -> Result<usize, String> {
        match self.str(name) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n.min(max)),
                _ => Err(format!(
                    "query parameter {name}={v:?} is not a whole number >= 1"
                )),
            },
        }
    }

    /// `name` as a duration, `default` when absent, at most `max`.
    pub fn duration(
        &self,
        name: &str,
        default: Duration,
        max: Duration,
    ) -> Result<Duration, String> {
        match self.str(name) {
            None => Ok(default),
            Some(v) => parse_duration(v)
                .map(|d| d.min(max))
                .ok_or_else(|| {
                    format!(
                        "query parameter {name}={v:?} is not a duration (e.g. \"30s\", \"500ms\", or whole seconds)"
                    )
                }),
        }
    }

    /// `name` as a lineage (32 hex digits).
    pub fn lineage(&self, name: &str) -> Result<Option<Lineage>, String> {
        self.str(name)
            .map(|v| {
                Lineage::from_hex(v).map_err(|_| {
                    format!("query parameter {name}={v:?} is not a lineage (32 hex digits)")
                })
            })
            .transpose()
    }
}

fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(q: &[(&str, &str)], allowed: &[&str]) -> Result<Params, String> {
        Params::new(
            q.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            allowed,
        )
    }

    #[test]
    fn bad_values_are_errors_that_name_the_parameter() {
        let e = params(&[("aftr", "1")], &["after"]).unwrap_err();
        assert!(e.contains("\"aftr\"") && e.contains("after"), "{e}");
        let e = params(&[("after", "1"), ("after", "2")], &["after"]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let p = params(
            &[
                ("after", "-1"),
                ("limit", "0"),
                ("wait", "soon"),
                ("lineage", "xyz"),
            ],
            &["after", "limit", "wait", "lineage"],
        )
        .unwrap();
        assert!(p.u64("after").unwrap_err().contains("after=\"-1\""));
        assert!(p
            .limit("limit", 10, 100)
            .unwrap_err()
            .contains("limit=\"0\""));
        let long = Duration::from_secs(300);
        assert!(p
            .duration("wait", long, long)
            .unwrap_err()
            .contains("wait=\"soon\""));
        assert!(p
            .lineage("lineage")
            .unwrap_err()
            .contains("lineage=\"xyz\""));
    }

    #[test]
    fn values_parse_with_defaults_and_caps() {
        let p = params(
            &[("after", "7"), ("limit", "5000"), ("wait", "10m")],
            &["after", "limit", "wait", "x"],
        )
        .unwrap();
        assert_eq!(p.u64("after").unwrap(), Some(7));
        assert_eq!(p.u64("x").unwrap(), None);
        assert_eq!(p.limit("limit", 10, 1000).unwrap(), 1000);
        assert_eq!(p.limit("x", 10, 1000).unwrap(), 10);
        let max = Duration::from_secs(300);
        assert_eq!(p.duration("wait", Duration::ZERO, max).unwrap(), max);
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        let l = Lineage([0xab; 16]);
        let p = params(&[("lineage", &l.to_hex())], &["lineage"]).unwrap();
        assert_eq!(p.lineage("lineage").unwrap(), Some(l));
    }
}
