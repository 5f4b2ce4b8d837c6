//! Input validation with precise reasons.

use std::fmt;

/// One reason an input is refused: where (a JSON pointer into the payload)
/// and what is wrong.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Violation {
    /// JSON pointer to the offending field, e.g. `/lines/1/quantity`.
    pub field: String,
    /// What is wrong, e.g. `must be between 1 and 10000`.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Checks an input beyond what its type says.
pub trait Validate {
    /// Every violation, empty when the input is valid.
    fn violations(&self) -> Vec<Violation>;

    /// `Ok` when valid, else every violation.
    fn validate(&self) -> Result<(), Vec<Violation>> {
        let v = self.violations();
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }
}

/// Collects violations.
#[derive(Debug, Default)]
pub struct Checker(Vec<Violation>);

impl Checker {
    /// Records a violation at `field` unless `ok`.
    pub fn check(
        &mut self,
        ok: bool,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        if !ok {
            self.0.push(Violation {
                field: field.into(),
                message: message.into(),
            });
        }
        self
    }

    /// The violations recorded.
    pub fn finish(&mut self) -> Vec<Violation> {
        std::mem::take(&mut self.0)
    }
}

/// One line listing every violation.
pub fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A plausible email: one `@`, a non-empty local part, a dotted domain, no
/// spaces, at most 254 characters.
pub fn is_email(s: &str) -> bool {
    if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// A non-blank text of at most `max` characters.
pub fn is_text(s: &str, max: usize) -> bool {
    !s.trim().is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_for_shape() {
        for ok in ["a@b.co", "first.last+tag@example.org"] {
            assert!(is_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@", "@b.co", "a@b", "a@b..co", "a b@c.de", "a@b@c.de", "a@.b.co",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }
}
