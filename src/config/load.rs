//! Reading a configuration: the built-in defaults, overlaid by `config.toml` (or `--config PATH`),
//! overlaid by the environment's `AGENTWIRE__SECTION__KEY`, then read into the schema and
//! validated. Development mode's generated secret lives here too, since it is read (or made) from
//! a file beside the configuration, and so does the record of where the configuration and its
//! secret came from, which the start-up lines tell the operator.
//!
//! The layers are merged as TOML tables and read into the schema once, through
//! `serde_path_to_error`, so a value of the wrong type (or a 0 where the schema says `NonZero*`)
//! is reported under its key, whichever layer it came from.

use std::path::{Path, PathBuf};

use super::{error, Algorithm, Config, ConfigError};

/// The file, beside the configuration file, that keeps development mode's generated secret so
/// that `agentwire serve` and `agentwire token` agree across restarts.
pub const DEV_SECRET_FILE: &str = ".agentwire-dev-secret";

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "AGENTWIRE__";

/// Where the configuration came from, for the start-up log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Defaults,
    File(PathBuf),
}

/// Where `auth.secret` came from, for the start-up lines; the secret itself is never shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// `AGENTWIRE__AUTH__SECRET`.
    Environment,
    /// `auth.secret` in this configuration file.
    File(PathBuf),
    /// Development mode's generated secret, kept in this file ([`DEV_SECRET_FILE`]).
    DevSecretFile(PathBuf),
    /// No secret in use: RS256 and ES256 verify with `auth.public_key_file`.
    None,
    /// No secret in use: identity providers' keys verify (`auth.jwks_url`, `auth.oidc_issuer`,
    /// `[[auth.issuers]]`).
    KeySets,
}

/// The start-up lines' words: "secret kept in .agentwire-dev-secret".
impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Environment => write!(f, "secret from AGENTWIRE__AUTH__SECRET"),
            SecretSource::File(path) => write!(f, "secret from auth.secret in {}", path.display()),
            SecretSource::DevSecretFile(path) => write!(f, "secret kept in {}", path.display()),
            SecretSource::None => write!(f, "no secret (keys from auth.public_key_file)"),
            SecretSource::KeySets => write!(f, "no secret (identity providers' keys)"),
        }
    }
}

/// A configuration ready to use, and where it and its secret came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
    pub secret: SecretSource,
}

impl Config {
    /// Loads `explicit`, else `./config.toml` when it exists, else the defaults; then applies the
    /// process environment's overrides and validates. In development mode with HS256 and no
    /// secret, the secret is read from (or made in) [`DEV_SECRET_FILE`] beside the configuration.
    pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let (text, source) = match explicit {
            Some(path) => (read(path)?, Source::File(path.to_owned())),
            None => {
                let default = Path::new("config.toml");
                if default.is_file() {
                    (read(default)?, Source::File(default.to_owned()))
                } else {
                    (String::new(), Source::Defaults)
                }
            }
        };
        let mut config = Config::from_sources(&text, &env)?;
        // `store.path` is relative to the file that names it (docs/conversations.md).
        if let Source::File(path) = &source {
            if config.store.path.is_relative() {
                config.store.path =
                    path.parent().map(Path::to_owned).unwrap_or_default().join(&config.store.path);
            }
        }
        let secret = secret_source(&config, &source, &env);
        if let SecretSource::DevSecretFile(path) = &secret {
            config.auth.secret = dev_secret(path)?;
        }
        Ok(Loaded { config, source, secret })
    }

    /// Where development mode keeps its generated secret for this configuration source.
    pub fn dev_secret_path(source: &Source) -> PathBuf {
        match source {
            Source::File(path) => path.parent().map(Path::to_owned).unwrap_or_default().join(DEV_SECRET_FILE),
            Source::Defaults => PathBuf::from(DEV_SECRET_FILE),
        }
    }

    /// Builds a validated configuration from TOML text and `(name, value)` environment pairs.
    pub fn from_sources(toml_text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut table = defaults_table();
        let file: toml::Table =
            toml_text.parse().map_err(|e: toml::de::Error| error("config file", e.message().to_owned()))?;
        merge(&mut table, file)?;
        apply_env(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            error(key, e.into_inner().message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }
}

/// Where the validated `config`'s secret comes from. An empty HS256 secret got through validation
/// only in development mode, which makes one.
fn secret_source(config: &Config, source: &Source, env: &[(String, String)]) -> SecretSource {
    let auth = &config.auth;
    if auth.uses_key_sets() {
        return SecretSource::KeySets;
    }
    if auth.algorithm != Algorithm::HS256 {
        return SecretSource::None;
    }
    if auth.secret.is_empty() && config.server.dev_mode {
        return SecretSource::DevSecretFile(Config::dev_secret_path(source));
    }
    match source {
        Source::File(path) if !env_sets(env, "auth", "secret") => SecretSource::File(path.clone()),
        // The built-in defaults have no secret: without a file, it came from the environment.
        _ => SecretSource::Environment,
    }
}

/// Development mode's secret: read from `path`, or made (32 random bytes, hex) and written there
/// on first start, readable by its owner only.
fn dev_secret(path: &Path) -> Result<String, ConfigError> {
    let failed = |e: std::io::Error| {
        error("server.dev_mode", format!("cannot keep the secret in {}: {e}", path.display()))
    };
    match std::fs::read_to_string(path) {
        Ok(secret) if secret.trim().len() >= 32 => return Ok(secret.trim().to_owned()),
        Ok(_) => {
            return Err(error(
                "server.dev_mode",
                format!("{} holds no usable secret; delete it", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(failed)?;
    file.write_all(secret.as_bytes()).map_err(failed)?;
    Ok(secret)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| error("--config", format!("cannot read {}: {e}", path.display())))
}

fn defaults_table() -> toml::Table {
    match toml::Table::try_from(Config::default()) {
        Ok(table) => table,
        // The defaults are plain data; failing to express them in TOML is a bug caught by tests.
        Err(e) => panic!("default configuration is not representable in TOML: {e}"),
    }
}

/// Overlays a file's sections onto the defaults, section by section.
fn merge(base: &mut toml::Table, overlay: toml::Table) -> Result<(), ConfigError> {
    for (section, value) in overlay {
        match (base.get_mut(&section), value) {
            (Some(toml::Value::Table(target)), toml::Value::Table(keys)) => target.extend(keys),
            (Some(_), _) => return Err(error(section, "must be a table like [section]")),
            (None, _) => return Err(error(section, "unknown section")),
        }
    }
    Ok(())
}

/// `AGENTWIRE__SECTION__KEY` as `(section, key)` in lower case; `None` for other variables.
fn env_key(name: &str) -> Option<Result<(String, String), ConfigError>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let mut parts = rest.splitn(2, "__");
    Some(match (parts.next(), parts.next()) {
        (Some(section), Some(key)) => Ok((section.to_ascii_lowercase(), key.to_ascii_lowercase())),
        _ => Err(error(name, "expected AGENTWIRE__SECTION__KEY")),
    })
}

/// Whether the environment overrides `section.key`.
fn env_sets(env: &[(String, String)], section: &str, key: &str) -> bool {
    env.iter().any(|(name, _)| matches!(env_key(name), Some(Ok((s, k))) if s == section && k == key))
}

/// Applies `AGENTWIRE__SECTION__KEY=value`. The default's type says how to read the text, so a
/// numeric-looking secret stays a string and `a,b` fills a list.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(parsed) = env_key(name) else {
            continue;
        };
        let (section, key) = parsed?;
        let dotted = format!("{section}.{key}");
        let current = table
            .get(&section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(&key))
            .ok_or_else(|| error(name.as_str(), format!("unknown key {dotted}")))?;
        let bad = |what: &str| error(dotted.clone(), format!("{name}={raw:?} is not {what}"));
        let value = match current {
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad("true or false")),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            _ => return Err(bad("supported in the environment")),
        };
        if let Some(toml::Value::Table(section_table)) = table.get_mut(&section) {
            section_table.insert(key, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{env, SECRET};

    #[test]
    fn defaults_are_valid_and_match_the_protocol() {
        let config =
            Config::from_sources("", &env(&[("AGENTWIRE__AUTH__SECRET", "0123456789abcdef")])).unwrap();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.limits.max_message_bytes, 65_536);
        assert_eq!(config.limits.pending_messages, 32);
        assert_eq!(config.history.events_per_user.get(), 1000);
        assert_eq!(config.auth.leeway_secs, 30);
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults_plus_development_mode() {
        let shipped = include_str!("../../config.toml");
        let from_file = Config::from_sources(shipped, &[]).unwrap();
        assert!(from_file.server.dev_mode, "the repository's config.toml turns development mode on");
        let mut shipped_table = toml::Table::try_from(&from_file).unwrap();
        shipped_table["server"]["dev_mode"] = toml::Value::Boolean(false);
        assert_eq!(shipped_table, defaults_table(), "config.toml and Config::default() disagree");
    }

    #[test]
    fn file_then_env_overrides() {
        let config = Config::from_sources(
            "[limits]\nburst = 80\n[auth]\nsecret = \"from-file-0123456789\"",
            &env(&[
                ("AGENTWIRE__SERVER__BIND", "127.0.0.1:9000"),
                ("AGENTWIRE__AUTH__SECRET", "1234567890123456"),
                ("AGENTWIRE__API__KEYS", "key-one-0123456789, key-two-0123456789"),
                ("AGENTWIRE__AUTH__DEV_TOKENS", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.bind.port(), 9000);
        assert_eq!(config.auth.secret, "1234567890123456");
        assert_eq!(config.limits.burst.get(), 80);
        assert_eq!(config.api.keys, vec!["key-one-0123456789", "key-two-0123456789"]);
        assert!(!config.auth.dev_tokens);
    }

    #[test]
    fn errors_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[limits]\nburst = \"many\"", &[], "limits.burst"),
            ("[limits]\nbursts = 3", &[], "limits"),
            ("[nope]\nx = 1", &[], "nope"),
            ("", &[("AGENTWIRE__LIMITS__BURST", "lots")], "limits.burst"),
            ("", &[("AGENTWIRE__LIMITS__NOPE", "1")], "AGENTWIRE__LIMITS__NOPE"),
            ("", &[("AGENTWIRE__SERVER__BIND", "localhost")], "server.bind"),
            ("", &[("AGENTWIRE__AUTH__ALGORITHM", "HS512")], "auth.algorithm"),
        ];
        for (text, vars, key) in cases {
            let mut vars = env(vars);
            vars.push((SECRET.0.into(), SECRET.1.into()));
            let err = Config::from_sources(text, &vars).unwrap_err();
            assert!(err.key.starts_with(key), "{text} {vars:?}: got {err}");
        }
    }

    /// The `NonZero*` keys refuse 0 while reading, from the file and from the environment alike,
    /// and the line names the key.
    #[test]
    fn zero_is_refused_where_the_schema_says_non_zero() {
        let keys = [
            ("limits", "burst"),
            ("limits", "max_connections"),
            ("auth", "timeout_secs"),
            ("history", "events_per_user"),
            ("api", "max_body_bytes"),
        ];
        for (section, key) in keys {
            let dotted = format!("{section}.{key}");
            let file = format!("[{section}]\n{key} = 0\n");
            let from_file = Config::from_sources(&file, &env(&[SECRET])).unwrap_err();
            let var = format!("AGENTWIRE__{}__{}", section.to_uppercase(), key.to_uppercase());
            let from_env = Config::from_sources("", &env(&[SECRET, (&var, "0")])).unwrap_err();
            for err in [from_file, from_env] {
                assert_eq!(err.key, dotted, "{err}");
                let line = err.to_string();
                assert!(line.contains(&dotted) && line.contains("nonzero"), "{line}");
            }
        }
        let negative = Config::from_sources("[limits]\nburst = -1\n", &env(&[SECRET])).unwrap_err();
        assert_eq!(negative.key, "limits.burst", "{negative}");
    }

    #[test]
    fn the_secret_source_says_where_the_secret_came_from() {
        let file = Source::File(PathBuf::from("deploy/config.toml"));
        let with_file_secret = "[auth]\nsecret = \"from-the-file-0123456789\"\n";
        let config = Config::from_sources(with_file_secret, &[]).unwrap();
        assert_eq!(secret_source(&config, &file, &[]), SecretSource::File("deploy/config.toml".into()));

        let vars = env(&[SECRET]);
        let config = Config::from_sources(with_file_secret, &vars).unwrap();
        assert_eq!(secret_source(&config, &file, &vars), SecretSource::Environment);
        let config = Config::from_sources("", &vars).unwrap();
        assert_eq!(secret_source(&config, &Source::Defaults, &vars), SecretSource::Environment);

        // Development mode with a secret from the environment does not use the secret file.
        let vars = env(&[SECRET, ("AGENTWIRE__SERVER__DEV_MODE", "true")]);
        let config = Config::from_sources("", &vars).unwrap();
        let source = secret_source(&config, &file, &vars);
        assert_eq!(source, SecretSource::Environment);
        assert_eq!(source.to_string(), "secret from AGENTWIRE__AUTH__SECRET");

        let vars = env(&[("AGENTWIRE__SERVER__DEV_MODE", "true")]);
        let config = Config::from_sources("", &vars).unwrap();
        let source = secret_source(&config, &file, &vars);
        assert_eq!(source, SecretSource::DevSecretFile(PathBuf::from("deploy").join(DEV_SECRET_FILE)));
        assert_eq!(source.to_string(), "secret kept in deploy/.agentwire-dev-secret");
        let source = secret_source(&config, &Source::File("config.toml".into()), &vars);
        assert_eq!(source.to_string(), "secret kept in .agentwire-dev-secret", "as README shows it");

        let rs256 = "[auth]\nalgorithm = \"RS256\"\npublic_key_file = \"key.pem\"\n";
        let config = Config::from_sources(rs256, &[]).unwrap();
        assert_eq!(secret_source(&config, &file, &[]), SecretSource::None);
    }
}
