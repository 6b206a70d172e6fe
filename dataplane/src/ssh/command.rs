//! Lobby commands: a command line (from `ssh boxd.test CMD…` or the interactive prompt) split
//! into words the way a POSIX shell would (quotes, backslashes), then parsed into a typed
//! [`LobbyCommand`]. Sans-io and total: any input gives a command or a [`UsageError`] whose
//! message says what to type instead; never a panic (fuzzed: `fuzz/fuzz_targets/lobby_command.rs`).

use std::fmt;

pub use boxd_operations::{LinkTo, NewToken, NewVm};

/// Largest command line accepted.
pub const MAX_LINE: usize = 4096;

/// What the user asked the lobby to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LobbyCommand {
    /// Create a VM and wait until it is reachable.
    New(NewArgs),
    /// List the caller's VMs.
    Ls {
        /// Machine-readable output.
        json: bool,
    },
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
        /// Machine-readable output.
        json: bool,
    },
    /// Delete a VM (and its disk).
    Rm {
        /// VM name.
        name: String,
    },
    /// Start, stop or restart a VM.
    Power {
        /// What to do.
        action: Power,
        /// VM name.
        name: String,
    },
    /// List the account's keys.
    Keys {
        /// Machine-readable output.
        json: bool,
    },
    /// Add the public key given on stdin.
    KeysAdd,
    /// Remove a key by fingerprint.
    KeysRm {
        /// `SHA256:…` fingerprint.
        fingerprint: String,
    },
    /// Who the caller is.
    Whoami {
        /// Machine-readable output.
        json: bool,
    },
    /// What happened to a VM.
    Events {
        /// VM name.
        name: String,
    },
    /// Keys waiting behind registration links (the cluster's owner only).
    Registrations {
        /// Machine-readable output.
        json: bool,
    },
    /// Link a waiting key to an account (the cluster's owner only).
    Approve {
        /// The code from the link.
        code: String,
        /// The account it joins.
        to: LinkTo,
    },
    /// Make an API token and print it.
    TokenCreate {
        /// What it may do, for how long.
        token: NewToken,
        /// Machine-readable output.
        json: bool,
    },
    /// List the account's tokens.
    TokenLs {
        /// Machine-readable output.
        json: bool,
    },
    /// Revoke a token.
    TokenRm {
        /// Its id.
        id: String,
    },
    /// An OpenSSH config block for the zone: names that work without DNS.
    SshConfig,
    /// Usage.
    Help,
    /// Leave the interactive prompt.
    Exit,
}

/// `new`'s options: what to create and how to print it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewArgs {
    /// The VM asked for (`None`s are the cluster's defaults).
    pub vm: NewVm,
    /// Machine-readable output.
    pub json: bool,
}

/// Power actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// Start a stopped VM.
    Start,
    /// Stop a running VM (its disk stays).
    Stop,
    /// Stop, then start.
    Restart,
}

/// Why a command line is not a command; the message says what to type instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// The `help` text.
pub const HELP: &str = "\
Commands:
  new [NAME | --name=NAME] [--image=IMAGE] [--cpus=N] [--memory=SIZE] [--disk=SIZE]
                      create a VM and wait until it is reachable
  ls                  list your VMs
  show NAME           show one VM (with its last events)
  events NAME         what happened to a VM: started, stopped, restarted and why
  start NAME          start a stopped VM
  stop NAME           stop a VM (its disk is kept)
  restart NAME        stop and start a VM
  rm NAME             delete a VM and its disk
  keys                list your SSH keys
  keys add            add the public key given on stdin
  keys rm FINGERPRINT remove a key
  whoami              show your account
  token create [--ttl=1h] [--vm=NAME]... [--read-only] [--label=TEXT]
                      make an API token (a JWT for the gRPC API at api.ZONE)
  token ls            list your tokens
  token rm ID         revoke a token at once
  registrations       keys waiting for approval (the cluster's owner)
  approve CODE [--name=NAME | --to-account=ACCOUNT]
                      link a waiting key to a new account (or to ACCOUNT)
  ssh-config          an OpenSSH config for your VMs' names (ssh -F <(ssh LOBBY ssh-config) NAME)
  help                this text
Add --json to ls, show, keys, whoami, token, registrations and new for machine-readable output.
Sizes: memory in MiB or with a unit (512M, 2G); disk in GiB or with a unit (10G).
";

/// Splits `line` into shell words and parses them. An empty line is `Ok(None)`.
pub fn parse_line(line: &str) -> Result<Option<LobbyCommand>, UsageError> {
    if line.len() > MAX_LINE {
        return Err(usage(format!(
            "the command is longer than {MAX_LINE} bytes"
        )));
    }
    if line
        .chars()
        .any(|c| c.is_control() && c != '\t' && c != '\n' && c != '\r')
    {
        return Err(usage("the command contains control characters"));
    }
    let words = shlex::split(line).ok_or_else(|| {
        usage("unbalanced quotes or a trailing backslash: close the quote and try again")
    })?;
    if words.is_empty() {
        return Ok(None);
    }
    parse(&words).map(Some)
}

/// One `--flag=value` or `--flag value` or bare `--flag`.
struct Flag<'a> {
    name: &'a str,
    value: Option<String>,
}

/// Splits words into positionals and flags; `--x value` takes the next word only for flags
/// listed in `valued`.
fn split<'a>(
    words: &'a [String],
    valued: &[&str],
) -> Result<(Vec<&'a str>, Vec<Flag<'a>>), UsageError> {
    let mut pos = Vec::new();
    let mut flags = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if let Some(rest) = w.strip_prefix("--") {
            let (name, value) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None if valued.contains(&rest) => {
                    let v = it
                        .next()
                        .ok_or_else(|| usage(format!("--{rest} needs a value: --{rest}=VALUE")))?;
                    (rest, Some(v.clone()))
                }
                None => (rest, None),
            };
            flags.push(Flag { name, value });
        } else if w.starts_with('-') && w.len() > 1 {
            return Err(usage(format!(
                "unknown option {w}: options are spelled --name=value (see `help`)"
            )));
        } else {
            pos.push(w.as_str());
        }
    }
    Ok((pos, flags))
}

fn no_value(f: &Flag<'_>) -> Result<(), UsageError> {
    match f.value {
        Some(_) => Err(usage(format!("--{} takes no value", f.name))),
        None => Ok(()),
    }
}

fn value<'f>(f: &'f Flag<'_>) -> Result<&'f str, UsageError> {
    f.value
        .as_deref()
        .ok_or_else(|| usage(format!("--{} needs a value: --{}=VALUE", f.name, f.name)))
}

/// Only `--json` is allowed; returns whether it was given.
fn json_only(cmd: &str, flags: &[Flag<'_>]) -> Result<bool, UsageError> {
    let mut json = false;
    for f in flags {
        match f.name {
            "json" => {
                no_value(f)?;
                json = true;
            }
            other => return Err(usage(format!("`{cmd}` has no option --{other}"))),
        }
    }
    Ok(json)
}

fn one_name<'a>(cmd: &str, pos: &[&'a str], what: &str) -> Result<&'a str, UsageError> {
    match pos {
        [_, n] => Ok(n),
        [_] => Err(usage(format!(
            "`{cmd}` needs a {what}: {cmd} {}",
            what.to_uppercase()
        ))),
        _ => Err(usage(format!("`{cmd}` takes one {what}"))),
    }
}

fn parse(words: &[String]) -> Result<LobbyCommand, UsageError> {
    let verb = words[0].as_str();
    match verb {
        "new" => parse_new(words),
        "ls" | "list" => {
            let (pos, flags) = split(words, &[])?;
            if pos.len() > 1 {
                return Err(usage("`ls` takes no arguments"));
            }
            Ok(LobbyCommand::Ls {
                json: json_only("ls", &flags)?,
            })
        }
        "show" => {
            let (pos, flags) = split(words, &[])?;
            Ok(LobbyCommand::Show {
                name: one_name("show", &pos, "name")?.to_owned(),
                json: json_only("show", &flags)?,
            })
        }
        "rm" | "start" | "stop" | "restart" => {
            let (pos, flags) = split(words, &[])?;
            json_only(verb, &flags)?;
            let name = one_name(verb, &pos, "name")?.to_owned();
            Ok(match verb {
                "rm" => LobbyCommand::Rm { name },
                "start" => LobbyCommand::Power {
                    action: Power::Start,
                    name,
                },
                "stop" => LobbyCommand::Power {
                    action: Power::Stop,
                    name,
                },
                _ => LobbyCommand::Power {
                    action: Power::Restart,
                    name,
                },
            })
        }
        "keys" => {
            let (pos, flags) = split(words, &[])?;
            let json = json_only("keys", &flags)?;
            match pos.get(1).copied() {
                None => Ok(LobbyCommand::Keys { json }),
                Some("add") if pos.len() == 2 => Ok(LobbyCommand::KeysAdd),
                Some("rm") => Ok(LobbyCommand::KeysRm {
                    fingerprint: one_name("keys rm", &pos[1..], "fingerprint")?.to_owned(),
                }),
                Some("ls" | "list") if pos.len() == 2 => Ok(LobbyCommand::Keys { json }),
                Some(other) => Err(usage(format!(
                    "`keys {other}` is not a command: use keys, keys add or keys rm FINGERPRINT"
                ))),
            }
        }
        "whoami" => {
            let (pos, flags) = split(words, &[])?;
            if pos.len() > 1 {
                return Err(usage("`whoami` takes no arguments"));
            }
            Ok(LobbyCommand::Whoami {
                json: json_only("whoami", &flags)?,
            })
        }
        "events" => {
            let (pos, _) = split(words, &[])?;
            Ok(LobbyCommand::Events {
                name: one_name("events", &pos, "NAME")?.to_owned(),
            })
        }
        "registrations" => {
            let (pos, flags) = split(words, &[])?;
            if pos.len() > 1 {
                return Err(usage("`registrations` takes no arguments"));
            }
            Ok(LobbyCommand::Registrations {
                json: json_only("registrations", &flags)?,
            })
        }
        "approve" => parse_approve(words),
        "token" | "tokens" => parse_token(words),
        "ssh-config" => {
            if words.len() > 1 {
                return Err(usage("`ssh-config` takes no arguments"));
            }
            Ok(LobbyCommand::SshConfig)
        }
        "help" | "--help" | "-h" | "?" => Ok(LobbyCommand::Help),
        "exit" | "quit" | "logout" => Ok(LobbyCommand::Exit),
        other => Err(usage(format!(
            "unknown command `{}`: type `help` for the list",
            other.escape_debug()
        ))),
    }
}

fn parse_token(words: &[String]) -> Result<LobbyCommand, UsageError> {
    let (pos, flags) = split(words, &["ttl", "vm", "label"])?;
    match pos.get(1).copied() {
        None | Some("ls" | "list") if pos.len() <= 2 => Ok(LobbyCommand::TokenLs {
            json: json_only("token ls", &flags)?,
        }),
        Some("rm" | "revoke") => {
            json_only("token rm", &flags)?;
            Ok(LobbyCommand::TokenRm {
                id: one_name("token rm", &pos[1..], "token id")?.to_owned(),
            })
        }
        Some("create" | "new") if pos.len() == 2 => {
            let (mut token, mut json) = (NewToken::default(), false);
            for f in &flags {
                match f.name {
                    "ttl" => {
                        let d = boxd_operations::parse_duration(value(f)?).map_err(usage)?;
                        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                        token.ttl_ms = Some(ms);
                    }
                    "vm" => token.vms.push(value(f)?.to_owned()),
                    "label" => token.label = value(f)?.to_owned(),
                    "read-only" => {
                        no_value(f)?;
                        token.read_only = true;
                    }
                    "json" => {
                        no_value(f)?;
                        json = true;
                    }
                    other => return Err(usage(format!("`token create` has no option --{other}"))),
                }
            }
            Ok(LobbyCommand::TokenCreate { token, json })
        }
        Some(verb @ ("create" | "new" | "ls" | "list")) => Err(usage(format!(
            "`token {verb}` takes options only (see `help`)"
        ))),
        Some(other) => Err(usage(format!(
            "`token {other}` is not a command: use token create, token ls or token rm ID"
        ))),
        None => Err(usage("`token` takes no arguments: use token ls")),
    }
}

fn parse_approve(words: &[String]) -> Result<LobbyCommand, UsageError> {
    let (pos, flags) = split(words, &["name", "to-account"])?;
    let code = one_name("approve", &pos, "code")?.to_owned();
    let mut to = LinkTo::NewAccount(None);
    for f in &flags {
        to = match (f.name, &to) {
            ("name", LinkTo::NewAccount(None)) => LinkTo::NewAccount(Some(value(f)?.to_owned())),
            ("to-account", LinkTo::NewAccount(None)) => LinkTo::Account(value(f)?.to_owned()),
            ("name" | "to-account", _) => {
                return Err(usage(
                    "give one of --name=NAME (a new account) or --to-account=ACCOUNT, once",
                ));
            }
            (other, _) => return Err(usage(format!("`approve` has no option --{other}"))),
        };
    }
    Ok(LobbyCommand::Approve { code, to })
}

fn parse_new(words: &[String]) -> Result<LobbyCommand, UsageError> {
    let (pos, flags) = split(words, &["name", "image", "cpus", "memory", "disk"])?;
    let mut a = NewArgs::default();
    if let [_, name] = pos.as_slice() {
        a.vm.name = Some((*name).to_owned());
    } else if pos.len() > 2 {
        return Err(usage("`new` takes at most one name: new --name=NAME"));
    }
    for f in &flags {
        match f.name {
            "name" if a.vm.name.is_some() => {
                return Err(usage("give the name once: new --name=NAME"));
            }
            "name" => a.vm.name = Some(value(f)?.to_owned()),
            "image" => a.vm.image = Some(value(f)?.to_owned()),
            "cpus" => {
                let v = value(f)?;
                a.vm.cpus = Some(v.parse().map_err(|_| {
                    usage(format!("--cpus={v} is not a number: use e.g. --cpus=2"))
                })?);
            }
            "memory" => a.vm.memory_mib = Some(size(value(f)?, "memory", Unit::Mib)?),
            "disk" => a.vm.disk_gib = Some(size(value(f)?, "disk", Unit::Gib)?),
            "json" => {
                no_value(f)?;
                a.json = true;
            }
            other => {
                return Err(usage(format!(
                    "`new` has no option --{other}: use --name, --image, --cpus, --memory, --disk"
                )));
            }
        }
    }
    Ok(LobbyCommand::New(a))
}

#[derive(Clone, Copy)]
enum Unit {
    Mib,
    Gib,
}

/// `512`, `512M`, `512MiB`, `2G`, `2GB`, `1T` → in `unit`; bare numbers are in `unit`.
fn size(v: &str, what: &str, unit: Unit) -> Result<u64, UsageError> {
    let bad = || {
        usage(format!(
            "--{what}={v} is not a size: use a number with an optional unit, e.g. --{what}={}",
            match unit {
                Unit::Mib => "512M",
                Unit::Gib => "10G",
            }
        ))
    };
    let lower = v.trim().to_ascii_lowercase();
    let digits = lower.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = lower[..digits].parse().map_err(|_| bad())?;
    let mib_per: u64 = match lower[digits..].trim() {
        "" => match unit {
            Unit::Mib => 1,
            Unit::Gib => 1024,
        },
        "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    let mib = n.checked_mul(mib_per).ok_or_else(bad)?;
    Ok(match unit {
        Unit::Mib => mib,
        Unit::Gib => {
            if mib % 1024 != 0 {
                return Err(usage(format!("--{what}={v} is not a whole number of GiB")));
            }
            mib / 1024
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> Result<LobbyCommand, String> {
        parse_line(s)
            .map(|c| c.expect("not empty"))
            .map_err(|e| e.0)
    }

    #[test]
    fn parses_new_in_every_spelling() {
        assert_eq!(p("new"), Ok(LobbyCommand::New(NewArgs::default())));
        let want = LobbyCommand::New(NewArgs {
            vm: NewVm {
                name: Some("my app".into()),
                image: Some("debian".into()),
                cpus: Some(2),
                memory_mib: Some(2048),
                disk_gib: Some(10),
            },
            json: true,
        });
        assert_eq!(
            p("new --name='my app' --image debian --cpus=2 --memory=2G --disk 10 --json"),
            Ok(want.clone())
        );
        assert_eq!(
            p(r#"new "my app" --image=debian --cpus 2 --memory 2048 --disk=10GiB --json"#),
            Ok(want)
        );
        assert!(matches!(
            p("new --memory=512"),
            Ok(LobbyCommand::New(NewArgs {
                vm: NewVm {
                    memory_mib: Some(512),
                    ..
                },
                ..
            }))
        ));
    }

    #[test]
    fn every_other_command() {
        assert_eq!(p("ls --json"), Ok(LobbyCommand::Ls { json: true }));
        assert_eq!(
            p("show app"),
            Ok(LobbyCommand::Show {
                name: "app".into(),
                json: false
            })
        );
        assert_eq!(p("rm app"), Ok(LobbyCommand::Rm { name: "app".into() }));
        assert_eq!(
            p("restart app"),
            Ok(LobbyCommand::Power {
                action: Power::Restart,
                name: "app".into()
            })
        );
        assert_eq!(p("keys"), Ok(LobbyCommand::Keys { json: false }));
        assert_eq!(p("keys add"), Ok(LobbyCommand::KeysAdd));
        assert_eq!(
            p("keys rm SHA256:abc"),
            Ok(LobbyCommand::KeysRm {
                fingerprint: "SHA256:abc".into()
            })
        );
        assert_eq!(p("whoami --json"), Ok(LobbyCommand::Whoami { json: true }));
        assert_eq!(
            p("token create --ttl=10m --vm=web --vm db --read-only --label='for ci' --json"),
            Ok(LobbyCommand::TokenCreate {
                token: NewToken {
                    ttl_ms: Some(600_000),
                    vms: vec!["web".into(), "db".into()],
                    read_only: true,
                    label: "for ci".into(),
                },
                json: true
            })
        );
        assert_eq!(p("tokens"), Ok(LobbyCommand::TokenLs { json: false }));
        assert_eq!(
            p("token ls --json"),
            Ok(LobbyCommand::TokenLs { json: true })
        );
        assert_eq!(
            p("token rm abc"),
            Ok(LobbyCommand::TokenRm { id: "abc".into() })
        );
        assert_eq!(
            p("registrations --json"),
            Ok(LobbyCommand::Registrations { json: true })
        );
        let approve = |code: &str, to| {
            Ok(LobbyCommand::Approve {
                code: code.into(),
                to,
            })
        };
        assert_eq!(p("approve c0de"), approve("c0de", LinkTo::NewAccount(None)));
        assert_eq!(
            p("approve c0de --name=ann"),
            approve("c0de", LinkTo::NewAccount(Some("ann".into())))
        );
        assert_eq!(
            p("approve --to-account ann c0de"),
            approve("c0de", LinkTo::Account("ann".into()))
        );
        assert_eq!(p("help"), Ok(LobbyCommand::Help));
        assert_eq!(p("  exit "), Ok(LobbyCommand::Exit));
        assert_eq!(parse_line("   "), Ok(None));
    }

    #[test]
    fn bad_input_says_what_to_do() {
        for (line, needle) in [
            ("frobnicate", "type `help`"),
            ("new --cpus=two", "not a number"),
            ("new --memory=lots", "not a size"),
            ("new --disk=1500M", "whole number of GiB"),
            ("new --colour=red", "no option --colour"),
            ("new --name", "needs a value"),
            ("new a --name=b", "give the name once"),
            ("show", "needs a name"),
            ("show a b", "takes one name"),
            ("rm -f app", "unknown option -f"),
            ("ls --json=yes", "takes no value"),
            ("new 'unterminated", "unbalanced quotes"),
            ("keys frob", "not a command"),
            ("approve", "needs a code"),
            ("approve c --name=a --to-account=b", "give one of"),
            ("approve c --name=a --name=b", "give one of"),
            ("approve c --force", "no option --force"),
            ("registrations x", "takes no arguments"),
            ("token frob", "not a command"),
            ("token create --ttl=soon", "not a duration"),
            ("token create --ttl=3w", "unknown unit"),
            ("token create --read-only=yes", "takes no value"),
            ("token create --vm", "needs a value"),
            ("token rm", "needs a token id"),
            ("token create extra", "takes options only"),
            ("new --memory=99999999999999999999T", "not a size"),
            ("ls \u{1b}[2J", "control characters"),
        ] {
            let e = p(line).unwrap_err();
            assert!(e.contains(needle), "{line:?}: {e}");
        }
        assert!(p(&"x".repeat(MAX_LINE + 1)).unwrap_err().contains("longer"));
    }
}
