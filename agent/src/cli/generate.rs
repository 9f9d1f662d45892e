//! `bulkhead completions SHELL` and `bulkhead man`: shell completions and manual pages, both
//! generated from the command line definition itself (with its examples), so they cannot
//! drift from what the binary accepts. The Debian package installs their output.

use std::{
    io::{self, Write},
    path::Path,
};

use clap_complete::Shell;

use super::CliError;

/// Writes the completion script for `shell`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut cmd = super::command();
    clap_complete::generate(shell, &mut cmd, "bulkhead", out);
}

/// With `dir`, writes `bulkhead.1` and one page per subcommand (`bulkhead-sessions-list.1`)
/// there; without, prints `bulkhead.1`.
pub fn man(dir: Option<&Path>, out: &mut dyn Write) -> Result<(), CliError> {
    let cmd = super::command();
    let Some(dir) = dir else {
        return render(&cmd, out).map_err(|e| CliError::Other(format!("writing the page: {e}")));
    };
    let written = (|| -> io::Result<usize> {
        std::fs::create_dir_all(dir)?;
        let mut pages = 0;
        let mut stack = vec![(cmd, "bulkhead".to_string())];
        while let Some((cmd, name)) = stack.pop() {
            for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
                stack.push((sub.clone(), format!("{name}-{}", sub.get_name())));
            }
            let page = cmd.name(name.clone());
            let mut file = std::fs::File::create(dir.join(format!("{name}.1")))?;
            render(&page, &mut file)?;
            pages += 1;
        }
        Ok(pages)
    })()
    .map_err(|e| CliError::Other(format!("{}: {e}", dir.display())))?;
    writeln!(out, "{written} pages written to {}", dir.display())
        .map_err(|e| CliError::Other(e.to_string()))
}

fn render(cmd: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_every_subcommand() {
        let mut bash = Vec::new();
        completions(Shell::Bash, &mut bash);
        let bash = String::from_utf8(bash).unwrap();
        for word in ["sessions", "approvals", "uninstall-programs", "--verdict"] {
            assert!(
                bash.contains(word),
                "{word} missing from the bash completions"
            );
        }
        let mut zsh = Vec::new();
        completions(Shell::Zsh, &mut zsh);
        assert!(String::from_utf8(zsh)
            .unwrap()
            .contains("#compdef bulkhead"));
    }

    #[test]
    fn man_pages_carry_the_examples_one_page_per_command() {
        let mut page = Vec::new();
        man(None, &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(".TH bulkhead 1"), "{page}");
        let dir = tempfile::tempdir().unwrap();
        man(Some(dir.path()), &mut Vec::new()).unwrap();
        let list = std::fs::read_to_string(dir.path().join("bulkhead-sessions-list.1")).unwrap();
        assert!(list.contains("sessions list \\-\\-since 1h"), "{list}");
        // One page for each leaf and each group, plus the top.
        let pages = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(pages > super::super::leaf_commands().len(), "{pages}");
    }
}
