//! The `nudge` command line: wires the modules, nothing more.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nudge::audit::{Format, LogWriter};
use nudge::config::Config;
use nudge::humanize;
use nudge::rules::{self, Limits};

#[derive(Parser)]
#[command(
    name = "nudge",
    version = nudge::VERSION,
    about = "Next-best-action proactive messaging daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile every journey script; print file:line:column for each error.
    /// With --config, also check the config as the daemon does at start-up
    /// (keys and values, secrets readable, channels and their CA files,
    /// Kafka settings, the rules of `rules.dir` against the channels),
    /// without contacting the broker or the database.
    Check {
        /// Directory of *.rhai journeys [default: rules, or `rules.dir`
        /// with --config].
        dir: Option<PathBuf>,
        /// The daemon's config file to check.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run CloudEvents JSON lines through the journeys on a virtual clock and
    /// print the dispatch log.
    Simulate {
        /// Directory of *.rhai journeys; repeat it to load several
        /// directories as one rule set.
        #[arg(long, default_value = "rules")]
        rules: Vec<PathBuf>,
        /// CloudEvents, one JSON object per line.
        #[arg(long)]
        events: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Take the contact policy, each channel's lateness, rate and
        /// withdraw, and rules.max_operations from this config file
        /// (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the daemon: consume Kafka, decide, schedule and send.
    Run {
        /// TOML config file; `NUDGE_SECTION__KEY` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Bring the store's schema up to this binary's version and print it
    /// (the daemon does the same at start; this runs it alone, e.g. before a rollout).
    /// With --from, move a stopped node's SQLite store into the PostgreSQL store
    /// the config names, for running replicas.
    Migrate {
        /// TOML config file naming the store; `NUDGE_SECTION__KEY` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A SQLite store (a path, or sqlite:///path) to copy whole into the
        /// config's PostgreSQL store, which must be empty. The daemon on it
        /// must be stopped; the file is then marked as moved and `nudge run`
        /// refuses it.
        #[arg(long, value_name = "SQLITE")]
        from: Option<String>,
        /// With --from: move a file already moved to another store again
        /// (that store lost, and nothing running on it).
        #[arg(long, requires = "from")]
        force: bool,
    },
    /// Run the journey tests (`*.test.toml` next to the journeys) on a virtual clock.
    Test {
        /// A rules directory (every `*.test.toml` under it), or one test file.
        #[arg(default_value = "rules")]
        path: PathBuf,
        /// The journeys to run the tests against; default: PATH, or the
        /// test file's directory.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Take the contact policy (caps, arbitration, quiet hours) and
        /// rules.max_operations from this config file (defaults otherwise),
        /// to test how journeys compete under it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the same events through two rule sets and report what would change.
    Replay {
        /// The candidate rule set.
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// The rule set to compare against (e.g. what runs in production).
        #[arg(long)]
        baseline: PathBuf,
        #[arg(long)]
        events: PathBuf,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
        /// Exit 1 when any customer would get a different message.
        #[arg(long)]
        fail_on_change: bool,
        /// Take the contact policy, each channel's lateness, rate and
        /// withdraw, and rules.max_operations from this config file
        /// (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// GET an admin endpoint; exit 0 on 2xx (for container probes without curl).
    Probe {
        #[arg(long, default_value = "127.0.0.1:9464")]
        address: String,
        #[arg(default_value = "/readyz")]
        path: String,
    },
    /// Print the reference of what journey scripts can use (for rules/README.md).
    RulesDoc,
    /// The dispatch log from the daemon's store, newest first: what was
    /// sent, held back or refused, and why.
    Log {
        /// The daemon's config file (its `[store]` is read, never written).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        journey: Option<String>,
        #[arg(long)]
        step: Option<String>,
        /// push, email or call_task.
        #[arg(long)]
        channel: Option<String>,
        /// sent, failed, retrying, suppressed, deferred, cancelled, expired,
        /// held_out, shadow, converted or withdrawn.
        #[arg(long)]
        outcome: Option<String>,
        /// Records at or after: RFC 3339, a date (UTC) or a duration ago (7d, 12h).
        #[arg(long)]
        since: Option<String>,
        /// Records before: RFC 3339, a date (UTC) or a duration ago.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        customer: Option<String>,
        #[arg(long, value_enum, default_value_t = nudge::review::log::LogFormat::Table)]
        format: nudge::review::log::LogFormat,
        /// At most this many records (0: all, streamed).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One customer's decision record in time order: events, rule decisions
    /// and what they saw, policy verdicts, send attempts.
    Explain {
        customer: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = TextFormat::Text)]
        format: TextFormat,
        /// Show contact addresses unmasked: needs the admin token
        /// (`admin.auth.admin_token_env`/`_file`), presented with
        /// `--token-file` or in NUDGE_ADMIN_TOKEN.
        #[arg(long)]
        unmask: bool,
        /// File holding the admin token presented for `--unmask` (else NUDGE_ADMIN_TOKEN).
        #[arg(long, requires = "unmask")]
        token_file: Option<PathBuf>,
    },
    /// Per journey: started, each step sent, converted, why the rest was not
    /// sent, and the uplift against the control group (per script version too).
    Funnel {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        journey: Option<String>,
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
    },
    /// What nudge learned from outcomes: per journey, step and channel, the
    /// sends, the conversions within policy.attribution_window, the raw and
    /// the smoothed rate scripts read as customer.propensity(...).
    Stats {
        /// The daemon's config file (its `[store]` is read, never written;
        /// `policy.propensity.prior` and `policy.attribution_window` too).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        journey: Option<String>,
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
    },
    /// Runtime control: show or change a journey or a channel through the
    /// daemon's admin API (admin token), and read the control log.
    Control {
        #[command(subcommand)]
        command: ControlCommand,
    },
}

#[derive(Subcommand)]
enum ControlCommand {
    /// Show a journey's settings in force, or change them (flags combine).
    Journey {
        name: String,
        /// Suppress its steps due from now on (kill switch).
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Send its steps again (lifts a --disable).
        #[arg(long)]
        enable: bool,
        /// Log its steps as `shadow` instead of sending them.
        #[arg(long, conflicts_with = "live")]
        shadow: bool,
        /// Send again (new instances start live).
        #[arg(long)]
        live: bool,
        /// Run for this percentage of customers (stable hash), new decisions.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        pilot_percent: Option<u8>,
        /// Keep this percentage of customers as a control group, new decisions.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        holdout_percent: Option<u8>,
        /// Clear every override of the journey: its script's settings, and
        /// the config's `policy.disabled_journeys`, apply again.
        #[arg(long, conflicts_with_all = ["disable", "enable", "shadow", "live", "pilot_percent", "holdout_percent"])]
        clear: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a channel, or stop it (its steps wait in the store) or resume it.
    Channel {
        /// push, email or call_task.
        kind: String,
        /// Hold its steps in the store (kill switch).
        #[arg(long, conflicts_with = "resume")]
        stop: bool,
        /// Send its held and later steps.
        #[arg(long)]
        resume: bool,
        /// Clear the override: the config's `policy.disabled_channels`
        /// applies again.
        #[arg(long, conflicts_with_all = ["stop", "resume"])]
        clear: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The control log from the daemon's store, oldest first: every change,
    /// when, by which token, before and after.
    Log {
        /// The daemon's config file (its `[store]` is read, never written).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
        /// Changes at or after: RFC 3339, a date (UTC) or a duration ago (7d, 12h).
        #[arg(long)]
        since: Option<String>,
        /// Changes before: RFC 3339, a date (UTC) or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// At most the newest this many (0: all), as `nudge log`.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Where the admin API is and which token to send.
#[derive(clap::Args)]
struct ApiArgs {
    /// The daemon's config file: `admin.listen` and `admin.auth` are read.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin server's URL (default: http:// and `admin.listen`).
    #[arg(long)]
    url: Option<String>,
    /// Read the admin token from this environment variable.
    #[arg(long, conflicts_with = "token_file")]
    token_env: Option<String>,
    /// Read the admin token from this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TextFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TableFormat {
    Table,
    Json,
}

/// `print!` that returns the error instead of panicking: a reader that
/// goes away (`| head`) ends the command quietly (see `main`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).context("writing stdout")?
    }};
}

/// `println!` that returns the error instead of panicking (see [`out!`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing stdout")?
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // The reader of the output went away (`| head`): nothing to say.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nudge: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, each cause left out when the text before it
/// already says it (library errors often print their source themselves).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(part.trim()) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            dir,
            config: Some(path),
        } => {
            let mut config = Config::load(Some(&path))?;
            if let Some(dir) = dir {
                config.rules.dir = dir;
            }
            let set = nudge::daemon::preflight(&config)
                .with_context(|| format!("{} is not ready to run", path.display()))?;
            let holidays = match &config.policy.holidays {
                Some(file) => nudge::config::holidays::Holidays::load(file)?,
                None => nudge::config::holidays::Holidays::shipped(),
            };
            if let Some(note) = holidays.ending_note(chrono::Utc::now().date_naive()) {
                outln!("note: {note}");
            }
            outln!(
                "ok: config {}: {} in {} (rule set {}), channels {}, Kafka settings accepted (broker and store not contacted)",
                path.display(),
                humanize::count(set.journeys().len() as u64, "journey", "journeys"),
                config.rules.dir.display(),
                set.version,
                config
                    .channels
                    .keys()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { dir, config: None } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("rules"));
            match rules::load_dir(&dir, &Limits::default()) {
                Ok(set) => {
                    outln!(
                        "ok: {} in {} (rule set {})",
                        humanize::count(set.journeys().len() as u64, "journey", "journeys"),
                        dir.display(),
                        set.version
                    );
                    for j in set.journeys() {
                        outln!(
                            "  {} ({}, {}, triggers: {}) {}",
                            j.name,
                            j.category,
                            humanize::count(j.steps.len() as u64, "step", "steps"),
                            j.triggers.join(", "),
                            j.hash,
                        );
                        if !j.description.is_empty() {
                            outln!("    {}", j.description);
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!(
                        "{}; nothing loaded",
                        nudge::humanize::count(e.problems.len() as u64, "problem", "problems")
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Simulate {
            rules: dir,
            events,
            format,
            config,
        } => {
            init_logging("warn");
            let config = Config::load(config.as_deref())?;
            let limits = Limits::from_config(&config.rules);
            let set = rules::load_dirs(&dir, &limits).map_err(|e| {
                let shown: Vec<String> = dir.iter().map(|d| d.display().to_string()).collect();
                anyhow::anyhow!("rules in {} do not compile:\n{e}", shown.join(", "))
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stdout = std::io::stdout();
            let mut writer = LogWriter::new(stdout.lock(), format);
            let settings = nudge::sim::ChannelSettings::of(&config);
            let summary = runtime.block_on(nudge::sim::simulate(
                set,
                config.policy,
                settings,
                &events,
                |r| writer.write(r),
                |w| eprintln!("{w}"),
            ))?;
            writer.flush().context("writing stdout")?;
            eprintln!(
                "simulated {}: {}, {}, {}",
                humanize::count(summary.events as u64, "event", "events"),
                humanize::count(summary.records as u64, "log record", "log records"),
                humanize::count(
                    summary.skipped_lines as u64,
                    "skipped line",
                    "skipped lines"
                ),
                humanize::count(
                    summary.rule_failures as u64,
                    "rule failure",
                    "rule failures"
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let config = Config::load(config.as_deref())?;
            nudge::daemon::init_logging(&config.log.format, &config.log.level);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(nudge::daemon::run(config));
            // Blocking work still under way after the drain (a batch whose
            // transaction has not committed: it is read again after a
            // restart) must not hold the exit past `kafka.drain_timeout`.
            runtime.shutdown_timeout(std::time::Duration::from_millis(200));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            config,
            from: Some(from),
            force,
        } => {
            let config = Config::load(config.as_deref())?;
            move_store(&from, &config, force)
        }
        Command::Migrate {
            config, from: None, ..
        } => {
            let config = Config::load(config.as_deref())?;
            let store = config.store.describe();
            let key = match config.store.url {
                Some(_) => "store.url",
                None => "store.path",
            };
            let (before, after) = nudge::store::migrate(&config.store)
                .with_context(|| format!("{key}: migrating {store}"))?;
            outln!(
                "{store}: schema version {after}{}",
                if before == after {
                    " (up to date)".to_string()
                } else {
                    format!(" (was {before})")
                }
            );
            note_if_moved(&config);
            Ok(ExitCode::SUCCESS)
        }
        Command::Test {
            path,
            rules: dir,
            config,
        } => {
            init_logging("error");
            let (limits, under) = match config {
                Some(file) => {
                    let config = Config::load(Some(&file))?;
                    let under = nudge::toolkit::ruletest::Under {
                        channels: nudge::sim::ChannelSettings::of(&config),
                        policy: config.policy,
                    };
                    (Limits::from_config(&config.rules), under)
                }
                None => (Limits::default(), Default::default()),
            };
            let (dir, files) = if path.is_file() {
                if !path.to_string_lossy().ends_with(".test.toml") {
                    anyhow::bail!(
                        "{} is not a test file: give a NAME.test.toml, or a directory",
                        path.display()
                    );
                }
                let parent = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                (
                    dir.unwrap_or_else(|| parent.to_path_buf()),
                    vec![path.clone()],
                )
            } else {
                let files = rules::files_under(&path, ".test.toml")
                    .with_context(|| format!("cannot read {}", path.display()))?;
                (dir.unwrap_or_else(|| path.clone()), files)
            };
            // Fail early, with positions, if the journeys themselves do not
            // compile; compiled once, each case runs on a fresh copy.
            let set = match rules::load_dir(&dir, &limits) {
                Ok(set) => set,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(nudge::toolkit::ruletest::run_files(
                &files,
                || Ok(set.fresh_copy(&limits)),
                &under,
            ))?;
            for f in &report.failures {
                outln!("FAIL {f}");
            }
            outln!(
                "nudge test: {} passed, {} failed",
                humanize::count(report.passed as u64, "case", "cases"),
                report.failed
            );
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replay {
            rules: dir,
            baseline,
            events,
            format,
            fail_on_change,
            config,
        } => {
            init_logging("error");
            let config = Config::load(config.as_deref())?;
            let limits = Limits::from_config(&config.rules);
            let load = |d: &PathBuf| {
                rules::load_dir(d, &limits)
                    .map_err(|e| anyhow::anyhow!("rules in {} do not compile:\n{e}", d.display()))
            };
            let (candidate, base) = (load(&dir)?, load(&baseline)?);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(nudge::toolkit::replay::replay(
                &events,
                base,
                candidate,
                &config.policy,
                &nudge::sim::ChannelSettings::of(&config),
            ))?;
            match format.as_str() {
                "json" => outln!("{}", serde_json::to_string_pretty(&report)?),
                "text" => out!("{}", report.to_text()),
                other => anyhow::bail!("--format: `{other}` is not text or json"),
            }
            Ok(if fail_on_change && report.changed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Probe { address, path } => {
            // `healthz` as well as `/healthz`.
            let path = match path.starts_with('/') {
                true => path,
                false => format!("/{path}"),
            };
            let (status, body) = probe(&address, &path)
                .with_context(|| format!("probing http://{address}{path}"))?;
            outln!("{status}");
            // Why not ready, on stderr: stdout stays the status for scripts.
            if !(200..300).contains(&status) && !body.is_empty() {
                eprintln!("{}", body.chars().take(4000).collect::<String>());
            }
            Ok(if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Log {
            config,
            journey,
            step,
            channel,
            outcome,
            since,
            until,
            customer,
            format,
            limit,
        } => {
            let now = chrono::Utc::now();
            let time = |flag: &str, v: Option<String>| {
                v.map(|t| nudge::review::parse_time(&t, now))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            };
            if let Some(c) = &channel {
                c.parse::<nudge::model::ChannelKind>()
                    .map_err(|e| anyhow::anyhow!("--channel: {e}"))?;
            }
            let filter = nudge::review::LogFilter {
                journey,
                step,
                channel,
                outcome: outcome
                    .map(|o| o.parse::<nudge::model::Outcome>())
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--outcome: {e}"))?,
                customer,
                since: time("since", since)?,
                until: time("until", until)?,
            };
            let store = open_review_of(config, filter.journey.as_deref())?;
            let stdout = std::io::stdout();
            let mut writer = nudge::review::log::LogWriter::new(stdout.lock(), format);
            let limit = (limit > 0).then_some(limit);
            // One record past the limit tells whether the limit cut anything.
            let mut cut = false;
            for (i, record) in
                nudge::review::log::LogStream::new(&*store, filter, limit.map(|l| l + 1))
                    .enumerate()
            {
                let record = record?;
                if limit == Some(i) {
                    cut = true;
                    break;
                }
                writer.write(&record).context("writing stdout")?;
            }
            let written = writer.finish().context("writing stdout")?;
            if cut {
                eprintln!(
                    "nudge log: the newest {} shown; --limit N (0: all) for more",
                    humanize::count(written as u64, "record", "records")
                );
            } else if written == 0 && format == nudge::review::log::LogFormat::Table {
                eprintln!("nudge log: no record matches");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            customer,
            config,
            format,
            unmask,
            token_file,
        } => {
            if unmask {
                use nudge::review::unmask;
                let loaded = Config::load(config.as_deref())?;
                let token = unmask::presented(
                    token_file.as_deref(),
                    std::env::var(unmask::TOKEN_ENV).ok(),
                )?;
                unmask::authorize(&loaded.admin.auth, token.as_deref())?;
            }
            let store = open_review(config)?;
            let record = nudge::review::record::decision_record(&*store, &customer, unmask)?;
            match format {
                TextFormat::Text => out!("{}", nudge::review::record::to_text(&record)),
                TextFormat::Json => outln!("{}", serde_json::to_string_pretty(&record)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Funnel {
            config,
            journey,
            format,
        } => {
            let store = open_review_of(config, journey.as_deref())?;
            let report = nudge::review::funnel::funnels(&*store, journey.as_deref())?;
            match format {
                TableFormat::Table => out!("{}", nudge::review::funnel::to_text(&report)),
                TableFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats {
            config,
            journey,
            format,
        } => {
            let loaded = Config::load(config.as_deref())?;
            let store = open_review_of(config, journey.as_deref())?;
            let stats = nudge::review::stats::stats(
                &*store,
                journey.as_deref(),
                loaded.policy.propensity.prior,
                loaded.policy.attribution_window,
            )?;
            match format {
                TableFormat::Table => out!("{}", nudge::review::stats::to_text(&stats)),
                TableFormat::Json => outln!("{}", serde_json::to_string_pretty(&stats)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Control { command } => control(command),
        Command::RulesDoc => {
            let mut out = std::io::stdout().lock();
            out.write_all(rules::host_api_reference().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `nudge control`: changes through the admin API, the log from the store.
fn control(command: ControlCommand) -> anyhow::Result<ExitCode> {
    use nudge::control::client::{describe_change, log_table};
    use serde_json::{json, Map, Value};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // "journey x: shadow: false → true (by admin, control log #3)"
    let changed = |what: String, answer: &Value| -> anyhow::Result<()> {
        outln!(
            "{what}: {} (by {}, control log #{})",
            describe_change(&answer["before"], &answer["after"]),
            answer["who"].as_str().unwrap_or("?"),
            answer["seq"]
        );
        Ok(())
    };
    match command {
        ControlCommand::Journey {
            name,
            disable,
            enable,
            shadow,
            live,
            pilot_percent,
            holdout_percent,
            clear,
            api,
        } => {
            let path =
                nudge::control::client::journey_path(&name).map_err(|e| anyhow::anyhow!(e))?;
            let endpoint = control_endpoint(api)?;
            let mut patch = Map::new();
            if disable || enable {
                patch.insert("enabled".into(), json!(enable));
            }
            if shadow || live {
                patch.insert("shadow".into(), json!(shadow));
            }
            if let Some(p) = pilot_percent {
                patch.insert("pilot_percent".into(), json!(p));
            }
            if let Some(p) = holdout_percent {
                patch.insert("holdout_percent".into(), json!(p));
            }
            if clear {
                for field in nudge::control::JOURNEY_FIELDS {
                    patch.insert(field.to_string(), Value::Null);
                }
            }
            // "pilot_percent 100 (script), …": each setting and where it comes from.
            let settings = |s: &Value| {
                nudge::control::JOURNEY_FIELDS
                    .iter()
                    .map(|f| format!("{f} {} ({})", s[f], s["sources"][f].as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if patch.is_empty() {
                let s = runtime.block_on(endpoint.get(&path))?;
                outln!("journey {name}: {}", settings(&s));
            } else {
                let answer = runtime.block_on(endpoint.put(&path, &Value::Object(patch)))?;
                changed(format!("journey {name}"), &answer)?;
                if clear {
                    outln!(
                        "journey {name}: overrides cleared; now {}",
                        settings(&answer["settings"])
                    );
                }
            }
        }
        ControlCommand::Channel {
            kind,
            stop,
            resume,
            clear,
            api,
        } => {
            kind.parse::<nudge::model::ChannelKind>()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let endpoint = control_endpoint(api)?;
            if stop || resume || clear {
                let body = match clear {
                    true => json!({ "enabled": null }),
                    false => json!({ "enabled": resume }),
                };
                let answer =
                    runtime.block_on(endpoint.put(&format!("/admin/channels/{kind}"), &body))?;
                changed(format!("channel {kind}"), &answer)?;
            } else {
                let all = runtime.block_on(endpoint.get("/admin/channels"))?;
                let c = all["channels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["channel"] == json!(kind))
                    .cloned()
                    .unwrap_or_default();
                outln!(
                    "channel {kind}: {} ({})",
                    match c["enabled"].as_bool() {
                        Some(true) => "running, enabled true",
                        Some(false) => "stopped, enabled false",
                        None => "unknown",
                    },
                    c["source"].as_str().unwrap_or("?")
                );
            }
        }
        ControlCommand::Log {
            config,
            format,
            since,
            until,
            limit,
        } => {
            let now = chrono::Utc::now();
            let time = |flag: &str, v: Option<String>| {
                v.map(|t| nudge::review::parse_time(&t, now))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
            };
            let (since, until) = (time("since", since)?, time("until", until)?);
            let store = open_review(config)?;
            let limit = if limit == 0 { usize::MAX } else { limit };
            // One change past the limit tells whether the limit cut anything.
            let mut entries = store.control_changes(since, until, limit.saturating_add(1))?;
            let cut = entries.len() > limit;
            if cut {
                // Oldest first: the one past the limit is the oldest.
                entries.remove(0);
            }
            match format {
                TableFormat::Table => out!("{}", log_table(&entries)),
                TableFormat::Json => outln!("{}", serde_json::to_string_pretty(&entries)?),
            }
            if cut {
                eprintln!(
                    "nudge control log: the newest {} shown; --limit N (0: all) for more",
                    humanize::count(entries.len() as u64, "change", "changes")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The admin API's URL and the admin token, from the flags or the config.
fn control_endpoint(api: ApiArgs) -> anyhow::Result<nudge::control::client::Endpoint> {
    let config = Config::load(api.config.as_deref())?;
    let base = match api.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => nudge::control::client::base_url(&config.admin.listen),
    };
    let token = if let Some(var) = api.token_env {
        std::env::var(&var).with_context(|| format!("--token-env: environment variable {var}"))?
    } else if let Some(path) = api.token_file {
        std::fs::read_to_string(&path)
            .with_context(|| format!("--token-file: {}", path.display()))?
    } else {
        config.admin.auth.admin_token()?.ok_or_else(|| {
            anyhow::anyhow!(
                "no admin token: set admin.auth.admin_token_env or admin.auth.admin_token_file in the config, or pass --token-env or --token-file"
            )
        })?
    };
    let token = token.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "the admin token is empty");
    Ok(nudge::control::client::Endpoint { base, token })
}

/// The store of the daemon's config, opened to read beside it.
fn open_review(config: Option<PathBuf>) -> anyhow::Result<Box<dyn nudge::review::ReviewRead>> {
    open_review_of(config, None)
}

/// [`open_review`] for the records of `journey`: a name that neither the
/// store nor the config's rules know is an error naming the known ones,
/// not an empty answer (a mistyped `--journey` looks like "nothing yet").
fn open_review_of(
    config: Option<PathBuf>,
    journey: Option<&str>,
) -> anyhow::Result<Box<dyn nudge::review::ReviewRead>> {
    let config = Config::load(config.as_deref())?;
    let store = open_reader(&config)?;
    if let Some(journey) = journey {
        let mut known: std::collections::BTreeSet<String> = store
            .arms(None, false)?
            .into_iter()
            .map(|a| a.journey)
            .collect();
        // Rules that do not load here leave the store's names to go by.
        if let Ok(set) = rules::load_dir(&config.rules.dir, &Limits::default()) {
            known.extend(set.journeys().iter().map(|j| j.name.clone()));
        }
        if !known.contains(journey) {
            anyhow::bail!(
                "--journey {journey}: no such journey in the store or in {} (known: {})",
                config.rules.dir.display(),
                known.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(store)
}

/// `nudge migrate --from`: a node's SQLite store into PostgreSQL.
fn move_store(from: &str, config: &Config, force: bool) -> anyhow::Result<ExitCode> {
    let source = if from.starts_with("sqlite:") {
        let named = nudge::config::StoreConfig {
            url: Some(from.to_owned()),
            ..Default::default()
        };
        match named.target() {
            Ok(nudge::config::StoreUrl::Sqlite(path)) => path,
            Ok(_) => unreachable!("a sqlite: URL names a file"),
            Err(e) => anyhow::bail!("--from {from}: {e}"),
        }
    } else if from.starts_with("postgres") {
        anyhow::bail!(
            "--from {from}: only a SQLite store can be moved (a path, or sqlite:///path)"
        );
    } else {
        PathBuf::from(from)
    };
    let target = config.store.describe();
    let moved = nudge::store::move_to_postgres(&source, &config.store, force)
        .with_context(|| format!("moving {} into {target}", source.display()))?;
    if let Some(at) = moved.already {
        outln!(
            "{} was already moved into {target} at {}: nothing to do",
            source.display(),
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "moved {} into {target} (PostgreSQL schema version {}; its versions are not SQLite's):",
        source.display(),
        moved.version
    );
    let width = moved.rows.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    for (table, rows) in &moved.rows {
        outln!("  {table:<width$}  {rows:>10}");
    }
    if moved.released > 0 {
        outln!(
            "{} claimed by the stopped daemon {} due again (sent under the same idempotency keys)",
            humanize::count(moved.released as u64, "step", "steps"),
            if moved.released == 1 { "is" } else { "are" }
        );
    }
    outln!(
        "{} is marked as moved: nudge run refuses it from now on. Start the replicas with \
         store.url = \"{target}\" and the same kafka topics: each partition resumes at the offset \
         that came across.",
        source.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn open_reader(config: &Config) -> anyhow::Result<Box<dyn nudge::review::ReviewRead>> {
    let key = match config.store.url {
        Some(_) => "store.url",
        None => "store.path",
    };
    let reader = nudge::store::open_reader(&config.store)
        .with_context(|| format!("{key}: reading {}", config.store.describe()))?;
    note_if_moved(config);
    Ok(reader)
}

/// On stderr: a SQLite file moved into PostgreSQL holds its history only up
/// to the move; the rest is in the store it went to.
fn note_if_moved(config: &Config) {
    if let Some((to, at)) = nudge::store::moved_to(&config.store) {
        eprintln!(
            "note: {} was moved to {to} at {} (nudge migrate --from): what it holds ends there; \
             read the current history with store.url = \"{to}\"",
            config.store.describe(),
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
}

/// The status of a GET, and its body (where `/readyz` says why): a minimal
/// HTTP/1.1 client for health checks in images without curl. Anything short
/// of a whole answer (no status line, headers cut short, a connection
/// closed or reset before it answered) is an error, never a pass: a health
/// check must not read a server that stopped answering as healthy. The
/// socket's errors are wrapped so that the command-line rule for a closed
/// stdout (exit 0 in silence) does not take them for one.
fn probe(address: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read;
    let no_answer = |e: std::io::Error| anyhow::anyhow!("no answer: {e}");
    let mut stream = std::net::TcpStream::connect(address).map_err(no_answer)?;
    let wait = Some(std::time::Duration::from_secs(5));
    stream.set_read_timeout(wait).map_err(no_answer)?;
    stream.set_write_timeout(wait).map_err(no_answer)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(no_answer)?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).map_err(no_answer)?;
    parse_probe_answer(&String::from_utf8_lossy(&bytes))
}

fn parse_probe_answer(response: &str) -> anyhow::Result<(u16, String)> {
    if response.is_empty() {
        anyhow::bail!("no answer: the connection was closed before a response");
    }
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        anyhow::bail!("an incomplete HTTP response (its headers were cut short)");
    };
    let mut status_line = head.lines().next().unwrap_or_default().split_whitespace();
    let status = match (status_line.next(), status_line.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse().ok(),
        _ => None,
    }
    .filter(|code| (100..600).contains(code))
    .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))?;
    let length = head.lines().skip(1).find_map(|h| {
        let (name, value) = h.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if length.is_some_and(|n| body.len() < n) {
        anyhow::bail!("an incomplete HTTP response (its body was cut short)");
    }
    Ok((status, body.trim().to_string()))
}

/// Readable logs for the tools (the daemon chooses JSON or text from config).
fn init_logging(default: &str) {
    nudge::daemon::init_logging("text", default);
}
