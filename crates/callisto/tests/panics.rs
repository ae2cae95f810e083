//! A panic reaches the log as an error, with its thread and place, and is
//! counted; the process goes on. (A file of its own: the panic hook and
//! the global subscriber are the whole process's.)

mod common;

use common::Logs;

#[test]
fn a_panic_is_logged_as_an_error_with_its_thread_and_place() {
    let logs = Logs::default();
    // Global: the panicking thread is not this one.
    tracing::subscriber::set_global_default(logs.subscriber()).unwrap();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    callisto::logging::log_panics();

    let here = line!() + 3;
    let outcome = std::thread::Builder::new()
        .name("doomed".into())
        .spawn(|| panic!("the number of the beast: {}", 666))
        .unwrap()
        .join();
    assert!(outcome.is_err(), "the thread panicked");
    let outcome = std::panic::catch_unwind(|| panic!("a plain message"));
    assert!(outcome.is_err());
    drop(std::panic::take_hook());

    let text = logs.text();
    // (RUST_BACKTRACE may add a backtrace, over many lines.)
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("panicked")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("This is a bug in Callisto"), "{line}");
    }
    assert!(
        lines[0].contains("panicked: the number of the beast: 666")
            && lines[0].contains("thread=\"doomed\"")
            && lines[0].contains(&format!("tests/panics.rs:{here}")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("panicked: a plain message"),
        "{}",
        lines[1]
    );
    let counted = metrics.render();
    assert!(counted.contains("callisto_panics_total 2"), "{counted}");
}
