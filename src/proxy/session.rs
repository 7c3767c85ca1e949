//! The sticky-session view of a request: which session its cookie names, which backend that
//! session belongs to, and the cookie its response gets. Sessions live in this balancer's table
//! (the chapter's way), or in a signed cookie that names the backend itself (`--sticky-secret`).

use crate::balance;
use crate::http::RequestHead;
use crate::sticky::signed::{SignedCookies, Verdict};
use crate::sticky::{SessionTable, Sticky};

/// A request's sticky session, and the backend it belongs to.
pub(super) struct Session<'t> {
    kind: Kind<'t>,
    /// The session's backend; `None` for a new session (no cookie, or one that is not honoured).
    pub(super) backend: Option<usize>,
}

enum Kind<'t> {
    /// The id the request goes by, in the table.
    Table {
        table: &'t SessionTable,
        id: uuid::Uuid,
    },
    /// What the request's signed cookie says.
    Signed {
        cookies: &'t SignedCookies,
        verdict: Verdict,
    },
}

impl<'t> Session<'t> {
    /// The session the request's cookie names, or a new one.
    pub(super) fn of(sticky: &'t Sticky, head: &RequestHead) -> Self {
        match sticky {
            Sticky::Table(table) => Self::in_table(table, head),
            Sticky::Signed(cookies) => {
                let verdict = cookies.check(&head.headers);
                let backend = match verdict {
                    Verdict::Valid { backend, .. } => Some(backend),
                    Verdict::Rejected(_) => None,
                };
                Session {
                    kind: Kind::Signed { cookies, verdict },
                    backend,
                }
            }
        }
    }

    /// The table's session named by the cookie, or a new one with a fresh id. An id the table
    /// does not know is replaced rather than adopted, so clients cannot choose their session ids.
    fn in_table(table: &'t SessionTable, head: &RequestHead) -> Self {
        let known = table
            .session_in(&head.headers)
            .and_then(|id| Some((id, table.backend_of(id)?)));
        let (id, backend) = match known {
            Some((id, backend)) => (id, Some(backend)),
            None => (uuid::Uuid::new_v4(), None),
        };
        Session {
            kind: Kind::Table { table, id },
            backend,
        }
    }

    /// The session's own backend, as the choice for this request when it is a candidate.
    pub(super) fn choice(&self, is_candidate: &dyn Fn(usize) -> bool) -> Option<balance::Pick> {
        let index = self.backend.filter(|&i| is_candidate(i))?;
        Some(balance::Pick {
            index,
            reason: String::new(),
        })
    }

    /// The `Set-Cookie` value the response carries when the request goes to `backend`, if any.
    /// A table session gets its cookie once, when it is new: the id stays while its backend
    /// changes. A signed cookie names its backend, so it is issued again when the session is
    /// new, when it moves, and when it is due for renewal.
    pub(super) fn set_cookie(&self, backend: usize) -> Option<String> {
        match &self.kind {
            Kind::Table { table, id } => self.backend.is_none().then(|| table.set_cookie(*id)),
            Kind::Signed { cookies, verdict } => match *verdict {
                Verdict::Valid {
                    backend: named,
                    expires,
                } if named == backend && !cookies.needs_renewal_now(expires) => None,
                _ => Some(cookies.set_cookie(backend)),
            },
        }
    }

    /// Records that the session now goes to `backend` (a new session, or one whose backend was
    /// unavailable and moved). A signed cookie needs nothing recorded: the new cookie says it.
    pub(super) fn follow(&self, backend: usize) {
        if let Kind::Table { table, id } = &self.kind {
            if self.backend != Some(backend) {
                table.remember(*id, backend);
            }
        }
    }

    /// The sticky part of `X-Lb-Decision` when the request goes to `pick`; `name` gives a
    /// backend's name by its index.
    pub(super) fn explain<'n>(&self, pick: usize, name: impl Fn(usize) -> &'n str) -> String {
        match (&self.kind, self.backend) {
            (Kind::Table { id, .. }, Some(own)) if own == pick => {
                format!("sticky hit: session {id} belongs to {}", name(own))
            }
            (Kind::Table { id, .. }, Some(old)) => {
                format!("sticky miss: session {id} moves from {}", name(old))
            }
            (Kind::Table { id, .. }, None) => format!("sticky miss: new session {id}"),
            (Kind::Signed { cookies, verdict }, _) => match *verdict {
                Verdict::Valid { backend, expires } if backend == pick => {
                    let renewed = if cookies.needs_renewal_now(expires) {
                        "; renewed"
                    } else {
                        ""
                    };
                    format!(
                        "sticky hit: signed cookie names {} (id {}){renewed}",
                        name(backend),
                        cookies.id_of(backend)
                    )
                }
                Verdict::Valid { backend, .. } => format!(
                    "sticky miss: signed cookie names {}, which is unavailable; a new cookie names \
                     the backend chosen",
                    name(backend)
                ),
                Verdict::Rejected(why) => {
                    format!("sticky miss: {why}; a new signed cookie names the backend chosen")
                }
            },
        }
    }
}
