//! The `bulkhead` command line as an admin uses it, without a daemon: pipes, policy commands.

use std::{
    io::Read as _,
    process::{Command, Stdio},
};

use bulkhead_tests::bulkhead_bin;

/// A config file whose policy directory is `policies` (state and run dirs in `dir`).
fn config_in(dir: &std::path::Path, policies: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("bulkhead.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nrun_dir = \"{}\"\npolicy_dir = \"{}\"\n",
            dir.join("state").display(),
            dir.join("run").display(),
            policies.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_reader_that_stops_early_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let config = config_in(dir.path(), &policies);
    // The reader is gone before the command prints its first line (its startup alone takes
    // longer than closing our end of the pipe).
    let mut child = Command::new(bulkhead_bin())
        .arg("--config")
        .arg(&config)
        .args(["policy", "init"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {stderr}"
    );
}

#[test]
fn policy_commands_use_the_policy_directory_of_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let config = config_in(dir.path(), &policies);
    let bulkhead = |args: &[&str]| {
        Command::new(bulkhead_bin())
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let init = bulkhead(&["policy", "init"]);
    assert!(init.status.success(), "{init:?}");
    assert!(policies.join("opaque-tcp.toml").is_file());
    let check = bulkhead(&["policy", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains(&policies.display().to_string()),
        "{check:?}"
    );
    // `policy test` reads the same directory: the jump host of opaque-tcp.toml is held.
    let test = bulkhead(&[
        "policy",
        "test",
        "--target",
        "jump-host",
        "--protocol",
        "tcp",
        "--connect",
    ]);
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(text.contains("verdict:   approve"), "{test:?}");
    // A second init keeps what is there.
    std::fs::write(policies.join("opaque-tcp.toml"), "# edited by the admin\n").unwrap();
    let again = bulkhead(&["policy", "init"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    assert_eq!(
        std::fs::read_to_string(policies.join("opaque-tcp.toml")).unwrap(),
        "# edited by the admin\n"
    );
}
