//! Field errors in the shape of Kubernetes' `field.Error`: a type, a field
//! path and a detail, rendered into `Status.details.causes`.

use std::fmt;

/// The `reason` of a status cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldErrorType {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    Forbidden,
    TooLong,
    Unknown,
    NotFound,
}

impl FieldErrorType {
    /// The `reason` string Kubernetes uses in `StatusCause`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Required => "FieldValueRequired",
            Self::Invalid => "FieldValueInvalid",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Duplicate => "FieldValueDuplicate",
            Self::Forbidden => "FieldValueForbidden",
            Self::TooLong => "FieldValueTooLong",
            Self::Unknown => "FieldValueUnknown",
            Self::NotFound => "FieldValueNotFound",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Required => "Required value",
            Self::Invalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Duplicate => "Duplicate value",
            Self::Forbidden => "Forbidden",
            Self::TooLong => "Too long",
            Self::Unknown => "Unknown field",
            Self::NotFound => "Not found",
        }
    }
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub kind: FieldErrorType,
    pub field: String,
    /// The offending value, rendered, for `Invalid`, `NotSupported` and `Duplicate`.
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn new(
        kind: FieldErrorType,
        field: impl Into<String>,
        value: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            field: field.into(),
            value,
            detail: detail.into(),
        }
    }

    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Required, field, None, detail)
    }

    pub fn invalid(
        field: impl Into<String>,
        value: impl fmt::Debug,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(
            FieldErrorType::Invalid,
            field,
            Some(format!("{value:?}").replace("\\\"", "\"")),
            detail,
        )
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Forbidden, field, None, detail)
    }

    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Self::new(
            FieldErrorType::NotSupported,
            field,
            Some(format!("\"{value}\"")),
            format!("supported values: {}", list.join(", ")),
        )
    }

    pub fn duplicate(field: impl Into<String>, value: &str) -> Self {
        Self::new(
            FieldErrorType::Duplicate,
            field,
            Some(format!("\"{value}\"")),
            "",
        )
    }

    /// A reference to something that does not exist.
    pub fn not_found(field: impl Into<String>, value: &str) -> Self {
        Self::new(
            FieldErrorType::NotFound,
            field,
            Some(format!("{value:?}")),
            "",
        )
    }

    pub fn unknown(field: impl Into<String>) -> Self {
        Self::new(FieldErrorType::Unknown, field, None, "")
    }

    /// The message of the cause, without the field (Kubernetes puts the field
    /// in its own member of the cause).
    pub fn message(&self) -> String {
        let mut out = self.kind.label().to_owned();
        if let Some(v) = &self.value {
            out.push_str(": ");
            out.push_str(v);
        }
        if !self.detail.is_empty() {
            out.push_str(": ");
            out.push_str(&self.detail);
        }
        out
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}

/// Accumulates errors under a path prefix.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn push(&mut self, e: FieldError) {
        self.0.push(e);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
