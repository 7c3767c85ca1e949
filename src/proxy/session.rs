//! The sticky-session view of a request: which session its cookie names, which backend the
//! table holds for it, and the cookie a new session gets.

use crate::http::RequestHead;
use crate::sticky::SessionTable;

/// A request's sticky session: the id it goes by, and the backend the table holds for it.
pub(super) struct Session<'t> {
    table: &'t SessionTable,
    pub(super) id: uuid::Uuid,
    /// The session's backend; `None` for a new session (no cookie, or one the table forgot).
    pub(super) backend: Option<usize>,
}

impl<'t> Session<'t> {
    /// The session named by the request's cookie, or a new one with a fresh id. An id the table
    /// does not know is replaced rather than adopted, so clients cannot choose their session ids.
    pub(super) fn of(table: &'t SessionTable, head: &RequestHead) -> Self {
        let known = table
            .session_in(&head.headers)
            .and_then(|id| Some((id, table.backend_of(id)?)));
        match known {
            Some((id, backend)) => Session {
                table,
                id,
                backend: Some(backend),
            },
            None => Session {
                table,
                id: uuid::Uuid::new_v4(),
                backend: None,
            },
        }
    }

    /// The `Set-Cookie` value a new session's response carries.
    pub(super) fn set_cookie(&self) -> Option<String> {
        self.backend
            .is_none()
            .then(|| self.table.set_cookie(self.id))
    }

    /// Records that the session now goes to `backend` (a new session, or one whose backend was
    /// unavailable and moved); the cookie stays the same.
    pub(super) fn follow(&self, backend: usize) {
        if self.backend != Some(backend) {
            self.table.remember(self.id, backend);
        }
    }
}
