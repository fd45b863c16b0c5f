//! The documentation is generated from, or checked against, the code.

mod harness;

use std::path::Path;

use harness::repo;
use nudge::rules::{host_api_reference, load_sources, Limits};

#[test]
fn rules_readme_holds_the_generated_api_reference() {
    let readme = std::fs::read_to_string(repo().join("rules/README.md")).unwrap();
    let begin = "<!-- BEGIN rules-doc -->\n";
    let start = readme.find(begin).expect("BEGIN marker") + begin.len();
    let end = readme.find("<!-- END rules-doc -->").expect("END marker");
    assert_eq!(
        &readme[start..end],
        host_api_reference(),
        "rules/README.md is out of date: regenerate the section with `nudge rules-doc`"
    );
}

#[test]
fn the_walkthrough_journey_compiles_with_the_shipped_ones() {
    let mut sources = Vec::new();
    for dir in [repo().join("rules"), repo().join("examples/journeys")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "rhai") {
                let text = std::fs::read_to_string(&path).unwrap();
                sources.push((path, text));
            }
        }
    }
    let set = load_sources(sources, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
    let card = set
        .journey("card_expiring")
        .expect("walkthrough journey loaded");
    assert_eq!(card.key_field.as_deref(), Some("card_id"));
    assert_eq!(card.steps.len(), 2);
    assert!(Path::new(&card.file).ends_with("examples/journeys/card_expiring.rhai"));
}

#[test]
fn readme_lists_every_metric_and_only_those() {
    use std::collections::BTreeSet;

    use nudge::telemetry::{catalog, metrics_reference};

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let begin = "<!-- BEGIN metrics -->\n";
    let start = readme.find(begin).expect("BEGIN metrics marker") + begin.len();
    let end = readme
        .find("<!-- END metrics -->")
        .expect("END metrics marker");
    let table = &readme[start..end];
    let listed: BTreeSet<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
        .map(|(name, _)| name)
        .collect();
    let exported: BTreeSet<&str> = catalog::ALL.iter().map(|m| m.name).collect();
    let missing: Vec<_> = exported.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&exported).collect();
    let expected = metrics_reference();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README.md's metric table has no row for {missing:?} and rows for {unknown:?}, \
         which nudge does not export; the table should read:\n{expected}"
    );
    assert_eq!(
        table, expected,
        "README.md's metric table is out of date (src/telemetry/catalog.rs); it should read:\n{expected}"
    );
}
