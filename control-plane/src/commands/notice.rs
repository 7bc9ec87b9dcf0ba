//! What one replica tells the others about commands ([`ReplicaNotice`]), and
//! its wire form: the payload of `NOTIFY tether_commands`. The payloads are
//! the ones replicas always sent (`run <command id> <server id>`,
//! `cancel <command id>`), so replicas of different versions may run side by
//! side; `crate::commands` sends and receives them, the store only carries
//! the text.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A notice to every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaNotice {
    /// A command queued for `server_id`: the replica holding the server's
    /// session claims and dispatches it.
    Run { command_id: Uuid, server_id: Uuid },
    /// A cancel of a running command: the replica running it cancels it.
    Cancel { command_id: Uuid },
}

/// Why a payload is not a [`ReplicaNotice`].
#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    #[error("unknown notice {0:?}")]
    UnknownKind(String),
    #[error("the notice has no {0}")]
    Missing(&'static str),
    #[error("invalid {field}: {source}")]
    InvalidId {
        field: &'static str,
        #[source]
        source: uuid::Error,
    },
    #[error("unexpected words after the notice: {0:?}")]
    Trailing(String),
}

const RUN: &str = "run";
const CANCEL: &str = "cancel";

fn id(word: Option<&str>, field: &'static str) -> Result<Uuid, NoticeError> {
    let word = word.ok_or(NoticeError::Missing(field))?;
    Uuid::parse_str(word).map_err(|source| NoticeError::InvalidId { field, source })
}

impl ReplicaNotice {
    /// The payload sent to the other replicas.
    pub fn to_payload(&self) -> String {
        self.to_string()
    }

    /// Reads a payload another replica sent. Words are separated by one
    /// space. A `run` notice may carry more words after the server id (they
    /// are ignored, as replicas always did, so a later version may add some);
    /// a `cancel` notice may not.
    pub fn parse(payload: &str) -> Result<Self, NoticeError> {
        let mut words = payload.split(' ');
        match words.next() {
            Some(RUN) => Ok(Self::Run {
                command_id: id(words.next(), "command id")?,
                server_id: id(words.next(), "server id")?,
            }),
            Some(CANCEL) => {
                let command_id = id(words.next(), "command id")?;
                match words.next() {
                    None => Ok(Self::Cancel { command_id }),
                    Some(word) => Err(NoticeError::Trailing(word.to_string())),
                }
            }
            other => Err(NoticeError::UnknownKind(
                other.unwrap_or_default().to_string(),
            )),
        }
    }
}

impl fmt::Display for ReplicaNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run {
                command_id,
                server_id,
            } => write!(f, "{RUN} {command_id} {server_id}"),
            Self::Cancel { command_id } => write!(f, "{CANCEL} {command_id}"),
        }
    }
}

impl FromStr for ReplicaNotice {
    type Err = NoticeError;

    fn from_str(payload: &str) -> Result<Self, Self::Err> {
        Self::parse(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::{NoticeError, ReplicaNotice};
    use uuid::Uuid;

    const COMMAND: &str = "0190b3a2-7c1e-7d4a-9f00-000000000001";
    const SERVER: &str = "0190b3a2-7c1e-7d4a-9f00-000000000002";

    fn uuid(text: &str) -> Uuid {
        Uuid::parse_str(text).unwrap_or_default()
    }

    #[test]
    fn notices_keep_the_wire_strings_replicas_always_sent() {
        let run = ReplicaNotice::Run {
            command_id: uuid(COMMAND),
            server_id: uuid(SERVER),
        };
        assert_eq!(run.to_payload(), format!("run {COMMAND} {SERVER}"));
        let cancel = ReplicaNotice::Cancel {
            command_id: uuid(COMMAND),
        };
        assert_eq!(cancel.to_payload(), format!("cancel {COMMAND}"));
    }

    #[test]
    fn notices_round_trip() {
        for _ in 0..16 {
            let run = ReplicaNotice::Run {
                command_id: Uuid::now_v7(),
                server_id: Uuid::new_v4(),
            };
            let cancel = ReplicaNotice::Cancel {
                command_id: Uuid::now_v7(),
            };
            for notice in [run, cancel] {
                let parsed = ReplicaNotice::parse(&notice.to_payload());
                assert!(
                    matches!(parsed, Ok(p) if p == notice),
                    "{notice} read back as {parsed:?}"
                );
                let via_from_str: Result<ReplicaNotice, _> = notice.to_string().parse();
                assert!(matches!(via_from_str, Ok(p) if p == notice));
            }
        }
    }

    #[test]
    fn payloads_of_earlier_replicas_parse() {
        assert!(matches!(
            ReplicaNotice::parse(&format!("run {COMMAND} {SERVER}")),
            Ok(ReplicaNotice::Run { command_id, server_id })
                if command_id == uuid(COMMAND) && server_id == uuid(SERVER)
        ));
        assert!(matches!(
            ReplicaNotice::parse(&format!("cancel {COMMAND}")),
            Ok(ReplicaNotice::Cancel { command_id }) if command_id == uuid(COMMAND)
        ));
        // As before: words after a run notice's server id are ignored.
        assert!(matches!(
            ReplicaNotice::parse(&format!("run {COMMAND} {SERVER} later-field")),
            Ok(ReplicaNotice::Run { .. })
        ));
    }

    /// Whether an error is the one a case expects.
    type Expected = fn(&NoticeError) -> bool;

    #[test]
    fn malformed_payloads_are_refused() {
        let cases: Vec<(String, Expected)> = vec![
            (
                String::new(),
                |e| matches!(e, NoticeError::UnknownKind(k) if k.is_empty()),
            ),
            (
                "launch".into(),
                |e| matches!(e, NoticeError::UnknownKind(k) if k == "launch"),
            ),
            (format!("RUN {COMMAND} {SERVER}"), |e| {
                matches!(e, NoticeError::UnknownKind(_))
            }),
            ("run".into(), |e| {
                matches!(e, NoticeError::Missing("command id"))
            }),
            (format!("run {COMMAND}"), |e| {
                matches!(e, NoticeError::Missing("server id"))
            }),
            (format!("run not-a-uuid {SERVER}"), |e| {
                matches!(
                    e,
                    NoticeError::InvalidId {
                        field: "command id",
                        ..
                    }
                )
            }),
            (format!("run {COMMAND} not-a-uuid"), |e| {
                matches!(
                    e,
                    NoticeError::InvalidId {
                        field: "server id",
                        ..
                    }
                )
            }),
            (format!("run  {COMMAND} {SERVER}"), |e| {
                matches!(
                    e,
                    NoticeError::InvalidId {
                        field: "command id",
                        ..
                    }
                )
            }),
            ("cancel".into(), |e| {
                matches!(e, NoticeError::Missing("command id"))
            }),
            ("cancel 42".into(), |e| {
                matches!(
                    e,
                    NoticeError::InvalidId {
                        field: "command id",
                        ..
                    }
                )
            }),
            (
                format!("cancel {COMMAND} {SERVER}"),
                |e| matches!(e, NoticeError::Trailing(w) if w == SERVER),
            ),
            (
                format!("cancel {COMMAND} "),
                |e| matches!(e, NoticeError::Trailing(w) if w.is_empty()),
            ),
        ];
        for (payload, expected) in cases {
            match ReplicaNotice::parse(&payload) {
                Ok(notice) => panic!("{payload:?} was read as {notice:?}"),
                Err(e) => assert!(expected(&e), "{payload:?}: unexpected error {e:?}"),
            }
        }
    }
}
