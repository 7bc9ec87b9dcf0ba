//! What "a selector picks a server" means, said once.
//!
//! Health checks, alert rules and command fan-outs each pick servers by
//! labels and/or ids. Their wire and stored JSON differ (a health check's
//! selector keeps `labels`/`server_ids` absent rather than empty, and there
//! `"server_ids": []` selects no server, while an alert rule's or a
//! fan-out's empty list means "no filter"), so each keeps a thin serde type
//! — [`super::health::HealthSelector`], [`super::AlertSelector`] and the
//! API's fan-out `Selector` — that converts into the one [`ServerSelector`].
//! The alert rule's conversion is here; the health check's is beside its
//! type, since `store/health` matches with it (this file importing it would
//! make an import cycle). Every decision whether a server is selected goes
//! through [`ServerSelector::matches`]; every selector given to the API is
//! checked by [`check_input`]. The organization scope is not part of a
//! selector: callers narrow to the organization tree before matching.

use uuid::Uuid;

use super::{AlertSelector, Labels, Server};

/// Which servers something applies to: those carrying every label of
/// `labels` and, when `server_ids` is given, being one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSelector {
    /// Every one must be on the server (same key, same value). Empty: no
    /// label filter.
    pub labels: Labels,
    /// `None`: any server. `Some(ids)`: one of `ids` only, so `Some` of an
    /// empty list selects no server.
    pub server_ids: Option<Vec<Uuid>>,
}

impl ServerSelector {
    /// Whether `server` is selected (its organization is not checked here).
    pub fn matches(&self, server: &Server) -> bool {
        let id_match = self
            .server_ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&server.id));
        id_match
            && self
                .labels
                .iter()
                .all(|(key, value)| server.labels.get(key) == Some(value))
    }
}

impl From<&AlertSelector> for ServerSelector {
    /// An empty list is no filter.
    fn from(selector: &AlertSelector) -> Self {
        Self {
            labels: selector.labels.clone(),
            server_ids: (!selector.server_ids.is_empty()).then(|| selector.server_ids.clone()),
        }
    }
}

/// How much a selector given to an API may hold; each API sets its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    pub max_labels: usize,
    pub max_server_ids: usize,
}

/// Why a selector given to an API is refused, the first problem found, in
/// this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SelectorInputError {
    #[error("a selector takes at most {max} labels")]
    TooManyLabels { max: usize },
    #[error("a selector takes at most {max} server ids")]
    TooManyServerIds { max: usize },
    /// A label key or value has control characters (NUL included): labels
    /// never need them, and PostgreSQL cannot store or compare NUL in text.
    #[error("selector labels must not contain control characters")]
    ControlCharacters,
    /// Reported only when no other problem was found.
    #[error("selector label keys must not be empty")]
    EmptyLabelKey,
}

/// Checks a selector's input against `limits`: the counts, then control
/// characters in every label key and value, then empty label keys.
pub fn check_input(
    labels: &Labels,
    server_ids: &[Uuid],
    limits: InputLimits,
) -> Result<(), SelectorInputError> {
    if labels.len() > limits.max_labels {
        return Err(SelectorInputError::TooManyLabels {
            max: limits.max_labels,
        });
    }
    if server_ids.len() > limits.max_server_ids {
        return Err(SelectorInputError::TooManyServerIds {
            max: limits.max_server_ids,
        });
    }
    let has_control = |text: &str| text.chars().any(char::is_control);
    if labels.iter().any(|(k, v)| has_control(k) || has_control(v)) {
        return Err(SelectorInputError::ControlCharacters);
    }
    if labels.keys().any(String::is_empty) {
        return Err(SelectorInputError::EmptyLabelKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::store::ServerStatus;

    fn server(labels: &[(&str, &str)]) -> Server {
        Server {
            id: Uuid::now_v7(),
            organization_id: Uuid::now_v7(),
            name: "web-1".into(),
            hostname: "web-1.example".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: ServerStatus::Online,
            status_reason: None,
            agent_version: None,
            facts: serde_json::Value::Null,
            deployment_id: None,
            created_at: Utc::now(),
            last_seen_at: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const LIMITS: InputLimits = InputLimits {
        max_labels: 2,
        max_server_ids: 2,
    };

    #[test]
    fn empty_selector_selects_every_server() {
        let selector = ServerSelector::default();
        assert!(selector.matches(&server(&[])));
        assert!(selector.matches(&server(&[("env", "prod")])));
    }

    #[test]
    fn listed_id_is_selected_and_unlisted_id_is_not() {
        let listed = server(&[]);
        let unlisted = server(&[]);
        let selector = ServerSelector {
            server_ids: Some(vec![listed.id]),
            ..ServerSelector::default()
        };
        assert!(selector.matches(&listed));
        assert!(!selector.matches(&unlisted));
    }

    #[test]
    fn empty_id_list_selects_no_server() {
        let selector = ServerSelector {
            server_ids: Some(Vec::new()),
            ..ServerSelector::default()
        };
        assert!(!selector.matches(&server(&[])));
    }

    #[test]
    fn server_needs_every_label_with_the_same_value() {
        let selector = ServerSelector {
            labels: labels(&[("env", "prod"), ("role", "web")]),
            server_ids: None,
        };
        assert!(selector.matches(&server(&[("env", "prod"), ("role", "web"), ("zone", "a")])));
        assert!(!selector.matches(&server(&[("env", "prod")])));
        assert!(!selector.matches(&server(&[("env", "staging"), ("role", "web")])));
        assert!(!selector.matches(&server(&[("ENV", "prod"), ("role", "web")])));
    }

    #[test]
    fn ids_and_labels_together_need_both() {
        let labelled = server(&[("env", "prod")]);
        let unlabelled = server(&[]);
        let elsewhere = server(&[("env", "prod")]);
        let selector = ServerSelector {
            labels: labels(&[("env", "prod")]),
            server_ids: Some(vec![labelled.id, unlabelled.id]),
        };
        assert!(selector.matches(&labelled));
        assert!(!selector.matches(&unlabelled));
        assert!(!selector.matches(&elsewhere));
    }

    #[test]
    fn alert_selector_with_empty_lists_selects_every_server() {
        let any = server(&[("env", "prod")]);
        assert!(ServerSelector::from(&AlertSelector::default()).matches(&any));
        let listed = AlertSelector {
            labels: labels(&[("env", "prod")]),
            server_ids: vec![any.id],
        };
        assert!(ServerSelector::from(&listed).matches(&any));
        assert!(!ServerSelector::from(&listed).matches(&server(&[("env", "prod")])));
    }

    #[test]
    fn input_within_limits_is_accepted() {
        let ids = [Uuid::now_v7(), Uuid::now_v7()];
        assert_eq!(
            check_input(&labels(&[("env", "prod"), ("x", "")]), &ids, LIMITS),
            Ok(())
        );
        assert_eq!(check_input(&Labels::new(), &[], LIMITS), Ok(()));
    }

    #[test]
    fn input_over_the_limits_is_refused() {
        let three = labels(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert_eq!(
            check_input(&three, &[], LIMITS),
            Err(SelectorInputError::TooManyLabels { max: 2 })
        );
        let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        assert_eq!(
            check_input(&Labels::new(), &ids, LIMITS),
            Err(SelectorInputError::TooManyServerIds { max: 2 })
        );
    }

    #[test]
    fn control_characters_in_label_keys_or_values_are_refused() {
        for pair in [("en\0v", "prod"), ("env", "pr\nod"), ("env", "\u{7f}")] {
            assert_eq!(
                check_input(&labels(&[pair]), &[], LIMITS),
                Err(SelectorInputError::ControlCharacters),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn empty_label_key_is_refused_after_every_other_check() {
        assert_eq!(
            check_input(&labels(&[("", "prod")]), &[], LIMITS),
            Err(SelectorInputError::EmptyLabelKey)
        );
        assert_eq!(
            check_input(&labels(&[("", "prod"), ("env", "\0")]), &[], LIMITS),
            Err(SelectorInputError::ControlCharacters)
        );
    }
}
