//! `loadgen`: the end-to-end benchmark. Drives a running topology (`deploy/up.sh`) over
//! `POST /v1/check` and prints throughput, latency, the local-decision ratio, and per limit
//! what was admitted against it. What it measures and how: `system_tests::loadgen`.

use std::process::ExitCode;

use clap::Parser;
use system_tests::loadgen::{self, Options};

fn main() -> ExitCode {
    let options = Options::parse();
    let summary = match loadgen::run(&options) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    if options.json {
        match serde_json::to_string_pretty(&summary) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("loadgen: the summary as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", summary.table());
    }
    ExitCode::SUCCESS
}
