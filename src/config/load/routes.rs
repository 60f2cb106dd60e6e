//! `routes:`: each route's `match:` and `to:`, checked against the applications and
//! destinations that loaded.

use std::collections::{HashMap, HashSet};

use super::{Loader, parse_net, quoted, top};
use crate::config::raw::{OneOrMany, RawMatch, RawRoute};
use crate::config::suggest::did_you_mean;
use crate::config::yaml::{KeyPath, Kind, Node};
use crate::config::{AgeRange, MatchConfig, RouteConfig};

const KNOWN_EVENTS: &[&str] = &["ENROLL", "AUTH", "DELETION"];
const KNOWN_GENDERS: &[&str] = &["male", "female"];

impl Loader {
    // ----- routes ------------------------------------------------------------------------

    pub(super) fn routes(&mut self) -> Vec<RouteConfig> {
        let path = top("routes");
        // Every name under `destinations:`, even those with errors, so that a broken
        // destination does not also make every route naming it an error.
        let names: Vec<String> = self
            .node(&top("destinations"))
            .and_then(Node::entries)
            .unwrap_or_default()
            .iter()
            .map(|e| e.key.clone())
            .collect();
        let len = self.list_len(&path);
        if len == 0
            && self
                .node(&path)
                .is_none_or(|n| matches!(n.kind, Kind::Seq(_)))
        {
            self.key_warn(&path, "no routes: events are stored but sent nowhere");
        }
        self.unused_destinations(&names, len);

        let mut out = Vec::new();
        let mut seen_names: HashMap<String, u64> = HashMap::new();
        for i in 0..len {
            let rpath = path.index(i);
            let Some(raw) = self.de::<RawRoute>(&rpath) else {
                continue;
            };
            let mut ok = true;
            let name = match raw.name {
                Some(n) if n.trim().is_empty() => {
                    self.error(&rpath.key("name"), "must not be empty");
                    ok = false;
                    n
                }
                Some(n) => n,
                None => format!("route-{}", i + 1),
            };
            let line = self.root.value_loc(&rpath).line;
            if let Some(first) = seen_names.get(&name) {
                let msg = format!(
                    "duplicate route name {}; the first is at line {first}",
                    self.shown(&rpath.key("name"), &name)
                );
                self.error(&rpath.key("name"), msg);
                ok = false;
            } else {
                seen_names.insert(name.clone(), line);
            }

            let to_path = rpath.key("to");
            let mut to: Vec<String> = Vec::new();
            if raw.to.is_empty() {
                self.error(&to_path, "must name at least one destination");
                ok = false;
            }
            for (idx, dest) in raw.to.items() {
                let dpath = item_path(&to_path, idx);
                if !names.iter().any(|n| n == dest) {
                    let hint = match did_you_mean(dest, names.iter().map(String::as_str)) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None if names.is_empty() => "no destinations are defined".into(),
                        None => format!("defined destinations: {}", quoted(&names)),
                    };
                    let msg = format!("unknown destination {}; {hint}", self.shown(&dpath, dest));
                    self.error(&dpath, msg);
                    ok = false;
                } else if to.iter().any(|t| t == dest) {
                    let msg = format!("destination {} is listed twice", self.shown(&dpath, dest));
                    self.warn(&dpath, msg);
                } else {
                    to.push(dest.to_owned());
                }
            }
            let matcher = match raw.matcher {
                None => MatchConfig::default(),
                Some(m) => match self.matcher(&rpath.key("match"), m) {
                    Some(m) => m,
                    None => {
                        ok = false;
                        MatchConfig::default()
                    }
                },
            };
            if ok {
                out.push(RouteConfig { name, matcher, to });
            }
        }
        out
    }

    /// Warns about destinations that no route names (read from the tree, so that routes
    /// with errors still count).
    fn unused_destinations(&mut self, names: &[String], routes: usize) {
        let mut used: HashSet<String> = HashSet::new();
        for i in 0..routes {
            let to = top("routes").index(i).key("to");
            match self.root.find(&to).map(|n| &n.kind) {
                Some(Kind::Str(s)) => {
                    used.insert(s.clone());
                }
                Some(Kind::Seq(items)) => {
                    used.extend(items.iter().filter_map(|n| n.as_str().map(str::to_owned)));
                }
                _ => {}
            }
        }
        for name in names {
            if !used.contains(name) {
                self.key_warn(
                    &top("destinations").key(name),
                    format!("destination `{name}` is not used by any route"),
                );
            }
        }
    }

    fn matcher(&mut self, path: &KeyPath, raw: RawMatch) -> Option<MatchConfig> {
        let mut ok = true;
        let mut m = MatchConfig::default();
        let ev_path = path.key("eventName");
        m.event_name = self.strings(&ev_path, raw.event_name.as_ref(), &mut ok);
        for (idx, ev) in raw.event_name.iter().flat_map(OneOrMany::items) {
            if !ev.is_empty() && !KNOWN_EVENTS.contains(&ev) {
                let hint = match did_you_mean(ev, KNOWN_EVENTS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("FACEIO sends {}", quoted(KNOWN_EVENTS)),
                };
                let at = item_path(&ev_path, idx);
                let msg = format!("unknown event name {}; {hint}", self.shown(&at, ev));
                self.warn(&at, msg);
            }
        }
        let app_path = path.key("appId");
        m.app_id = self.strings(&app_path, raw.app_id.as_ref(), &mut ok);
        for (idx, id) in raw.app_id.iter().flat_map(OneOrMany::items) {
            if !id.is_empty() && !self.app_ids.is_empty() && !self.app_ids.iter().any(|a| a == id) {
                let at = item_path(&app_path, idx);
                let msg = format!(
                    "{} is not one of the configured applications; this never matches",
                    self.shown(&at, id)
                );
                self.warn(&at, msg);
            }
        }
        m.facial_id = self.strings(&path.key("facialId"), raw.facial_id.as_ref(), &mut ok);
        let gender_path = path.key("details.gender");
        m.gender = self.strings(&gender_path, raw.gender.as_ref(), &mut ok);
        for (idx, g) in raw.gender.iter().flat_map(OneOrMany::items) {
            if !g.is_empty() && !KNOWN_GENDERS.contains(&g) {
                self.warn(
                    &item_path(&gender_path, idx),
                    "FACEIO reports `male` or `female`; this value never matches",
                );
            }
        }
        if let Some(ips) = raw.client_ip {
            let ip_path = path.key("clientIp");
            if ips.is_empty() {
                self.error(&ip_path, "must not be an empty list");
                ok = false;
            }
            let mut nets = Vec::new();
            for (idx, text) in ips.items() {
                match parse_net(text) {
                    Some(net) => nets.push(net),
                    None => {
                        self.error(
                            &item_path(&ip_path, idx),
                            "not an IP address or CIDR network (such as 10.0.0.0/8 or 192.168.1.7)",
                        );
                        ok = false;
                    }
                }
            }
            m.client_ip = Some(nets);
        }
        if let Some(age) = raw.age {
            let age_path = path.key("details.age");
            for (key, v) in [("min", age.min), ("max", age.max)] {
                if v.is_some_and(|v| !v.is_finite()) {
                    self.error(&age_path.key(key), "must be a finite number");
                    ok = false;
                }
            }
            match (age.min, age.max) {
                (None, None) => {
                    if !self.diag.suppressed(&age_path.key("min"))
                        && !self.diag.suppressed(&age_path.key("max"))
                    {
                        self.error(&age_path, "give `min`, `max` or both");
                    }
                    ok = false;
                }
                (Some(min), Some(max)) if min > max => {
                    self.error(&age_path.key("min"), "min must not be greater than max");
                    ok = false;
                }
                _ => {}
            }
            m.age = Some(AgeRange {
                min: age.min,
                max: age.max,
            });
        }
        ok.then_some(m)
    }

    /// A `match:` list of strings: not empty, no empty strings.
    fn strings(
        &mut self,
        path: &KeyPath,
        value: Option<&OneOrMany>,
        ok: &mut bool,
    ) -> Option<Vec<String>> {
        let value = value?;
        if value.is_empty() {
            self.error(path, "must not be an empty list");
            *ok = false;
        }
        let mut out = Vec::new();
        for (idx, s) in value.items() {
            if s.is_empty() {
                self.error(&item_path(path, idx), "must not be empty");
                *ok = false;
            }
            out.push(s.to_owned());
        }
        Some(out)
    }
}

/// `path[n]` for a list element, `path` for a single value.
fn item_path(path: &KeyPath, idx: Option<usize>) -> KeyPath {
    idx.map_or_else(|| path.clone(), |n| path.index(n))
}
