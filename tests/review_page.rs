//! The review page in a real browser: a real daemon (the example events
//! through the real broker to the recording endpoints) serves it, headless
//! Chromium driven by chromedriver (WebDriver, through fantoccini) reads
//! it the way a marketing reviewer does, and what it shows is checked
//! against the daemon's store and against `nudge log`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`
//! (`scripts/ci-deps.sh` installs them). `REVIEW_PAGE_SCREENSHOT=DIR` saves
//! screenshots of the log and funnel pages there (the README's come from it).

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const TOKEN: &str = "review-page-token-7f3a";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "{CHROMEDRIVER} and {CHROMIUM} are needed: run scripts/ci-deps.sh \
             (apt-get install chromium chromium-driver)"
        );
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let address = format!("127.0.0.1:{port}");
        wait_for(Duration::from_secs(20), "chromedriver to answer", || {
            // (It keeps connections alive, which `http_get` waits out.)
            std::net::TcpStream::connect(&address).is_ok()
        });
        Self {
            child,
            url: format!("http://{address}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, downloads: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
            ],
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        }),
    );
    ClientBuilder::native()
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

/// The log rows a page shows, as their `data-seq`.
async fn shown_seqs(c: &Client) -> Vec<i64> {
    let mut out = Vec::new();
    for row in c.find_all(Locator::Css("#log tbody tr")).await.unwrap() {
        out.push(
            row.attr("data-seq")
                .await
                .unwrap()
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    out
}

/// The store's log seqs of a filter, newest first (the page's order).
fn stored_seqs(db: &Path, journey: Option<&str>, customer: Option<&str>) -> Vec<i64> {
    let conn = store_reader(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT seq FROM dispatch_log WHERE (?1 IS NULL OR journey = ?1)
             AND (?2 IS NULL OR customer = ?2) ORDER BY time DESC, seq DESC",
        )
        .unwrap();
    stmt.query_map(rusqlite::params![journey, customer], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A key pressed where the focus is, as a keyboard user would.
async fn press(c: &Client, key: Key) {
    c.active_element()
        .await
        .unwrap()
        .send_keys(&key.to_string())
        .await
        .unwrap();
}

/// The HTTP status of the page the browser shows (a blank 401 or 404 looks
/// like any other blank page).
async fn navigation_status(c: &Client) -> Value {
    js(
        c,
        "return performance.getEntriesByType('navigation').map(e => e.responseStatus)",
    )
    .await
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

#[test]
fn a_reviewer_reads_the_page_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let recv = Receiver::start(&rt);
    let mut cfg = DaemonConfig::new(dir.path(), &recv);
    let token_file = dir.path().join("reviewer.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    cfg.extra = format!(
        "[admin.auth]\nreviewer_token_file = {:?}\n",
        token_file.display().to_string()
    );
    create_topic(&rt, &cfg.topic, 3);
    let daemon = Daemon::start(&cfg, "a");
    daemon.wait_ready(LONG);
    run_examples(&daemon, &cfg.topic, &recv, &cfg.store, LONG);
    let db = cfg.store.clone();
    let admin = daemon.admin.clone();
    let config = dir.path().join("a.toml");
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let driver = Driver::start();

    rt.block_on(async {
        let c = browser(&driver, &downloads).await;
        let base = format!("http://{admin}");

        // Without credentials: 401, and nothing of the log reaches the page.
        c.goto(&format!("{base}/")).await.unwrap();
        let status = navigation_status(&c).await;
        assert_eq!(status, json!([401]));
        assert!(!c.source().await.unwrap().contains("data-seq"));
        // What a browser shows once its sign-in box is cancelled: a page
        // a person can read, titled, in a language, saying what to do.
        let refused = {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&admin).unwrap();
            write!(
                stream,
                "GET / HTTP/1.1\r\nHost: {admin}\r\nAccept: text/html,*/*\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        };
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(
            refused.contains("<html lang=\"en\">")
                && refused.contains("<title>Sign-in needed · nudge review</title>")
                && refused.contains("the token as the password"),
            "{refused}"
        );
        // And a wrong token is refused the same way.
        assert_eq!(http_get(&admin, "/").unwrap().0, 401);
        // No admin token is configured: `nudge control` says the API is off.
        let (code, _, err) = harness::nudge(&[
            "control",
            "journey",
            "fee_increase",
            "--url",
            &base,
            "--token-file",
            token_file.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("the control API is off (404)"), "{err}");

        // With the reviewer token as the basic-auth password (any user name).
        let authed = format!("http://reviewer:{TOKEN}@{admin}/");
        c.goto(&authed).await.unwrap();
        c.wait()
            .for_element(Locator::Css("#log"))
            .await
            .expect("the dispatch log");
        let all = stored_seqs(&db, None, None);
        assert!(all.len() >= 10, "{all:?}");
        // The title says what the view holds (a screen reader announces it).
        assert_eq!(
            c.title().await.unwrap(),
            format!("Dispatch log: {} records, newest first · nudge review", all.len())
        );
        // How late a step went, as a duration, not milliseconds.
        let late = js(
            &c,
            "return Array.from(document.querySelectorAll('#log tbody td[data-label=Late]')).map(td => td.textContent)",
        )
        .await;
        assert!(
            late.as_array()
                .unwrap()
                .iter()
                .all(|l| !l.as_str().unwrap().ends_with(" ms")),
            "{late}"
        );
        // A filter that cannot be read keeps the form as sent, with the
        // problem said beside it.
        c.goto(&format!("{authed}?since=last+week&journey=fee_increase"))
            .await
            .unwrap();
        let error = c.find(Locator::Id("error")).await.unwrap();
        assert_eq!(error.attr("role").await.unwrap().as_deref(), Some("alert"));
        assert!(error.text().await.unwrap().contains("since"));
        assert!(c.title().await.unwrap().starts_with("Error: "));
        let kept = js(
            &c,
            "return [document.querySelector('#filters input[name=since]').value, \
             document.querySelector('#filters input[name=journey]').value]",
        )
        .await;
        assert_eq!(kept, json!(["last week", "fee_increase"]));
        // The field in error is marked so and points at the message.
        let marked = js(
            &c,
            "const i = document.querySelector('#filters input[name=since]'); \
             return [i.getAttribute('aria-invalid'), i.getAttribute('aria-errormessage'), \
             document.querySelector('#filters input[name=journey]').getAttribute('aria-invalid')]",
        )
        .await;
        assert_eq!(marked, json!(["true", "error", null]));
        c.goto(&authed).await.unwrap();
        c.wait()
            .for_element(Locator::Css("#log"))
            .await
            .expect("the dispatch log");
        assert_eq!(
            shown_seqs(&c).await,
            all,
            "the page lists the store's log, newest first"
        );
        let reach = c
            .find(Locator::Id("reach"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            reach.contains("The log reaches back to") && reach.contains("store.retention"),
            "{reach}"
        );
        // The stylesheet loaded from the binary (the CSP allows only 'self').
        let styled = js(
            &c,
            "return getComputedStyle(document.querySelector('header')).borderBottomStyle",
        )
        .await;
        assert_eq!(styled, json!("solid"));
        // The outcome filter offers every outcome the log can hold.
        let offered = js(
            &c,
            "return Array.from(document.querySelectorAll('select[name=outcome] option')).map(o => o.value)",
        )
        .await;
        let mut every = vec![json!("")];
        every.extend(
            nudge::model::Outcome::ALL
                .iter()
                .map(|o| json!(o.as_str())),
        );
        assert_eq!(offered, Value::Array(every));

        // The journey and step filters offer the names of the rules in
        // force as one types (retired names can still be typed).
        let suggested = js(
            &c,
            "return [document.querySelector('#filters input[name=journey]').getAttribute('list'), \
             Array.from(document.querySelectorAll('#journey-suggestions option')).map(o => o.value), \
             Array.from(document.querySelectorAll('#step-suggestions option')).map(o => o.value)]",
        )
        .await;
        assert_eq!(suggested[0], json!("journey-suggestions"));
        assert_eq!(
            suggested[1],
            json!(["energy_rebate", "fee_increase", "unsigned_loan"])
        );
        let steps = suggested[2].as_array().unwrap();
        for step in ["push", "email", "call"] {
            assert!(steps.contains(&json!(step)), "{step} in {steps:?}");
        }

        // Under the table, what each outcome means: folded until asked for.
        let glossary = "return [document.querySelector('#outcomes').open, \
             Array.from(document.querySelectorAll('#outcomes dt')).map(d => d.textContent), \
             document.querySelector('#outcomes dd').checkVisibility()]";
        let closed = js(&c, glossary).await;
        assert_eq!(closed[0], json!(false));
        assert_eq!(closed[2], json!(false), "folded away");
        c.find(Locator::Css("#outcomes summary"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let open = js(&c, glossary).await;
        assert_eq!(open[0], json!(true));
        let named: Vec<Value> = nudge::model::Outcome::ALL
            .iter()
            .map(|o| json!(o.as_str()))
            .collect();
        assert_eq!(open[1], Value::Array(named));
        assert_eq!(open[2], json!(true), "shown once opened");
        // Its fold is a target 24 px high at least (WCAG 2.5.8).
        let height = js(
            &c,
            "return document.querySelector('#outcomes summary').getBoundingClientRect().height",
        )
        .await;
        assert!(height.as_f64().unwrap() >= 24.0, "{height}");

        // A customer id hundreds of characters long breaks inside its
        // cell: the page does not grow sideways on a desktop.
        let widths = js(
            &c,
            "document.querySelector('#log tbody a.customer bdi').textContent = 'c'.repeat(400); \
             return [document.documentElement.scrollWidth, document.documentElement.clientWidth]",
        )
        .await;
        let (scroll, client) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
        assert!(scroll <= client, "the log is {scroll} px wide in {client}");

        // By keyboard: skip links past the header, past the filters, and
        // past the rows to the page links, each shown when focused.
        c.goto(&format!("{authed}?limit=3")).await.unwrap();
        c.wait().for_element(Locator::Id("older")).await.unwrap();
        let focused = "const a = document.activeElement; \
             return [a.id || a.textContent, a.getBoundingClientRect().left >= 0]";
        let body = c.find(Locator::Css("body")).await.unwrap();
        body.send_keys(&Key::Tab.to_string()).await.unwrap();
        assert_eq!(js(&c, focused).await, json!(["Skip to content", true]));
        let mut stops = Vec::new();
        for _ in 0..4 {
            press(&c, Key::Tab).await;
            stops.push(js(&c, focused).await[0].clone());
        }
        assert_eq!(
            stops,
            json!(["Dispatch log", "Funnels", "Skip to the results", "Skip to the page links"])
                .as_array()
                .unwrap()
                .clone()
        );
        assert_eq!(js(&c, focused).await[1], json!(true), "shown when focused");
        press(&c, Key::Enter).await;
        press(&c, Key::Tab).await;
        assert_eq!(js(&c, focused).await[0], json!("older"));

        // A mistyped address: a page saying so, with the way back, not the
        // browser's blank error.
        c.goto(&format!("{authed}customers/")).await.unwrap();
        let status = navigation_status(&c).await;
        assert_eq!(status, json!([404]));
        assert_eq!(c.title().await.unwrap(), "Not found · nudge review");
        c.find(Locator::Css("main a[href='/']"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait().for_element(Locator::Css("#log")).await.unwrap();
        c.goto(&authed).await.unwrap();
        c.wait().for_element(Locator::Css("#log")).await.unwrap();

        // Filter by journey through the form.
        let journey = c
            .find(Locator::Css("#filters input[name=journey]"))
            .await
            .unwrap();
        journey.send_keys("unsigned_loan").await.unwrap();
        c.find(Locator::Id("apply"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_url(&c, "journey=unsigned_loan").await;
        let loan = stored_seqs(&db, Some("unsigned_loan"), None);
        assert!(!loan.is_empty() && loan.len() < all.len());
        assert_eq!(shown_seqs(&c).await, loan);
        for cell in c
            .find_all(Locator::Css("#log tbody td.journey"))
            .await
            .unwrap()
        {
            assert_eq!(cell.text().await.unwrap(), "unsigned_loan");
        }
        if let Ok(dir) = std::env::var("REVIEW_PAGE_SCREENSHOT") {
            let png = c.screenshot().await.unwrap();
            std::fs::write(Path::new(&dir).join("review-page.png"), png).unwrap();
        }

        // Download the CSV of this filter: what `nudge log` writes for it.
        c.find(Locator::Id("csv"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let file = downloads.join("nudge-log.csv");
        wait_for(Duration::from_secs(20), "the CSV download", || {
            file.exists() && !downloads.join("nudge-log.csv.crdownload").exists()
        });
        let csv = std::fs::read_to_string(&file).unwrap();
        let (code, expected, err) = nudge(&[
            "log",
            "--config",
            config.to_str().unwrap(),
            "--format",
            "csv",
            "--limit",
            "0",
            "--journey",
            "unsigned_loan",
        ]);
        assert_eq!(code, 0, "{err}");
        // The page's link asks for a byte-order mark, for spreadsheets;
        // after it, the bytes the CLI writes (RFC 4180: CRLF).
        assert_eq!(csv.strip_prefix('\u{feff}'), Some(expected.as_str()));
        assert_eq!(expected.matches("\r\n").count(), loan.len() + 1);
        assert_eq!(csv.lines().count(), loan.len() + 1);

        // One customer's decision record, from the first row's link.
        let link = c.find(Locator::Css("#log tbody a.customer")).await.unwrap();
        let customer = link.text().await.unwrap();
        link.click().await.unwrap();
        c.wait().for_element(Locator::Id("record")).await.unwrap();
        let h1 = c
            .find(Locator::Css("h1"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(h1, format!("Customer {customer}"));
        // At 320 CSS px (a phone, or 400 % zoom), with every fold open,
        // nothing widens the page (WCAG 1.4.10).
        c.set_window_size(320, 800).await.unwrap();
        let widths = js(
            &c,
            "document.querySelectorAll('details').forEach(d => d.open = true); \
             return [document.documentElement.scrollWidth, document.documentElement.clientWidth]",
        )
        .await;
        let (scroll, client) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
        assert!(scroll <= client, "the record is {scroll} px wide in {client}");
        c.set_window_size(1280, 900).await.unwrap();
        let mut logged = Vec::new();
        for row in c
            .find_all(Locator::Css("#record tbody tr[data-seq]"))
            .await
            .unwrap()
        {
            logged.push(
                row.attr("data-seq")
                    .await
                    .unwrap()
                    .unwrap()
                    .parse::<i64>()
                    .unwrap(),
            );
        }
        let mut theirs = stored_seqs(&db, None, Some(&customer));
        theirs.reverse(); // the record is oldest first
        assert_eq!(
            logged, theirs,
            "every log record of {customer}, oldest first"
        );
        // Instances started (decisions not to start are decision rows too).
        let mut decisions = 0;
        for row in c
            .find_all(Locator::Css("#record tbody tr.decision"))
            .await
            .unwrap()
        {
            if !row.text().await.unwrap().contains(" not started by event ") {
                decisions += 1;
            }
        }
        let conn = store_reader(&db).unwrap();
        let instances: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM instances WHERE customer = ?1",
                [&customer],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(decisions as i64, instances);
        // Contacts masked: the examples' addresses never reach the page.
        let source = c.source().await.unwrap();
        for address in [
            "alice@example.com",
            "bob@example.com",
            "+61400000001",
            "+61400000002",
        ] {
            assert!(!source.contains(address), "{address} unmasked on the page");
        }

        // The funnels: started per journey as the store counts live instances.
        c.goto(&format!("{base}/funnel")).await.unwrap();
        c.wait()
            .for_element(Locator::Css("section.funnel"))
            .await
            .unwrap();
        for section in c.find_all(Locator::Css("section.funnel")).await.unwrap() {
            let journey = section.attr("data-journey").await.unwrap().unwrap();
            let started = section
                .find(Locator::Css("tr.started td[data-label=Count]"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let live: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM instances WHERE journey = ?1 AND mode = 'live'",
                    [&journey],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(started, live.to_string(), "{journey}");
        }
        if let Ok(dir) = std::env::var("REVIEW_PAGE_SCREENSHOT") {
            let png = c.screenshot().await.unwrap();
            std::fs::write(Path::new(&dir).join("review-funnel.png"), png).unwrap();
        }

        // A producer's very long customer id keeps to a column of its own
        // width: the other columns are not squeezed into breaking words.
        let long = format!("c-{}", "long".repeat(80));
        let pushes = recv.on("/push").len();
        produce(
            &cfg.topic,
            &[
                harness::event("ctx-long", "customer.contact_updated", &long, json!({"app_installed": true})),
                harness::event(
                    "loan-long",
                    "loan_application.completed",
                    &long,
                    json!({"application_id": "A-long", "product": "Personal loan",
                        "amount": 1000, "signed": false, "resume_url": "u"}),
                ),
            ],
        );
        wait_for(LONG, "the long customer's push", || {
            recv.on("/push").len() > pushes
        });
        c.goto(&format!("{base}/")).await.unwrap();
        c.wait().for_element(Locator::Css("#log")).await.unwrap();
        let widths = js(
            &c,
            "const a = document.querySelector('#log tbody a.customer'); \
             return [a.textContent.length, a.getBoundingClientRect().width, \
                     document.querySelector('#log').getBoundingClientRect().width]",
        )
        .await;
        assert_eq!(widths[0], json!(long.len()), "the newest row is the long id's");
        let (cell, table) = (widths[1].as_f64().unwrap(), widths[2].as_f64().unwrap());
        assert!(
            cell <= 0.25 * table,
            "the customer id is {cell} px of a {table} px table"
        );
        c.close().await.unwrap();
    });
    daemon.terminate();
    // The receiver's runtime ends with the test process.
    std::mem::forget(recv);
    std::mem::forget(rt);
}

/// Waits until the browser's URL holds `part` (the form's navigation done).
async fn wait_url(c: &Client, part: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let url = c.current_url().await.unwrap();
        if url.as_str().contains(part) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still at {url}");
        tokio::time::sleep(POLL).await;
    }
}
