//! Routing: which destinations an event goes to.
//!
//! Routes are compiled once from the config into a [`Router`]. Every route whose `match`
//! holds applies; the result is the *set* of destinations, in the order they are first
//! named, so a destination named by several matching routes gets the event once.
//! Matching is pure and allocation-light: it runs on the ingress answer path, before the
//! event is stored, because the deliveries are written in the same transaction.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{AgeRange, Config, MatchConfig};
use crate::event::Payload;

/// A compiled route.
#[derive(Debug, Clone)]
struct Route {
    /// For `check`'s summary and logs.
    name: String,
    /// The condition.
    matcher: MatchConfig,
    /// Indexes into [`Router::destinations`].
    to: Vec<usize>,
}

/// All routes, compiled.
#[derive(Debug, Clone)]
pub struct Router {
    /// Destination names, indexed by the routes.
    destinations: Vec<String>,
    routes: Vec<Route>,
}

impl Router {
    /// Compiles the config's routes. The config is validated, so every name resolves;
    /// a name that does not (impossible after validation) is skipped, not a panic.
    pub fn new(config: &Config) -> Self {
        let destinations: Vec<String> =
            config.destinations.iter().map(|d| d.name.clone()).collect();
        let routes = config
            .routes
            .iter()
            .map(|r| Route {
                name: r.name.clone(),
                matcher: r.matcher.clone(),
                to: r
                    .to
                    .iter()
                    .filter_map(|name| destinations.iter().position(|d| d == name))
                    .collect(),
            })
            .collect();
        Self {
            destinations,
            routes,
        }
    }

    /// The destinations `payload` goes to: each once, in first-named order.
    pub fn route(&self, payload: &Payload) -> Vec<&str> {
        let mut seen = vec![false; self.destinations.len()];
        let mut out = Vec::new();
        for route in &self.routes {
            if !matches(&route.matcher, payload) {
                continue;
            }
            for &i in &route.to {
                if !seen[i] {
                    seen[i] = true;
                    out.push(self.destinations[i].as_str());
                }
            }
        }
        out
    }

    /// Names of the routes that match, for `simulate`-style explanations and tests.
    pub fn matching_routes(&self, payload: &Payload) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|r| matches(&r.matcher, payload))
            .map(|r| r.name.as_str())
            .collect()
    }
}

fn any_of(allowed: &Option<Vec<String>>, value: Option<&str>) -> bool {
    match allowed {
        None => true,
        Some(list) => value.is_some_and(|v| list.iter().any(|a| a == v)),
    }
}

fn ip_in(nets: &Option<Vec<IpNet>>, client_ip: &str) -> bool {
    match nets {
        None => true,
        Some(nets) => client_ip
            .trim()
            .parse::<IpAddr>()
            .is_ok_and(|ip| nets.iter().any(|n| n.contains(&ip))),
    }
}

fn age_in(range: &Option<AgeRange>, age: Option<f64>) -> bool {
    match range {
        None => true,
        Some(r) => age
            .is_some_and(|a| r.min.is_none_or(|min| a >= min) && r.max.is_none_or(|max| a <= max)),
    }
}

/// Whether every key given in `m` holds for `p`.
pub fn matches(m: &MatchConfig, p: &Payload) -> bool {
    any_of(&m.event_name, Some(&p.event_name))
        && any_of(&m.app_id, Some(&p.app_id))
        && any_of(&m.facial_id, Some(&p.facial_id))
        && any_of(&m.gender, p.gender())
        && ip_in(&m.client_ip, &p.client_ip)
        && age_in(&m.age, p.age())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Age, Details};

    fn payload(event: &str, ip: &str, gender: Option<&str>, age: Option<Age>) -> Payload {
        Payload {
            event_name: event.into(),
            facial_id: "face-1".into(),
            app_id: "fioa1".into(),
            client_ip: ip.into(),
            details: Some(Details {
                timestamp: None,
                gender: gender.map(Into::into),
                age,
            }),
        }
    }

    fn list(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_destination_named_by_several_matching_routes_gets_the_event_once() {
        let route = |name: &str, matcher: MatchConfig, to: Vec<usize>| Route {
            name: name.into(),
            matcher,
            to,
        };
        let enroll = MatchConfig {
            event_name: list(&["ENROLL"]),
            ..Default::default()
        };
        let router = Router {
            destinations: vec!["slack".into(), "crm".into(), "audit".into()],
            routes: vec![
                route("enrollments", enroll, vec![0, 1]),
                route("crm-all", MatchConfig::default(), vec![1]),
                route("everything", MatchConfig::default(), vec![2, 1]),
            ],
        };
        let enrolled = payload("ENROLL", "1.1.1.1", None, None);
        assert_eq!(router.route(&enrolled), vec!["slack", "crm", "audit"]);
        assert_eq!(
            router.matching_routes(&enrolled),
            vec!["enrollments", "crm-all", "everything"]
        );
        let auth = payload("AUTH", "1.1.1.1", None, None);
        assert_eq!(router.route(&auth), vec!["crm", "audit"]);
    }

    #[test]
    fn empty_match_takes_everything() {
        assert!(matches(
            &MatchConfig::default(),
            &payload("WHATEVER", "1.1.1.1", None, None)
        ));
    }

    #[test]
    fn event_name_list_is_any_of() {
        let m = MatchConfig {
            event_name: list(&["ENROLL", "DELETION"]),
            ..Default::default()
        };
        assert!(matches(&m, &payload("ENROLL", "1.1.1.1", None, None)));
        assert!(matches(&m, &payload("DELETION", "1.1.1.1", None, None)));
        assert!(!matches(&m, &payload("AUTH", "1.1.1.1", None, None)));
    }

    fn with_ids(app_id: &str, facial_id: &str) -> Payload {
        Payload {
            app_id: app_id.into(),
            facial_id: facial_id.into(),
            ..payload("AUTH", "1.1.1.1", None, None)
        }
    }

    #[test]
    fn app_id_matches_a_value_or_any_of_a_list() {
        let one = MatchConfig {
            app_id: list(&["fioa1"]),
            ..Default::default()
        };
        assert!(matches(&one, &with_ids("fioa1", "face-1")));
        assert!(!matches(&one, &with_ids("fioa2", "face-1")));
        assert!(
            !matches(&one, &with_ids("FIOA1", "face-1")),
            "IDs are compared exactly"
        );
        assert!(
            !matches(&one, &with_ids("fioa10", "face-1")),
            "no prefix match"
        );

        let any = MatchConfig {
            app_id: list(&["fioa1", "fioa2"]),
            ..Default::default()
        };
        assert!(matches(&any, &with_ids("fioa1", "face-1")));
        assert!(matches(&any, &with_ids("fioa2", "face-1")));
        assert!(!matches(&any, &with_ids("fioa3", "face-1")));
    }

    #[test]
    fn facial_id_matches_a_value_or_any_of_a_list() {
        let one = MatchConfig {
            facial_id: list(&["face-1"]),
            ..Default::default()
        };
        assert!(matches(&one, &with_ids("fioa1", "face-1")));
        assert!(!matches(&one, &with_ids("fioa1", "face-2")));
        assert!(
            !matches(&one, &with_ids("fioa1", "face-10")),
            "no prefix match"
        );

        let any = MatchConfig {
            facial_id: list(&["face-1", "face-2"]),
            ..Default::default()
        };
        assert!(matches(&any, &with_ids("fioa1", "face-1")));
        assert!(matches(&any, &with_ids("fioa1", "face-2")));
        assert!(!matches(&any, &with_ids("fioa1", "face-3")));
    }

    #[test]
    fn app_id_and_facial_id_must_both_hold() {
        let both = MatchConfig {
            app_id: list(&["fioa1"]),
            facial_id: list(&["face-1", "face-2"]),
            ..Default::default()
        };
        assert!(matches(&both, &with_ids("fioa1", "face-2")));
        assert!(!matches(&both, &with_ids("fioa2", "face-2")));
        assert!(!matches(&both, &with_ids("fioa1", "face-3")));
        // And through the router: only the matching route's destination is chosen.
        let router = Router {
            destinations: vec!["vip".into(), "audit".into()],
            routes: vec![
                Route {
                    name: "vip".into(),
                    matcher: both,
                    to: vec![0],
                },
                Route {
                    name: "everything".into(),
                    matcher: MatchConfig::default(),
                    to: vec![1],
                },
            ],
        };
        assert_eq!(
            router.route(&with_ids("fioa1", "face-1")),
            vec!["vip", "audit"]
        );
        assert_eq!(router.route(&with_ids("fioa2", "face-1")), vec!["audit"]);
    }

    #[test]
    fn client_ip_by_cidr_and_bad_ip_never_matches() {
        let m = MatchConfig {
            client_ip: Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::1/128".parse().unwrap(),
            ]),
            ..Default::default()
        };
        assert!(matches(&m, &payload("AUTH", "10.2.3.4", None, None)));
        assert!(matches(&m, &payload("AUTH", "2001:db8::1", None, None)));
        assert!(!matches(&m, &payload("AUTH", "11.0.0.1", None, None)));
        assert!(!matches(&m, &payload("AUTH", "not-an-ip", None, None)));
    }

    #[test]
    fn age_range_is_inclusive_and_reads_strings() {
        let m = MatchConfig {
            age: Some(AgeRange {
                min: Some(18.0),
                max: Some(30.0),
            }),
            gender: list(&["female"]),
            ..Default::default()
        };
        let f = |age| payload("ENROLL", "1.1.1.1", Some("female"), age);
        assert!(matches(&m, &f(Some(Age::Number(18.0)))));
        assert!(matches(&m, &f(Some(Age::Text("30".into())))));
        assert!(!matches(&m, &f(Some(Age::Number(31.0)))));
        assert!(!matches(&m, &f(None)), "no age cannot be in a range");
        assert!(!matches(
            &m,
            &payload("ENROLL", "1.1.1.1", Some("male"), Some(Age::Number(20.0)))
        ));
    }
}
