//! Loading secrets from where operators keep them: an environment variable
//! or a file (Docker/Kubernetes secrets). The value goes straight into a
//! [`SecretString`]; error messages name the variable or file, never the value.

use std::path::PathBuf;

use secrecy::SecretString;

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable's name.
    Env(String),
    /// A file whose content (without trailing newline) is the secret.
    File(PathBuf),
}

/// Reads the secret; the error says which variable or file and what to do.
pub fn load_secret(source: &SecretSource) -> Result<SecretString, String> {
    let value = match source {
        SecretSource::Env(var) => match std::env::var(var) {
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!(
                    "environment variable `{var}` (client_secret_env) is not set; export it with the app registration's client secret"
                ));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("environment variable `{var}` is not valid UTF-8"));
            }
        },
        SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read secret file `{}` (client_secret_file): {e}",
                path.display()
            )
        })?,
    };
    let trimmed = value.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        let place = match source {
            SecretSource::Env(var) => format!("environment variable `{var}`"),
            SecretSource::File(path) => format!("secret file `{}`", path.display()),
        };
        return Err(format!("{place} is empty"));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn file_secret_drops_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n").unwrap();
        let s = load_secret(&SecretSource::File(path)).unwrap();
        assert_eq!(s.expose_secret(), "abc");
        assert_eq!(format!("{s:?}"), "SecretBox<str>([REDACTED])");
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "\n").unwrap();
        assert!(
            load_secret(&SecretSource::File(path.clone()))
                .unwrap_err()
                .contains("empty")
        );
        let missing = dir.path().join("missing");
        assert!(
            load_secret(&SecretSource::File(missing))
                .unwrap_err()
                .contains("missing")
        );
    }
}
