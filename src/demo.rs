//! `mongo-syncd demo`: the whole daemon between two in-process `mongo-sim` replica sets, with a
//! sample data set, live writes and a one-line-per-second progress display. It ends by stopping
//! the writes, waiting for the destination to catch up and comparing both sides document by
//! document; it exits 0 only on an exact copy.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{IsTerminal, Write as _},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use bson::{doc, oid::ObjectId, Bson, DateTime, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongo_sim::{MongoSim, SimHandle};
use mongodb::Client;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use mongo_syncd::{
    app::{self, DaemonOptions, RunningDaemon},
    cli::DemoOptions,
    config::Config,
    exit,
    metrics::WorkerState,
    model::event::ts_key,
    source::Source,
    status::{NamespaceStatus, StatusRegistry},
};

/// Replica-set names of the two simulators.
const SOURCE_SET: &str = "demo-source";
const DESTINATION_SET: &str = "demo-destination";
/// `sync.id` of the demo pipeline.
const DEMO_SYNC_ID: &str = "demo";
/// Documents per `insert_many` while seeding.
const SEED_BATCH: usize = 1_000;
/// Pause between two writes of the live writer (about 100 operations a second).
const WRITER_PAUSE: Duration = Duration::from_millis(10);
/// How long the destination may take to catch up once the writer stops.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// The sample data set: (database, collection, documents).
const DATA_SET: &[(&str, &str, usize)] = &[
    ("shop", "customers", 5_000),
    ("shop", "products", 1_000),
    ("shop", "orders", 20_000),
    ("analytics", "events", 24_000),
    ("analytics", "daily_stats", 400),
];

const CITIES: &[&str] = &[
    "Lisbon", "Osaka", "Toronto", "Nairobi", "Lyon", "Austin", "Hanoi", "Leeds", "Porto", "Graz",
];
const STATUSES: &[&str] = &[
    "pending",
    "paid",
    "packed",
    "shipped",
    "delivered",
    "returned",
];
const EVENT_TYPES: &[&str] = &["page_view", "search", "add_to_cart", "checkout", "login"];
const TIERS: &[&str] = &["bronze", "silver", "gold"];
const SHIPPING: &[&str] = &["standard", "express"];
const CATEGORIES: &[&str] = &["books", "garden", "kitchen", "toys", "audio", "outdoor"];

/// Terminal styling: ANSI colours only when stdout is a terminal.
#[derive(Clone, Copy)]
struct Style {
    tty: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.tty {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
    fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    fn green(self, t: &str) -> String {
        self.paint("32", t)
    }
    fn yellow(self, t: &str) -> String {
        self.paint("33", t)
    }
    fn red(self, t: &str) -> String {
        self.paint("31", t)
    }
    fn ok_mark(self) -> String {
        if self.tty {
            self.green("✓")
        } else {
            "ok".to_string()
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `12345` → `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// At most 6 characters below 10^12: `12,345`, `370.4k`, `12.3M`, `4.5G`.
fn compact(n: u64) -> String {
    match n {
        0..=99_999 => thousands(n),
        100_000..=999_949 => format!("{:.1}k", n as f64 / 1e3),
        999_950..=999_949_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

/// Runs the demo; see the module documentation.
pub async fn run(options: DemoOptions) -> ExitCode {
    let style = Style {
        tty: std::io::stdout().is_terminal(),
    };
    // The progress display is the demo's voice; the daemon's own log keeps to warnings (the
    // embedded simulators' connection chatter to errors) unless RUST_LOG asks for more.
    if let Some(handle) = &options.log_reload {
        let _ = handle.set_level("warn,mongo_sim=error");
    }
    let interrupted = CancellationToken::new();
    spawn_interrupt_listener(interrupted.clone());
    ExitCode::from(demo(options, style, interrupted).await)
}

/// The first SIGINT/SIGTERM cancels `token` (stop early, still compare); a second one exits at
/// once with 130.
fn spawn_interrupt_listener(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            let term_fut = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term_fut => {}
            }
            if token.is_cancelled() {
                say("interrupted twice; exiting without the final comparison");
                std::process::exit(130);
            }
            token.cancel();
        }
    });
}

async fn demo(options: DemoOptions, style: Style, interrupted: CancellationToken) -> u8 {
    say(&style
        .bold("mongo-syncd demo: two in-process MongoDB replica sets (mongo-sim), synced live"));
    let (source, destination) = match start_simulators().await {
        Ok(s) => s,
        Err(e) => {
            say(&style.red(&format!("cannot start the simulators: {e}")));
            return exit::RUNTIME_FAILURE;
        }
    };
    let (src, dst) = match (
        Client::with_uri_str(source.uri()).await,
        Client::with_uri_str(destination.uri()).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            say(&style.red(&format!("cannot connect to the simulators: {e}")));
            return exit::RUNTIME_FAILURE;
        }
    };
    say(&format!("  {}       {}", style.dim("source"), source.uri()));
    say(&format!(
        "  {}  {}",
        style.dim("destination"),
        destination.uri()
    ));

    let seed_started = Instant::now();
    let mut rng = StdRng::seed_from_u64(20_251_128);
    let ids = tokio::select! {
        r = seed(&src, &mut rng) => match r {
            Ok(ids) => ids,
            Err(e) => {
                say(&style.red(&format!("seeding the source failed: {e}")));
                return exit::RUNTIME_FAILURE;
            }
        },
        _ = interrupted.cancelled() => {
            say("interrupted while seeding; nothing to compare");
            return 130;
        }
    };
    let seeded: u64 = DATA_SET.iter().map(|(_, _, n)| *n as u64).sum();
    say(&format!(
        "  {}     {} documents, {} collections in shop and analytics ({:.1}s)",
        style.dim("data set"),
        thousands(seeded),
        DATA_SET.len(),
        seed_started.elapsed().as_secs_f64()
    ));

    let mut config = match Config::from_uris(&source.uri(), &destination.uri()) {
        Ok(c) => c,
        Err(e) => {
            say(&style.red(&format!("demo configuration rejected: {e}")));
            return exit::RUNTIME_FAILURE;
        }
    };
    if let Some(listen) = options.http_listen {
        config.http.listen = listen;
    }
    config.sync.id = DEMO_SYNC_ID.to_string();
    // One namespace under a conflict policy, as a destination edited by others would be: the
    // newest `updated_at` wins (the demo's writer only moves it forward, so everything applies).
    config.conflict.rules = vec![mongo_syncd::config::ConflictRule {
        namespaces: vec!["shop.customers".parse().expect("a valid pattern")],
        policy: mongo_syncd::config::ConflictPolicy::NewestWins,
        field: Some("updated_at".to_string()),
    }];
    config.validation.interval_seconds = 10;
    config.shutdown.timeout_seconds = 10;
    if let Err(e) = config.validate() {
        say(&style.red(&format!("demo configuration rejected: {e}")));
        return exit::RUNTIME_FAILURE;
    }
    let listen = config.http.listen;
    let metadata_db = config.checkpoint.database.clone();

    // The daemon, exactly as `mongo-syncd run` runs it, minus signal handling and the file.
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let daemon = tokio::spawn(app::run_daemon(
        config,
        DaemonOptions {
            config_path: None,
            reset_identity: false,
            log_reload: options.log_reload.clone(),
            handle_signals: false,
            shutdown: shutdown.clone(),
            on_ready: Some(ready_tx),
        },
    ));
    let running = tokio::select! {
        r = ready_rx => match r {
            Ok(r) => r,
            Err(_) => {
                let code = daemon.await.unwrap_or(exit::RUNTIME_FAILURE);
                say(&style.red(&format!(
                    "the daemon did not start (exit {code}); is {listen} already in use?"
                )));
                say(&style.red("try --http-listen 127.0.0.1:0"));
                return if code == exit::OK { exit::RUNTIME_FAILURE } else { code };
            }
        },
        _ = interrupted.cancelled() => {
            shutdown.cancel();
            let _ = daemon.await;
            return 130;
        }
    };
    say(&format!(
        "  {}         http://{} (/metrics /readyz /api/v1/status)",
        style.dim("http"),
        running.http_addr
    ));
    match options.duration {
        Some(d) => say(&format!(
            "  {}          {}s with live writes, then a full comparison; Ctrl-C stops early",
            style.dim("run"),
            d.as_secs()
        )),
        None => say(&format!(
            "  {}          live writes until Ctrl-C, then a full comparison",
            style.dim("run")
        )),
    }
    say("");

    // The live writer.
    let writer_stop = CancellationToken::new();
    let writes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(live_writer(
        src.clone(),
        ids,
        rng,
        Arc::clone(&writes),
        writer_stop.clone(),
    ));

    // Progress, once a second, until the duration ends or Ctrl-C.
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut display = Display::new(style, seeded);
    display.header();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupted.cancelled() => {
                say(&style.yellow("  interrupted: stopping the writer, then comparing"));
                break;
            }
        }
        display.line(
            started.elapsed(),
            &running.status,
            writes.load(Ordering::Relaxed),
        );
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }

    // Stop writing, wait for the destination, compare.
    writer_stop.cancel();
    let writer_result = writer.await;
    let total_writes = writes.load(Ordering::Relaxed);
    say("");
    match writer_result {
        Ok(Ok(())) => say(&format!(
            "  writer stopped after {} source writes",
            thousands(total_writes)
        )),
        Ok(Err(e)) => say(&style.red(&format!("  the live writer failed: {e}"))),
        Err(e) => say(&style.red(&format!("  the live writer panicked: {e}"))),
    }
    let verdict = finish(&src, &dst, &running, &interrupted).await;
    match &verdict {
        Verdict::Exact { hashes, .. } => {
            for h in hashes {
                say(&format!("  {} {h}", style.ok_mark()));
            }
        }
        Verdict::Different(lines) => {
            for l in lines.iter().take(20) {
                say(&style.red(&format!("  {l}")));
            }
        }
    }

    shutdown.cancel();
    let code = daemon.await.unwrap_or(exit::RUNTIME_FAILURE);
    let namespaces = running.status.snapshot().len() as u64;
    let checkpoints = dst
        .database(&metadata_db)
        .collection::<Document>(mongo_syncd::checkpoint::CHECKPOINTS_COLLECTION)
        .count_documents(doc! {"_id.sync_id": DEMO_SYNC_ID, "phase": "streaming"})
        .await
        .unwrap_or(0);
    if code != exit::OK {
        say(&style.red(&format!("  the daemon stopped with exit code {code}")));
    } else {
        say(&format!(
            "  daemon stopped cleanly; {checkpoints} of {namespaces} namespaces checkpointed"
        ));
    }
    // Close the demo's own clients before the simulators and the runtime stop (a client dropped
    // while the runtime stops ends its sessions from a task of its own).
    let closing = async {
        tokio::join!(
            src.shutdown().immediate(true),
            dst.shutdown().immediate(true)
        )
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    source.shutdown().await;
    destination.shutdown().await;
    match verdict {
        Verdict::Exact {
            collections,
            documents,
            ..
        } => {
            say(&style.green(&style.bold(&format!(
                "exact copy: {collections} collections, {} documents identical",
                thousands(documents)
            ))));
            code
        }
        Verdict::Different(lines) => {
            say(&style.red(&style.bold(&format!(
                "NOT an exact copy: {} difference(s), listed above",
                lines.len()
            ))));
            exit::RUNTIME_FAILURE
        }
    }
}

async fn start_simulators() -> std::io::Result<(SimHandle, SimHandle)> {
    let source = MongoSim::builder()
        .replica_set(SOURCE_SET)
        .noop_interval(Duration::from_secs(1))
        .start()
        .await?;
    let destination = MongoSim::builder()
        .replica_set(DESTINATION_SET)
        .noop_interval(Duration::from_secs(1))
        .start()
        .await?;
    Ok((source, destination))
}

/// `_id`s the writer picks from.
struct KnownIds {
    orders: Vec<ObjectId>,
    events: Vec<ObjectId>,
    customers: i32,
    products: i32,
}

fn sku(i: i32) -> String {
    format!("SKU-{i:05}")
}

fn customer(rng: &mut StdRng, id: i32) -> Document {
    let created = DateTime::from_millis(1_700_000_000_000 + rng.random_range(0..40_000_000_000i64));
    doc! {
        "_id": id,
        "name": format!("Customer {id}"),
        "email": format!("customer{id}@example.com"),
        "tier": TIERS[rng.random_range(0..TIERS.len())],
        "address": {
            "street": format!("{} Example Street", rng.random_range(1..400)),
            "city": CITIES[rng.random_range(0..CITIES.len())],
            "zip": format!("{:05}", rng.random_range(0..100_000)),
        },
        "orders_count": 0,
        "created_at": created,
        "updated_at": created,
        "tags": (0..rng.random_range(0..3)).map(|i| format!("tag{i}")).collect::<Vec<_>>(),
    }
}

fn product(rng: &mut StdRng, i: i32) -> Document {
    doc! {
        "_id": sku(i),
        "name": format!("Product {i}"),
        "price": (rng.random_range(100..20_000) as f64) / 100.0,
        "stock": rng.random_range(0..500),
        "categories": [CATEGORIES[rng.random_range(0..CATEGORIES.len())], CATEGORIES[rng.random_range(0..CATEGORIES.len())]],
        "dimensions": {"w": rng.random_range(1..100), "h": rng.random_range(1..100), "d": rng.random_range(1..100)},
    }
}

fn order(rng: &mut StdRng, id: ObjectId, customers: i32, products: i32) -> Document {
    let items: Vec<Document> = (0..rng.random_range(1..6))
        .map(|_| {
            doc! {
                "sku": sku(rng.random_range(0..products)),
                "qty": rng.random_range(1..5),
                "price": (rng.random_range(100..20_000) as f64) / 100.0,
            }
        })
        .collect();
    let total: f64 = items
        .iter()
        .map(|i| i.get_f64("price").unwrap_or(0.0) * i.get_i32("qty").unwrap_or(1) as f64)
        .sum();
    doc! {
        "_id": id,
        "customer_id": rng.random_range(0..customers),
        "status": STATUSES[rng.random_range(0..STATUSES.len())],
        "items": items,
        "total": (total * 100.0).round() / 100.0,
        "shipping": {"method": SHIPPING[rng.random_range(0..SHIPPING.len())], "city": CITIES[rng.random_range(0..CITIES.len())]},
        "created_at": DateTime::now(),
    }
}

fn event(rng: &mut StdRng, id: ObjectId) -> Document {
    doc! {
        "_id": id,
        "type": EVENT_TYPES[rng.random_range(0..EVENT_TYPES.len())],
        "session": format!("s{:06}", rng.random_range(0..50_000)),
        "at": DateTime::now(),
        "props": {"path": format!("/p/{}", rng.random_range(0..1_000)), "ms": rng.random_range(1..3_000)},
    }
}

async fn insert_batched(
    client: &Client,
    db: &str,
    coll: &str,
    docs: Vec<Document>,
) -> Result<(), mongodb::error::Error> {
    let c = client.database(db).collection::<Document>(coll);
    for chunk in docs.chunks(SEED_BATCH) {
        c.insert_many(chunk.to_vec()).await?;
    }
    Ok(())
}

/// Writes the sample data set to the source.
async fn seed(src: &Client, rng: &mut StdRng) -> Result<KnownIds, mongodb::error::Error> {
    let count = |db: &str, coll: &str| {
        DATA_SET
            .iter()
            .find(|(d, c, _)| *d == db && *c == coll)
            .map_or(0, |(_, _, n)| *n)
    };
    let customers = count("shop", "customers") as i32;
    let products = count("shop", "products") as i32;
    insert_batched(
        src,
        "shop",
        "customers",
        (0..customers).map(|i| customer(rng, i)).collect(),
    )
    .await?;
    insert_batched(
        src,
        "shop",
        "products",
        (0..products).map(|i| product(rng, i)).collect(),
    )
    .await?;
    let orders: Vec<ObjectId> = (0..count("shop", "orders"))
        .map(|_| ObjectId::new())
        .collect();
    insert_batched(
        src,
        "shop",
        "orders",
        orders
            .iter()
            .map(|id| order(rng, *id, customers, products))
            .collect(),
    )
    .await?;
    let events: Vec<ObjectId> = (0..count("analytics", "events"))
        .map(|_| ObjectId::new())
        .collect();
    insert_batched(
        src,
        "analytics",
        "events",
        events.iter().map(|id| event(rng, *id)).collect(),
    )
    .await?;
    let days = count("analytics", "daily_stats") as i64;
    insert_batched(
        src,
        "analytics",
        "daily_stats",
        (0..days)
            .map(|d| {
                let day = DateTime::from_millis(1_735_689_600_000 + d * 86_400_000);
                doc! {"_id": day.try_to_rfc3339_string().unwrap_or_default()[..10].to_string(), "views": rng.random_range(0..100_000), "orders": rng.random_range(0..2_000)}
            })
            .collect(),
    )
    .await?;
    let shop = src.database("shop");
    shop.collection::<Document>("orders")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"customer_id": 1})
                .build(),
        )
        .await?;
    shop.collection::<Document>("customers")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await?;
    Ok(KnownIds {
        orders,
        events,
        customers,
        products,
    })
}

/// Inserts, updates, replaces, deletes and small transactions on the source until `stop`.
async fn live_writer(
    src: Client,
    mut ids: KnownIds,
    mut rng: StdRng,
    writes: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<(), mongodb::error::Error> {
    let shop = src.database("shop");
    let orders = shop.collection::<Document>("orders");
    let customers = shop.collection::<Document>("customers");
    let products = shop.collection::<Document>("products");
    let events = src.database("analytics").collection::<Document>("events");
    let stats = src
        .database("analytics")
        .collection::<Document>("daily_stats");
    while !stop.is_cancelled() {
        let roll = rng.random_range(0..100);
        match roll {
            0..=19 => {
                let id = ObjectId::new();
                orders
                    .insert_one(order(&mut rng, id, ids.customers, ids.products))
                    .await?;
                ids.orders.push(id);
            }
            20..=39 => {
                let id = ids.orders[rng.random_range(0..ids.orders.len())];
                let status = STATUSES[rng.random_range(0..STATUSES.len())];
                orders
                    .update_one(
                        doc! {"_id": id},
                        doc! {"$set": {"status": status, "updated_at": DateTime::now()}, "$inc": {"revision": 1}},
                    )
                    .await?;
            }
            40..=44 => {
                let id = ids.orders[rng.random_range(0..ids.orders.len())];
                orders
                    .update_one(
                        doc! {"_id": id},
                        doc! {"$push": {"items": {"sku": sku(rng.random_range(0..ids.products)), "qty": 1, "price": 9.99}}},
                    )
                    .await?;
            }
            45..=54 => {
                let batch: Vec<Document> = (0..5)
                    .map(|_| {
                        let id = ObjectId::new();
                        ids.events.push(id);
                        event(&mut rng, id)
                    })
                    .collect();
                events.insert_many(batch).await?;
            }
            55..=62 => {
                let i = rng.random_range(0..ids.events.len());
                let id = ids.events.swap_remove(i);
                events.delete_one(doc! {"_id": id}).await?;
            }
            63..=69 => {
                let id = rng.random_range(0..ids.customers);
                let city = CITIES[rng.random_range(0..CITIES.len())];
                customers
                    .update_one(
                        doc! {"_id": id},
                        doc! {"$set": {"address.city": city, "updated_at": DateTime::now()}, "$unset": {"tags": ""}},
                    )
                    .await?;
            }
            70..=74 => {
                let i = rng.random_range(0..ids.products);
                products
                    .replace_one(doc! {"_id": sku(i)}, product(&mut rng, i))
                    .await?;
            }
            75..=79 => {
                let day = format!("2025-01-{:02}", rng.random_range(1..29));
                stats
                    .update_one(doc! {"_id": day}, doc! {"$inc": {"views": 1}})
                    .await?;
            }
            80..=84 => {
                if ids.orders.len() > 1_000 {
                    let i = rng.random_range(0..ids.orders.len());
                    let id = ids.orders.swap_remove(i);
                    orders.delete_one(doc! {"_id": id}).await?;
                }
            }
            _ => {
                // A transaction: a new order, its customer's counter, the stock of its items.
                let id = ObjectId::new();
                let o = order(&mut rng, id, ids.customers, ids.products);
                let customer_id = o.get_i32("customer_id").unwrap_or(0);
                let skus: Vec<String> = o
                    .get_array("items")
                    .map(|a| {
                        a.iter()
                            .filter_map(|i| {
                                i.as_document()?.get_str("sku").ok().map(str::to_string)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut session = src.start_session().await?;
                session.start_transaction().await?;
                orders.insert_one(o).session(&mut session).await?;
                customers
                    .update_one(
                        doc! {"_id": customer_id},
                        doc! {"$inc": {"orders_count": 1}, "$set": {"updated_at": DateTime::now()}},
                    )
                    .session(&mut session)
                    .await?;
                for s in skus {
                    products
                        .update_one(doc! {"_id": s}, doc! {"$inc": {"stock": -1}})
                        .session(&mut session)
                        .await?;
                }
                session.commit_transaction().await?;
                ids.orders.push(id);
            }
        }
        writes.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(WRITER_PAUSE) => {}
        }
    }
    Ok(())
}

/// The one-line-per-second progress display. Every line fits 80 columns.
struct Display {
    style: Style,
    seeded: u64,
    last_applied: u64,
    /// The newest validation already shown (its time), so each result is printed once.
    last_validation: Option<SystemTime>,
}

impl Display {
    fn new(style: Style, seeded: u64) -> Display {
        Display {
            style,
            seeded,
            last_applied: 0,
            last_validation: None,
        }
    }

    /// The column titles and a legend for the two counters that newcomers compare.
    fn header_lines(&self) -> Vec<String> {
        let titles = format!(
            "  {:>5}  {:<16}  {:>18}  {:>5}  {:>16}  {:>8}",
            "time", "collections", "copied / total", "lag", "events applied", "src ops"
        );
        vec![
            self.style.dim(&titles),
            self.style.dim(
                "  src ops: operations of the demo's writer; one can change several documents",
            ),
            self.style.dim(
                "  (5-document batches, transactions). events applied: the changes they made,",
            ),
            self.style.dim(
                "  applied from the change stream once copied (the copy itself carries the rest).",
            ),
        ]
    }

    fn header(&self) {
        for line in self.header_lines() {
            say(&line);
        }
    }

    fn line(&mut self, elapsed: Duration, status: &StatusRegistry, writes: u64) {
        for line in self.lines(elapsed, &status.snapshot(), writes, SystemTime::now()) {
            say(&line);
        }
    }

    /// One progress row, preceded by a line for a validation finished since the last row.
    fn lines(
        &mut self,
        elapsed: Duration,
        snapshot: &BTreeMap<String, NamespaceStatus>,
        writes: u64,
        now: SystemTime,
    ) -> Vec<String> {
        let mut states: BTreeMap<&'static str, usize> = BTreeMap::new();
        let (mut copied, mut total, mut applied) = (0u64, 0u64, 0u64);
        let mut lag: Option<f64> = None;
        let mut validation: Option<(SystemTime, String)> = None;
        for s in snapshot.values() {
            *states.entry(s.state.as_str()).or_default() += 1;
            copied += s.copied;
            total += s.copy_estimate.max(s.copied);
            applied += s.events_applied;
            if let Some(l) = s.lag_seconds {
                lag = Some(lag.map_or(l, |m: f64| m.max(l)));
            }
            if let Some(v) = &s.last_validation {
                if validation.as_ref().is_none_or(|(at, _)| v.at > *at) {
                    let text = if v.mismatched_documents > 0 {
                        format!("{} ({} documents differ)", v.result, v.mismatched_documents)
                    } else {
                        v.result.clone()
                    };
                    validation = Some((v.at, text));
                }
            }
        }
        let n = snapshot.len();
        let count = |s: WorkerState| states.get(s.as_str()).copied().unwrap_or(0);
        let copying = count(WorkerState::Copying);
        let (phase, painted) = if n == 0 {
            ("starting".to_string(), 'y')
        } else if count(WorkerState::Parked) > 0 {
            (format!("{} of {n} parked", count(WorkerState::Parked)), 'r')
        } else if count(WorkerState::Backoff) > 0 {
            (
                format!("{} of {n} backoff", count(WorkerState::Backoff)),
                'r',
            )
        } else if copying > 0 {
            (format!("{copying} of {n} copying"), 'y')
        } else if count(WorkerState::Streaming) == n {
            (format!("{n} streaming"), 'g')
        } else {
            (
                format!("{} of {n} streaming", count(WorkerState::Streaming)),
                'y',
            )
        };
        let phase_cell = format!("{phase:<16}");
        let phase_cell = match painted {
            'g' => self.style.green(&phase_cell),
            'r' => self.style.red(&phase_cell),
            _ => self.style.yellow(&phase_cell),
        };
        let total = if total == 0 { self.seeded } else { total };
        let pct = if total == 0 {
            100.0
        } else {
            (copied as f64 * 100.0 / total as f64).min(100.0)
        };
        let copy_cell = format!("{}/{} {:>3.0}%", compact(copied), compact(total), pct);
        // While any collection copies, the lag of the whole is not meaningful yet (it is
        // measured from the copy's start): the copy column is the progress to watch.
        let lag_cell = match lag {
            Some(l) if copying == 0 && n > 0 => format!("{l:.0}s"),
            _ => "—".to_string(),
        };
        let rate = applied.saturating_sub(self.last_applied);
        self.last_applied = applied;
        let applied_cell = format!("{} (+{})", compact(applied), compact(rate));
        let mut lines = Vec::new();
        if let Some((at, text)) = validation {
            if self.last_validation.is_none_or(|shown| at > shown) {
                self.last_validation = Some(at);
                let ago = now.duration_since(at).map(|d| d.as_secs()).unwrap_or(0);
                lines.push(format!(
                    "  {:>4}s  last validation: {text}, {ago}s ago",
                    elapsed.as_secs()
                ));
            }
        }
        let mut line = String::new();
        let _ = write!(
            line,
            "  {:>4}s  {}  {:>18}  {:>5}  {:>16}  {:>8}",
            elapsed.as_secs(),
            phase_cell,
            copy_cell,
            lag_cell,
            applied_cell,
            compact(writes),
        );
        lines.push(line);
        lines
    }
}

enum Verdict {
    Exact {
        collections: usize,
        documents: u64,
        /// One line per database: its `dbHash`, equal on both sides.
        hashes: Vec<String>,
    },
    Different(Vec<String>),
}

/// Waits for the destination to apply everything the source has, then compares both sides.
async fn finish(
    src: &Client,
    dst: &Client,
    running: &RunningDaemon,
    interrupted: &CancellationToken,
) -> Verdict {
    let waiting = Instant::now();
    let target = match Source::new(src.clone(), None).cluster_time().await {
        Ok(t) => t,
        Err(e) => {
            return Verdict::Different(vec![format!("cannot read the source cluster time: {e}")])
        }
    };
    let caught_up = |status: &StatusRegistry| -> bool {
        let snap = status.snapshot();
        !snap.is_empty()
            && snap.values().all(|s| {
                s.state == WorkerState::Streaming
                    && s.applied_through
                        .is_some_and(|a: Timestamp| ts_key(a) >= ts_key(target))
            })
    };
    let mut compared = None;
    loop {
        if caught_up(&running.status) {
            if compared.is_none() {
                say(&format!(
                    "  destination caught up with the source in {:.1}s; comparing every document",
                    waiting.elapsed().as_secs_f64()
                ));
            }
            let verdict = compare(src, dst).await;
            let exact = matches!(verdict, Verdict::Exact { .. });
            compared = Some(verdict);
            if exact {
                break;
            }
        }
        if waiting.elapsed() > CATCH_UP_TIMEOUT {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = interrupted.cancelled(), if !interrupted.is_cancelled() => {}
        }
    }
    match compared {
        Some(v) => v,
        None => {
            let mut lines = vec![format!(
                "the destination did not catch up within {}s",
                CATCH_UP_TIMEOUT.as_secs()
            )];
            for (ns, s) in running.status.snapshot() {
                lines.push(format!(
                    "{ns}: {} (applied through {:?}, lag {})",
                    s.state.as_str(),
                    s.applied_through,
                    s.lag_seconds
                        .map_or("unknown".to_string(), |l| format!("{l:.0}s"))
                ));
            }
            Verdict::Different(lines)
        }
    }
}

async fn dump(
    client: &Client,
    db: &str,
    coll: &str,
) -> Result<Vec<RawDocumentBuf>, mongodb::error::Error> {
    client
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await?
        .try_collect()
        .await
}

fn id_text(d: &RawDocumentBuf) -> String {
    match d.get("_id") {
        Ok(Some(id)) => Bson::try_from(id)
            .map(|b| b.to_string())
            .unwrap_or_default(),
        _ => "?".to_string(),
    }
}

/// Document-by-document comparison (sorted `_id`, raw BSON bytes) plus `dbHash` per database.
async fn compare(src: &Client, dst: &Client) -> Verdict {
    let mut diffs = Vec::new();
    let mut hashes = Vec::new();
    let mut collections = 0usize;
    let mut documents = 0u64;
    let mut databases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (db, coll, _) in DATA_SET {
        databases
            .entry(db.to_string())
            .or_default()
            .push(coll.to_string());
    }
    for (db, colls) in &databases {
        // The destination has exactly the source's collections in this database.
        let (src_names, dst_names) = match (
            src.database(db).list_collection_names().await,
            dst.database(db).list_collection_names().await,
        ) {
            (Ok(mut a), Ok(mut b)) => {
                a.sort();
                b.sort();
                (a, b)
            }
            (Err(e), _) | (_, Err(e)) => {
                return Verdict::Different(vec![format!("listing collections of {db}: {e}")])
            }
        };
        if src_names != dst_names {
            diffs.push(format!(
                "{db}: collections differ: source {src_names:?}, destination {dst_names:?}"
            ));
        }
        for coll in colls {
            let (a, b) = match (dump(src, db, coll).await, dump(dst, db, coll).await) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    return Verdict::Different(vec![format!("reading {db}.{coll}: {e}")])
                }
            };
            collections += 1;
            let mut bad = Vec::new();
            if a.len() != b.len() {
                bad.push(format!(
                    "{} documents on the source, {} on the destination",
                    a.len(),
                    b.len()
                ));
            }
            let mut differing = 0usize;
            for (x, y) in a.iter().zip(&b) {
                if x.as_bytes() != y.as_bytes() {
                    differing += 1;
                    if differing <= 3 {
                        bad.push(format!(
                            "_id {} (source) vs _id {} (destination) differ",
                            id_text(x),
                            id_text(y)
                        ));
                    }
                }
            }
            if differing > 3 {
                bad.push(format!("{differing} positions differ in all"));
            }
            if bad.is_empty() {
                documents += a.len() as u64;
            } else {
                diffs.extend(bad.into_iter().map(|b| format!("{db}.{coll}: {b}")));
            }
        }
        let hash = |c: &Client| {
            let db = c.database(db);
            let names = colls.clone();
            async move {
                db.run_command(doc! {"dbHash": 1, "collections": names})
                    .await
                    .map(|r| r.get_str("md5").unwrap_or_default().to_string())
            }
        };
        match (hash(src).await, hash(dst).await) {
            (Ok(a), Ok(b)) if a == b && !a.is_empty() => hashes.push(format!(
                "{db}: dbHash {} on both sides ({} collections)",
                &a[..a.len().min(12)],
                colls.len()
            )),
            (Ok(a), Ok(b)) => diffs.push(format!(
                "{db}: dbHash differs (source {a}, destination {b})"
            )),
            (Err(e), _) | (_, Err(e)) => diffs.push(format!("{db}: dbHash failed: {e}")),
        }
    }
    if diffs.is_empty() {
        Verdict::Exact {
            collections,
            documents,
            hashes,
        }
    } else {
        Verdict::Different(diffs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongo_syncd::status::LastValidation;

    /// Widest line the demo prints (a classic terminal).
    const MAX_COLUMNS: usize = 80;

    fn width(line: &str) -> usize {
        line.chars().count()
    }

    fn ns(state: WorkerState, copied: u64, estimate: u64, lag: Option<f64>) -> NamespaceStatus {
        let registry = StatusRegistry::default();
        registry.register("x.y", "x.y");
        registry.update("x.y", |s| {
            s.state = state;
            s.copied = copied;
            s.copy_estimate = estimate;
            s.lag_seconds = lag;
            s.events_applied = 1_234_567;
        });
        registry.get("x.y").unwrap()
    }

    #[test]
    fn every_line_fits_80_columns_and_says_what_it_counts() {
        let mut d = Display::new(Style { tty: false }, 50_400);
        for line in d.header_lines() {
            assert!(
                width(&line) <= MAX_COLUMNS,
                "{} columns: {line:?}",
                width(&line)
            );
        }
        let mut snapshot = BTreeMap::new();
        for (i, state) in [
            WorkerState::Copying,
            WorkerState::Streaming,
            WorkerState::Copying,
        ]
        .into_iter()
        .enumerate()
        {
            snapshot.insert(
                format!("db.c{i}"),
                ns(state, 9_999_999, 12_345_678, Some(12_345.0)),
            );
        }
        let at = SystemTime::now();
        snapshot.get_mut("db.c1").unwrap().last_validation = Some(LastValidation {
            result: "mismatch".into(),
            at,
            ranges_checked: 1,
            mismatched_documents: 123_456,
            repaired: 0,
        });
        let lines = d.lines(Duration::from_secs(9_999), &snapshot, 99_999_999, at);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert!(
                width(line) <= MAX_COLUMNS,
                "{} columns: {line:?}",
                width(line)
            );
        }
        let row = &lines[1];
        // What "2 of 3" counts is in the cell, and the copy shows its progress.
        assert!(row.contains("2 of 3 copying"), "{row}");
        assert!(d.header_lines()[0].contains("collections"));
        assert!(row.contains("30.0M/37.0M  81%"), "{row}");
        // Lag is not a number while copying.
        assert!(row.contains("—") && !row.contains("12345s"), "{row}");
        // The validation is shown once.
        let again = d.lines(Duration::from_secs(10_000), &snapshot, 99_999_999, at);
        assert_eq!(again.len(), 1, "{again:?}");
    }

    #[test]
    fn compact_numbers_stay_within_6_characters() {
        for (n, want) in [
            (0, "0"),
            (99_999, "99,999"),
            (100_000, "100.0k"),
            (999_949, "999.9k"),
            (999_950, "1.0M"),
            (999_949_999, "999.9M"),
            (u64::MAX, "18446744073.7G"),
        ] {
            assert_eq!(compact(n), want);
        }
        for n in [
            0,
            99_999,
            100_000,
            999_949,
            999_950,
            123_456_789,
            999_949_999,
            99_999_999_999,
        ] {
            assert!(compact(n).chars().count() <= 6, "{n}: {}", compact(n));
        }
    }

    #[test]
    fn lag_shows_once_every_collection_streams_and_only_when_known() {
        let mut d = Display::new(Style { tty: false }, 10);
        let mut snapshot = BTreeMap::new();
        snapshot.insert("a.b".to_string(), ns(WorkerState::Streaming, 10, 10, None));
        let row = d
            .lines(Duration::from_secs(1), &snapshot, 5, SystemTime::now())
            .remove(0);
        assert!(row.contains("—"), "unknown lag is not 0: {row}");
        snapshot.insert(
            "a.b".to_string(),
            ns(WorkerState::Streaming, 10, 10, Some(3.0)),
        );
        let row = d
            .lines(Duration::from_secs(2), &snapshot, 5, SystemTime::now())
            .remove(0);
        assert!(row.contains(" 3s ") && row.contains("1 streaming"), "{row}");
    }
}
