//! The `conveyour-cdc` command: parses arguments, sets up logging, and
//! hands over to the library. It orchestrates; the library does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use conveyour_cdc::{check, config, pipeline, preview, status, telemetry, Error};

/// Streams Postgres row changes into ConveYour identify and track calls.
#[derive(Parser)]
#[command(name = "conveyour-cdc", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text, env = "CONVEYOUR_CDC_LOG_FORMAT")]
    log_format: LogFormat,
    /// Worker threads of the async runtime.
    #[arg(long, global = true, default_value_t = DEFAULT_THREADS, env = "CONVEYOUR_CDC_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    #[command(subcommand)]
    command: Command,
}

/// One worker thread: a slot is one ordered stream that one walsender
/// process produces, and one thread maps and sends it faster than the
/// walsender decodes (the benchmark's ceiling, about 140k changes/s on one
/// core). A second thread added no throughput there and cost CPU, since
/// every hand-over between the reader, delivery and its request tasks then
/// woke another thread (5.1 → 4.7 CPU seconds per million changes).
const DEFAULT_THREADS: u16 = 1;

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Show the stored entries with ConveYour's reason.
    List {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send stored entries again (after fixing the cause); delivered ones are removed.
    Retry {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this entry.
        #[arg(long)]
        id: Option<i64>,
    },
    /// Delete stored entries.
    Purge {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this entry.
        #[arg(long)]
        id: Option<i64>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes until stopped (SIGTERM or Ctrl-C).
    Run {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Verify everything `run` needs, in Postgres and ConveYour, and print
    /// one line per check. Sends ConveYour nothing unless --probe-id is given.
    Check {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only parse and validate the config; do not connect.
        #[arg(long)]
        config_only: bool,
        /// Also send ConveYour one identify with empty traits for this
        /// contact id (created if the account lacks it), to try the URL, app
        /// key and token.
        #[arg(long, value_name = "ID", conflicts_with = "config_only", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        probe_id: Option<String>,
    },
    /// List, re-send or delete entries ConveYour rejected for good.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Send one table's current rows again, in chunks, while the running
    /// connector keeps streaming (e.g. after adding a trait to its mapping).
    Resync {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The mapped table, `schema.table` or `table` (public).
        #[arg(long)]
        table: String,
    },
    /// Print the requests the mapping would send for rows the tables hold now.
    ///
    /// Each row is mapped as if it had just been inserted. Output is JSON
    /// Lines on stdout, one object per row: `table`, the row's primary `key`
    /// (every column read, for a table without one), and either `requests`
    /// (each `endpoint` with the exact `body` the connector sends; empty when
    /// inserts do not count for the table) or `rejected` with the reason, the
    /// column named. Rows that the table's `where:` refuses are not shown, as
    /// they are not streamed. Rows are read in one
    /// REPEATABLE READ READ ONLY transaction; nothing is written or sent. A
    /// one-line summary goes to stderr.
    Preview {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this mapped table: `schema.table`, or `table` for the public schema.
        #[arg(long)]
        table: Option<String>,
        /// Rows per table at most, in primary-key order (the first N).
        #[arg(long, default_value_t = preview::DEFAULT_LIMIT, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// Report the slot, the publication, dead letters and initial-sync state.
    Status {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_logging(format);
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line on stderr: a JSON log line when logs are JSON, so
            // log collectors parse it, else plain text.
            match format {
                LogFormat::Json => tracing::error!(hint = e.hint(), "{e}"),
                LogFormat::Text => eprintln!("error: {e} (hint: {})", e.hint()),
            }
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: Cli) -> Result<ExitCode, Error> {
    let threads = cli.threads;
    match cli.command {
        Command::Run { config } => {
            let settings = config::load(&config)?;
            runtime(threads)?.block_on(async {
                let listener = telemetry::bind(&settings.metrics_listen)
                    .await
                    .map_err(Error::Setup)?;
                if let Some(addr) = telemetry::local_addr(&listener) {
                    tracing::info!(%addr, "metrics and health checks listening");
                }
                tokio::spawn(telemetry::serve(listener));
                let (trigger, shutdown) = conveyour_cdc::shutdown::Shutdown::new();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stop requested: finishing in-flight requests");
                    trigger.trigger();
                });
                pipeline::run(&settings, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview {
            config,
            table,
            limit,
        } => {
            let settings = config::load(&config)?;
            let tables = match preview::select(&settings, table.as_deref()) {
                Ok(tables) => tables,
                Err(problem) => Cli::command()
                    .error(
                        clap::error::ErrorKind::InvalidValue,
                        format!("--table: {problem}"),
                    )
                    .exit(),
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let summary =
                runtime(threads)?.block_on(preview::run(&settings, &tables, limit, &mut out))?;
            eprintln!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { action } => dead_letters(action, threads),
        Command::Resync { config, table } => {
            let settings = config::load(&config)?;
            let table =
                runtime(threads)?.block_on(conveyour_cdc::request_resync(&settings, &table))?;
            println!(
                "resync of {table} requested: the running connector (or the next to start) copies it alongside the stream; watch conveyour_cdc_snapshot_tables_remaining or `status`"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, json } => {
            let settings = config::load(&config)?;
            let status = runtime(threads)?.block_on(status::read(&settings))?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| Error::Internal(format!("writing JSON: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", status.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            config_only,
            probe_id,
        } => {
            let settings = config::load(&config)?;
            println!("ok   config: {} tables mapped", settings.tables.len());
            if config_only {
                return Ok(ExitCode::SUCCESS);
            }
            let results = runtime(threads)?.block_on(async {
                let mut results = check::run_checks(&settings).await;
                results.extend(
                    check::conveyour_checks(&settings.conveyour, probe_id.as_deref()).await,
                );
                results
            });
            for r in &results {
                println!("{r}");
            }
            let failed: Vec<&str> = results
                .iter()
                .filter(|r| r.failed())
                .map(|r| r.name.as_str())
                .collect();
            if failed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "error: {} check(s) failed: {}",
                    failed.len(),
                    failed.join(", ")
                );
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn dead_letters(action: DeadLetterAction, threads: u16) -> Result<ExitCode, Error> {
    match action {
        DeadLetterAction::List { config, json } => {
            let settings = config::load(&config)?;
            let letters = runtime(threads)?.block_on(async {
                let client = conveyour_cdc::connect(&settings.postgres).await?;
                Ok::<_, Error>(
                    conveyour_cdc::list_dead_letters(&client, &settings.slot, None).await?,
                )
            })?;
            if json {
                let text = serde_json::to_string_pretty(&letters)
                    .map_err(|e| Error::Internal(format!("writing JSON: {e}")))?;
                println!("{text}");
            } else if letters.is_empty() {
                println!("no dead letters for slot {}", settings.slot);
            } else {
                for l in &letters {
                    let key = match &l.key {
                        Some(k) => {
                            let pairs: Vec<String> = k
                                .iter()
                                .map(|(c, v)| format!("{c}={}", v.as_deref().unwrap_or("NULL")))
                                .collect();
                            format!(" key=({})", pairs.join(", "))
                        }
                        None => String::new(),
                    };
                    let status = match l.status {
                        0 => String::new(),
                        s => format!(" HTTP {s}"),
                    };
                    println!(
                        "{:>6}  {}  {:<10}  {} {} id={}{key} lsn={}{status} attempts={} retries={}: {}",
                        l.id,
                        l.created_at,
                        l.reason,
                        l.endpoint,
                        l.table,
                        l.contact,
                        l.lsn,
                        l.attempts,
                        l.retries,
                        l.message
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetterAction::Retry { config, id } => {
            let settings = config::load(&config)?;
            let outcome =
                runtime(threads)?.block_on(pipeline::retry_dead_letters(&settings, id))?;
            println!(
                "delivered {}, rejected again {}",
                outcome.delivered, outcome.rejected
            );
            if outcome.waiting > 0 {
                println!(
                    "{} dead letter(s) of rows to read again are left for the connector: no connector is streaming slot {}, and only a streaming one re-reads rows without racing newer changes; they are retried when it starts",
                    outcome.waiting, settings.slot
                );
            }
            if outcome.pending > 0 {
                eprintln!(
                    "error: the connector streaming slot {} has not retried {} dead letter(s) yet; they stay marked and it retries them when it gets to them (see its log, then `dead-letters list`)",
                    settings.slot, outcome.pending
                );
            }
            if outcome.rejected > 0 {
                eprintln!(
                    "error: {} dead letter(s) rejected again; see `dead-letters list`",
                    outcome.rejected
                );
            }
            if outcome.rejected > 0 || outcome.pending > 0 {
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetterAction::Purge { config, id } => {
            let settings = config::load(&config)?;
            let n = runtime(threads)?.block_on(async {
                let client = conveyour_cdc::connect(&settings.postgres).await?;
                Ok::<_, Error>(
                    conveyour_cdc::purge_dead_letters(&client, &settings.slot, id).await?,
                )
            })?;
            println!("deleted {n} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime(threads: u16) -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(threads))
        .enable_all()
        .build()
        .map_err(|e| Error::Setup(format!("cannot start the async runtime: {e}")))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVEYOUR_CDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
