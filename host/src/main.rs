//! The `cistern` command: flags in the spirit of HTTP Replicator, a config
//! file in KDL, and `cistern check FILE` to validate one (like `nginx -t`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cistern::app::{self, StartOptions};
use cistern::config::{CacheMode, Config, Layout, Listener};
use cistern::policy::PolicyEngine;
use cistern::reload::{ConfigAdjust, Triggers};
use clap::{Parser, Subcommand};

/// A caching proxy that keeps a browsable replica of what passes through it.
#[derive(Parser, Debug)]
#[command(name = "cistern", version, about)]
struct Cli {
    /// Config file (default: ./config.kdl if it exists, else a plain forward
    /// proxy on localhost:8080 with the replica in the current directory).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(short = 'b', long, value_name = "ADDRESS")]
    bind: Option<IpAddr>,
    /// Port to listen on.
    #[arg(short = 'p', long, value_name = "PORT")]
    port: Option<u16>,
    /// Replica root directory.
    #[arg(short = 'r', long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Log request and response headers with each request.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Inactivity timeout in seconds for clients and upstreams.
    #[arg(short = 't', long, value_name = "SEC")]
    timeout: Option<u64>,
    /// Keep every file directly in the root directory.
    #[arg(long)]
    flat: bool,
    /// Never revalidate: serve whatever the replica holds.
    #[arg(long = "static")]
    static_mode: bool,
    /// Never connect upstream; 504 for what is not in the replica.
    #[arg(long)]
    offline: bool,
    /// Cap upstream download bandwidth, in KiB/s.
    #[arg(long, value_name = "RATE")]
    limit: Option<u64>,
    /// Detach from the terminal and log to this file.
    #[arg(long, value_name = "LOG")]
    daemon: Option<PathBuf>,
    /// Write the process id to this file.
    #[arg(long, value_name = "FILE")]
    pid: Option<PathBuf>,
    /// Log engine events (fills, resumes, store decisions).
    #[arg(long)]
    debug: bool,
    /// Plain mode (no config file) without its package policies
    /// (`distro`, `store-id`): cache by HTTP's rules alone.
    #[arg(long)]
    no_package_policies: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and exit non-zero with its errors.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Read every replica and check it against the SHA-256 recorded when it
    /// was stored (the store of `--config`, or of `--root`); prints each
    /// mismatch and exits non-zero if there is any. Changes nothing.
    Verify,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Check { file }) = &cli.command {
        return check(file);
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(report) => {
            eprintln!("{report:?}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Verify) = &cli.command {
        return verify(&config);
    }
    if let Some(log) = &cli.daemon {
        if let Err(e) = daemonize(log, cli.pid.as_deref()) {
            eprintln!("cistern: cannot detach: {e:#}");
            return ExitCode::FAILURE;
        }
    } else if let Some(pid) = &cli.pid
        && let Err(e) = std::fs::write(pid, format!("{}\n", std::process::id()))
    {
        eprintln!("cistern: cannot write pid file {}: {e}", pid.display());
        return ExitCode::FAILURE;
    }
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cistern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config, &cli));
    // The log is written by its own thread: what was logged, a reason not
    // to start among it, goes out before the process does.
    cistern::observe::accesslog::flush();
    if let Some(pid) = &cli.pid {
        let _ = std::fs::remove_file(pid);
    }
    code
}

fn check(file: &Path) -> ExitCode {
    // Like `nginx -t`: the certificates are loaded and the policies compiled
    // and linked too, so a check that passes means the file would go live.
    let loaded = Config::load(file)
        .map_err(miette::Report::new)
        .and_then(|c| {
            cistern::tls::CertTable::load(&c, std::time::SystemTime::now())
                .map_err(|e| miette::miette!("{}: {e}", file.display()))?;
            let engine = PolicyEngine::new().map_err(|e| miette::miette!("{e}"))?;
            engine
                .load(&c.policies)
                .map_err(|e| miette::miette!("{}: {e}", file.display()))?;
            Ok(c)
        });
    match loaded {
        Ok(c) => {
            println!(
                "{}: ok ({} listener(s), {} mirror(s), {} site(s), {} policy declaration(s))",
                file.display(),
                c.listeners.len(),
                c.mirrors.len(),
                c.sites.len(),
                c.policies.len()
            );
            ExitCode::SUCCESS
        }
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}

/// The config file (or the built-in default) with the command line's
/// overrides applied.
/// `cistern verify`: one line per replica that does not match, then a
/// summary; exit 1 when anything did not match, 2 when the store cannot be
/// read at all.
fn verify(config: &Config) -> ExitCode {
    let store = &config.store;
    match cistern::store::verify::verify(store) {
        Ok(report) => {
            for f in &report.findings {
                match &f.key {
                    Some(key) => println!("{}: {} ({key})", f.path.display(), f.problem),
                    None => println!("{}: {}", f.path.display(), f.problem),
                }
            }
            println!(
                "{}: {} replica(s) ({} bytes) match, {} problem(s)",
                store.root.display(),
                report.good,
                report.bytes,
                report.findings.len()
            );
            if report.findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cistern verify: {e}");
            ExitCode::from(2)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, miette::Report> {
    let cwd = std::env::current_dir()
        .map_err(|e| miette::miette!("cannot read the current directory: {e}"))?;
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(miette::Report::new)?,
        None if cwd.join("config.kdl").is_file() => {
            Config::load(&cwd.join("config.kdl")).map_err(miette::Report::new)?
        }
        None => Config::plain(&cwd, !cli.no_package_policies),
    };
    Overrides::from_cli(cli, &cwd).apply(&mut config);
    Ok(config)
}

/// The command-line flags that override the config file; applied again to
/// every reloaded config so a reload never undoes them.
#[derive(Debug, Clone)]
struct Overrides {
    bind: Option<IpAddr>,
    port: Option<u16>,
    root: Option<PathBuf>,
    timeout: Option<u64>,
    flat: bool,
    static_mode: bool,
    offline: bool,
    limit: Option<u64>,
}

impl Overrides {
    fn from_cli(cli: &Cli, cwd: &Path) -> Overrides {
        Overrides {
            bind: cli.bind,
            port: cli.port,
            root: cli.root.as_ref().map(|root| {
                if root.is_absolute() {
                    root.clone()
                } else {
                    cwd.join(root)
                }
            }),
            timeout: cli.timeout,
            flat: cli.flat,
            static_mode: cli.static_mode,
            offline: cli.offline,
            limit: cli.limit,
        }
    }

    fn apply(&self, config: &mut Config) {
        if self.bind.is_some() || self.port.is_some() {
            let first = config.listeners.first().map(|l| l.addr);
            let ip = self
                .bind
                .or(first.map(|a| a.ip()))
                .unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let port = self.port.or(first.map(|a| a.port())).unwrap_or(8080);
            config.listeners = vec![Listener {
                addr: SocketAddr::new(ip, port),
            }];
        }
        if let Some(root) = &self.root {
            let mut state = root.clone().into_os_string();
            state.push(".cistern");
            config.store.state = PathBuf::from(state);
            config.store.root = root.clone();
        }
        if let Some(secs) = self.timeout {
            config.timeouts.idle = Duration::from_secs(secs.max(1));
        }
        if self.flat {
            config.store.layout = Layout::Flat;
        }
        if self.static_mode {
            config.mode = CacheMode::Static;
        }
        if self.offline {
            config.mode = CacheMode::Offline;
        }
        if let Some(kib) = self.limit {
            config.limits.download_bytes_per_sec = Some(kib.max(1) * 1024);
        }
    }
}

fn daemonize(log: &Path, pid: Option<&Path>) -> anyhow::Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file handle")?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut d = daemonize::Daemonize::new()
        .working_directory(cwd)
        .stdout(out)
        .stderr(err);
    if let Some(pid) = pid {
        d = d.pid_file(pid);
    }
    d.start().context("forking")?;
    Ok(())
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = if cli.debug {
        "info,cistern=debug"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_env("CISTERN_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through one bounded buffer and a writer thread: a full pipe on
        // stderr must not block the thread that logs.
        .with_writer(cistern::observe::accesslog::LogLines)
        .with_ansi(cli.daemon.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(config: Config, cli: &Cli) -> ExitCode {
    let overrides = std::env::current_dir().map(|cwd| Overrides::from_cli(cli, &cwd));
    let options = StartOptions {
        log_headers: cli.verbose,
        clock: None,
        // The config file and what it names are watched, and SIGHUP
        // reloads too, like nginx.
        reload: Triggers {
            files: true,
            sighup: true,
        },
        adjust: overrides
            .ok()
            .map(|o| ConfigAdjust(Arc::new(move |c: &mut Config| o.apply(c)))),
    };
    descriptor_limit(&config);
    let source = config.source.as_ref().map_or_else(
        || "built-in forward proxy defaults".to_owned(),
        |p| p.display().to_string(),
    );
    let running = match app::start(config, options).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("cistern ready (config: {source})");
    // Out before anything else happens: whoever watches the log for
    // these two lines reads them when they are true.
    cistern::observe::accesslog::flush();
    wait_for_signal().await;
    tracing::info!("shutting down");
    cistern::observe::accesslog::flush();
    running.shutdown().await;
    ExitCode::SUCCESS
}

/// Raises the open-file limit to the hard limit and says what it is, with
/// a warning when it is below what `max-connections` lets in.
fn descriptor_limit(config: &Config) {
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    let now = match cistern::gate::raise_descriptor_limit() {
        Ok(l) => {
            tracing::info!(target: "cistern::gate", "open-file limit {} (was {})", show(l.now), show(l.before));
            l.now
        }
        Err(e) => {
            tracing::warn!(target: "cistern::gate", "{e}");
            e.before
        }
    };
    let max = config.limits.max_connections;
    if let Some(n) = now
        && n < u64::from(max)
    {
        tracing::warn!(
            target: "cistern::gate",
            "the open-file limit ({n}) is below limit {{ max-connections {max} }}: accepts will fail with \"too many open files\" before the cap is reached"
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
