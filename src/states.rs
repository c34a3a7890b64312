//! Every state the engine stores, as a type: what a CA, profile, request, certificate or identity
//! can be, and which moves between them are legal, written once, next to the enum.
//!
//! Each is stored as the same lower-case text it always was (diesel `ToSql`/`FromSql` on `Text`,
//! on both backends), so no data changes. This module depends on nothing of the engine's.

use std::fmt;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Text;

/// Declares a state enum stored as text: its variants and their stored names, `as_str`,
/// `FromStr`, `Display`, serde and OpenAPI as the same text, and diesel's `ToSql`/`FromSql`.
macro_rules! stored_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, AsExpression, FromSqlRow)]
        #[diesel(sql_type = Text)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database and shown in the API.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownState { kind: stringify!($name), text: other.to_string() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        // In the API's OpenAPI description: a string, one of the stored names.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<DB: Backend> ToSql<Text, DB> for $name
        where
            str: ToSql<Text, DB>,
        {
            fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
                self.as_str().to_sql(out)
            }
        }

        impl<DB: Backend> FromSql<Text, DB> for $name
        where
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                Ok(String::from_sql(bytes)?.parse::<$name>()?)
            }
        }
    };
}

/// Text in the database (or a request) that names no state of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {text:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub text: String,
}

stored_state! {
    /// A CA's operational state.
    CaState {
        Enabled = "enabled",
        /// Sync work refused (`503`), async work accepted and held durably until resubmitted.
        Parked = "parked",
        /// No new work; what is queued is finished.
        Draining = "draining",
        Disabled = "disabled",
        /// Disabled for good, its key destroyed.
        Retired = "retired",
    }
}

impl CaState {
    /// Does the CA's cell run the work it is handed (queued work included)?
    pub fn takes_work(self) -> bool {
        match self {
            CaState::Enabled | CaState::Draining => true,
            CaState::Parked | CaState::Disabled | CaState::Retired => false,
        }
    }

    /// May an operator move a CA from this state to `to`? Every move is legal but out of
    /// `retired`: its key is destroyed.
    pub fn may_become(self, to: CaState) -> bool {
        match self {
            CaState::Retired => to == CaState::Retired,
            CaState::Enabled | CaState::Parked | CaState::Draining | CaState::Disabled => true,
        }
    }
}

stored_state! {
    /// Whether a profile takes requests.
    ProfileState {
        Enabled = "enabled",
        Disabled = "disabled",
    }
}

impl ProfileState {
    pub fn from_enabled(enabled: bool) -> ProfileState {
        if enabled {
            ProfileState::Enabled
        } else {
            ProfileState::Disabled
        }
    }
}

stored_state! {
    /// How a stored request is answered.
    RequestMode {
        /// The caller waits (a stored row only for an `Idempotency-Key`).
        Sync = "sync",
        /// Accepted with `202`; the caller polls.
        Async = "async",
    }
}

stored_state! {
    /// Where a stored request is.
    RequestState {
        Pending = "pending",
        Issued = "issued",
        /// Failed for a reason the request itself carries: replaying it gives the same answer.
        Failed = "failed",
        /// Failed because of the engine's state at the time (deadline, overload): may be retried.
        Retryable = "retryable",
        Expired = "expired",
        Parked = "parked",
    }
}

impl RequestState {
    /// Where a request goes when its attempt fails: for good if the failure is the request's own
    /// (`permanent`), back to pending for another attempt if it is asynchronous, otherwise
    /// retryable by its caller.
    pub fn after_failure(permanent: bool, mode: RequestMode) -> RequestState {
        match (permanent, mode) {
            (true, _) => RequestState::Failed,
            (false, RequestMode::Async) => RequestState::Pending,
            (false, RequestMode::Sync) => RequestState::Retryable,
        }
    }

    /// Is the request finished (no attempt will change it)?
    pub fn is_final(self) -> bool {
        match self {
            RequestState::Issued | RequestState::Failed | RequestState::Expired => true,
            RequestState::Pending | RequestState::Retryable | RequestState::Parked => false,
        }
    }
}

stored_state! {
    /// A certificate's record.
    CertState {
        /// Recorded before signing (write-ahead); becomes `issued` or `abandoned`.
        Signing = "signing",
        /// Signed and recorded; may become `revoked`.
        Issued = "issued",
        Abandoned = "abandoned",
        /// Taken back: on its CRL shard until it expires, and `revoked` in OCSP. Final.
        Revoked = "revoked",
    }
}

stored_state! {
    /// A disposable identity.
    IdentityState {
        Active = "active",
        /// The sealed key is gone (last use, expiry): nothing can sign with it again.
        Destroyed = "destroyed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_the_text_it_is_stored_as() {
        fn round_trip<T: Copy + PartialEq + fmt::Debug + std::str::FromStr>(
            all: &[T],
            text: impl Fn(T) -> &'static str,
        ) {
            for s in all {
                assert_eq!(text(*s).parse::<T>().ok(), Some(*s), "{s:?}");
            }
        }
        round_trip(CaState::ALL, CaState::as_str);
        round_trip(ProfileState::ALL, ProfileState::as_str);
        round_trip(RequestMode::ALL, RequestMode::as_str);
        round_trip(RequestState::ALL, RequestState::as_str);
        round_trip(CertState::ALL, CertState::as_str);
        round_trip(IdentityState::ALL, IdentityState::as_str);
        let texts: Vec<_> = CaState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(texts, ["enabled", "parked", "draining", "disabled", "retired"]);
        let texts: Vec<_> = RequestState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(texts, ["pending", "issued", "failed", "retryable", "expired", "parked"]);
        assert_eq!(
            "Enabled".parse::<CaState>().unwrap_err().to_string(),
            "unknown CaState \"Enabled\"",
            "stored text is exact"
        );
        assert_eq!(serde_json::to_string(&CertState::Abandoned).unwrap(), "\"abandoned\"");
        assert_eq!(serde_json::from_str::<CaState>("\"parked\"").unwrap(), CaState::Parked);
    }

    #[test]
    fn a_failure_moves_a_request_by_whose_fault_it_is_and_how_it_is_answered() {
        use RequestState::*;
        assert_eq!(RequestState::after_failure(true, RequestMode::Async), Failed);
        assert_eq!(RequestState::after_failure(true, RequestMode::Sync), Failed);
        assert_eq!(RequestState::after_failure(false, RequestMode::Async), Pending);
        assert_eq!(RequestState::after_failure(false, RequestMode::Sync), Retryable);
        let finals: Vec<_> = RequestState::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, [&Issued, &Failed, &Expired]);
    }

    #[test]
    fn only_enabled_and_draining_cas_take_work_and_retired_is_for_good() {
        let working: Vec<_> = CaState::ALL.iter().filter(|s| s.takes_work()).collect();
        assert_eq!(working, [&CaState::Enabled, &CaState::Draining]);
        for to in CaState::ALL {
            assert_eq!(CaState::Retired.may_become(*to), *to == CaState::Retired, "{to:?}");
            assert!(CaState::Disabled.may_become(*to));
        }
    }
}
