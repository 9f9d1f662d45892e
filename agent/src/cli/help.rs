//! Examples in every command's `--help`, kept in one table so each command shows how it is
//! used, and a test makes sure none is left without.

use clap::{CommandFactory as _, FromArgMatches as _};

use super::Cli;

/// (command path, example lines).
const EXAMPLES: &[(&[&str], &str)] = &[
    (&["daemon"], "sudo bulkhead daemon\n  sudo bulkhead --config /etc/bulkhead/bulkhead.toml daemon --fail-open"),
    (&["run"], "sudo bulkhead run -- claude\n  sudo bulkhead run --user ai-agent --new-session -- ./agent-task.sh\n  sudo bulkhead run --user alice -- psql -h 10.20.0.5 -U app orders"),
    (&["status"], "bulkhead status\n  bulkhead status --json | jq .policy"),
    (&["sessions", "list"], "bulkhead sessions list --since 1h\n  bulkhead sessions list --target orders-db --verdict denied --json"),
    (&["sessions", "show"], "bulkhead sessions show 2000001\n  bulkhead sessions show 2000001 --json"),
    (&["sessions", "replay"], "bulkhead sessions replay 2000001\n  bulkhead sessions replay 2000001 --speed 4"),
    (&["sessions", "export"], "bulkhead sessions export --since 1d > events.jsonl\n  bulkhead sessions export --session 2000001 --format asciicast -o s.cast"),
    (&["sessions", "tail"], "bulkhead sessions tail\n  bulkhead sessions tail --since 10m --verdict denied"),
    (&["ca", "export"], "bulkhead ca export > bulkhead-ca.pem\n  psql \"host=10.20.0.5 sslmode=verify-full sslrootcert=bulkhead-ca.pem\"\n  bulkhead ca export --ssh | sudo tee -a /etc/ssh/ssh_known_hosts   # SSH clients outside `bulkhead run`"),
    (&["policy", "check"], "bulkhead policy check\n  bulkhead policy check ./policies"),
    (&["policy", "test"], "bulkhead policy test --target orders-db --sql \"DELETE FROM orders WHERE id = 1\"\n  bulkhead policy test --target 10.0.0.5:443 --connect --process curl"),
    (&["policy", "init"], "sudo bulkhead policy init\n  bulkhead policy init ./my-policies"),
    (&["approvals", "list"], "bulkhead approvals list\n  bulkhead approvals list --json"),
    (&["approvals", "approve"], "bulkhead approvals approve 2000123 --reason \"ticket 42\"\n  bulkhead approvals approve 2000123 --for 30m --reason \"migration window\""),
    (&["approvals", "deny"], "bulkhead approvals deny 2000123 --reason \"not during business hours\""),
    (&["approvals", "show"], "bulkhead approvals show 2000123\n  bulkhead approvals show 2000123 --json"),
    (&["approvals", "watch"], "bulkhead approvals watch\n  bulkhead approvals watch --json"),
    (&["approvals", "grants"], "bulkhead approvals grants"),
    (&["approvals", "revoke"], "bulkhead approvals revoke 2000130"),
    (&["uninstall-programs"], "sudo bulkhead uninstall-programs"),
    (&["trust", "install"], "sudo bulkhead trust install"),
    (&["trust", "remove"], "sudo bulkhead trust remove"),
    (&["doctor"], "sudo bulkhead doctor\n  bulkhead doctor --json | jq '.[] | select(.level != \"ok\")'"),
    (&["completions"], "bulkhead completions bash > /etc/bash_completion.d/bulkhead\n  bulkhead completions zsh > \"${fpath[1]}/_bulkhead\""),
    (&["man"], "bulkhead man | man -l -\n  bulkhead man --dir /usr/share/man/man1"),
];

/// The command line definition, with the examples in each command's help.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for (path, text) in EXAMPLES {
        cmd = with_examples(cmd, path, text);
    }
    cmd
}

fn with_examples(cmd: clap::Command, path: &[&str], text: &str) -> clap::Command {
    match path {
        [] => cmd.after_help(format!("Examples:\n  {text}")),
        [first, rest @ ..] => cmd.mut_subcommand(*first, |sub| with_examples(sub, rest, text)),
    }
}

/// Parses the process's arguments (exits with a usage error, as clap does).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Every command that runs something (no subcommands of its own), as paths.
pub fn leaf_commands() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|c| c.get_name() != "help")
            .collect();
        if subs.is_empty() && !path.is_empty() {
            out.push(path.clone());
        }
        for sub in subs {
            path.push(sub.get_name().to_string());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(&command(), &mut Vec::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_examples_and_every_example_names_a_command() {
        let leaves = leaf_commands();
        assert!(leaves.len() >= 15, "{leaves:?}");
        for leaf in &leaves {
            assert!(
                EXAMPLES
                    .iter()
                    .any(|(p, _)| p.iter().copied().eq(leaf.iter().map(String::as_str))),
                "bulkhead {} has no examples",
                leaf.join(" ")
            );
        }
        for (path, text) in EXAMPLES {
            assert!(
                leaves
                    .iter()
                    .any(|l| l.iter().map(String::as_str).eq(path.iter().copied())),
                "examples for a command that does not exist: {path:?}"
            );
            let first = text.lines().next().unwrap_or_default();
            assert!(
                first.contains(&format!("bulkhead {}", path.join(" "))),
                "{path:?}: {first}"
            );
        }
        command().debug_assert();
    }

    #[test]
    fn every_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "bulkhead", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    /// Words of a shell line, with "..." quoting, up to a pipe or redirection.
    fn words(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                ' ' if !quoted => {
                    if !word.is_empty() {
                        out.push(std::mem::take(&mut word));
                    }
                }
                '|' | '>' if !quoted => break,
                c => word.push(c),
            }
        }
        if !word.is_empty() {
            out.push(word);
        }
        out
    }

    #[test]
    fn every_example_parses() {
        for (_, text) in EXAMPLES {
            for line in text.lines().map(str::trim) {
                let argv = words(line.trim_start_matches("sudo "));
                if argv.first().map(String::as_str) != Some("bulkhead") {
                    continue; // another tool's line (psql with the exported CA)
                }
                if let Err(e) = command().try_get_matches_from(&argv) {
                    panic!("{line}: {e}");
                }
            }
        }
    }
}
