//! Validated names: device ids and metric names.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The name is empty.
    #[error("{what} is empty: give 1 to {max} characters from [A-Za-z0-9_.:-{extra}]")]
    Empty {
        /// "device id" or "metric name".
        what: &'static str,
        /// Maximum length.
        max: usize,
        /// Characters allowed besides [A-Za-z0-9_.:-].
        extra: &'static str,
    },
    /// The name is too long.
    #[error("{what} {name:?} is {len} characters long; the maximum is {max}")]
    TooLong {
        /// "device id" or "metric name".
        what: &'static str,
        /// The refused name, cut to the maximum.
        name: String,
        /// Its length.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// The name holds a character outside the allowed set.
    #[error("{what} {name:?} contains {ch:?} at byte {pos}; allowed are [A-Za-z0-9_.:-{extra}]")]
    BadChar {
        /// "device id" or "metric name".
        what: &'static str,
        /// The refused name.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        pos: usize,
        /// Characters allowed besides [A-Za-z0-9_.:-].
        extra: &'static str,
    },
}

fn validate(
    what: &'static str,
    name: &str,
    max: usize,
    extra: &'static str,
) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::Empty { what, max, extra });
    }
    let len = name.chars().count();
    if len > max {
        return Err(IdError::TooLong {
            what,
            name: name.chars().take(max).collect(),
            len,
            max,
        });
    }
    for (pos, ch) in name.char_indices() {
        let ok =
            ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | ':' | '-') || extra.contains(ch);
        if !ok {
            return Err(IdError::BadChar {
                what,
                name: name.to_owned(),
                ch,
                pos,
                extra,
            });
        }
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal, $max:expr, $extra:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Maximum length in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates `name`.
            pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
                let name = name.into();
                validate($what, &name, $max, $extra)?;
                Ok(Self(name))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0) // honours width and alignment in tables
            }
        }

        impl std::str::FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A device's id: 1 to 128 characters from `[A-Za-z0-9_.:-]`, unique in a fleet.
    DeviceId, "device id", 128, ""
);
name_type!(
    /// A metric's name: 1 to 128 characters from `[A-Za-z0-9_.:/-]`.
    MetricName, "metric name", 128, "/"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn errors_say_what_is_allowed() {
        let e = DeviceId::new("truck 9").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device id \"truck 9\" contains ' ' at byte 5; allowed are [A-Za-z0-9_.:-]"
        );
        assert!(DeviceId::new("").unwrap_err().to_string().contains("empty"));
        assert!(MetricName::new("engine/temp").is_ok());
        assert_eq!(format!("[{:<6}]", DeviceId::new("ab").unwrap()), "[ab    ]");
        assert!(DeviceId::new("engine/temp").is_err());
    }

    proptest! {
        #[test]
        fn valid_ids_roundtrip(s in "[A-Za-z0-9_.:-]{1,128}") {
            let id = DeviceId::new(s.clone()).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
        }

        #[test]
        fn anything_else_is_refused_not_panicking(s in ".{0,200}") {
            let ok = !s.is_empty()
                && s.chars().count() <= 128
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
            prop_assert_eq!(DeviceId::new(s).is_ok(), ok);
        }
    }
}
