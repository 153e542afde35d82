//! The whole `/metrics` exposition: the families the metrics module defines and those the
//! identity watch, the delete guard, the buffer budget and the connection counter register
//! themselves. It lives here, above all of them, so the metrics module imports none.

use crate::metrics::{
    tests::{parse, sample_metrics, EXPECTED_TYPES},
    METRIC_NAMES,
};

#[test]
fn render_has_every_metric_with_its_type_and_help() {
    let m = sample_metrics();
    // The families the identity watch and the delete guard own (and register) themselves.
    crate::identity::register_metrics(&m);
    let _guard = crate::guard::DeleteGuard::new(0.5, &m);
    let _budget = crate::source::buffer_budget::BufferBudget::new(1 << 20, &m);
    super::connections::count_connections(
        &mut mongodb::options::ClientOptions::default(),
        &mut mongodb::options::ClientOptions::default(),
        &super::connections::ConnectionCounts::default(),
        &m,
    );
    let text = m.render();
    let (types, _) = parse(&text);
    for (name, ty) in EXPECTED_TYPES {
        assert_eq!(types.get(*name).map(String::as_str), Some(*ty), "{name}");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 10),
            "{name} has no HELP text"
        );
    }
    // Nothing exported that is not listed: the constants are the whole truth.
    assert_eq!(types.len(), EXPECTED_TYPES.len(), "{:?}", types.keys());
    assert_eq!(METRIC_NAMES.len(), EXPECTED_TYPES.len());
    for name in types.keys() {
        assert!(METRIC_NAMES.contains(&name.as_str()), "{name}");
    }
}
