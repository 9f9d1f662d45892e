use std::process::ExitCode;

use bulkhead::{
    cli::{self, Cli, Command},
    config::Config,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::parse();
    if !matches!(args.command, Command::Daemon { .. }) {
        // A reader that stops early (`bulkhead sessions list | head`) ends a CLI command
        // quietly, as it ends other Unix tools, instead of a panic on a failed print. The daemon
        // keeps Rust's default (ignored): a peer that goes away is an error on that socket.
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(code) = answer_status(&e) {
                return ExitCode::from(code);
            }
            eprintln!("bulkhead: {}", chain(&e));
            match e.downcast_ref::<cli::CliError>() {
                Some(cli::CliError::Exit(code, _)) => ExitCode::from(*code),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The error and its causes, each once: a message that already includes its cause's text
/// (`cannot read X: No such file or directory (os error 2)`, or `cannot listen on X: Address
/// already in use (os error 98) (another program ...)`) does not repeat it.
fn chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Errors that are an answer, not a failure (`status` when the daemon is down, `policy test`
/// on a deny): their exit status; what there was to say is printed already.
fn answer_status(e: &anyhow::Error) -> Option<u8> {
    use bulkhead::policy::cli::PolicyCliError;
    match (
        e.downcast_ref::<cli::CliError>(),
        e.downcast_ref::<PolicyCliError>(),
    ) {
        (Some(cli::CliError::Status(code)), _) | (_, Some(PolicyCliError::Verdict(code))) => {
            Some(*code)
        }
        _ => None,
    }
}

fn run(args: Cli) -> anyhow::Result<()> {
    // Generated from the command line alone: no configuration needed (a package build has none).
    match &args.command {
        Command::Completions { shell } => {
            cli::generate::completions(*shell, &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => {
            return Ok(cli::generate::man(dir.as_deref(), &mut std::io::stdout())?)
        }
        _ => {}
    }
    let mut config = Config::load(args.config.as_deref())?;
    match args.command {
        Command::Daemon { fail_open } => {
            config.daemon.fail_open |= fail_open;
            init_tracing(&config.daemon.log);
            // One worker: a current-thread runtime, with no work-stealing queues, no
            // cross-thread wake-ups and no atomics on every task's schedule.
            let runtime = if config.daemon.workers == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(config.daemon.workers)
                    .enable_all()
                    .build()?
            };
            runtime.block_on(bulkhead::daemon::run(config))?;
        }
        Command::Run {
            user,
            allow_root,
            keep_tty,
            new_session,
            command,
        } => {
            let options = cli::RunOptions {
                user: user.as_deref(),
                allow_root,
                keep_tty,
                new_session,
            };
            match cli::run(&config, &options, &command)? {}
        }
        Command::Status(f) => cli::status(&config, f.json)?,
        Command::Sessions(command) => cli::sessions::run(&config, command)?,
        Command::Ca(command) => cli::ca(&config, &command)?,
        Command::Policy(cmd) => bulkhead::policy::cli::run(&config, cmd)?,
        Command::Approvals(command) => cli::approvals::run(&config, command)?,
        Command::UninstallPrograms => cli::uninstall_programs(&config)?,
        Command::Doctor(f) => cli::doctor::run(&config, f.json)?,
        Command::Trust(command) => cli::trust::run(&config, &command)?,
        // Answered before the configuration was loaded.
        Command::Completions { .. } | Command::Man { .. } => {}
    }
    Ok(())
}

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Under systemd (stdout is the journal, which sets JOURNAL_STREAM), structured journal
    // entries: fields stay fields (`journalctl -u bulkhead SESSION=2000001`), levels are
    // priorities. Elsewhere plain text on stdout.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("bulkhead".into()))
                .init();
            return;
        }
    }
    // Colours for a person at a terminal only; a journal or a log file gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colour)
        .init();
}
