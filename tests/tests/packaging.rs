//! The systemd unit shipped in `packaging/` is valid, checked with `systemd-analyze verify`
//! (PID 1 is not systemd on the build machines, so the unit can be verified, not started).

use std::process::Command;

#[test]
fn the_systemd_unit_verifies() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing (Debian package systemd; scripts/setup.sh installs it)"
    );
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/bulkhead.service"
    ))
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/bulkhead daemon"),
        "{unit}"
    );
    // Point ExecStart at the binary under test, so verify also checks that it exists.
    let unit = unit.replace(
        "/usr/local/bin/bulkhead",
        &bulkhead_tests::bulkhead_bin().display().to_string(),
    );
    let dir = std::env::temp_dir().join(format!("bulkhead-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bulkhead.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
